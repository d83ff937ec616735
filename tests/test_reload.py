"""Live reload: SIGHUP and POST /-/reload apply new settings without dropping established associations."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from echo_scp import scu
from echo_scp.settings import Settings
from tests.conftest import associate as _associate
from tests.conftest import free_port, http_get, http_ready, make_settings, wait_for


class Config:
    """A configuration that a test can change between reloads."""

    def __init__(self, **top: Any) -> None:
        self.listeners: list[dict[str, Any]] = [{}]
        self.top = top

    def load(self) -> Settings:
        return make_settings(listeners=self.listeners, **self.top)


def _post(port: int, path: str = "/-/reload") -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_reload_applies_policy_to_new_associations_only(start_service):
    """A reload changes AE title, allow-list and limit for new associations; an established one carries on."""
    config = Config()
    running = start_service(config.load(), reloader=config.load)
    established = _associate(running.port())
    assert established.is_established
    config.listeners = [
        {"port": running.port(), "ae_title": "RENAMED", "allowed_calling_ae_titles": ["NEWCOMER"]}
    ]
    status, body = _post(running.http_port)
    assert (status, body) == (200, {"status": "reloaded"})
    assert established.send_c_echo().Status == 0, "the established association is not dropped"
    established.release()
    assert _associate(running.port()).is_rejected  # old called AE title: 1/1/7
    assert _associate(running.port(), called="RENAMED").is_rejected  # ECHOSCU not allowed: 1/1/3
    fresh = _associate(running.port(), calling="NEWCOMER", called="RENAMED")
    assert fresh.is_established
    fresh.release()
    running.wait_ready()  # the self-check follows the new AE title
    assert running.sample("echo_scp_config_last_reload_successful") == 1


def test_invalid_reload_keeps_the_old_configuration(start_service):
    """An invalid new configuration is refused with its problems, logged, and the old one keeps serving."""
    config = Config()
    running = start_service(config.load(), reloader=config.load)
    config.listeners = [{"port": running.port(), "ae_title": "WAY_TOO_LONG_AE_TITLE"}]
    status, body = _post(running.http_port)
    assert status == 500
    assert body["problems"] == ["listeners[0].ae_title: AE title must be at most 16 characters (got 21)"]
    assert running.sample("echo_scp_config_last_reload_successful") == 0
    assert running.events("reload_failed")[0]["problems"] == body["problems"]
    ok = _associate(running.port())
    assert ok.is_established, "the old AE title still works"
    ok.release()
    config.listeners = [{"port": running.port()}]
    assert _post(running.http_port)[0] == 200
    assert running.sample("echo_scp_config_last_reload_successful") == 1


def test_reload_adds_and_removes_listeners(start_service):
    """Listeners added by a reload start, listeners removed stop accepting, and readiness follows."""
    config = Config()
    running = start_service(config.load(), reloader=config.load)
    first = running.port()
    config.listeners = [{"port": first}, {"name": "extra", "ae_title": "EXTRA"}]
    assert _post(running.http_port)[0] == 200
    extra = running.service.listeners[1].address[1]
    assoc = _associate(extra, called="EXTRA")
    assert assoc.is_established
    running.wait_ready()
    config.listeners = [{"name": "extra", "port": extra, "ae_title": "EXTRA"}]
    assert _post(running.http_port)[0] == 200
    assert assoc.send_c_echo().Status == 0, "removing a listener does not drop its associations"
    assoc.release()
    assert [listener.name for listener in running.service.listeners] == ["extra"]
    assert running.sample("echo_scp_listener_up", listener="dicom") == 0
    with pytest.raises(scu.ConnectFailed):
        scu.echo_association("127.0.0.1", first, called_aet="ECHOSCP", connect_timeout=2)
    running.wait_ready()


def test_reload_that_cannot_bind_changes_nothing(start_service):
    """A reload whose new listener cannot bind fails as a whole and names the address."""
    import socket

    config = Config()
    running = start_service(config.load(), reloader=config.load)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        config.listeners = [{"port": running.port(), "ae_title": "CHANGED"}, {"name": "b", "port": taken}]
        status, body = _post(running.http_port)
    assert status == 500
    assert f"127.0.0.1:{taken}" in body["problems"][0]
    ok = _associate(running.port())
    assert ok.is_established, "the first listener kept its old AE title"
    ok.release()


def test_reload_endpoint_rejects_get(start_service):
    """GET /-/reload is 405 with Allow: POST."""
    config = Config()
    running = start_service(config.load(), reloader=config.load)
    status, _, headers = http_get(running.http_port, "/-/reload")
    assert status == 405 and headers["Allow"] == "POST"


def test_certificate_rotation_without_restart(start_service, tls_files, tmp_path: Path):
    """After a reload with a new certificate, a client trusting only the new CA connects, the old CA fails."""
    import trustme

    new_ca = trustme.CA()
    new_cert = new_ca.issue_cert("localhost", "127.0.0.1")
    cert, key, ca = tmp_path / "new.pem", tmp_path / "new.key", tmp_path / "new-ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in new_cert.cert_chain_pems))
    new_cert.private_key_pem.write_to_path(str(key))
    new_ca.cert_pem.write_to_path(str(ca))
    config = Config()
    config.listeners = [{"tls": {"cert_file": str(tls_files["cert"]), "key_file": str(tls_files["key"])}}]
    running = start_service(config.load(), reloader=config.load)
    port = running.port()

    def echo(ca_file: Path) -> scu.EchoResult:
        context = scu.client_ssl_context(ca_file=str(ca_file))
        return scu.echo_association(
            "127.0.0.1", port, called_aet="ECHOSCP", ssl_context=context, acse_timeout=5
        )

    assert echo(tls_files["ca"]).ok
    with pytest.raises(scu.ConnectFailed):
        echo(ca)
    config.listeners = [{"port": port, "tls": {"cert_file": str(cert), "key_file": str(key)}}]
    assert _post(running.http_port)[0] == 200
    assert echo(ca).ok
    with pytest.raises(scu.ConnectFailed):
        echo(tls_files["ca"])
    running.wait_ready()


def test_sighup_reloads_the_config_file(tmp_path: Path):
    """SIGHUP makes the daemon re-read its config file; the new AE title answers."""
    port, http_port = free_port(), free_port()
    config = tmp_path / "echo-scp.toml"

    def write(ae_title: str) -> None:
        config.write_text(
            f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n'
            f"[readiness]\ninterval = 0.2\n"
            f'[[listeners]]\nhost = "127.0.0.1"\nport = {port}\nae_title = "{ae_title}"\n'
        )

    write("BEFORE")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("ECHO_SCP_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "echo_scp.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for(lambda: http_ready(http_port), timeout=30)
        write("AFTER")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: _echo_ok(port, "AFTER"), timeout=10)
        assert not _echo_ok(port, "BEFORE")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert any(json.loads(line)["event"] == "reload_succeeded" for line in out.splitlines())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _echo_ok(port: int, called: str) -> bool:
    try:
        return scu.echo_association("127.0.0.1", port, called_aet=called, acse_timeout=3).ok
    except scu.EchoError:
        return False


@pytest.mark.parametrize("engine", ["event", "pynetdicom"])
def test_reload_applies_transfer_syntaxes_to_new_associations(start_service, engine):
    """Transfer syntaxes changed by a reload decide the next association's negotiation, on either engine."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    config = Config()
    config.listeners = [{"engine": engine, "transfer_syntaxes": ["ImplicitVRLittleEndian"]}]
    running = start_service(config.load(), reloader=config.load)

    def explicit_only() -> Any:
        ae = AE(ae_title="ECHOSCU")
        ae.add_requested_context(Verification, ["1.2.840.10008.1.2.1"])  # Explicit VR Little Endian
        ae.acse_timeout = 5
        return ae.associate("127.0.0.1", running.port(), ae_title="ECHOSCP")

    refused = explicit_only()
    assert not refused.is_established  # no acceptable presentation context: the SCU aborts
    config.listeners = [
        {"engine": engine, "port": running.port(), "transfer_syntaxes": ["ExplicitVRLittleEndian"]}
    ]
    assert running.service.reload().complete
    accepted = explicit_only()
    assert accepted.is_established
    assert str(accepted.accepted_contexts[0].transfer_syntax[0]) == "1.2.840.10008.1.2.1"
    accepted.release()
