"""A real Prometheus (Debian's) running deploy/prometheus/prometheus.yml against a running daemon.

The test's copy of the configuration changes only what a test must: compose's
addresses (echo-scp:8080, echo-scp:11112, localhost:9090) become the loopback
ports of this test's daemon and Prometheus, Prometheus scrapes and evaluates
every second, the dicom-probe job gets a TLS target (module "tls") and a
failing one next to the shipped one (the dashboard has panels for both), and
the alert rules' ``for:`` durations are cut to one second so that an alert can
be watched going pending or firing. Every Grafana dashboard's queries run as Grafana would send
them, with $__rate_interval and the template variables (resolved through
Prometheus' label API) substituted.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from echo_scp import scu
from tests.conftest import free_port, http_get, http_ready, require_tool, venv_tool, wait_for
from tests.test_deploy import DEPLOY, JOB, PROMETHEUS_CONFIG

pytestmark = [pytest.mark.slow, pytest.mark.peer, pytest.mark.timeout(180)]

SCRAPE_INTERVAL = 1
# Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval).
RATE_INTERVAL = f"{4 * SCRAPE_INTERVAL}s"
AE_TITLE = "ECHOSCP"
LABEL_VALUES = re.compile(r"label_values\((?P<selector>.*),\s*(?P<label>\w+)\s*\)")
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
PROBE_JOB = "dicom-probe"


class Daemon:
    """`echo-scp serve` on free loopback ports, with a plain and a TLS listener."""

    def __init__(self, folder: Path, tls_files: dict[str, Path]) -> None:
        self.port, self.tls_port, self.http_port = free_port(), free_port(), free_port()
        config = folder / "echo-scp.toml"
        config.write_text(
            "shutdown_grace_period = 1.0\n"
            f'[http]\nhost = "127.0.0.1"\nport = {self.http_port}\n'
            '[log]\nformat = "json"\n'
            "[readiness]\ninterval = 1.0\n"
            f'[[listeners]]\nname = "dicom"\nhost = "127.0.0.1"\nport = {self.port}\n'
            f'ae_title = "{AE_TITLE}"\n'
            f'[[listeners]]\nname = "dicom-tls"\nhost = "127.0.0.1"\nport = {self.tls_port}\n'
            f'ae_title = "{AE_TITLE}"\n'
            f'[listeners.tls]\ncert_file = "{tls_files["cert"]}"\nkey_file = "{tls_files["key"]}"\n'
            '[probe]\nallowed_targets = ["127.0.0.1/32"]\n'
            f'[probe.modules.tls.tls]\nca_file = "{tls_files["ca"]}"\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_SCP_")}
        self.log = (folder / "daemon.log").open("w")
        self.proc = subprocess.Popen(
            [venv_tool("echo-scp"), "serve", "--config", str(config)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: self.proc.poll() is not None or http_ready(self.http_port), timeout=30)
            assert self.proc.poll() is None, f"the daemon exited: {(folder / 'daemon.log').read_text()}"
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.log.close()


class Traffic:
    """Peers in a background thread: C-ECHOs, now and then an abort and a wrong called AE title."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.rounds = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.rounds += 1
            # One rejection in ten keeps the rejection ratio under the alert's 20 %.
            called = "WRONG" if self.rounds % 10 == 0 else AE_TITLE
            try:
                scu.echo_association(
                    "127.0.0.1",
                    self.port,
                    called_aet=called,
                    calling_aet="TRAFFIC",
                    repeat=3,
                    abort=self.rounds % 7 == 0,
                    acse_timeout=5,
                    dimse_timeout=5,
                    network_timeout=5,
                )
            except scu.AssociationRejected:
                pass
            except (scu.EchoError, OSError) as exc:
                self.errors.append(repr(exc))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self.errors, self.errors[:5]


class Prometheus:
    """Debian's prometheus with a test copy of the project's configuration and rules."""

    def __init__(self, executable: str, folder: Path, daemon: Daemon) -> None:
        self.port = free_port()
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"].update(
            scrape_interval=f"{SCRAPE_INTERVAL}s", evaluation_interval=f"{SCRAPE_INTERVAL}s"
        )
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        probe = jobs[PROBE_JOB]
        probe["static_configs"] += [
            {"targets": [f"{AE_TITLE}@127.0.0.1:{daemon.tls_port}"], "labels": {"__module": "tls"}},
            {"targets": [f"WRONG@127.0.0.1:{daemon.port}"]},
        ]
        # The job's params say module=default for every target; relabelling runs later and wins.
        probe["relabel_configs"].append(
            {"source_labels": ["__module"], "regex": "(.+)", "target_label": "__param_module"}
        )
        text = yaml.safe_dump(config)
        addresses = {
            "echo-scp:8080": f"127.0.0.1:{daemon.http_port}",
            "echo-scp:11112": f"127.0.0.1:{daemon.port}",
            "localhost:9090": f"127.0.0.1:{self.port}",
        }
        for compose_address, address in addresses.items():
            assert compose_address in text, f"prometheus.yml no longer names {compose_address}"
            text = text.replace(compose_address, address)
        assert "echo-scp:" not in text, f"an address this test does not rewrite:\n{text}"
        (folder / "prometheus.yml").write_text(text)
        self.rules = 0
        for pattern in config["rule_files"]:
            (folder / pattern).parent.mkdir(parents=True, exist_ok=True)
            for source in PROMETHEUS_CONFIG.parent.glob(pattern):
                groups = yaml.safe_load(source.read_text())
                for group in groups["groups"]:
                    for rule in group["rules"]:
                        self.rules += 1
                        if "for" in rule:
                            rule["for"] = f"{SCRAPE_INTERVAL}s"
                (folder / source.relative_to(PROMETHEUS_CONFIG.parent)).write_text(yaml.safe_dump(groups))
        assert self.rules, "no rule file matched rule_files"
        self.log = (folder / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                executable,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

        def ready() -> bool:
            assert self.proc.poll() is None, (folder / "prometheus.log").read_text()[-3000:]
            try:
                return http_get(self.port, "/-/ready")[0] == 200
            except OSError:
                return False

        try:
            wait_for(ready, timeout=60, interval=0.1)
        except BaseException:
            self.stop()
            raise

    def api(self, path: str, **params: str) -> Any:
        status, body, _headers = http_get(self.port, f"/api/v1/{path}?{urllib.parse.urlencode(params)}")
        reply = json.loads(body)
        assert status == 200 and reply["status"] == "success", body
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def targets(self, job: str) -> list[dict[str, Any]]:
        return [t for t in self.api("targets")["activeTargets"] if t["labels"]["job"] == job]

    def target(self) -> dict[str, Any] | None:
        targets = self.targets(JOB)
        return targets[0] if targets else None

    def rules_by_name(self) -> dict[str, dict[str, Any]]:
        return {r["name"]: r for g in self.api("rules")["groups"] for r in g["rules"]}

    def active_alerts(self) -> dict[str, str]:
        return {a["labels"]["alertname"]: a["state"] for a in self.api("alerts")["alerts"]}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        finally:
            self.log.close()


class Stack:
    """The daemon, Prometheus scraping it, and peer traffic."""

    def __init__(self, folder: Path, tls_files: dict[str, Path]) -> None:
        executable = require_tool("prometheus")
        self.daemon = Daemon(folder, tls_files)
        try:
            self.traffic = Traffic(self.daemon.port)
        except BaseException:
            self.daemon.stop()
            raise
        try:
            self.prometheus = Prometheus(executable, folder, self.daemon)
        except BaseException:
            self.traffic.stop()
            self.daemon.stop()
            raise

    def wait_scraped_and_evaluated(self) -> None:
        """Until the target is up and every rule has been evaluated at least once."""

        def done() -> bool:
            targets = self.prometheus.targets(JOB) + self.prometheus.targets(PROBE_JOB)
            rules = self.prometheus.rules_by_name()
            return (
                len(targets) == 4
                and all(t["health"] == "up" for t in targets)
                and len(rules) == self.prometheus.rules
                and all(r["health"] != "unknown" for r in rules.values())
            )

        wait_for(done, timeout=60, interval=0.2)

    def close(self) -> None:
        try:
            self.traffic.stop()
        finally:
            self.prometheus.stop()
            self.daemon.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tls_files: dict[str, Path]) -> Iterator[Stack]:
    """A scraped daemon with traffic, shared by the tests that do not stop it."""
    running = Stack(tmp_path_factory.mktemp("prometheus"), tls_files)
    try:
        running.wait_scraped_and_evaluated()
        yield running
    finally:
        running.close()


def test_echo_scp_target_is_up(stack):
    """Prometheus scrapes the echo-scp job's target, with the static config's labels."""
    target = stack.prometheus.target()
    assert target is not None and target["health"] == "up", target
    assert target["labels"]["echo_traffic_expected"] in {"true", "false"}
    (sample,) = stack.prometheus.query(f'up{{job="{JOB}"}}')
    assert sample["value"][1] == "1"


def test_every_rule_loads_and_evaluates_ok(stack):
    """Every rule of the rule files prometheus.yml names is loaded, and evaluates with health "ok"."""
    rules = stack.prometheus.rules_by_name()
    patterns = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["rule_files"]
    files = [f for pattern in patterns for f in PROMETHEUS_CONFIG.parent.glob(pattern)]
    assert len(files) >= 2, files
    groups = [g for f in files for g in yaml.safe_load(f.read_text())["groups"]]
    expected = {r.get("alert") or r.get("record") for g in groups for r in g["rules"]}
    assert set(rules) == expected
    unhealthy = {name: (r["health"], r.get("lastError")) for name, r in rules.items() if r["health"] != "ok"}
    assert not unhealthy


def _substitute(expr: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def _variables(prometheus: Prometheus, dashboard: dict[str, Any]) -> dict[str, str]:
    """Each query variable resolved as Grafana would, all values selected ("a|b")."""
    values = {"__rate_interval": RATE_INTERVAL}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = LABEL_VALUES.fullmatch(text.strip())
        assert match, f"variable {variable['name']}: unsupported query {text!r}"
        selector = _substitute(match["selector"], values)
        found = prometheus.api(f"label/{match['label']}/values", **{"match[]": selector})
        assert found, f"variable {variable['name']} ({text}) has no values"
        values[variable["name"]] = "|".join(found)
    return values


@pytest.mark.parametrize("dashboard_file", DASHBOARDS, ids=lambda path: path.name)
def test_every_dashboard_query_returns_data(stack, dashboard_file):
    """Every Grafana panel query, with $__rate_interval and the variables substituted, returns numbers."""
    dashboard = json.loads(dashboard_file.read_text())
    values = _variables(stack.prometheus, dashboard)
    queries = [
        (panel["title"], _substitute(target["expr"], values))
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    assert queries

    missing: list[str] = []

    def complete() -> bool:
        missing[:] = []
        for title, expr in queries:
            result = stack.prometheus.query(expr)
            if not result or any(math.isnan(float(sample["value"][1])) for sample in result):
                missing.append(f"{title}: {expr} -> {result}")
        return not missing

    # Rates need two scrapes of traffic inside the window.
    try:
        wait_for(complete, timeout=30, interval=0.5)
    except pytest.fail.Exception:
        pytest.fail("panel queries without data:\n" + "\n".join(missing))
    assert stack.traffic.rounds > 0


def test_listener_down_alert_goes_pending_or_firing_when_the_daemon_stops(tmp_path, tls_files):
    """EchoScpListenerDown is inactive while the daemon runs and pending or firing once it has stopped."""
    running = Stack(tmp_path, tls_files)
    try:
        running.wait_scraped_and_evaluated()
        # Before the first scrape absent(up) holds, so with a 1 s "for" it may
        # fire briefly at start; it must resolve once the target is up.
        wait_for(lambda: "EchoScpListenerDown" not in running.prometheus.active_alerts(), timeout=30)
        running.traffic.stop()
        assert running.daemon.stop() == 0
        wait_for(
            lambda: running.prometheus.active_alerts().get("EchoScpListenerDown") in {"pending", "firing"},
            timeout=30,
            interval=0.2,
        )
    finally:
        running.close()
