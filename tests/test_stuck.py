"""A stuck log consumer never stops the DICOM path, and a stuck listener turns /livez off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from echo_scp import scu
from tests.conftest import associate, free_port, http_get, http_ready, make_settings, wait_for


def test_unread_stdout_pipe_drops_and_counts_log_records(tmp_path: Path) -> None:
    """With stdout a pipe nobody reads, 400 associations are served, drops counted, and /livez stays 200."""
    port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_SCP_")}
    env.update(
        ECHO_SCP_HOST="127.0.0.1",
        ECHO_SCP_PORT=str(port),
        ECHO_SCP_HTTP__HOST="127.0.0.1",
        ECHO_SCP_HTTP__PORT=str(http_port),
        ECHO_SCP_LOG__FORMAT="json",
        ECHO_SCP_LOG__QUEUE_SIZE="50",
    )
    stderr = (tmp_path / "stderr").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "echo_scp.cli",
            "serve",
            "--config",
            str(Path(__file__).parent / "empty.toml"),
        ],
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env,
    )
    try:
        wait_for(lambda: http_ready(http_port), timeout=30)
        # About 150 association lines fill a 64 KiB pipe; 400 need the queue to drop.
        for number in range(400):
            result = scu.echo_association(
                "127.0.0.1", port, called_aet="ECHOSCP", acse_timeout=5, dimse_timeout=5, network_timeout=5
            )
            assert result.ok, f"association {number} failed while stdout was not read"
        assert http_get(http_port, "/livez")[0] == 200
        _, metrics, _ = http_get(http_port, "/metrics")
        dropped = _sample(metrics, "echo_scp_log_records_dropped_total")
        assert dropped > 0
        echoes = _sample(
            metrics, "echo_scp_echo_requests_total", listener="dicom", calling_ae="other", status="success"
        )
        assert echoes == 400
        lines: list[dict[str, Any]] = []
        assert proc.stdout is not None
        stdout = proc.stdout
        reader = threading.Thread(target=lambda: lines.extend(map(json.loads, stdout)), daemon=True)
        reader.start()
        wait_for(lambda: any(line.get("event") == "log_records_dropped" for line in lines), timeout=10)
        summary = next(line for line in lines if line.get("event") == "log_records_dropped")
        assert summary["level"] == "warning" and summary["dropped"] > 0 and "timestamp" in summary
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        stderr.close()


def _sample(exposition: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} is not in /metrics")


def test_a_stuck_accept_loop_turns_liveness_off(start_service) -> None:
    """When a listener's accept loop stops answering heartbeats for stall_timeout, /livez says stalled."""
    running = start_service(make_settings(liveness={"stall_timeout": 3.0}))
    server = running.service.listeners[0].server
    release = threading.Event()
    original = server._profile

    def stuck() -> Any:
        release.wait(30)
        return original()

    # The accept loop reads the listener's snapshot for each connection: hold it there.
    server._profile = stuck
    try:
        with __import__("socket").create_connection(("127.0.0.1", running.port()), timeout=5):

            def accept_loop_stalled() -> bool:
                ok, body = running.service.liveness()
                return not ok and "accept loop unanswered" in body.get("stalled", {}).get("dicom", "")

            wait_for(accept_loop_stalled, timeout=10)
            assert http_get(running.http_port, "/livez")[0] == 503
    finally:
        server._profile = original
        release.set()
    wait_for(lambda: running.service.liveness()[0], timeout=10)


def test_stalled_association_handling_turns_liveness_off(start_service) -> None:
    """When no association is handled (the self-check gets no answer) for stall_timeout, /livez says so."""
    running = start_service(make_settings(liveness={"stall_timeout": 3.0}))
    table = running.service.table
    release = threading.Event()
    original = table.open

    def stuck(*args: Any, **kwargs: Any) -> Any:
        release.wait(30)
        return original(*args, **kwargs)

    table.open = stuck  # type: ignore[method-assign]
    try:
        wait_for(lambda: not running.service.liveness()[0], timeout=15)
        body = running.service.liveness()[1]
        assert body["status"] == "stalled" and "self-check unanswered" in body["stalled"]["dicom"]
    finally:
        table.open = original  # type: ignore[method-assign]
        release.set()
    # The next self-check that gets through brings liveness back.
    wait_for(lambda: running.service.liveness()[0], timeout=15)
    held = associate(running.port())
    assert held.is_established
    held.release()
