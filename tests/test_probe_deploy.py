"""The /probe deployment artefacts against the real tools and a running daemon.

The dicom-probe scrape job, its alert rules and their promtool unit tests, the
"DICOM nodes" Grafana dashboard and the README's copy-paste scrape config; and
a real Prometheus server (Debian's package) scraping /probe through the
shipped relabelling for DCMTK storescp and for a wrong AE title.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from echo_scp.health import PROBE_PATH
from tests.conftest import REPO, free_port, http_get, make_settings, require_tool, wait_for
from tests.test_deploy import check_dashboard_layout

pytestmark = pytest.mark.timeout(120)

DEPLOY = REPO / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules" / "dicom-probe.rules.yml"
RULES_TESTS = DEPLOY / "prometheus" / "rules" / "dicom-probe.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dicom-probe.json"
JOB = "dicom-probe"
PROBE_NAME = re.compile(r"\b(probe_[a-z_]+)\b")


def shipped_job() -> dict[str, Any]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    return dict(job)


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every probe alert rule and dashboard query."""
    found = [
        (f"rule {rule['alert']}", rule["expr"])
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    ]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append((f"variable {variable['name']}", variable["query"]["query"]))
    return found


def readme_scrape_config() -> dict[str, Any]:
    """The scrape job in the README's "Monitoring other DICOM nodes" section."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Monitoring other DICOM nodes") :]
    section = section[: section.index("\n## ", 1)]
    block = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert block, "no yaml block in the README section"
    config = yaml.safe_load(block.group(1))
    (job,) = config["scrape_configs"]
    return dict(job)


# -- rules and dashboard ----------------------------------------------------------


def test_every_probe_alert_has_firing_and_silent_unit_tests():
    """Each probe alert has a promtool case where it fires and one where it must not."""
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert alerts == {"DicomNodeEchoFailing", "DicomProbeNotRunning", "DicomNodeCertificateExpiresSoon"}
    firing: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULES_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert firing == alerts and silent == alerts


def test_rules_and_dashboard_use_metrics_that_probe_returns(start_service, tls_files):
    """Every probe_* name in the rules and the dashboard is one that /probe returns (plain, TLS, failed)."""
    tls_listener = {
        "name": "dicom-tls",
        "tls": {"cert_file": str(tls_files["cert"]), "key_file": str(tls_files["key"])},
    }
    modules = {"tls": {"tls": {"ca_file": str(tls_files["ca"])}}}
    running = start_service(
        make_settings([{}, tls_listener], probe={"allowed_targets": ["127.0.0.0/8"], "modules": modules})
    )
    exported: set[str] = set()
    for target, module in (
        (f"ECHOSCP@localhost:{running.port(1)}", "tls"),
        (f"ECHOSCP@127.0.0.1:{running.port(0)}", "default"),
        (f"WRONG@127.0.0.1:{running.port(0)}", "default"),
    ):
        status, body, _ = http_get(
            running.http_port, f"{PROBE_PATH}?{urlencode({'target': target, 'module': module})}"
        )
        assert status == 200, body
        exported |= {s.name for family in text_string_to_metric_families(body) for s in family.samples}
    problems = []
    seen = set()
    for where, expr in expressions():
        for name in PROBE_NAME.findall(expr):
            seen.add(name)
            if name not in exported:
                problems.append(f"{where}: {name} is not returned by /probe")
        for selector in re.findall(r"\b[a-z_]+\{([^}]*)\}", expr):
            assert 'job="dicom-probe"' in selector or "$job" in selector, f"{where}: {selector}"
    assert not problems, "\n".join(problems)
    assert {"probe_success", "probe_ssl_earliest_cert_expiry", "probe_dicom_peer_info"} <= seen


def test_probe_dashboard_is_consistent_and_provisioned():
    """The dashboard has unique ids, no overlapping panels, its data source variable, and is provisioned."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "dicom-probe"
    panels = dashboard["panels"]
    check_dashboard_layout(panels)
    titles = " ".join(panel["title"].lower() for panel in panels)
    for topic in ("success", "failure reason", "rejection", "phase", "inventory", "certificate"):
        assert topic in titles, f"no panel about {topic}"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/echo-scp.yml").read_text())
    (path,) = [p["options"]["path"] for p in provider["providers"]]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == path  # the whole folder, this file included


# -- scrape config ---------------------------------------------------------------


def test_scrape_job_relabels_the_blackbox_way():
    """The shipped job sends __address__ as ?target=, keeps it as instance and scrapes echo-scp's /probe."""
    job = shipped_job()
    assert job["metrics_path"] == PROBE_PATH
    assert job["params"] == {"module": ["default"]}
    assert job["relabel_configs"][:2] == [
        {"source_labels": ["__address__"], "target_label": "__param_target"},
        {"source_labels": ["__param_target"], "target_label": "instance"},
    ]
    last = job["relabel_configs"][2]
    assert last["target_label"] == "__address__" and last["replacement"] == "echo-scp:8080"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    allowed = json.loads(compose["services"]["echo-scp"]["environment"]["ECHO_SCP_PROBE__ALLOWED_TARGETS"])
    for static in job["static_configs"]:
        for target in static["targets"]:
            host = target.rpartition("@")[2].rpartition(":")[0]
            assert host in allowed, f"{target} is not allowed by the compose echo-scp"


def test_readme_scrape_config_is_the_shipped_one(tmp_path):
    """The README's copy-paste job is valid for promtool and relabels exactly as the shipped job does."""
    job = readme_scrape_config()
    shipped = shipped_job()
    for key in ("job_name", "metrics_path", "params"):
        assert job[key] == shipped[key], key
    assert job["relabel_configs"][:2] == shipped["relabel_configs"][:2]
    assert job["relabel_configs"][2]["target_label"] == "__address__"
    promtool = require_tool("promtool")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"scrape_configs": [job]}))
    result = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- a real Prometheus --------------------------------------------------------------


def _api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.mark.peer
def test_real_prometheus_stores_probe_success_for_storescp_and_a_wrong_ae_title(
    start_service, start_storescp, tmp_path: Path
):
    """Prometheus scrapes /probe through the shipped relabelling: storescp stores 1, a wrong AE title 0."""
    prometheus = require_tool("prometheus")
    scp_port = start_storescp("--aetitle", "STORESCP")
    running = start_service(probe={"allowed_targets": ["127.0.0.1/32"]})
    # storescp answers whatever AE title it is called by; the daemon's own
    # listener checks it (1/1/7), so the wrong AE title goes there.
    good, wrong = f"STORESCP@127.0.0.1:{scp_port}", f"WRONG@127.0.0.1:{running.port()}"
    job = shipped_job()
    job["scrape_interval"] = job["scrape_timeout"] = "2s"
    job["static_configs"] = [{"targets": [good, wrong]}]
    # Only where echo-scp listens changes; the relabelling is the shipped one.
    job["relabel_configs"][2]["replacement"] = f"127.0.0.1:{running.http_port}"
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [job],
            }
        )
    )
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: process.poll() is not None or _ready(port), timeout=30)
        assert process.poll() is None, log.read_text()

        def stored() -> dict[str, str] | None:
            result = _api(port, "/api/v1/query", query=f'probe_success{{job="{JOB}"}}')["result"]
            values = {sample["metric"]["instance"]: sample["value"][1] for sample in result}
            return values if len(values) == 2 else None

        assert wait_for(stored, timeout=30) == {good: "1", wrong: "0"}
        reason = _api(port, "/api/v1/query", query=f'probe_dicom_failure_reason{{instance="{wrong}"}} == 1')
        assert [s["metric"]["reason"] for s in reason["result"]] == ["rejected"]
        up = _api(port, "/api/v1/query", query=f'up{{job="{JOB}"}}')["result"]
        assert {s["metric"]["instance"]: s["value"][1] for s in up} == {good: "1", wrong: "1"}

        def pending() -> list[dict[str, Any]]:
            alerts = _api(port, "/api/v1/alerts")["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "DicomNodeEchoFailing"]

        (alert,) = wait_for(pending, timeout=30)
        assert alert["labels"]["instance"] == wrong and alert["state"] == "pending"
        assert "(reason: rejected)" in alert["annotations"]["description"]
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert running.sample("echo_scp_probes_total", module="default", result="success") >= 1
    assert running.sample("echo_scp_probes_total", module="default", result="failure") >= 1
