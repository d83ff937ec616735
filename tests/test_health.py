"""Health endpoint: liveness, readiness transitions and the self-check."""

from __future__ import annotations

import json
import threading
import urllib.request
from typing import Any

from prometheus_client import CollectorRegistry
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from echo_scp.daemon import Service
from echo_scp.health import MAX_BODY
from tests.conftest import http_get, make_settings, wait_for


def test_liveness_and_aliases(start_service):
    """/livez and /-/healthy answer 200 with JSON while the listeners run."""
    running = start_service()
    for path in ("/livez", "/-/healthy"):
        status, body, headers = http_get(running.http_port, path)
        assert status == 200
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"status": "alive"}


def test_ready_after_self_check_and_aliases(start_service):
    """/readyz and /-/ready turn 200 once a loopback C-ECHO through every listener succeeded."""
    running = start_service(listeners=[{"name": "a"}, {"name": "b", "ae_title": "OTHER"}])
    running.wait_ready()
    for path in ("/readyz", "/-/ready"):
        status, body, _ = http_get(running.http_port, path)
        assert status == 200, body
        assert json.loads(body) == {"status": "ready"}


def test_not_ready_until_first_self_check():
    """Before its first self-check a listener is not ready, and the 503 body names it."""
    service = Service(make_settings(), registry=CollectorRegistry(), log=_quiet())
    service.prober.start = lambda: None  # hold the self-check back to observe "starting"
    service.start()
    try:
        assert service.http is not None
        status, body, _ = http_get(service.http.port, "/readyz")
        assert status == 503
        assert json.loads(body) == {"status": "not ready", "failing": {"dicom": "not checked yet"}}
        assert service.registry.get_sample_value("echo_scp_ready") == 0
        assert service.prober.check(service.listeners[0]) is True
        status, _, _ = http_get(service.http.port, "/readyz")
        assert status == 200
        assert service.registry.get_sample_value("echo_scp_ready") == 1
    finally:
        service.stop()


def test_broken_listener_makes_service_unready_and_dead(start_service):
    """When one listener stops accepting, /readyz and /livez turn 503 naming it; the other stays fine."""
    running = start_service(listeners=[{"name": "a"}, {"name": "b"}])
    running.wait_ready()
    running.service.listeners[1].stop_accepting()
    running.service.prober.check_now()

    def unready() -> dict[str, object] | None:
        status, body, _ = http_get(running.http_port, "/readyz")
        return json.loads(body) if status == 503 else None

    body = wait_for(unready)
    assert list(body["failing"]) == ["b"]
    status, body, _ = http_get(running.http_port, "/livez")
    assert status == 503
    assert json.loads(body)["listeners_not_accepting"] == ["b"]


def test_draining_turns_readiness_off(start_service):
    """During shutdown /readyz answers 503 "draining" while an association is still finishing."""
    running = start_service(shutdown_grace_period=10.0)
    running.wait_ready()
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", running.port(), ae_title="ECHOSCP")
    assert assoc.is_established
    port = running.http_port
    stopper = threading.Thread(target=running.service.stop)
    stopper.start()

    def draining() -> bool:
        status, body, _ = http_get(port, "/readyz")
        return status == 503 and json.loads(body)["status"] == "draining"

    wait_for(draining)
    status, _, _ = http_get(port, "/livez")
    assert status == 200, "draining is not death: liveness stays up"
    assert assoc.send_c_echo().Status == 0, "an established association is served while draining"
    assoc.release()
    stopper.join(timeout=10)
    assert not stopper.is_alive()


def test_self_checks_are_not_peer_traffic(start_service):
    """Self-check C-ECHOs are counted apart and leave the peer metrics at zero."""
    running = start_service()
    wait_for(lambda: running.sample("echo_scp_self_checks_total", listener="dicom", result="success") >= 3)
    assert running.sample("echo_scp_connections_opened_total", listener="dicom") == 0
    assert (
        running.sample(
            "echo_scp_associations_total", listener="dicom", calling_ae="other", outcome="accepted"
        )
        == 0
    )
    assert running.sample("echo_scp_self_check_last_success_timestamp_seconds", listener="dicom") > 0


def test_self_check_passes_allow_list_and_tls(start_service, tls_files):
    """The self-check succeeds through a mutual-TLS listener with a calling-AE allow-list."""
    tls = {
        "cert_file": str(tls_files["cert"]),
        "key_file": str(tls_files["key"]),
        "ca_file": str(tls_files["ca"]),
        "client_certificates": "required",
    }
    running = start_service(listeners=[{"tls": tls, "allowed_calling_ae_titles": ["ONLY_ME"]}])
    running.wait_ready()


def test_unknown_path_and_wrong_method():
    """Unknown paths get 404; POST on a health path gets 405 with Allow."""
    service = Service(make_settings(), registry=CollectorRegistry(), log=_quiet())
    service.start()
    try:
        assert service.http is not None
        port = service.http.port
        assert http_get(port, "/nope")[0] == 404
        request = urllib.request.Request(f"http://127.0.0.1:{port}/readyz", method="POST", data=b"")
        try:
            urllib.request.urlopen(request, timeout=5)
            raise AssertionError("POST must not succeed")
        except urllib.error.HTTPError as exc:
            with exc:
                assert exc.code == 405
                assert exc.headers["Allow"] == "GET, HEAD"
    finally:
        service.stop()


def _quiet() -> object:
    import structlog
    from structlog.testing import LogCapture

    return structlog.wrap_logger(None, processors=[LogCapture()])


def _exchange(port: int, method: str, body: bytes, then: str = "/livez") -> tuple[int, int | None]:
    """Status of a reload request with ``body``, then of GET ``then`` on that connection (None: closed)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        if len(body) > MAX_BODY:
            # Only the header: the daemon answers from Content-Length without
            # reading, and a client still sending could see its reset instead.
            conn.putrequest(method, "/-/reload")
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders()
        else:
            conn.request(method, "/-/reload", body=body, headers={"Content-Length": str(len(body))})
        first = conn.getresponse()
        first.read()
        if first.getheader("Connection", "").lower() == "close":
            return first.status, None
        conn.request("GET", then)
        second = conn.getresponse()
        second.read()
        return first.status, second.status
    finally:
        conn.close()


def test_reload_body_is_read_whole_and_connection_stays_in_step(start_service):
    """A reload with a 200 KiB body is answered, and the next request on the keep-alive connection works."""
    running = start_service(reloader=make_settings)
    assert _exchange(running.http_port, "POST", b"x" * 200_000) == (200, 200)


def test_oversized_reload_body_gets_413_and_no_reload(start_service):
    """A body over the limit gets 413 and a closed connection, and does not reload."""
    loads: list[int] = []

    def reloader() -> Any:
        loads.append(1)
        return make_settings()

    running = start_service(reloader=reloader)
    assert _exchange(running.http_port, "POST", b"x" * (2 << 20)) == (413, None)
    assert loads == []


def test_only_post_reloads(start_service):
    """PUT, DELETE and PATCH on /-/reload get 405 and do not reload; POST does."""
    loads: list[int] = []

    def reloader() -> Any:
        loads.append(1)
        return make_settings()

    running = start_service(reloader=reloader)
    for method in ("PUT", "DELETE", "PATCH"):
        assert _exchange(running.http_port, method, b"{}") == (405, 200), method
    assert loads == []
    assert _exchange(running.http_port, "POST", b"") == (200, 200)
    assert loads == [1]
