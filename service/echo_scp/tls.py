"""TLS contexts for the listeners and the HTTP endpoint, following BCP 195 (non-downgrading).

:class:`echo_scp.settings.TlsSettings` and :class:`echo_scp.settings.HttpTlsSettings`
build their contexts when they are validated and carry them
(``server_context``, ``self_check_context``): use those rather than calling
these again, which would read the files twice.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from echo_scp.settings import HttpTlsSettings, TlsSettings

# BCP 195 / RFC 9325 recommended TLS 1.2 suites (AEAD with forward secrecy);
# TLS 1.3 suites are OpenSSL's defaults, which are all acceptable.
_TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    ]
)
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
# The exporter-toolkit's names for the same, as the HTTP settings spell them.
_HTTP_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_HTTP_VERIFY = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}


class DeferredHandshakeContext(ssl.SSLContext):
    """An SSLContext whose server-side ``wrap_socket`` does not handshake.

    pynetdicom wraps each accepted socket inside its accept loop, so with a
    plain context one client that connects and sends nothing blocks every other
    client. The handshake is instead done by the connection's own thread, with
    a deadline (see ``listener.Listener``).
    """

    def wrap_socket(self, sock: Any, server_side: bool = False, *args: Any, **kwargs: Any) -> Any:
        if server_side:
            kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, server_side, *args, **kwargs)


def server_context(tls: TlsSettings) -> DeferredHandshakeContext:
    """The listener's server-side context; raises ssl.SSLError or OSError if files do not load."""
    context = DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    context.set_ciphers(_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    password = tls.key_password.get_secret_value() if tls.key_password else None
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=password)
    context.verify_mode = _VERIFY[tls.client_certificates]
    if tls.ca_file is not None:
        context.load_verify_locations(cafile=str(tls.ca_file))
    return context


def self_check_context(tls: TlsSettings) -> ssl.SSLContext:
    """Client context for the loopback readiness self-check of a TLS listener.

    The self-check talks to its own listener over loopback, so it does not
    verify the server certificate (the listener's host name is often not
    loopback); it does present a client certificate for mutual TLS.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = _VERSIONS[tls.min_version]
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls.client_certificates != "none":
        password = tls.key_password.get_secret_value() if tls.key_password else None
        cert = tls.self_check_cert_file or tls.cert_file
        key = tls.self_check_key_file or tls.key_file
        context.load_cert_chain(str(cert), str(key), password=password)
    return context


def http_server_context(tls: HttpTlsSettings) -> ssl.SSLContext:
    """The HTTP endpoint's server-side context; raises ssl.SSLError or OSError if files do not load.

    Sockets are wrapped without a handshake (``do_handshake_on_connect=False``
    by ``health.py``), which then handshakes on the request's own thread.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _HTTP_VERSIONS[tls.min_version]
    context.set_ciphers(_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    context.verify_mode = _HTTP_VERIFY[tls.client_auth_type]
    if tls.client_ca_file is not None:
        context.load_verify_locations(cafile=str(tls.client_ca_file))
    return context
