"""Command line: ``echo-scp serve | check-config | echo``.

Flags are views of the settings model: each names the field it sets and takes
its help text from the field's description. ``serve`` accepts pynetdicom
echoscp's options with the same names, so ``python -m pynetdicom echoscp ...``
becomes ``echo-scp serve ...``; ``check-config`` takes them too. The command
line also picks the config file (``--config``, ``$ECHO_SCP_CONFIG``, the
defaults); settings.py reads whichever file it is given. Only :func:`main`
ends the process.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from echo_scp import __version__
from echo_scp.protocol import DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN as _DEFL
from echo_scp.protocol import EXPLICIT_VR_BIG_ENDIAN as _EVBE
from echo_scp.protocol import EXPLICIT_VR_LITTLE_ENDIAN as _EVLE
from echo_scp.protocol import IMPLICIT_VR_LITTLE_ENDIAN as _IVLE

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    from echo_scp.settings import Layer, Settings

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_START = 3

# The uncompressed syntaxes in echoscp's -x=/-xe/-xb/-xi orders.
_TS_PREFERENCES = {
    "prefer_uncompr": [_EVLE, _DEFL, _EVBE, _IVLE],
    "prefer_little": [_EVLE, _IVLE, _DEFL, _EVBE],
    "prefer_big": [_EVBE, _IVLE, _EVLE, _DEFL],
    "implicit": [_IVLE],
}
# Looked up in order when neither --config nor $ECHO_SCP_CONFIG names a file.
# (argparse, json and pathlib are imported where they are used: ``echo-scp
# echo``, an exec probe started every few seconds, needs none of them here.)
DEFAULT_CONFIG_FILES = ("config/echo-scp.toml", "/etc/echo-scp/echo-scp.toml")
# (flags, settings field of the first listener, type); the last flag names the source.
_LISTENER_FLAGS: list[tuple[tuple[str, ...], str, type]] = [
    (("-aet", "--ae-title"), "ae_title", str),
    (("-ta", "--acse-timeout"), "acse_timeout", float),
    (("-td", "--dimse-timeout"), "dimse_timeout", float),
    (("-tn", "--network-timeout"), "network_timeout", float),
    (("-pdu", "--max-pdu"), "max_pdu_size", int),
    (("-ba", "--bind-address"), "host", str),
]


def _describe(model: Any, field: str) -> str:
    info = model.model_fields[field]
    return f"{info.description} (sets {field}; default {info.default!r})"


def _parser() -> argparse.ArgumentParser:
    import argparse

    from echo_scp.settings import HttpSettings, ListenerSettings, LogSettings

    parser = argparse.ArgumentParser(
        prog="echo-scp", description="DICOM Verification SCP daemon and C-ECHO client."
    )
    parser.add_argument("--version", action="version", version=f"echo-scp {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{serve,check-config,echo}")

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            metavar="FILE",
            help="TOML config file (default: $ECHO_SCP_CONFIG, "
            "then config/echo-scp.toml, then /etc/echo-scp/echo-scp.toml)",
        )

    def add_settings_flags(p: argparse.ArgumentParser) -> None:
        """serve's flags; check-config takes them too, to show what serve would run."""
        p.add_argument("port", nargs="?", type=int, help=_describe(ListenerSettings, "port"))
        for flags, field, kind in _LISTENER_FLAGS:
            p.add_argument(
                *flags, dest=field, type=kind, metavar=field.upper(), help=_describe(ListenerSettings, field)
            )
        out = p.add_mutually_exclusive_group()
        out.add_argument(
            "-q",
            "--quiet",
            dest="verbosity",
            action="store_const",
            const="critical",
            help="quiet mode: only critical messages",
        )
        out.add_argument(
            "-v",
            "--verbose",
            dest="verbosity",
            action="store_const",
            const="info",
            help="verbose mode: log level info",
        )
        out.add_argument(
            "-d",
            "--debug",
            dest="verbosity",
            action="store_const",
            const="debug",
            help="debug mode: log level debug, including pynetdicom's PDU dumps",
        )
        p.add_argument(
            "-ll",
            "--log-level",
            choices=["critical", "error", "warn", "warning", "info", "debug"],
            help=_describe(LogSettings, "level"),
        )
        p.add_argument(
            "--log-format", choices=["auto", "json", "console"], help=_describe(LogSettings, "format")
        )
        ts = p.add_mutually_exclusive_group()
        ts.add_argument(
            "-x=",
            "--prefer-uncompr",
            dest="ts",
            action="store_const",
            const="prefer_uncompr",
            help="prefer explicit VR local byte order (implicit last)",
        )
        ts.add_argument(
            "-xe",
            "--prefer-little",
            dest="ts",
            action="store_const",
            const="prefer_little",
            help="prefer explicit VR little endian",
        )
        ts.add_argument(
            "-xb",
            "--prefer-big",
            dest="ts",
            action="store_const",
            const="prefer_big",
            help="prefer explicit VR big endian",
        )
        ts.add_argument(
            "-xi",
            "--implicit",
            dest="ts",
            action="store_const",
            const="implicit",
            help="accept implicit VR little endian only",
        )
        p.add_argument("--http-port", type=int, help=_describe(HttpSettings, "port"))
        p.add_argument("--http-host", metavar="HOST", help=_describe(HttpSettings, "host"))

    serve = commands.add_parser("serve", help="run the daemon", description="Run the Verification SCP.")
    add_config(serve)
    add_settings_flags(serve)

    check = commands.add_parser(
        "check-config",
        help="validate and print the effective configuration",
        description="Validate the configuration serve would run with these flags, say which file "
        "it read, and print the result (secrets masked, transfer syntaxes by name).",
    )
    add_config(check)
    add_settings_flags(check)

    commands.add_parser("echo", help="send C-ECHO to a DICOM node (see echo-scp echo --help)", add_help=False)
    return parser


_TS_FLAGS = {
    "prefer_uncompr": "--prefer-uncompr",
    "prefer_little": "--prefer-little",
    "prefer_big": "--prefer-big",
    "implicit": "--implicit",
}
_VERBOSITY_FLAGS = {"critical": "--quiet", "info": "--verbose", "debug": "--debug"}


def _flag_layer(args: argparse.Namespace) -> Layer:
    """The settings the flags set, each naming its flag (listener flags go to the first listener)."""
    from echo_scp.settings import Layer

    items: list[tuple[tuple[int | str, ...], Any, str]] = []
    if args.port is not None:
        items.append((("listeners", 0, "port"), args.port, "the port argument"))
    for flags, field, _kind in _LISTENER_FLAGS:
        value = getattr(args, field)
        if value is not None:
            items.append((("listeners", 0, field), value, flags[-1]))
    if args.ts:
        items.append((("listeners", 0, "transfer_syntaxes"), _TS_PREFERENCES[args.ts], _TS_FLAGS[args.ts]))
    if args.log_level:
        items.append((("log", "level"), args.log_level, "--log-level"))
    elif args.verbosity:
        items.append((("log", "level"), args.verbosity, _VERBOSITY_FLAGS[args.verbosity]))
    if args.log_format:
        items.append((("log", "format"), args.log_format, "--log-format"))
    if args.http_port is not None:
        items.append((("http", "port"), args.http_port, "--http-port"))
    if args.http_host is not None:
        items.append((("http", "host"), args.http_host, "--http-host"))
    return Layer.of(items)


def find_config_file(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    """The config file to read: --config, then $ECHO_SCP_CONFIG, then the first default that exists."""
    from pathlib import Path

    from echo_scp.settings import CONFIG_ENV_VAR, ConfigError

    chosen = explicit or environ.get(CONFIG_ENV_VAR)
    if chosen:
        path = Path(chosen)
        if not path.is_file():
            source = "--config" if explicit else CONFIG_ENV_VAR
            raise ConfigError([f"{source}: config file {str(path)!r} does not exist"])
        return path
    return next((path for path in map(Path, DEFAULT_CONFIG_FILES) if path.is_file()), None)


def _load(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[Settings, Path | None]:
    """The settings from the file the flags or environment pick, the environment and the flags."""
    from echo_scp.settings import load_settings

    path = find_config_file(args.config, environ)
    return load_settings(path, environ=environ, flags=_flag_layer(args)), path


def _check_config(settings: Settings, path: Path | None) -> int:
    """Say which file was read and any warnings (on stderr); print the effective configuration as JSON."""
    import json

    from echo_scp.transfer_syntax import transfer_syntax_name

    if path is None:
        looked = ", ".join(str(p) for p in DEFAULT_CONFIG_FILES)
        print(
            f"echo-scp: no config file (none named, none at {looked}): defaults and environment only",
            file=sys.stderr,
        )
    else:
        print(f"echo-scp: config file {path.absolute()}", file=sys.stderr)
    # Valid, so exit 0, but said before it is deployed (serve logs them too).
    for warning in settings.warnings:
        print(f"echo-scp: warning: {warning}", file=sys.stderr)
    effective = settings.redacted()
    for listener in effective["listeners"]:
        # Names read better than UIDs and load back to the same UIDs.
        listener["transfer_syntaxes"] = [transfer_syntax_name(uid) for uid in listener["transfer_syntaxes"]]
    print(json.dumps(effective, indent=2))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``echo-scp`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "echo":
        # The probe client keeps its own lean parser and imports nothing of the daemon.
        from echo_scp.echo_cli import main as echo_main

        return echo_main(argv[1:])
    args = _parser().parse_args(argv or ["serve"])
    command = args.command or "serve"

    from echo_scp.settings import ConfigError

    try:
        settings, path = _load(args, os.environ)
    except ConfigError as exc:
        print("echo-scp: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if command == "check-config":
        return _check_config(settings, path)
    # A reload looks for the file again, as a restart would.
    return _serve(settings, lambda: _load(args, os.environ)[0])


def _raise_open_file_limit(wanted: int = 65536) -> None:
    """Lift the soft descriptor limit (often 1,024) toward the hard one: each peer costs one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _settle(service: Any, wait: float = 1.0) -> None:
    """Once started (and the first self-check has answered, for at most ``wait`` s): the heap at rest.

    Everything allocated so far lives as long as the process: frozen, it stays
    out of the garbage collector's generations so collections stay cheap;
    then the C heap's free pages go back to the system.
    """
    deadline = time.monotonic() + wait
    while not service.readiness()[0] and time.monotonic() < deadline:
        # A bounded wait at start: the self-check runs on the prober's thread.
        time.sleep(0.01)
    gc.collect()
    gc.freeze()
    _release_free_heap()


def _release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim), once started.

    Importing and validating at start-up (pydantic builds its validators in C
    memory, files are read whole) leaves megabytes freed but still mapped; the
    daemon then runs for months at rest on far less.
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError, TypeError):
        # The running program's own symbols, libc's among them (not ctypes.util: it may run ldconfig).
        ctypes.CDLL(None).malloc_trim(0)


def _serve(settings: Any, reloader: Any) -> int:
    from echo_scp import logs
    from echo_scp.daemon import Service, StartError, capture_signals

    control = logs.LogControl().install(settings.log)
    log = logs.make_logger()
    _raise_open_file_limit()
    # The daemon's process, so its pydicom settings (see the function).
    from echo_scp.engine import skip_pydicom_reading_validation

    skip_pydicom_reading_validation()
    try:
        service = Service(settings, log=log, reloader=reloader, log_control=control)
        try:
            service.start()
        except StartError as exc:
            log.error("start_failed", error=str(exc))
            print(f"echo-scp: {exc}", file=sys.stderr)
            return EXIT_START
        with capture_signals(service, log):
            _settle(service)
            service.serve_until_stopped()
        return EXIT_OK
    finally:
        control.restore()


if __name__ == "__main__":
    sys.exit(main())
