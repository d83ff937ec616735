"""The daemon as a process on the installed pynetdicom: DCMTK echoscu, SIGHUP reload, SIGTERM.

.ci/pynetdicom-matrix runs this file and test_contract.py against every pynetdicom 3.0.x release; the
whole suite runs on the newest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from echo_scp import seam
from tests.conftest import free_port, http_get, require_tool, wait_for

pytestmark = pytest.mark.peer


def _write_config(path: Path, *, port: int, http_port: int, ae_title: str, engine: str) -> None:
    path.write_text(
        f"""shutdown_grace_period = 2.0

[http]
host = "127.0.0.1"
port = {http_port}

[log]
format = "json"

[readiness]
interval = 0.2
timeout = 2.0
max_age = 5.0

[[listeners]]
name = "dicom"
host = "127.0.0.1"
port = {port}
ae_title = "{ae_title}"
engine = "{engine}"
"""
    )


def _metrics(http_port: int) -> str:
    status, text, _ = http_get(http_port, "/metrics")
    assert status == 200
    return text


def _samples(http_port: int) -> dict[str, list[Any]]:
    text = _metrics(http_port)
    found: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def _value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def _echoscu(echoscu: str, port: int, called: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [echoscu, "-aet", "DCMTK", "-aec", called, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("configured", ["event", "pynetdicom"])
def test_daemon_serves_echoscu_reloads_and_exits(configured, tmp_path):
    """On the installed pynetdicom the daemon answers DCMTK echoscu, names its pynetdicom version and running
    engine in build_info, applies a SIGHUP reload and exits 0 on SIGTERM."""
    echoscu = require_tool("echoscu")
    expected_engine, problems = seam.effective_engine(configured)
    port, http_port = free_port(), free_port()
    config = tmp_path / "echo-scp.toml"
    _write_config(config, port=port, http_port=http_port, ae_title="SMOKE", engine=configured)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_SCP_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "echo_scp.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"daemon exited early with {proc.returncode}: {proc.stderr.read()}")
            try:
                return http_get(http_port, "/readyz")[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout=30)
        served = _echoscu(echoscu, port, "SMOKE")
        assert served.returncode == 0, served.stderr

        (build,) = [
            line for line in _metrics(http_port).splitlines() if line.startswith("echo_scp_build_info{")
        ]
        print(f"\n{build}")  # shown by .ci/pynetdicom-matrix
        assert f'pynetdicom_version="{seam.pynetdicom_version()}"' in build
        assert f'engine="{expected_engine}"' in build
        wait_for(
            lambda: (
                _value(
                    _samples(http_port), "echo_scp_echo_requests_total", calling_ae="other", status="success"
                )
                == 1
            )
        )

        _write_config(config, port=port, http_port=http_port, ae_title="RELOADED", engine=configured)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: _echoscu(echoscu, port, "RELOADED").returncode == 0, timeout=15)
        rejected = _echoscu(echoscu, port, "SMOKE")
        assert rejected.returncode != 0
        assert "Called AE Title Not Recognized" in rejected.stderr, rejected.stderr
        assert _value(_samples(http_port), "echo_scp_config_last_reload_successful") == 1

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    events = [line["event"] for line in lines]
    (started,) = [line for line in lines if line["event"] == "listener_started"]
    assert started["engine"] == expected_engine
    assert "reload_succeeded" in events
    assert events[-1] == "shutdown_complete"
    warnings = [line for line in lines if line["event"] == "pynetdicom_contract_failed"]
    assert [w["problems"] for w in warnings] == ([problems] if problems else [])
