"""/probe against real peers: DCMTK storescp, the daemon itself (plain and mutual TLS), wrong AE titles,
closed ports, non-DICOM servers, and targets the allow-list keeps out."""

from __future__ import annotations

import datetime
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from echo_scp.probe import FAILURE_REASONS, PHASES, certificate_not_after
from tests.conftest import Running, http_get, make_settings, require_tool, wait_for

pytestmark = pytest.mark.timeout(60)

LOOPBACK = ["127.0.0.0/8"]


def probe(running: Running, headers: dict[str, str] | None = None, **params: str) -> tuple[int, str]:
    """GET /probe with these query parameters; (status, body)."""
    status, body, _ = http_get(running.http_port, "/probe?" + urlencode(params), headers)
    return status, body


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a text exposition, keyed by (name, labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def failure_reason(text: str) -> str | None:
    """The one reason probe_dicom_failure_reason marks, or None when it marks none."""
    marked = [r for r in FAILURE_REASONS if value(text, "probe_dicom_failure_reason", reason=r) == 1]
    assert len(marked) <= 1, marked
    return marked[0] if marked else None


def check_metrics(text: str) -> None:
    """promtool accepts the exposition (names, types, help, units)."""
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def probe_service(start_service: Callable[..., Running], **probe_settings: Any) -> Running:
    settings: dict[str, Any] = {"allowed_targets": LOOPBACK, **probe_settings}
    return start_service(probe=settings)


def peer_counts(running: Running, listener: str = "dicom") -> float:
    """Everything the daemon books as peer traffic on a listener."""
    names = [
        ("echo_scp_connections_opened_total", {}),
        ("echo_scp_associations_total", {"calling_ae": "other", "outcome": "accepted"}),
        ("echo_scp_associations_total", {"calling_ae": "other", "outcome": "rejected"}),
        ("echo_scp_echo_requests_total", {"calling_ae": "other", "status": "success"}),
    ]
    return sum(running.sample(name, listener=listener, **labels) for name, labels in names)


class RecordingServer:
    """A loopback TCP listener that records what connects and answers each connection with ``reply``.

    ``reply=None`` accepts and never answers (a dead server); the connections
    stay open until ``close()``.
    """

    def __init__(self, reply: bytes | None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.accepted: list[tuple[str, int]] = []
        self._reply = reply
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, address = self.sock.accept()
            except OSError:
                return
            self.accepted.append(address)
            self._conns.append(conn)
            if self._reply is not None:
                conn.recv(65536)
                conn.sendall(self._reply)
                conn.close()

    def close(self) -> None:
        # shutdown() wakes the accept() blocked in the serving thread; close() alone does not.
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)
        for conn in self._conns:
            conn.close()


@pytest.fixture
def tcp_server() -> Iterator[Callable[[bytes | None], RecordingServer]]:
    """Start RecordingServers; all are closed at the end of the test."""
    servers: list[RecordingServer] = []

    def start(reply: bytes | None) -> RecordingServer:
        server = RecordingServer(reply)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


# -- real peers ------------------------------------------------------------------


@pytest.mark.peer
def test_probe_of_dcmtk_storescp_succeeds(start_service, start_storescp):
    """A probe of DCMTK storescp succeeds, times each phase, names DCMTK's implementation, passes promtool."""
    port = start_storescp("--aetitle", "STORESCP")
    running = probe_service(start_service)
    status, body = probe(running, target=f"STORESCP@127.0.0.1:{port}")
    assert status == 200, body
    assert value(body, "probe_success") == 1
    assert failure_reason(body) is None
    assert value(body, "probe_dicom_association_accepted") == 1
    assert value(body, "probe_dicom_echo_status") == 0
    assert value(body, "probe_ip_protocol") == 4
    for phase in ("connect", "associate", "echo", "release"):
        assert value(body, "probe_dicom_phase_duration_seconds", phase=phase) > 0, phase
    assert value(body, "probe_dicom_phase_duration_seconds", phase="tls") == 0
    (peer,) = [labels for (name, labels) in samples(body) if name == "probe_dicom_peer_info"]
    info = dict(peer)
    assert info["implementation_version_name"].startswith("OFFIS_DCMTK")
    assert info["implementation_class_uid"].startswith("1.2.276.0.7230010.3")
    assert value(body, "probe_duration_seconds") < 5
    check_metrics(body)
    assert running.sample("echo_scp_probes_total", module="default", result="success") == 1


def test_probe_of_own_listener_is_not_peer_traffic(start_service):
    """A probe of the daemon's own listener succeeds and is counted as a probe, never as peer traffic."""
    running = probe_service(start_service)
    running.wait_ready()
    status, body = probe(running, target=f"ECHOSCP@127.0.0.1:{running.port()}")
    assert status == 200, body
    assert value(body, "probe_success") == 1
    running.wait_idle()
    assert peer_counts(running) == 0
    ended = running.events("association_ended")
    assert ended and all(event.get("self_check") for event in ended)
    assert running.sample("echo_scp_probes_total", module="default", result="success") == 1
    # The control: the same C-ECHO from a peer is booked.
    from echo_scp import scu

    assert scu.echo(f"ECHOSCP@127.0.0.1:{running.port()}") == 0
    running.wait_idle()
    assert (
        running.sample(
            "echo_scp_associations_total", listener="dicom", calling_ae="other", outcome="accepted"
        )
        == 1
    )


def test_probe_with_mutual_tls(start_service, tls_files):
    """A TLS module with a client certificate probes a mutual-TLS listener, showing TLS version and expiry."""
    tls_listener = {
        "name": "dicom-tls",
        "tls": {
            "cert_file": str(tls_files["cert"]),
            "key_file": str(tls_files["key"]),
            "ca_file": str(tls_files["ca"]),
            "client_certificates": "required",
        },
    }
    modules = {
        "tls": {
            "tls": {
                "ca_file": str(tls_files["ca"]),
                "cert_file": str(tls_files["client_cert"]),
                "key_file": str(tls_files["client_key"]),
            }
        },
        "tls-no-client-cert": {"tls": {"ca_file": str(tls_files["ca"])}},
        "tls-untrusted": {"tls": {}},
    }
    running = start_service(
        make_settings([tls_listener], probe={"allowed_targets": LOOPBACK, "modules": modules})
    )
    target = f"ECHOSCP@localhost:{running.port()}"
    status, body = probe(running, target=target, module="tls")
    assert status == 200, body
    assert value(body, "probe_success") == 1
    assert value(body, "probe_dicom_phase_duration_seconds", phase="tls") > 0
    versions = [
        dict(labels)["version"] for (name, labels) in samples(body) if name == "probe_tls_version_info"
    ]
    assert versions in (["TLS 1.2"], ["TLS 1.3"])
    leaf = x509.load_pem_x509_certificate(tls_files["cert"].read_bytes())
    assert value(body, "probe_ssl_earliest_cert_expiry") == leaf.not_valid_after_utc.timestamp()
    check_metrics(body)
    running.wait_idle()
    assert peer_counts(running, "dicom-tls") == 0

    for module in ("tls-no-client-cert", "tls-untrusted"):
        status, body = probe(running, target=target, module=module)
        assert status == 200
        assert value(body, "probe_success") == 0, module
        assert failure_reason(body) == "tls", module


def test_wrong_called_ae_title_is_a_rejection_in_words(start_service):
    """A wrong called AE title fails the probe with the rejection's result, source and reason as labels."""
    running = probe_service(start_service)
    status, body = probe(running, target=f"WRONG@127.0.0.1:{running.port()}")
    assert status == 200
    assert value(body, "probe_success") == 0
    assert failure_reason(body) == "rejected"
    assert value(body, "probe_dicom_association_accepted") == 0
    rejected = {
        "result": "permanent",
        "source": "service_user",
        "reason": "called_ae_title_not_recognised",
    }
    assert value(body, "probe_dicom_association_rejected", **rejected) == 1
    assert value(body, "probe_dicom_echo_status") is None
    check_metrics(body)
    assert running.sample("echo_scp_probes_total", module="default", result="failure") == 1


def test_closed_port_fails_fast(start_service):
    """A port nobody listens on fails at once with connect_refused, well inside the timeout."""
    running = probe_service(start_service)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        status, body = probe(running, target=f"127.0.0.1:{port}")
    assert status == 200
    assert value(body, "probe_success") == 0
    assert failure_reason(body) == "connect_refused"
    assert value(body, "probe_duration_seconds") < 1
    assert value(body, "probe_dicom_phase_duration_seconds", phase="associate") == 0


def test_http_server_is_a_protocol_failure(start_service, tcp_server):
    """A web server on the port fails the probe as a protocol error, and the debug log says it is HTTP."""
    server = tcp_server(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    running = probe_service(start_service)
    status, body = probe(running, target=f"127.0.0.1:{server.port}")
    assert status == 200
    assert value(body, "probe_success") == 0
    assert failure_reason(body) == "protocol"
    status, debug = probe(running, target=f"127.0.0.1:{server.port}", debug="true")
    assert status == 200
    assert "the peer answered in HTTP" in debug


def test_silent_server_times_out_within_the_scrape_timeout(start_service, tcp_server):
    """A port that accepts and never answers times out by Prometheus' scrape timeout minus the margin."""
    server = tcp_server(None)
    running = probe_service(start_service)
    started = time.monotonic()
    status, body = probe(
        running, {"X-Prometheus-Scrape-Timeout-Seconds": "1.5"}, target=f"127.0.0.1:{server.port}"
    )
    elapsed = time.monotonic() - started
    assert status == 200
    assert failure_reason(body) == "timeout"
    assert 0.9 < value(body, "probe_duration_seconds") < 1.4
    assert elapsed < 1.5
    assert value(body, "probe_dicom_phase_duration_seconds", phase="associate") >= 0.9


def test_module_timeout_bounds_the_whole_association(start_service, tcp_server):
    """Without a scrape timeout the module's timeout bounds the probe."""
    server = tcp_server(None)
    running = probe_service(start_service, modules={"default": {"timeout": 0.5}})
    status, body = probe(running, target=f"127.0.0.1:{server.port}")
    assert status == 200
    assert failure_reason(body) == "timeout"
    assert 0.4 < value(body, "probe_duration_seconds") < 1.0


# -- safety ----------------------------------------------------------------------


def test_probing_is_off_until_allowed_targets_is_set(start_service, tcp_server):
    """With no allowed_targets every probe is 403 and nothing is connected to."""
    server = tcp_server(None)
    running = start_service()
    status, body = probe(running, target=f"127.0.0.1:{server.port}")
    assert status == 403
    assert "probing is off: set probe.allowed_targets" in body
    assert server.accepted == []
    assert running.sample("echo_scp_probes_total", module="other", result="forbidden") == 1


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_target_outside_the_allow_list_is_403_before_connecting(start_service, tcp_server, host):
    """A target (address or name) outside allowed_targets gets 403 and no connection; allowed, it connects."""
    server = tcp_server(b"")
    outside = probe_service(start_service, allowed_targets=["10.0.0.0/8", "pacs.example.org"])
    status, body = probe(outside, target=f"{host}:{server.port}")
    assert status == 403, body
    assert "outside probe.allowed_targets" in body
    if host == "localhost":
        assert "resolves to" in body
    assert server.accepted == []
    assert outside.sample("echo_scp_probes_total", module="default", result="forbidden") == 1
    # The control: allowed by network (address) or by name, the same target is connected to.
    inside = probe_service(start_service, allowed_targets=["10.0.0.0/8", "127.0.0.1/32", "localhost"])
    status, body = probe(inside, target=f"{host}:{server.port}")
    assert status == 200
    wait_for(lambda: len(server.accepted) == 1)


def test_name_not_listed_is_not_even_resolved_without_networks(start_service):
    """With only host names allowed, another name is refused without a DNS lookup."""
    running = probe_service(start_service, allowed_targets=["pacs.example.org"])
    status, body = probe(running, target="other.invalid:104")
    assert status == 403
    assert body == "target host 'other.invalid' is not in probe.allowed_targets\n"
    events = running.events("probe_forbidden")
    assert len(events) == 1
    assert not running.events("resolved")


def test_concurrent_probes_are_capped(start_service, tcp_server):
    """Past probe.max_concurrent a probe is answered 429 while the others run."""
    server = tcp_server(None)
    running = probe_service(start_service, max_concurrent=1, modules={"default": {"timeout": 2}})
    first: list[tuple[int, str]] = []
    thread = threading.Thread(target=lambda: first.append(probe(running, target=f"127.0.0.1:{server.port}")))
    thread.start()
    wait_for(lambda: server.accepted)
    status, body = probe(running, target=f"127.0.0.1:{server.port}")
    assert status == 429
    assert body == "too many probes at once (probe.max_concurrent is 1)\n"
    thread.join(10)
    assert first and first[0][0] == 200
    assert running.sample("echo_scp_probes_total", module="default", result="throttled") == 1
    # The slot is free again.
    status, body = probe(running, target=f"ECHOSCP@127.0.0.1:{running.port()}")
    assert status == 200 and value(body, "probe_success") == 1


@pytest.mark.parametrize(
    ("params", "headers", "message"),
    [
        ({}, {}, "missing parameter 'target' ([AET@]HOST[:PORT])"),
        (
            {"target": "PACS@host:0"},
            {},
            "invalid target: port 0 out of range 1-65535 in address 'PACS@host:0'",
        ),
        ({"target": "ThisAETitleIsTooLong@host"}, {}, "invalid target: called AE title"),
        ({"target": "host", "module": "nope"}, {}, "unknown module 'nope' (configured: default)"),
        (
            {"target": "host", "modul": "default"},
            {},
            "unknown parameter 'modul'; /probe takes target, module",
        ),
        ({"target": "host", "debug": "yes"}, {}, "debug must be true or false, got 'yes'"),
        (
            {"target": "host"},
            {"X-Prometheus-Scrape-Timeout-Seconds": "soon"},
            "invalid x-prometheus-scrape-timeout-seconds header 'soon'",
        ),
    ],
)
def test_bad_requests_get_400_naming_the_problem(start_service, params, headers, message):
    """Malformed probe requests are answered 400 with one line saying what is wrong."""
    running = probe_service(start_service)
    status, body = probe(running, headers, **params)
    assert status == 400
    assert body.startswith(message)


def test_repeated_parameter_is_400(start_service):
    """A parameter given twice is refused rather than silently picking one."""
    running = probe_service(start_service)
    status, body, _ = http_get(running.http_port, "/probe?target=a&target=b")
    assert (status, body) == (400, "parameter 'target' is given 2 times\n")


def test_reload_applies_to_the_next_probe(start_service, tmp_path):
    """allowed_targets changed by a reload decide the next probe."""
    from echo_scp.settings import load_settings

    config = tmp_path / "echo-scp.toml"

    def write(targets: str) -> None:
        config.write_text(
            f'[http]\nhost = "127.0.0.1"\nport = 0\n[probe]\nallowed_targets = {targets}\n'
            '[[listeners]]\nhost = "127.0.0.1"\nport = 0\n'
        )

    write('["10.0.0.0/8"]')
    running = start_service(
        load_settings(config, environ={}), reloader=lambda: load_settings(config, environ={})
    )
    target = f"ECHOSCP@127.0.0.1:{running.port()}"
    assert probe(running, target=target)[0] == 403
    write('["127.0.0.1"]')
    assert running.service.reload().complete
    status, body = probe(running, target=target)
    assert status == 200 and value(body, "probe_success") == 1


# -- debug and output -----------------------------------------------------------


def test_debug_shows_the_log_metrics_and_module_without_secrets(start_service, tls_files, tmp_path):
    """debug=true returns the probe's log, the metrics it would return and the module, password masked."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(tls_files["client_key"].read_bytes(), password=None)
    encrypted_key = tmp_path / "client-encrypted.key"
    encrypted_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    modules = {
        "tls": {
            "tls": {
                "ca_file": str(tls_files["ca"]),
                "cert_file": str(tls_files["client_cert"]),
                "key_file": str(encrypted_key),
                "key_password": "secret",
            }
        }
    }
    running = probe_service(start_service, modules=modules)
    status, text = probe(running, target=f"ECHOSCP@127.0.0.1:{running.port()}", debug="true")
    assert status == 200
    logs, _, rest = text.partition("\n\nMetrics that would have been returned:\n")
    metrics, _, module = rest.partition("\nModule configuration (default):\n")
    assert logs.startswith("Logs for the probe:\nevent=probe_started target=ECHOSCP@127.0.0.1:")
    for event in ("resolved", "connected", "association_accepted", "c_echo", "association_released"):
        assert f"event={event} " in logs, event
    assert "event=probe_succeeded" in logs
    assert value(metrics, "probe_success") == 1
    assert '"calling_ae_title": "ECHO_SCP_PROBE"' in module
    status, text = probe(running, target=f"ECHOSCP@127.0.0.1:{running.port()}", module="tls", debug="true")
    assert "secret" not in text and '"key_password": "**********"' in text


def test_openmetrics_when_prometheus_asks(start_service):
    """With Prometheus' Accept header the probe answers in OpenMetrics, ending in # EOF."""
    running = probe_service(start_service)
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    status, body, headers = http_get(
        running.http_port, f"/probe?target=ECHOSCP@127.0.0.1:{running.port()}", {"Accept": accept}
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    assert "probe_success 1.0" in body


def test_every_phase_and_reason_series_exists_on_failure_too(start_service):
    """A failed probe still carries every phase and failure-reason series, so queries never miss one."""
    running = probe_service(start_service)
    status, body = probe(running, target="127.0.0.1:1")
    assert status == 200
    found = samples(body)
    for phase in PHASES:
        assert ("probe_dicom_phase_duration_seconds", frozenset({("phase", phase)})) in found
    for reason in FAILURE_REASONS:
        assert ("probe_dicom_failure_reason", frozenset({("reason", reason)})) in found
    check_metrics(body)


def test_certificate_expiry_is_read_from_der(tls_files):
    """certificate_not_after reads notAfter from DER as cryptography does, and None from garbage."""
    for name in ("cert", "client_cert"):
        cert = x509.load_pem_x509_certificate(Path(tls_files[name]).read_bytes())
        from cryptography.hazmat.primitives.serialization import Encoding

        assert certificate_not_after(cert.public_bytes(Encoding.DER)) == cert.not_valid_after_utc.timestamp()
    assert certificate_not_after(b"\x30\x03\x02\x01\x01") is None
    assert certificate_not_after(b"") is None
    # A two-digit UTCTime year of 49 is 2049, not 1949 (RFC 5280 4.1.2.5.1).
    assert (
        datetime.datetime.fromtimestamp(
            certificate_not_after(_with_utctime(b"491231235959Z")) or 0, datetime.UTC
        ).year
        == 2049
    )


def _with_utctime(not_after: bytes) -> bytes:
    """The smallest DER that certificate_not_after walks: a certificate whose notAfter is ``not_after``."""

    def tlv(tag: int, content: bytes) -> bytes:
        return bytes((tag, len(content))) + content

    validity = tlv(0x30, tlv(0x17, b"200101000000Z") + tlv(0x17, not_after))
    tbs = tlv(0x30, tlv(0x02, b"\x01") + tlv(0x30, b"") + tlv(0x30, b"") + validity)
    return tlv(0x30, tbs)
