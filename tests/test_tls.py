"""TLS listeners: handshakes off the accept loop, failures counted, BCP 195 versions."""

from __future__ import annotations

import socket
import ssl
import time
import warnings
from typing import Any

import pytest

from echo_scp import scu
from tests.conftest import wait_for


def _tls_listener(tls_files: dict[str, Any], **tls: Any) -> dict[str, Any]:
    return {"tls": {"cert_file": str(tls_files["cert"]), "key_file": str(tls_files["key"]), **tls}}


def _client_context(tls_files: dict[str, Any]) -> ssl.SSLContext:
    return scu.client_ssl_context(ca_file=str(tls_files["ca"]))


def _echo(port: int, context: ssl.SSLContext, timeout: float = 5.0) -> scu.EchoResult:
    return scu.echo_association(
        "127.0.0.1",
        port,
        called_aet="ECHOSCP",
        ssl_context=context,
        server_hostname="localhost",
        acse_timeout=timeout,
        dimse_timeout=timeout,
        network_timeout=timeout,
    )


def test_silent_clients_do_not_block_tls_listener(start_service, tls_files):
    """Clients that connect to a TLS port and send nothing do not delay other clients' C-ECHOs."""
    running = start_service(listeners=[_tls_listener(tls_files, handshake_timeout=30)])
    context = _client_context(tls_files)
    silent = [socket.create_connection(("127.0.0.1", running.port())) for _ in range(5)]
    half = socket.create_connection(("127.0.0.1", running.port()))
    half.sendall(b"\x16\x03\x01\x00\xc8\x01")  # the first bytes of a ClientHello, then nothing
    try:
        started = time.monotonic()
        for _ in range(3):
            assert _echo(running.port(), context).ok
        assert time.monotonic() - started < 5, "echoes were held up behind the silent clients"
    finally:
        for sock in [*silent, half]:
            sock.close()


def test_handshake_timeout_is_counted_and_cleaned_up(start_service, tls_files):
    """A client that never finishes the handshake is dropped after handshake_timeout and counted."""
    running = start_service(listeners=[_tls_listener(tls_files, handshake_timeout=0.3)])
    with socket.create_connection(("127.0.0.1", running.port())) as silent:
        wait_for(
            lambda: (
                running.sample("echo_scp_tls_handshake_failures_total", listener="dicom", reason="timeout")
                == 1
            )
        )
        silent.settimeout(5)
        assert silent.recv(1) == b"", "the daemon closes the connection"
    running.wait_idle()
    ended = [e for e in running.events("association_ended") if not e.get("self_check")]
    assert [(e["outcome"], e["tls_failure"]) for e in ended] == [("tls_failed", "timeout")]
    assert _echo(running.port(), _client_context(tls_files)).ok


def test_plaintext_dicom_to_tls_port_is_a_protocol_failure(start_service, tls_files):
    """Plain DICOM sent to a TLS listener fails the handshake as a protocol error; TLS peers still work."""
    running = start_service(listeners=[_tls_listener(tls_files)])
    with pytest.raises(scu.EchoError):
        scu.echo_association("127.0.0.1", running.port(), called_aet="ECHOSCP", acse_timeout=3)
    wait_for(
        lambda: (
            running.sample("echo_scp_tls_handshake_failures_total", listener="dicom", reason="protocol") == 1
        )
    )
    assert _echo(running.port(), _client_context(tls_files)).ok


def test_tls_1_1_client_is_refused(start_service, tls_files):
    """BCP 195: a client capped at TLS 1.1 cannot connect."""
    running = start_service(listeners=[_tls_listener(tls_files)])
    context = _client_context(tls_files)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # setting TLS 1.0/1.1 is deprecated, rightly
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(scu.ConnectFailed):
        _echo(running.port(), context)
    wait_for(
        lambda: (
            running.sample("echo_scp_tls_handshake_failures_total", listener="dicom", reason="protocol") == 1
        )
    )


def test_tls_1_3_only_listener(start_service, tls_files):
    """A listener with min_version 1.3 serves TLS 1.3 clients and refuses TLS 1.2-only clients."""
    running = start_service(listeners=[_tls_listener(tls_files, min_version="1.3")])
    assert _echo(running.port(), _client_context(tls_files)).ok
    old = _client_context(tls_files)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(scu.ConnectFailed):
        _echo(running.port(), old)


def test_untrusted_client_certificate_is_refused(start_service, tls_files):
    """With client certificates required, a certificate from another CA is refused and counted."""
    running = start_service(
        listeners=[_tls_listener(tls_files, ca_file=str(tls_files["ca"]), client_certificates="required")]
    )
    good = scu.client_ssl_context(
        ca_file=str(tls_files["ca"]),
        cert_file=str(tls_files["client_cert"]),
        key_file=str(tls_files["client_key"]),
    )
    assert _echo(running.port(), good).ok
    stranger = scu.client_ssl_context(
        ca_file=str(tls_files["ca"]),
        cert_file=str(tls_files["stranger_cert"]),
        key_file=str(tls_files["stranger_key"]),
    )
    with pytest.raises(scu.ConnectFailed):
        _echo(running.port(), stranger)
    wait_for(
        lambda: (
            running.sample("echo_scp_tls_handshake_failures_total", listener="dicom", reason="certificate")
            == 1
        )
    )
