"""Real DICOM peers against a running daemon: pynetdicom, DCMTK and dicom-echo."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from tests.conftest import associate as _associate
from tests.conftest import make_settings, require_tool, skip_unless_ci, venv_tool, wait_for


def _reject_triple(assoc: Any) -> tuple[int, int, int]:
    rsp = assoc.acceptor.primitive
    return (rsp.result, rsp.result_source, rsp.diagnostic)


def test_pynetdicom_scu_echo_succeeds(start_service):
    """An in-process pynetdicom SCU gets Success and the association is released cleanly."""
    running = start_service()
    assoc = _associate(running.port())
    assert assoc.is_established
    status = assoc.send_c_echo(msg_id=7)
    assert status.Status == 0x0000
    assoc.release()
    running.wait_idle()
    ended = running.events("association_ended")
    assert [e["outcome"] for e in ended if not e.get("self_check")] == ["released"]


def test_called_ae_title_rejected_1_1_7(start_service):
    """A wrong called AE title is rejected permanent / service-user / called AE not recognised."""
    running = start_service()
    assoc = _associate(running.port(), called="NOT_ME")
    assert assoc.is_rejected
    assert _reject_triple(assoc) == (1, 1, 7)


def test_calling_ae_title_rejected_1_1_3(start_service):
    """A calling AE title outside the allow-list is rejected 1/1/3; an allowed one is accepted."""
    running = start_service(listeners=[{"allowed_calling_ae_titles": ["MODALITY1"]}])
    assoc = _associate(running.port(), calling="INTRUDER")
    assert assoc.is_rejected
    assert _reject_triple(assoc) == (1, 1, 3)
    ok = _associate(running.port(), calling="MODALITY1")
    assert ok.is_established
    ok.release()


def test_called_ae_check_can_be_switched_off(start_service):
    """With require_called_ae_title off, any called AE title is accepted."""
    running = start_service(listeners=[{"require_called_ae_title": False}])
    assoc = _associate(running.port(), called="ANY-SCP")
    assert assoc.is_established
    assoc.release()


def test_association_limit_rejected_2_3_2(start_service):
    """Past max_associations the next association is rejected transient / presentation / local limit."""
    running = start_service(listeners=[{"max_associations": 2}])
    held = [_associate(running.port()) for _ in range(2)]
    assert all(a.is_established for a in held)
    extra = _associate(running.port())
    assert extra.is_rejected
    assert _reject_triple(extra) == (2, 3, 2)
    for assoc in held:
        assoc.release()
    running.wait_idle()
    again = _associate(running.port())
    assert again.is_established, "slots must be given back when associations end"
    again.release()


def test_only_verification_is_offered(start_service):
    """A storage context is rejected at the presentation level while Verification is accepted."""
    running = start_service()
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", running.port(), ae_title="ECHOSCP")
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
    assert accepted == {str(Verification)}
    assert rejected == {str(CTImageStorage)}
    assoc.release()


def test_ipv6_listener(start_service):
    """A listener bound to ::1 answers C-ECHO over IPv6."""
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        skip_unless_ci("no IPv6 loopback on this machine")
    running = start_service(listeners=[{"host": "::1"}])
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("::1", running.port(), ae_title="ECHOSCP")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    running.wait_ready()


def test_pynetdicom_echoscu_app(start_service):
    """`python -m pynetdicom echoscu` exits 0 against the daemon and non-zero on a wrong AE title."""
    running = start_service()
    ok = subprocess.run(
        [sys.executable, "-m", "pynetdicom", "echoscu", "127.0.0.1", str(running.port()), "-aec", "ECHOSCP"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "pynetdicom", "echoscu", "127.0.0.1", str(running.port()), "-aec", "WRONG"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0
    assert "Result: Rejected Permanent, Source: Service User" in bad.stderr, bad.stderr
    assert "Reason: Called AE title not recognised" in bad.stderr, bad.stderr


def test_dcmtk_echoscu(start_service):
    """DCMTK echoscu succeeds, and reports the exact rejection for a wrong called AE title."""
    echoscu = require_tool("echoscu")
    running = start_service()
    ok = subprocess.run(
        [echoscu, "-aec", "ECHOSCP", "-aet", "DCMTK", "127.0.0.1", str(running.port())],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [echoscu, "-aec", "WRONG", "127.0.0.1", str(running.port())],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode != 0
    assert "Rejected Permanent" in bad.stderr and "Called AE Title Not Recognized" in bad.stderr, bad.stderr
    running.wait_idle()
    assert (
        running.sample("echo_scp_echo_requests_total", listener="dicom", calling_ae="other", status="success")
        == 1
    )


def _dcmtk_tls_args(files: dict[str, Any], *, client_cert: bool) -> list[str]:
    args = ["+tls" if client_cert else "+tla"]
    if client_cert:
        args += [str(files["client_key"]), str(files["client_cert"])]
    args += ["+cf", str(files["ca"])]
    return args


def _echoscu(echoscu: str, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """Run DCMTK echoscu with extra arguments against 127.0.0.1:port, calling ECHOSCP."""
    return subprocess.run(
        [echoscu, *args, "-aec", "ECHOSCP", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_dcmtk_echoscu_tls(start_service, tls_files):
    """DCMTK echoscu over TLS (+tla, anonymous client) succeeds against a TLS listener."""
    echoscu = require_tool("echoscu")
    running = start_service(
        listeners=[{"tls": {"cert_file": str(tls_files["cert"]), "key_file": str(tls_files["key"])}}]
    )
    result = _echoscu(echoscu, running.port(), *_dcmtk_tls_args(tls_files, client_cert=False))
    assert result.returncode == 0, result.stderr
    running.wait_ready()


def test_dcmtk_echoscu_mutual_tls(start_service, tls_files):
    """With client certificates required, DCMTK with a CA-signed certificate works, without one fails."""
    echoscu = require_tool("echoscu")
    tls = {
        "cert_file": str(tls_files["cert"]),
        "key_file": str(tls_files["key"]),
        "ca_file": str(tls_files["ca"]),
        "client_certificates": "required",
    }
    running = start_service(listeners=[{"tls": tls}])
    ok = _echoscu(echoscu, running.port(), *_dcmtk_tls_args(tls_files, client_cert=True))
    assert ok.returncode == 0, ok.stderr
    anonymous = _echoscu(echoscu, running.port(), *_dcmtk_tls_args(tls_files, client_cert=False))
    assert anonymous.returncode != 0
    running.wait_ready()  # the self-check presents the server certificate as its client certificate
    wait_for(
        lambda: (
            running.sample("echo_scp_tls_handshake_failures_total", listener="dicom", reason="certificate")
            == 1
        )
    )


def test_dicom_echo_client(start_service):
    """The dicom-echo client from PyPI gets Success from the daemon."""
    running = start_service()
    tool = venv_tool("dicom-echo")
    result = subprocess.run(
        [tool, "-aec", "ECHOSCP", f"127.0.0.1:{running.port()}"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dicom_echo_python_api(start_service):
    """dicom-echo's Python API `send(address)` returns status 0 from the daemon.

    It runs in a child process: dicom-echo's Rust backend holds the GIL while it
    waits on the network, which would freeze an in-process daemon.
    """
    running = start_service()
    code = (
        "import sys, dicom_echo; "
        f"sys.exit(dicom_echo.send('127.0.0.1:{running.port()}', called_ae_title='ECHOSCP'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_make_settings_defaults_are_loopback():
    """The test helper binds loopback only, never a routable address."""
    settings = make_settings()
    assert all(item.host in ("127.0.0.1", "::1") for item in settings.listeners)
    assert settings.http.host == "127.0.0.1"
