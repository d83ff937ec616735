"""Cost of one C-ECHO as a whole process, for command-line clients side by side.

    .venv/bin/python bench/clients.py [--rounds 30] [--venv DIR]

An exec probe pays for a process start, the imports and the echo on every run,
so that is what is measured: wall time and CPU time (user + system of the
child) per run of ``echo-scp echo``, DCMTK's ``echoscu`` (as users run it, and
with ``TCP_NODELAY=1`` in its environment, which DCMTK reads to disable
Nagle's algorithm), ``python -m pynetdicom echoscu`` and ``dicom-echo``, each
as its installed program, against one daemon (``echo-scp serve``) started once
on loopback. echo-scp and pynetdicom run from ``--venv`` (default
``.venv/runtime``, the runtime dependencies only, as in the image, when it
exists), dicom-echo from this interpreter's venv (it is a test dependency).
The clients take turns round robin, so drift in the machine's load spreads
over all of them: each round is a paired run. A run counts only if it exits 0
and the daemon's count of successful C-ECHOs went up by exactly one; anything
else invalidates the sample and stops the benchmark.

Bytecode: a venv built as the image is (``deploy/runtime-venv.sh``, which
``make bench`` runs for ``.venv/runtime``) is used with its own bytecode, as
compiled at build time. In any other, an editable echo-scp, or an environment
with PYTHONDONTWRITEBYTECODE=1, would leave echo-scp to be compiled from source
on every run, so the clients get a private PYTHONPYCACHEPREFIX there. One
unmeasured warm-up round comes first; ``--as-is`` keeps the environment
unchanged and skips it.

Prints a Markdown table to stdout; exits 0, or 1 when a run failed.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import servers

REPO = Path(__file__).resolve().parent.parent
# dicom-echo is a test dependency: it is in this interpreter's venv only.
TEST_BIN = Path(sys.executable).parent
DCMTK_ECHOSCU = "/usr/bin/echoscu"
AE_TITLE = "ECHOSCP"
_SUCCESS_SAMPLE = re.compile(
    r'^echo_scp_echo_requests_total\{[^}]*status="success"[^}]*\} ([0-9.e+]+)$', re.MULTILINE
)


class BenchError(Exception):
    """A run failed or the daemon misbehaved: the measurement is invalid."""


@dataclass
class Client:
    """One command-line C-ECHO client and its measurements."""

    name: str
    argv: list[str]
    # Changes to the environment of each run; None removes the variable.
    env: dict[str, str | None] = field(default_factory=dict)
    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def successful_echoes(http_port: int) -> float:
    """The daemon's count of C-ECHOs answered with Success, over every label set."""
    status, text = http_get(http_port, "/metrics")
    if status != 200:
        raise BenchError(f"GET /metrics answered {status}")
    return sum(float(value) for value in _SUCCESS_SAMPLE.findall(text))


def start_daemon(bin_dir: Path, dicom_port: int, http_port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """``echo-scp serve`` on loopback, configured through the environment only."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ECHO_SCP_")}
    env.update(
        ECHO_SCP_HOST="127.0.0.1",
        ECHO_SCP_PORT=str(dicom_port),
        ECHO_SCP_AE_TITLE=AE_TITLE,
        ECHO_SCP_HTTP__HOST="127.0.0.1",
        ECHO_SCP_HTTP__PORT=str(http_port),
        ECHO_SCP_LOG__LEVEL="warning",
    )
    with log_path.open("wb") as log:
        daemon = subprocess.Popen(
            [str(bin_dir / "echo-scp"), "serve", "--config", str(REPO / "tests" / "empty.toml")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while http_get(http_port, "/readyz")[0] != 200:
        if daemon.poll() is not None:
            raise BenchError(f"the daemon exited with {daemon.returncode}: {log_path.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            daemon.terminate()
            raise BenchError("the daemon was not ready within 30 s")
        time.sleep(0.05)
    return daemon


def stop_daemon(daemon: subprocess.Popen[bytes]) -> None:
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(30)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()


def client_env(pycache: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def run_once(client: Client, env: Mapping[str, str], http_port: int) -> tuple[float, float]:
    """Run the client once; return (wall ms, CPU ms) or raise BenchError if the echo did not succeed."""
    before_count = successful_echoes(http_port)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    run_env = {key: value for key, value in env.items() if key not in client.env}
    run_env |= {key: value for key, value in client.env.items() if value is not None}
    done = subprocess.run(client.argv, env=run_env, capture_output=True, timeout=60, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise BenchError(
            f"{client.name} exited {done.returncode}: {done.stderr.decode(errors='replace')[-1000:]}"
        )
    gained = successful_echoes(http_port) - before_count
    if gained != 1:
        raise BenchError(f"{client.name} exited 0, but the daemon counted {gained:g} successes, not 1")
    return wall * 1000, cpu * 1000


def table(clients: Sequence[Client]) -> str:
    base_wall = statistics.median(clients[0].wall_ms)
    base_cpu = statistics.median(clients[0].cpu_ms)
    lines = [
        "| client | wall median (ms) | wall min-max (ms) | CPU median (ms) | CPU min-max (ms) "
        f"| wall vs {clients[0].name} | CPU vs {clients[0].name} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for client in clients:
        wall, cpu = statistics.median(client.wall_ms), statistics.median(client.cpu_ms)
        lines.append(
            f"| `{client.name}` | {wall:.1f} | {min(client.wall_ms):.1f}-{max(client.wall_ms):.1f} "
            f"| {cpu:.1f} | {min(client.cpu_ms):.1f}-{max(client.cpu_ms):.1f} "
            f"| {wall / base_wall:.2f}x | {cpu / base_cpu:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=30, help="measured runs of each client (default: 30)")
    parser.add_argument(
        "--as-is",
        action="store_true",
        help="run the clients with the environment unchanged (no private bytecode cache, no warm-up)",
    )
    parser.add_argument(
        "--venv",
        type=Path,
        help="virtualenv of echo-scp and pynetdicom (default: .venv/runtime when it exists, else this one)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    runtime = REPO / ".venv" / "runtime"
    venv = args.venv or (runtime if (runtime / "bin" / "echo-scp").exists() else TEST_BIN.parent)
    bin_dir = venv.absolute() / "bin"

    dicom_port, http_port = free_port(), free_port()
    address = f"127.0.0.1:{dicom_port}"
    echoscu = [DCMTK_ECHOSCU, "-aec", AE_TITLE, "127.0.0.1", f"{dicom_port}"]
    clients = [
        Client("echo-scp echo", [str(bin_dir / "echo-scp"), "echo", f"{AE_TITLE}@{address}"]),
        Client("DCMTK echoscu", echoscu, {"TCP_NODELAY": None}),
        Client("DCMTK echoscu TCP_NODELAY=1", echoscu, {"TCP_NODELAY": "1"}),
        Client(
            "python -m pynetdicom echoscu",
            [
                str(bin_dir / "python"),
                "-m",
                "pynetdicom",
                "echoscu",
                "-aec",
                AE_TITLE,
                "127.0.0.1",
                f"{dicom_port}",
            ],
        ),
        Client("dicom-echo", [str(TEST_BIN / "dicom-echo"), "-aec", AE_TITLE, address]),
    ]
    with tempfile.TemporaryDirectory(prefix="echo-scp-bench-") as scratch:
        own_bytecode = args.as_is or servers.built_as_the_image(venv)
        pycache = None if own_bytecode else Path(scratch) / "pycache"
        env = client_env(pycache)
        daemon = start_daemon(bin_dir, dicom_port, http_port, Path(scratch) / "daemon.log")
        try:
            if not args.as_is:
                for client in clients:
                    run_once(client, env, http_port)
            for _ in range(args.rounds):
                for client in clients:
                    wall, cpu = run_once(client, env, http_port)
                    client.wall_ms.append(wall)
                    client.cpu_ms.append(cpu)
        except BenchError as exc:
            print(f"bench: invalid run, no results: {exc}", file=sys.stderr)
            return 1
        finally:
            stop_daemon(daemon)

    if args.as_is:
        bytecode = "environment as-is"
    else:
        bytecode = f"bytecode: {servers.describe_bytecode(venv)}; one warm-up round"
    print(
        f"{args.rounds} rounds, clients interleaved, one C-ECHO per process to `echo-scp serve` on "
        f"127.0.0.1; Python {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs; {bytecode}; echo-scp and pynetdicom from `{venv}`. "
        "CPU = user + system time of the client process.\n"
    )
    print(table(clients))
    return 0


if __name__ == "__main__":
    sys.exit(main())
