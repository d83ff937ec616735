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

    It verifies the listener the way a real client would, so that /readyz
    fails when every real client would: the chain the listener serves must
    verify, every certificate in it must be within its validity period, and the
    leaf must be fit for a server (extended key usage). The trust anchors are
    the listener's own certificates (``cert_file``) and ``ca_file``, with
    ``VERIFY_X509_PARTIAL_CHAIN`` so that a served leaf or intermediate can be
    one: the daemon cannot know the roots its peers trust. The host name is not
    checked, since the self-check connects over loopback, whatever name the
    certificate is for. For mutual TLS it presents a client certificate
    (``self_check_cert_file``, else ``cert_file``).

    Raises :class:`ClientCertificateRefused` when the listener would refuse that
    client certificate for any reason but its validity period (which is a
    warning, see ``settings.TlsSettings``); ssl.SSLError or OSError when files
    do not load.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = _VERSIONS[tls.min_version]
    context.check_hostname = False
    # Not verifying yet: the probe below must reach the listener's verdict on
    # the client certificate whatever it thinks of the server's.
    context.verify_mode = ssl.CERT_NONE
    if tls.client_certificates != "none":
        password = tls.key_password.get_secret_value() if tls.key_password else None
        cert = tls.self_check_cert_file or tls.cert_file
        key = tls.self_check_key_file or tls.key_file
        context.load_cert_chain(str(cert), str(key), password=password)
        refusal = client_certificate_refusal(tls.server_context, context)
        if refusal is not None and refusal.verify_code not in _VALIDITY_PERIOD_ERRORS:
            raise ClientCertificateRefused(refusal)
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.load_verify_locations(cafile=str(tls.cert_file))
    if tls.ca_file is not None:
        context.load_verify_locations(cafile=str(tls.ca_file))
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


# OpenSSL's X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED.
_VALIDITY_PERIOD_ERRORS = frozenset({9, 10})
# X509_V_ERR_INVALID_PURPOSE: for a client certificate, no clientAuth usage.
INVALID_PURPOSE = 26


class ClientCertificateRefused(Exception):
    """The listener refuses the certificate its readiness self-check would present."""

    def __init__(self, error: ssl.SSLCertVerificationError) -> None:
        self.verify_code: int = error.verify_code
        self.verify_message: str = error.verify_message or str(error)
        super().__init__(self.verify_message)


def client_certificate_refusal(
    server: ssl.SSLContext, client: ssl.SSLContext
) -> ssl.SSLCertVerificationError | None:
    """Why ``server`` refuses the client certificate ``client`` presents, or None if it accepts it.

    A TLS handshake between the two contexts in memory (``ssl.MemoryBIO``), no
    socket involved, so the verdict is OpenSSL's own: chain to the server's CA
    file, the clientAuth extended key usage, the validity period.
    """
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(client_in, client_out, server_hostname=None)
    server_side = server.wrap_bio(server_in, server_out, server_side=True)
    done = {"client": False, "server": False}
    # A TLS 1.2 or 1.3 handshake takes at most a few flights each way.
    for _ in range(8):
        for name, side in (("client", client_side), ("server", server_side)):
            if done[name]:
                continue
            try:
                side.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as exc:
                # Only the server verifies here: the client does not.
                return exc
            except ssl.SSLError:
                if name == "server":
                    # Not about the client certificate (and not expected with
                    # contexts of one listener): no verdict, the self-check
                    # itself will say what is wrong.
                    return None
                # The client reads the server's alert; the server's own error says why.
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            return None
    return None
