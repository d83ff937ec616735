"""Command line: ``echo-scp serve | check-config | echo``.

Flags are views of the settings model: each names the field it sets and takes
its help text from the field's description. ``serve`` accepts pynetdicom
echoscp's options with the same names, so ``python -m pynetdicom echoscp ...``
becomes ``echo-scp serve ...``. Only :func:`main` ends the process.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Sequence
from typing import Any

from echo_scp import __version__

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_START = 3

# The uncompressed syntaxes in echoscp's -x=/-xe/-xb/-xi orders.
_IVLE, _EVLE, _DEFL, _EVBE = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
)
_TS_PREFERENCES = {
    "prefer_uncompr": [_EVLE, _DEFL, _EVBE, _IVLE],
    "prefer_little": [_EVLE, _IVLE, _DEFL, _EVBE],
    "prefer_big": [_EVBE, _IVLE, _EVLE, _DEFL],
    "implicit": [_IVLE],
}
# (flags, settings field of the first listener, type)
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

    serve = commands.add_parser("serve", help="run the daemon", description="Run the Verification SCP.")
    add_config(serve)
    serve.add_argument("port", nargs="?", type=int, help=_describe(ListenerSettings, "port"))
    for flags, field, kind in _LISTENER_FLAGS:
        serve.add_argument(
            *flags, dest=field, type=kind, metavar=field.upper(), help=_describe(ListenerSettings, field)
        )
    out = serve.add_mutually_exclusive_group()
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
    serve.add_argument(
        "-ll",
        "--log-level",
        choices=["critical", "error", "warn", "warning", "info", "debug"],
        help=_describe(LogSettings, "level"),
    )
    serve.add_argument(
        "--log-format", choices=["auto", "json", "console"], help=_describe(LogSettings, "format")
    )
    ts = serve.add_mutually_exclusive_group()
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
    serve.add_argument("--http-port", type=int, help=_describe(HttpSettings, "port"))
    serve.add_argument("--http-host", metavar="HOST", help=_describe(HttpSettings, "host"))

    check = commands.add_parser("check-config", help="validate and print the effective configuration")
    add_config(check)

    commands.add_parser("echo", help="send C-ECHO to a DICOM node (see echo-scp echo --help)", add_help=False)
    return parser


def _overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(top-level overrides, first-listener overrides) from serve's flags."""
    top: dict[str, Any] = {}
    first: dict[str, Any] = {}
    if getattr(args, "port", None) is not None:
        first["port"] = args.port
    for _flags, field, _kind in _LISTENER_FLAGS:
        value = getattr(args, field, None)
        if value is not None:
            first[field] = value
    if getattr(args, "ts", None):
        first["transfer_syntaxes"] = _TS_PREFERENCES[args.ts]
    log: dict[str, Any] = {}
    level = getattr(args, "log_level", None) or getattr(args, "verbosity", None)
    if level:
        log["level"] = level
    if getattr(args, "log_format", None):
        log["format"] = args.log_format
    if log:
        top["log"] = log
    http: dict[str, Any] = {}
    if getattr(args, "http_port", None) is not None:
        http["port"] = args.http_port
    if getattr(args, "http_host", None) is not None:
        http["host"] = args.http_host
    if http:
        top["http"] = http
    return top, first


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``echo-scp`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "echo":
        # The probe client keeps its own lean parser and imports nothing of the daemon.
        from echo_scp.echo_cli import main as echo_main

        return echo_main(argv[1:])
    args = _parser().parse_args(argv or ["serve"])
    command = args.command or "serve"

    from echo_scp.settings import ConfigError, load_settings

    top, first = _overrides(args)
    try:
        settings = load_settings(args.config, overrides=top, first_listener=first)
    except ConfigError as exc:
        print("echo-scp: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if command == "check-config":
        print(json.dumps(settings.redacted(), indent=2))
        return EXIT_OK
    return _serve(settings, lambda: load_settings(args.config, overrides=top, first_listener=first))


def _raise_open_file_limit(wanted: int = 65536) -> None:
    """Lift the soft descriptor limit (often 1,024) toward the hard one: each peer costs one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _serve(settings: Any, reloader: Any) -> int:
    from echo_scp import logs
    from echo_scp.daemon import Service, StartError, capture_signals

    control = logs.LogControl().install(settings.log)
    log = logs.make_logger()
    _raise_open_file_limit()
    try:
        service = Service(settings, log=log, reloader=reloader, log_control=control)
        try:
            service.start()
        except StartError as exc:
            log.error("start_failed", error=str(exc))
            print(f"echo-scp: {exc}", file=sys.stderr)
            return EXIT_START
        # Everything allocated so far lives as long as the process: keep it out
        # of the garbage collector's generations so collections stay cheap.
        gc.freeze()
        with capture_signals(service, log):
            service.serve_until_stopped()
        return EXIT_OK
    finally:
        control.restore()


if __name__ == "__main__":
    sys.exit(main())
