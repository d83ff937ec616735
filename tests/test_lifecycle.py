"""The daemon as a process: JSON logs, SIGTERM with open associations, exit codes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests import wire
from tests.conftest import REPO, associate, free_port, http_get, wait_for

EMPTY = REPO / "tests" / "empty.toml"


class Daemon:
    """An `echo-scp serve` child process on free loopback ports."""

    def __init__(self, proc: subprocess.Popen[str], port: int, http_port: int) -> None:
        self.proc = proc
        self.port = port
        self.http_port = http_port

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited early with {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                return http_get(self.http_port, "/readyz")[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout=30)

    def finish(self, timeout: float) -> tuple[int, list[dict[str, Any]], str]:
        """Wait for exit; return (code, JSON log lines, stderr)."""
        out, err = self.proc.communicate(timeout=timeout)
        lines = [json.loads(line) for line in out.splitlines() if line.strip()]
        return self.proc.returncode, lines, err


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_SCP_")}
    env.update(extra)
    return env


def _spawn(port: int, http_port: int, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "echo_scp.cli", "serve", "--config", str(EMPTY), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(
            ECHO_SCP_HOST="127.0.0.1",
            ECHO_SCP_PORT=str(port),
            ECHO_SCP_HTTP__HOST="127.0.0.1",
            ECHO_SCP_HTTP__PORT=str(http_port),
            ECHO_SCP_READINESS__INTERVAL="0.2",
            **env,
        ),
    )


@pytest.fixture
def daemon() -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, **env: str) -> Daemon:
        port, http_port = free_port(), free_port()
        proc = _spawn(port, http_port, *args, **env)
        procs.append(proc)
        return Daemon(proc, port, http_port)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _associate(port: int) -> Any:
    assoc = associate(port)
    assert assoc.is_established
    return assoc


def test_sigterm_lets_open_association_finish(daemon):
    """SIGTERM during an open association: the association completes within the grace period, exit 0."""
    proc = daemon(ECHO_SCP_SHUTDOWN_GRACE_PERIOD="10")
    proc.wait_ready()
    assoc = _associate(proc.port)
    proc.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: http_get(proc.http_port, "/readyz")[0] == 503)
    # New connections are refused once the listener stops accepting.
    wait_for(lambda: not _accepts(proc.port))
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    code, lines, err = proc.finish(timeout=15)
    assert code == 0, err
    events = [line["event"] for line in lines]
    assert events.index("shutdown_started") < events.index("shutdown_complete")
    ended = [line for line in lines if line["event"] == "association_ended"]
    assert [(e["outcome"], e["echoes"]) for e in ended] == [("released", 1)]
    assert lines[-1]["event"] == "shutdown_complete" and lines[-1]["aborted"] == 0


def test_sigterm_aborts_associations_left_after_grace(daemon):
    """An association still open when the grace period ends receives an A-ABORT; the exit is 0."""
    proc = daemon(ECHO_SCP_SHUTDOWN_GRACE_PERIOD="1")
    proc.wait_ready()
    assoc = _associate(proc.port)
    started = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    code, lines, err = proc.finish(timeout=15)
    assert code == 0, err
    assert time.monotonic() - started < 6
    wait_for(lambda: assoc.is_aborted, timeout=5)
    ended = [line for line in lines if line["event"] == "association_ended"]
    assert ended and ended[0]["outcome"] == "aborted" and ended[0]["abort_source"] == "local"
    assert lines[-1]["aborted"] == 1


def test_second_signal_forces_exit(daemon):
    """A second SIGTERM during the grace period exits at once with status 130."""
    proc = daemon(ECHO_SCP_SHUTDOWN_GRACE_PERIOD="60")
    proc.wait_ready()
    assoc = _associate(proc.port)
    proc.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: http_get(proc.http_port, "/readyz")[0] == 503)
    proc.proc.send_signal(signal.SIGTERM)
    code, lines, _ = proc.finish(timeout=10)
    assert code == 130
    (forced,) = [line for line in lines if line["event"] == "forced_exit"]
    assert forced["level"] == "error" and forced["signal"] == "SIGTERM"
    assert forced["timestamp"].endswith("Z"), "every line has a timestamp, this one too"
    assert all("timestamp" in line for line in lines)
    assoc.abort()


def test_sigint_is_a_clean_shutdown(daemon):
    """SIGINT (Ctrl-C) shuts down like SIGTERM and exits 0."""
    proc = daemon()
    proc.wait_ready()
    proc.proc.send_signal(signal.SIGINT)
    code, lines, err = proc.finish(timeout=15)
    assert code == 0, err
    assert lines[-1]["event"] == "shutdown_complete"


def test_port_in_use_exits_3_naming_the_address(daemon):
    """A DICOM port already in use makes the daemon exit 3 with the address in the message."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        proc = _spawn(port, free_port())
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert f"127.0.0.1:{port}" in err
    assert "start_failed" in out


def test_http_port_in_use_exits_3_and_frees_the_dicom_port(daemon):
    """An HTTP port in use exits 3 naming it, and the DICOM listener it had bound is released."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        http_port = squatter.getsockname()[1]
        dicom_port = free_port()
        proc = _spawn(dicom_port, http_port)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert f"127.0.0.1:{http_port}" in err
    with socket.socket() as again:
        again.bind(("127.0.0.1", dicom_port))


def test_bad_config_exits_2_with_field_path(tmp_path: Path):
    """An invalid configuration exits 2 and names the field, before anything binds."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[[listeners]]\nae_title = "THIS_IS_FAR_TOO_LONG"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "echo_scp.cli", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(),
    )
    assert proc.returncode == 2
    assert "listeners[0].ae_title: AE title must be at most 16 characters (got 20)" in proc.stderr


def test_echoscp_compatible_flags(daemon):
    """echoscp's flags work: positional port, -aet, -xi, -ll debug with pynetdicom's records as JSON."""
    port = free_port()
    proc = daemon(str(port), "-aet", "COMPAT", "-xi", "-ll", "debug", "--http-port", "0")
    proc.port = port
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)

    def listening() -> bool:
        if proc.proc.poll() is not None:
            pytest.fail(proc.proc.stderr.read())
        return _accepts(port)

    # Wait with a plain socket: pynetdicom leaks its socket on a refused connect.
    wait_for(listening, timeout=30)
    assoc = ae.associate("127.0.0.1", port, ae_title="COMPAT")
    assert assoc.is_established
    assert str(assoc.accepted_contexts[0].transfer_syntax[0]) == wire.IMPLICIT_LE  # -xi
    assoc.release()
    proc.proc.send_signal(signal.SIGTERM)
    code, lines, err = proc.finish(timeout=15)
    assert code == 0, err
    assert any(line.get("logger", "").startswith("pynetdicom") for line in lines)
    assert any(line["event"] == "c_echo" for line in lines)


def test_sigterm_during_a_flood(daemon):
    """SIGTERM under load: every C-ECHO already requested is answered; others are refused, never hang."""
    import threading

    from echo_scp import scu

    proc = daemon(ECHO_SCP_SHUTDOWN_GRACE_PERIOD="10", ECHO_SCP_MAX_ASSOCIATIONS="200")
    proc.wait_ready()
    stop = threading.Event()
    outcomes: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            try:
                result = scu.echo_association(
                    "127.0.0.1", proc.port, called_aet="ECHOSCP", repeat=3, acse_timeout=15, dimse_timeout=15
                )
                kind = "ok" if result.ok else "bad_status"
            except (scu.ConnectFailed, scu.AssociationAborted) as exc:
                # Refused or aborted: the answers allowed after SIGTERM.
                kind = f"refused:{type(exc).__name__}"
            except scu.AssociationRejected as exc:
                # Waiting in the listen backlog when the listener closed: 2/3/1, "try again".
                triple = (exc.result, exc.source, exc.reason)
                kind = "refused:congestion" if triple == (2, 3, 1) else f"other:rejected:{triple}"
            except scu.ProtocolError as exc:
                # Connected in the kernel's backlog an instant before the listening
                # socket closed: reset before any DICOM answer, i.e. refused.
                before_answer = "reset" in str(exc) and "A-ASSOCIATE response" in str(exc)
                kind = "refused:reset_in_backlog" if before_answer else f"other:ProtocolError:{exc}"
            except scu.EchoError as exc:
                kind = f"other:{type(exc).__name__}:{exc}"
            with lock:
                outcomes.append(kind)
            if kind != "ok":
                return

    threads = [threading.Thread(target=client) for _ in range(16)]
    for thread in threads:
        thread.start()
    wait_for(lambda: outcomes.count("ok") >= 50, timeout=30)
    started = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    code, lines, err = proc.finish(timeout=30)
    elapsed = time.monotonic() - started
    stop.set()
    for thread in threads:
        thread.join(timeout=20)
        assert not thread.is_alive(), "a client hung after SIGTERM"
    assert code == 0, err
    assert elapsed < 10 + 5, f"shutdown took {elapsed:.1f} s"
    failures = [o for o in outcomes if o != "ok" and not o.startswith("refused:")]
    assert failures == [], failures
    ended = [line for line in lines if line["event"] == "association_ended"]
    # No association that was accepted lost its C-ECHOs: each ended released with all three.
    accepted = [e for e in ended if e["outcome"] in ("released", "aborted")]
    assert all(e["outcome"] == "released" and e["echoes"] == 3 for e in accepted), [
        e for e in accepted if e["outcome"] != "released" or e["echoes"] != 3
    ][:3]
