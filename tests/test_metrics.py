"""Metrics: a known mix of traffic gives exactly the expected values; the exposition is valid."""

from __future__ import annotations

import subprocess

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, http_get, require_tool
from tests.conftest import associate as _associate

LISTENER = "dicom"


def _traffic_mix(port: int) -> None:
    """4 released GOOD associations (4 echoes), 1 aborted ALSO (1 echo), 3 rejections."""
    for _ in range(2):
        assoc = _associate(port, "GOOD")
        assert assoc.send_c_echo().Status == 0
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    aborted = _associate(port, "ALSO")
    assert aborted.send_c_echo().Status == 0
    aborted.abort()
    assert _associate(port, "BAD").is_rejected  # 1/1/3
    assert _associate(port, "GOOD", called="WRONG").is_rejected  # 1/1/7
    held = [_associate(port, "GOOD") for _ in range(2)]
    assert _associate(port, "GOOD").is_rejected  # 2/3/2
    for assoc in held:
        assoc.release()


def test_known_traffic_mix_gives_exact_counts(start_service):
    """After a known mix of accepted, rejected, aborted and released associations, every count matches."""
    running = start_service(
        listeners=[{"allowed_calling_ae_titles": ["GOOD", "ALSO"], "max_associations": 2}]
    )
    running.wait_ready()
    _traffic_mix(running.port())
    running.wait_idle()

    def assoc(ae: str, outcome: str) -> float:
        return running.sample(
            "echo_scp_associations_total", listener=LISTENER, calling_ae=ae, outcome=outcome
        )

    assert assoc("GOOD", "accepted") == 4
    assert assoc("GOOD", "released") == 4
    assert assoc("ALSO", "accepted") == 1
    assert assoc("ALSO", "aborted") == 1
    assert assoc("other", "rejected") == 1  # BAD is not on the allow-list
    assert assoc("GOOD", "rejected") == 2  # the wrong called AE title and the limit
    assert assoc("other", "accepted") == 0

    def rejections(result: str, source: str, reason: str) -> float:
        return running.sample(
            "echo_scp_association_rejections_total",
            listener=LISTENER,
            result=result,
            source=source,
            reason=reason,
        )

    assert rejections("permanent", "service_user", "calling_ae_title_not_recognised") == 1
    assert rejections("permanent", "service_user", "called_ae_title_not_recognised") == 1
    assert rejections("transient", "service_provider_presentation", "local_limit_exceeded") == 1
    echoes = "echo_scp_echo_requests_total"
    assert running.sample(echoes, listener=LISTENER, calling_ae="GOOD", status="success") == 4
    assert running.sample(echoes, listener=LISTENER, calling_ae="ALSO", status="success") == 1
    assert running.sample("echo_scp_association_aborts_total", listener=LISTENER, source="peer") == 1
    assert running.sample("echo_scp_connections_opened_total", listener=LISTENER) == 8
    assert running.sample("echo_scp_connections_open", listener=LISTENER) == 0
    assert running.sample("echo_scp_associations_active", listener=LISTENER) == 0
    assert running.sample("echo_scp_association_duration_seconds_count", listener=LISTENER) == 5
    assert running.sample("echo_scp_echo_duration_seconds_count", listener=LISTENER) == 5
    # The readiness self-checks ran but are not peer traffic.
    assert running.sample("echo_scp_self_checks_total", listener=LISTENER, result="success") >= 1


def test_wrong_called_ae_from_unlisted_peer_is_folded_into_other(start_service):
    """A calling AE title outside the allow-list is labelled `other`, never by its own value."""
    running = start_service(listeners=[{"allowed_calling_ae_titles": ["GOOD"]}])
    assert _associate(running.port(), "ATTACKER_CHOSEN", called="WRONG").is_rejected
    running.wait_idle()
    status, text, _ = http_get(running.http_port, "/metrics")
    assert status == 200
    assert "ATTACKER_CHOSEN" not in text
    assert "127.0.0.1" not in text, "peer addresses must never be label values"


def test_series_exist_at_zero_before_traffic(start_service):
    """Every listener's label sets are exported at 0 before any peer connects."""
    running = start_service(listeners=[{"allowed_calling_ae_titles": ["GOOD"]}])
    _, text, _ = http_get(running.http_port, "/metrics")
    for line in (
        'echo_scp_associations_total{calling_ae="GOOD",listener="dicom",outcome="accepted"} 0.0',
        'echo_scp_associations_total{calling_ae="other",listener="dicom",outcome="rejected"} 0.0',
        'echo_scp_associations_total{calling_ae="other",listener="dicom",outcome="no_accepted_context"} 0.0',
        'echo_scp_connections_open{listener="dicom"} 0.0',
        'echo_scp_listener_up{listener="dicom"} 1.0',
    ):
        assert line in text, line
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"echo_scp_build_info", "process_cpu_seconds", "process_resident_memory_bytes"} <= names


def test_build_info_names_versions(start_service):
    """echo_scp_build_info names the versions of echo-scp, pynetdicom, pydicom, Python, and the engine."""
    import platform
    from importlib import metadata

    import pydicom

    from echo_scp import __version__

    running = start_service()
    labels = {
        "version": __version__,
        "pynetdicom_version": metadata.version("pynetdicom"),
        "pydicom_version": pydicom.__version__,
        "python_version": platform.python_version(),
        "engine": "event",
    }
    assert running.sample("echo_scp_build_info", **labels) == 1


def test_build_info_names_every_running_engine(start_service):
    """With one listener on each engine, echo_scp_build_info's engine label names both."""
    running = start_service(listeners=[{}, {"name": "stock", "engine": "pynetdicom"}])
    assert [listener.engine for listener in running.service.listeners] == ["event", "pynetdicom"]
    status, text, _ = http_get(running.http_port, "/metrics")
    assert status == 200
    assert 'engine="event,pynetdicom"' in text


def test_promtool_accepts_the_exposition_after_traffic(start_service):
    """`promtool check metrics` finds no problem in /metrics after real traffic."""
    promtool = require_tool("promtool")
    running = start_service(
        listeners=[{"allowed_calling_ae_titles": ["GOOD", "ALSO"], "max_associations": 2}]
    )
    _traffic_mix(running.port())
    running.wait_idle()
    status, text, _ = http_get(running.http_port, "/metrics")
    assert status == 200
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_openmetrics_when_asked(start_service):
    """An Accept header asking for OpenMetrics gets OpenMetrics, ending in # EOF."""
    running = start_service()
    status, text, headers = http_get(
        running.http_port, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    status, text, headers = http_get(running.http_port, "/metrics")
    assert headers["Content-Type"].startswith("text/plain")
    assert "# EOF" not in text


def _readme_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """The README's metric table: name -> (type, labels)."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("| metric | type | labels | meaning |") :].split("\n\n", 1)[0]
    rows: dict[str, tuple[str, frozenset[str]]] = {}
    for line in table.splitlines()[2:]:
        name, kind, labels = (cell.strip() for cell in line.strip("|").split("|")[:3])
        rows[name.strip("`")] = (
            kind,
            frozenset(label.strip(" `") for label in labels.split(",") if label.strip()),
        )
    return rows


def _exposed_metrics(exposition: str) -> dict[str, tuple[str, frozenset[str]]]:

    found: dict[str, tuple[str, frozenset[str]]] = {}
    for family in text_string_to_metric_families(exposition):
        if family.name.startswith(("process_", "python_")):
            continue
        kind = "gauge" if family.type == "info" else family.type
        name = family.name + ("_info" if family.type == "info" else "_total" if kind == "counter" else "")
        labels = frozenset(label for sample in family.samples for label in sample.labels if label != "le")
        found[name] = (kind, labels)
    return found


def test_readme_metric_table_matches_the_exposition(start_service, tls_files):
    """Every metric /metrics exports is in the README table with its type and labels, and nothing else is."""
    import ssl
    import urllib.request

    tls = {"cert_file": str(tls_files["cert"]), "key_file": str(tls_files["key"])}
    # TLS on a listener and on the HTTP endpoint, so that their TLS series exist too.
    running = start_service(listeners=[{}, {"name": "secure", "tls": tls}], http={"tls": tls})
    running.wait_ready()
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    url = f"https://127.0.0.1:{running.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        exposition = response.read().decode()
    assert _exposed_metrics(exposition) == _readme_metrics()


def test_no_created_series_and_no_tls_series_for_plain_listeners(start_service, tls_files):
    """/metrics has no _created series, and TLS series only for the TLS listener, none for plain HTTP."""
    tls = {"cert_file": str(tls_files["cert"]), "key_file": str(tls_files["key"])}
    running = start_service(listeners=[{}, {"name": "secure", "tls": tls}])
    _, exposition, _ = http_get(running.http_port, "/metrics")
    assert "_created" not in exposition
    tls_lines = [
        line for line in exposition.splitlines() if line.startswith("echo_scp_tls_handshake_failures_total{")
    ]
    assert tls_lines and all('listener="secure"' in line for line in tls_lines)
    assert "echo_scp_http_tls_handshake_failures_total{" not in exposition, "plain HTTP has no TLS series"
    # Not even the unlabelled gauge: at 0 it would read "the last load failed" and fire an alert.
    assert "\necho_scp_http_tls_certificate" not in exposition, "plain HTTP has no certificate series"
