"""The servers under test: how to start each, time it to ready, and stop it for sure.

Every server runs as a subprocess in its own session (so its own process
group), on a free loopback port, with its output in a log file. ``Reaper``
owns them all: whatever happens in the benchmark (an exception, Ctrl-C,
SIGTERM), leaving its ``with`` block kills every process group it started.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import loadgen
import procstat

REPO = Path(__file__).resolve().parent.parent
DCMTK_STORESCP = "/usr/bin/storescp"
LOOPBACK = "127.0.0.1"
# How long a server gets to answer its first C-ECHO before the run gives up on it.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
_POLL_INTERVAL = 0.002


class ServerFailed(Exception):
    """A server did not start, or died; the message ends with the tail of its log."""


@dataclass(frozen=True)
class ServerSpec:
    """One server configuration under test."""

    name: str
    description: str
    called_aet: str
    has_readyz: bool
    python: bool  # runs from the Python servers' virtualenv (bytecode: see Reaper.warm_up)
    command: Callable[[int, Path, Path], list[str]]  # (port, work dir, venv bin dir) -> argv
    environment: Callable[[int, int], dict[str, str | None]]  # (port, http port) -> changes; None unsets


def default_venv() -> Path:
    """The virtualenv the Python servers run from: ``.venv/runtime`` when it exists, else this one.

    ``.venv/runtime`` (``make bench`` builds it) has echo-scp's runtime
    dependencies only, as the container image does; the test venv also holds
    packages that pydicom and structlog import when present (requests, rich),
    which cost the Python servers start-up time and memory the image does not pay.
    """
    runtime = REPO / ".venv" / "runtime"
    if (runtime / "bin" / "echo-scp").exists():
        return runtime
    return Path(sys.executable).parent.parent


def built_as_the_image(venv: Path) -> bool:
    """Whether ``venv`` holds echo-scp's bytecode as the image does (``deploy/runtime-venv.sh`` built it).

    Such a venv has echo-scp installed from its wheel and every module
    compiled at build time, without docstrings (``python -m echo_scp.bytecode``);
    the Python servers then run on exactly that bytecode. An editable echo-scp
    (the test venv) is not in site-packages.
    """
    return any(venv.glob("lib/python3*/site-packages/echo_scp/__pycache__/*.pyc"))


def describe_bytecode(venv: Path) -> str:
    """Which bytecode the Python programs of ``venv`` run on, for a report (see built_as_the_image)."""
    if built_as_the_image(venv):
        return "the venv's own, as the image's (deploy/runtime-venv.sh: compiled when built, no docstrings)"
    return "a private cache, compiled by a warm-up run (the venv was not built as the image)"


def _venv_bin(bin_dir: Path, name: str) -> str:
    path = bin_dir / name
    if not path.exists():
        raise ServerFailed(f"{path} not found: give --venv a virtualenv with echo-scp installed")
    return str(path)


def _echo_scp_env(port: int, http_port: int) -> dict[str, str | None]:
    return {
        "ECHO_SCP_PORT": str(port),
        "ECHO_SCP_HTTP__PORT": str(http_port),
        "ECHO_SCP_HOST": LOOPBACK,
        "ECHO_SCP_HTTP__HOST": LOOPBACK,
        "ECHO_SCP_AE_TITLE": "ECHOSCP",
        "ECHO_SCP_MAX_ASSOCIATIONS": "1000",
        "ECHO_SCP_LOG__LEVEL": "warning",
        # The idle-association windows must end well before the idle abort.
        "ECHO_SCP_NETWORK_TIMEOUT": "120",
        # Every association is closed before the stop; a short grace only bounds a stuck one.
        "ECHO_SCP_SHUTDOWN_GRACE_PERIOD": "2",
    }


SPECS: dict[str, ServerSpec] = {
    spec.name: spec
    for spec in (
        ServerSpec(
            name="echo-scp",
            description="this daemon (event engine on pynetdicom's make_server, metrics, logs, self-check)",
            called_aet="ECHOSCP",
            has_readyz=True,
            python=True,
            command=lambda port, work, bin_dir: [
                _venv_bin(bin_dir, "echo-scp"),
                "serve",
                "--config",
                str(REPO / "tests" / "empty.toml"),
            ],
            environment=_echo_scp_env,
        ),
        ServerSpec(
            name="echoscp",
            description="stock `python -m pynetdicom echoscp PORT -ba 127.0.0.1 -tn 120`",
            called_aet="ECHOSCP",
            has_readyz=False,
            python=True,
            command=lambda port, work, bin_dir: [
                _venv_bin(bin_dir, "python"),
                "-m",
                "pynetdicom",
                "echoscp",
                str(port),
                "-ba",
                LOOPBACK,
                "-tn",
                "120",
            ],
            environment=lambda port, http_port: {},
        ),
        ServerSpec(
            name="storescp-nodelay",
            description="DCMTK `storescp PORT` with TCP_NODELAY=1 in its environment",
            called_aet="ECHOSCP",
            has_readyz=False,
            command=lambda port, work, bin_dir: [DCMTK_STORESCP, "--output-directory", str(work), str(port)],
            environment=lambda port, http_port: {"TCP_NODELAY": "1"},
            python=False,
        ),
        ServerSpec(
            name="storescp",
            description="DCMTK `storescp PORT` as users run it (no TCP_NODELAY variable)",
            called_aet="ECHOSCP",
            has_readyz=False,
            command=lambda port, work, bin_dir: [DCMTK_STORESCP, "--output-directory", str(work), str(port)],
            environment=lambda port, http_port: {"TCP_NODELAY": None},
            python=False,
        ),
    )
}
BASELINE = "echoscp"


def free_port() -> int:
    """A loopback port nobody listens on right now (the server binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    """A started server process and where it listens."""

    spec: ServerSpec
    process: subprocess.Popen[bytes]
    port: int
    http_port: int
    log_path: Path
    started: float  # time.monotonic() just before the process was spawned

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> loadgen.Target:
        return loadgen.Target(LOOPBACK, self.port, self.spec.called_aet)

    def cpu_seconds(self) -> float:
        return procstat.cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return procstat.rss_bytes(self.pid)

    def threads(self) -> int:
        return procstat.thread_count(self.pid)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise ServerFailed(f"{self.spec.name} exited with status {code}:\n{self.log_tail()}")


def _environment(changes: dict[str, str | None]) -> dict[str, str]:
    # A stray ECHO_SCP_* variable in the caller's shell would change (or, being
    # unknown, reject) the daemon's configuration; start from a clean slate.
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith("ECHO_SCP_")}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class Reaper:
    """Starts servers and guarantees each one's process group is gone when the block ends."""

    def __init__(self, work_dir: Path, venv: Path | None = None) -> None:
        self.work_dir = work_dir
        #: The Python servers' virtualenv (see default_venv).
        self.venv = venv if venv is not None else default_venv()
        # Bytecode for the Python servers, as the image has it. A venv built by
        # the image's recipe has it already, and is used as it is. In any other
        # (an editable echo-scp, or a shell with PYTHONDONTWRITEBYTECODE=1)
        # echo-scp would be compiled from source at every start: a private
        # cache, filled by warm_up(), serves every server there.
        self.pycache = None if built_as_the_image(self.venv) else work_dir / "pycache"
        self._running: list[RunningServer] = []

    def __enter__(self) -> Reaper:
        return self

    def __exit__(self, *exc: object) -> None:
        for server in list(self._running):
            self.stop(server)

    def start(self, spec: ServerSpec) -> RunningServer:
        port, http_port = free_port(), free_port()
        work = self.work_dir / f"{spec.name}-{port}"
        work.mkdir(parents=True, exist_ok=True)
        log_path = work / "server.log"
        changes = spec.environment(port, http_port)
        if spec.python and self.pycache is None:
            # The venv's own bytecode: nothing redirects or rewrites it.
            changes = {**changes, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": None}
        elif spec.python:
            changes = {**changes, "PYTHONDONTWRITEBYTECODE": None, "PYTHONPYCACHEPREFIX": str(self.pycache)}
        with open(log_path, "wb") as log:
            started = time.monotonic()
            process = subprocess.Popen(
                spec.command(port, work, self.venv / "bin"),
                env=_environment(changes),
                cwd=work,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = RunningServer(spec, process, port, http_port, log_path, started)
        self._running.append(server)
        return server

    def warm_up(self, spec: ServerSpec) -> None:
        """Start and stop a Python server once, unmeasured: its bytecode cached, its files read once."""
        if not spec.python:
            return
        server = self.start(spec)
        try:
            wait_ready(server)
        finally:
            self.stop(server)

    def stop(self, server: RunningServer, timeout: float = STOP_TIMEOUT) -> dict[str, float | int | None]:
        """SIGTERM the process group, SIGKILL it after ``timeout``; returns how it went."""
        began = time.monotonic()
        pgid = server.pid  # start_new_session made the server its group's leader
        _signal_group(pgid, signal.SIGTERM)
        try:
            code: int | None = server.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        # Also catches anything the server left behind in its group.
        _signal_group(pgid, signal.SIGKILL)
        if code is None:
            code = server.process.wait(timeout=STOP_TIMEOUT)
        if server in self._running:
            self._running.remove(server)
        return {"exit_code": code, "stop_seconds": time.monotonic() - began}


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _readyz(server: RunningServer) -> bool:
    connection = http.client.HTTPConnection(LOOPBACK, server.http_port, timeout=1.0)
    try:
        connection.request("GET", "/readyz")
        response = connection.getresponse()
        # Read the body: closing with unread data sends a reset, which the
        # daemon's HTTP server reports as a traceback on stderr.
        response.read()
        return response.status == 200
    except OSError:
        return False
    finally:
        connection.close()


def wait_ready(server: RunningServer, timeout: float = START_TIMEOUT) -> dict[str, float | None]:
    """Seconds from spawn to the first successful C-ECHO and, if served, to /readyz 200.

    Both are polled every couple of milliseconds from the moment of spawn, so
    each is accurate to a few milliseconds.
    """
    echo_at: float | None = None
    readyz_at: float | None = None
    deadline = server.started + timeout
    for _ in range(int(timeout / _POLL_INTERVAL) + 1):
        server.check_alive()
        if time.monotonic() > deadline:
            raise ServerFailed(f"{server.spec.name} not ready after {timeout:g} s:\n{server.log_tail()}")
        if echo_at is None:
            try:
                loadgen.one_association(server.target, 1.0)
                echo_at = time.monotonic() - server.started
            except (OSError, loadgen.wire.WireError):
                pass
        if server.spec.has_readyz and readyz_at is None and _readyz(server):
            readyz_at = time.monotonic() - server.started
        if echo_at is not None and (readyz_at is not None or not server.spec.has_readyz):
            break
        time.sleep(_POLL_INTERVAL)
    return {"first_echo_seconds": echo_at, "readyz_seconds": readyz_at}
