"""Tests for echo_scp.scu, the dependency-free C-ECHO client, against real peers.

The peers are an in-process pynetdicom SCP, DCMTK's storescp and, for answers
no real SCP gives, small scripted socket servers that speak (or mangle) the
DICOM upper layer by hand. Everything listens on loopback port 0.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from pynetdicom import AE, evt

from echo_scp import scu
from tests import wire
from tests.conftest import skip_unless_ci

pytestmark = pytest.mark.timeout(30)

SERVICE_DIR = Path(__file__).resolve().parent.parent / "service"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


# --------------------------------------------------------------------------
# pynetdicom SCP
# --------------------------------------------------------------------------


@dataclass
class Scp:
    """A running pynetdicom SCP and what it saw."""

    server: Any
    port: int
    message_ids: list[int] = field(default_factory=list)
    requestors: list[dict[str, Any]] = field(default_factory=list)
    aborted: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def start_scp() -> Iterator[Callable[..., Scp]]:
    """Start pynetdicom SCPs on free ports; all are shut down after the test."""
    servers: list[Any] = []

    def start(
        *,
        host: str = "127.0.0.1",
        status: int = 0x0000,
        abstract_syntaxes: tuple[str, ...] = (scu.VERIFICATION_SOP_CLASS,),
        ae_title: str = "ECHO-SCP",
        require_called_aet: bool = False,
        maximum_pdu_size: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> Scp:
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = require_called_aet
        if maximum_pdu_size is not None:
            ae.maximum_pdu_size = maximum_pdu_size
        for uid in abstract_syntaxes:
            ae.add_supported_context(uid)
        scp = Scp(server=None, port=0)

        def on_echo(event: Any) -> int:
            requestor = event.assoc.requestor
            scp.message_ids.append(int(event.request.MessageID))
            scp.requestors.append(
                {
                    "ae_title": requestor.ae_title,
                    "port": requestor.port,
                    "maximum_length": requestor.maximum_length,
                    "implementation_class_uid": str(requestor.implementation_class_uid),
                    "implementation_version_name": requestor.implementation_version_name,
                    "called_ae_title": event.assoc.acceptor.ae_title,
                }
            )
            return status

        handlers: list[Any] = [
            (evt.EVT_C_ECHO, on_echo),
            (evt.EVT_ABORTED, lambda event: scp.aborted.set()),
            (evt.EVT_RELEASED, lambda event: scp.released.set()),
        ]
        server = ae.start_server((host, 0), block=False, evt_handlers=handlers, ssl_context=ssl_context)
        assert server is not None
        servers.append(server)
        scp.server = server
        scp.port = int(server.server_address[1])
        return scp

    yield start
    for server in servers:
        server.shutdown()


def closed_port() -> int:
    """A loopback port that was free a moment ago and has no listener now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------
# Successful associations
# --------------------------------------------------------------------------


def test_repeat_sends_numbered_echoes_and_collects_each_status(start_scp: Callable[..., Scp]) -> None:
    """Three C-ECHOs on one association return three Success statuses for message IDs 1, 2 and 3."""
    scp = start_scp()
    result = scu.echo_association("127.0.0.1", scp.port, repeat=3, called_aet="ECHO-SCP")
    assert result.statuses == (0, 0, 0)
    assert result.ok
    assert scp.message_ids == [1, 2, 3]
    assert result.transfer_syntax == scu.IMPLICIT_VR_LITTLE_ENDIAN
    assert result.peer_max_pdu == 16382  # pynetdicom's default
    assert 0 < result.elapsed < 10
    assert scp.released.wait(5)


def test_associate_request_identifies_the_client(start_scp: Callable[..., Scp]) -> None:
    """The A-ASSOCIATE-RQ carries the AE titles, maximum length and implementation identity."""
    scp = start_scp()
    scu.echo_association("127.0.0.1", scp.port, called_aet="ECHO-SCP", calling_aet="PROBE", max_pdu=32768)
    (seen,) = scp.requestors
    assert seen["ae_title"] == "PROBE"
    assert seen["called_ae_title"] == "ECHO-SCP"
    assert seen["maximum_length"] == 32768
    assert seen["implementation_class_uid"] == scu.IMPLEMENTATION_CLASS_UID
    assert seen["implementation_version_name"] == scu.IMPLEMENTATION_VERSION_NAME


def test_non_success_status_is_returned_not_raised(start_scp: Callable[..., Scp]) -> None:
    """A C-ECHO answered with 0x0110 (Processing failure) is reported in the result and by echo()."""
    scp = start_scp(status=0x0110)
    result = scu.echo_association("127.0.0.1", scp.port)
    assert result.statuses == (0x0110,)
    assert not result.ok
    assert scu.echo(f"127.0.0.1:{scp.port}") == 0x0110


def test_echo_parses_the_address_and_returns_success(start_scp: Callable[..., Scp]) -> None:
    """echo('AET@host:port') calls that AE title and returns status 0."""
    scp = start_scp(require_called_aet=True, ae_title="ECHO-SCP")
    assert scu.echo(f"ECHO-SCP@127.0.0.1:{scp.port}") == 0x0000
    assert scp.requestors[0]["called_ae_title"] == "ECHO-SCP"


def test_offered_transfer_syntax_order_is_respected(start_scp: Callable[..., Scp]) -> None:
    """Offering only Explicit VR Little Endian gets that transfer syntax accepted."""
    scp = start_scp()
    result = scu.echo_association("127.0.0.1", scp.port, transfer_syntaxes=[scu.EXPLICIT_VR_LITTLE_ENDIAN])
    assert result.transfer_syntax == scu.EXPLICIT_VR_LITTLE_ENDIAN
    assert result.ok


def test_small_pdus_are_fragmented_and_reassembled(start_scp: Callable[..., Scp]) -> None:
    """With a 40-byte peer limit and a 20-byte own limit, the command sets travel in fragments both ways."""
    scp = start_scp(maximum_pdu_size=40)
    result = scu.echo_association("127.0.0.1", scp.port, max_pdu=20, repeat=2)
    assert result.peer_max_pdu == 40
    assert result.statuses == (0, 0)
    assert scp.message_ids == [1, 2]


@pytest.mark.parametrize(("abort", "expected"), [(True, "aborted"), (False, "released")])
def test_association_ends_in_abort_or_release(
    start_scp: Callable[..., Scp], abort: bool, expected: str
) -> None:
    """abort=True ends the association with an A-ABORT the SCP sees; otherwise it is released."""
    scp = start_scp()
    result = scu.echo_association("127.0.0.1", scp.port, abort=abort)
    assert result.ok
    assert getattr(scp, expected).wait(5)
    other = scp.released if abort else scp.aborted
    assert not other.is_set()


def test_ipv6_loopback(start_scp: Callable[..., Scp]) -> None:
    """The client reaches an SCP on ::1, by bracketed address with a port and by bare address."""
    if not has_ipv6_loopback():
        skip_unless_ci("this machine has no IPv6 loopback (::1)")
    scp = start_scp(host="::1")
    assert scu.echo(f"[::1]:{scp.port}") == 0
    bound: list[tuple[str, int]] = []
    result = scu.echo_association("::1", scp.port, on_bound=bound.append)
    assert result.ok
    assert bound[0][0] == "::1"
    assert scp.requestors[-1]["port"] == bound[0][1]


# --------------------------------------------------------------------------
# Negotiation failures
# --------------------------------------------------------------------------


def test_wrong_called_ae_title_is_rejected_with_words(start_scp: Callable[..., Scp]) -> None:
    """An SCP that checks the called AE title rejects a wrong one as 1/1/7, named in words."""
    scp = start_scp(require_called_aet=True, ae_title="ECHO-SCP")
    with pytest.raises(scu.AssociationRejected) as caught:
        scu.echo_association("127.0.0.1", scp.port, called_aet="SOMEONE-ELSE")
    rejected = caught.value
    assert (rejected.result, rejected.source, rejected.reason) == (1, 1, 7)
    assert rejected.result_text == "permanent"
    assert rejected.source_text == "service-user"
    assert rejected.reason_text == "Called AE title not recognised"
    assert str(rejected) == (
        "association rejected: permanent, service-user, called AE title not recognised (1/1/7)"
    )
    assert rejected.exit_code == 3


def test_unsupported_abstract_syntax_means_no_accepted_context(start_scp: Callable[..., Scp]) -> None:
    """An SCP that supports only CT Image Storage rejects the Verification context (result 3)."""
    scp = start_scp(abstract_syntaxes=(CT_IMAGE_STORAGE,))
    with pytest.raises(scu.NoAcceptedContext, match="abstract syntax not supported") as caught:
        scu.echo_association("127.0.0.1", scp.port)
    assert caught.value.result == 3
    assert caught.value.exit_code == 3
    assert scp.message_ids == []


def test_unsupported_transfer_syntax_means_no_accepted_context(start_scp: Callable[..., Scp]) -> None:
    """Offering only JPEG Baseline for Verification is refused: transfer syntaxes not supported (result 4)."""
    scp = start_scp()
    with pytest.raises(scu.NoAcceptedContext, match="transfer syntaxes not supported") as caught:
        scu.echo_association("127.0.0.1", scp.port, transfer_syntaxes=[JPEG_BASELINE])
    assert caught.value.result == 4


# --------------------------------------------------------------------------
# Transport failures
# --------------------------------------------------------------------------


def test_connection_refused() -> None:
    """A port with no listener raises ConnectFailed naming the address, with exit code 2."""
    port = closed_port()
    with pytest.raises(scu.ConnectFailed) as caught:
        scu.echo_association("127.0.0.1", port, connect_timeout=5)
    assert str(caught.value) == f"connection refused: 127.0.0.1:{port}"
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("host", ["nonexistent.invalid", "bad..name"])
def test_unresolvable_host(host: str) -> None:
    """A host name that does not resolve raises ConnectFailed rather than a socket error."""
    with pytest.raises(scu.ConnectFailed, match="cannot resolve host"):
        scu.echo_association(host, 104)


def test_on_bound_sees_the_source_port_before_connecting() -> None:
    """on_bound gets the loopback address and port before connect(), and the peer sees that same port."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        bound: list[tuple[str, int]] = []

        def on_bound(local: tuple[str, int]) -> None:
            # Nothing may be queued on the listener yet: the connect comes later.
            with pytest.raises(BlockingIOError):
                listener.accept()
            bound.append(local)

        port = listener.getsockname()[1]
        with pytest.raises(scu.EchoTimeout):
            # Nobody answers the queued connection, so the ACSE timeout ends it.
            scu.echo_association("127.0.0.1", port, on_bound=on_bound, acse_timeout=0.2)
        connection, peer = listener.accept()
        connection.close()
    assert bound == [("127.0.0.1", peer[1])]


# --------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsMaterial:
    """Certificates for TLS tests, as a trustme CA and PEM files."""

    ca: trustme.CA
    server: trustme.LeafCert
    ca_file: str
    client_cert_file: str
    client_key_file: str


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """A CA with a server certificate for 127.0.0.1/::1/localhost and a client certificate."""
    folder = tmp_path_factory.mktemp("scu-tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "::1", "localhost")
    client = ca.issue_cert("echo-probe.example")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    client.cert_chain_pems[0].write_to_path(str(folder / "client.pem"))
    client.private_key_pem.write_to_path(str(folder / "client.key"))
    return TlsMaterial(
        ca, server, str(folder / "ca.pem"), str(folder / "client.pem"), str(folder / "client.key")
    )


def server_tls_context(material: TlsMaterial, *, require_client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    material.server.configure_cert(context)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        material.ca.configure_trust(context)
    return context


def test_tls_echo(start_scp: Callable[..., Scp], tls_material: TlsMaterial) -> None:
    """A C-ECHO succeeds over TLS when the client trusts the server's CA."""
    scp = start_scp(ssl_context=server_tls_context(tls_material, require_client_cert=False))
    context = scu.client_ssl_context(ca_file=tls_material.ca_file)
    result = scu.echo_association("127.0.0.1", scp.port, ssl_context=context)
    assert result.ok


def test_mutual_tls_echo(start_scp: Callable[..., Scp], tls_material: TlsMaterial) -> None:
    """A C-ECHO succeeds when the server requires a client certificate and one is presented."""
    scp = start_scp(ssl_context=server_tls_context(tls_material, require_client_cert=True))
    context = scu.client_ssl_context(
        ca_file=tls_material.ca_file,
        cert_file=tls_material.client_cert_file,
        key_file=tls_material.client_key_file,
    )
    result = scu.echo_association("localhost", scp.port, ssl_context=context, repeat=2)
    assert result.statuses == (0, 0)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["1.2", "1.3"])
def test_mutual_tls_without_client_certificate_fails_to_connect(
    start_scp: Callable[..., Scp], tls_material: TlsMaterial, version: ssl.TLSVersion
) -> None:
    """Without a client certificate mutual TLS fails as ConnectFailed, in TLS 1.2 and in 1.3 alike."""
    scp = start_scp(ssl_context=server_tls_context(tls_material, require_client_cert=True))
    context = scu.client_ssl_context(ca_file=tls_material.ca_file)
    context.maximum_version = version
    with pytest.raises(scu.ConnectFailed, match="TLS"):
        scu.echo_association("127.0.0.1", scp.port, ssl_context=context, acse_timeout=5)


def test_untrusted_server_certificate_fails_the_handshake(
    start_scp: Callable[..., Scp], tls_material: TlsMaterial
) -> None:
    """A server certificate from an unknown CA fails the TLS handshake, unless insecure is set."""
    scp = start_scp(ssl_context=server_tls_context(tls_material, require_client_cert=False))
    with pytest.raises(scu.ConnectFailed, match=r"^TLS handshake failed: .*certificate"):
        scu.echo_association("127.0.0.1", scp.port, ssl_context=scu.client_ssl_context())
    insecure = scu.client_ssl_context(insecure=True)
    assert scu.echo_association("127.0.0.1", scp.port, ssl_context=insecure).ok


def test_server_hostname_is_checked(start_scp: Callable[..., Scp], tls_material: TlsMaterial) -> None:
    """A server_hostname the certificate does not name fails the handshake."""
    scp = start_scp(ssl_context=server_tls_context(tls_material, require_client_cert=False))
    context = scu.client_ssl_context(ca_file=tls_material.ca_file)
    with pytest.raises(scu.ConnectFailed, match="TLS handshake failed: Hostname mismatch"):
        scu.echo_association("127.0.0.1", scp.port, ssl_context=context, server_hostname="pacs.example")


class _LateContext(ssl.SSLContext):
    """A client context whose wrap_socket starts once the peer's reset has arrived (a listener restarting)."""

    def wrap_socket(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        time.sleep(0.6)
        return super().wrap_socket(*args, **kwargs)


def test_reset_before_the_tls_handshake_is_connect_failed(tls_material: TlsMaterial) -> None:
    """A reset before the TLS handshake gives ConnectFailed (nothing else) and leaves no socket open."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def accept_and_reset() -> None:
            conn, _ = server.accept()
            time.sleep(0.2)  # the client is past connect() and waits to wrap
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # RST

        resetter = threading.Thread(target=accept_and_reset)
        resetter.start()
        context = _LateContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(tls_material.ca_file)
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(scu.ConnectFailed, match="connection lost before the TLS handshake") as caught:
            scu.echo_association("127.0.0.1", port, ssl_context=context, server_hostname="localhost")
        resetter.join(5)
        assert caught.value.kind == "connect"
        del caught
        assert len(os.listdir("/proc/self/fd")) <= before, "the half-made TLS socket was closed"


def test_client_ssl_context_rejects_unknown_minimum_version() -> None:
    """Only TLSv1.2 and TLSv1.3 are accepted as minimum versions."""
    with pytest.raises(ValueError, match=r"unsupported minimum TLS version 'TLSv1\.1'"):
        scu.client_ssl_context(minimum_version="TLSv1.1")
    assert scu.client_ssl_context(minimum_version="TLSv1.3").minimum_version == ssl.TLSVersion.TLSv1_3


# --------------------------------------------------------------------------
# DCMTK storescp
# --------------------------------------------------------------------------


@pytest.mark.peer
def test_dcmtk_storescp_answers_echo(start_storescp: Callable[..., int]) -> None:
    """DCMTK storescp accepts the association, prefers Explicit VR LE and answers each C-ECHO with Success."""
    port = start_storescp("--aetitle", "STORESCP")
    result = scu.echo_association("127.0.0.1", port, called_aet="STORESCP", repeat=2)
    assert result.statuses == (0, 0)
    assert result.transfer_syntax == scu.EXPLICIT_VR_LITTLE_ENDIAN
    assert result.peer_max_pdu == 16384
    assert scu.echo(f"STORESCP@127.0.0.1:{port}", abort=True) == 0


@pytest.mark.peer
def test_dcmtk_storescp_refusal_is_a_rejection(start_storescp: Callable[..., int]) -> None:
    """storescp --refuse answers with an A-ASSOCIATE-RJ, permanent, service-user, no reason given."""
    port = start_storescp("--refuse")
    with pytest.raises(scu.AssociationRejected) as caught:
        scu.echo_association("127.0.0.1", port)
    assert (caught.value.result, caught.value.source, caught.value.reason) == (1, 1, 1)
    assert caught.value.reason_text == "No reason given"


# --------------------------------------------------------------------------
# Scripted peers: timeouts and malformed answers
# --------------------------------------------------------------------------


class ScriptedPeer:
    """A one-connection TCP server that runs a script, then records PDUs until the client closes."""

    def __init__(self, script: Callable[[ScriptedPeer, socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.received: list[int] = []
        self.error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._serve, args=(script,), daemon=True)
        self._thread.start()

    def read_pdu(self, conn: socket.socket) -> tuple[int, bytes]:
        pdu_type, body = wire.recv_pdu(conn)
        self.received.append(pdu_type)
        return pdu_type, body

    def _serve(self, script: Callable[[ScriptedPeer, socket.socket], None]) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(10)
                script(self, conn)
                while True:
                    try:
                        self.read_pdu(conn)
                    except (EOFError, OSError):
                        break
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        """Wait for the conversation to end and re-raise anything the script raised."""
        if self._closed:
            return
        self._closed = True
        self._thread.join(15)
        self.listener.close()
        assert not self._thread.is_alive(), "scripted peer still running"
        if self.error is not None:
            raise self.error


@pytest.fixture
def scripted_peer() -> Iterator[Callable[[Callable[[ScriptedPeer, socket.socket], None]], ScriptedPeer]]:
    """Start scripted peers; each is joined (and its errors raised) after the test."""
    peers: list[ScriptedPeer] = []

    def start(script: Callable[[ScriptedPeer, socket.socket], None]) -> ScriptedPeer:
        peer = ScriptedPeer(script)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.close()


def reply_after_request(
    *answers: bytes, then_close: bool = False
) -> Callable[[ScriptedPeer, socket.socket], None]:
    """Script: read the A-ASSOCIATE-RQ, send each answer, optionally half-close."""

    def script(peer: ScriptedPeer, conn: socket.socket) -> None:
        assert peer.read_pdu(conn)[0] == wire.Pdu.ASSOCIATE_RQ
        for answer in answers:
            conn.sendall(answer)
        if then_close:
            conn.shutdown(socket.SHUT_WR)

    return script


def test_fragmented_response_over_several_pdus_is_reassembled(
    scripted_peer: Callable[..., ScriptedPeer],
) -> None:
    """A C-ECHO-RSP split into three PDVs across two P-DATA-TF PDUs is reassembled and its status read."""
    command = wire.c_echo_rsp(1, 0xB000)

    def script(peer: ScriptedPeer, conn: socket.socket) -> None:
        assert peer.read_pdu(conn)[0] == wire.Pdu.ASSOCIATE_RQ
        conn.sendall(wire.associate_ac())
        assert peer.read_pdu(conn)[0] == wire.Pdu.P_DATA_TF
        conn.sendall(
            wire.p_data(wire.pdv(command[:10], wire.COMMAND), wire.pdv(command[10:30], wire.COMMAND))
        )
        conn.sendall(wire.p_data(wire.pdv(command[30:])))
        assert peer.read_pdu(conn)[0] == wire.Pdu.RELEASE_RQ
        conn.sendall(wire.RELEASE_RP)

    peer = scripted_peer(script)
    result = scu.echo_association("127.0.0.1", peer.port)
    peer.close()
    assert result.statuses == (0xB000,)
    assert not result.ok
    assert result.peer_max_pdu == 16384
    assert peer.received == [wire.Pdu.ASSOCIATE_RQ, wire.Pdu.P_DATA_TF, wire.Pdu.RELEASE_RQ]


def test_client_pdus_match_an_independent_encoding(scripted_peer: Callable[..., ScriptedPeer]) -> None:
    """The A-ASSOCIATE-RQ, C-ECHO-RQ and A-RELEASE-RQ sent are byte for byte what tests/wire.py encodes."""
    seen: list[bytes] = []

    def script(peer: ScriptedPeer, conn: socket.socket) -> None:
        seen.append(wire.pdu(*peer.read_pdu(conn)))
        conn.sendall(wire.associate_ac(transfer_syntax=wire.EXPLICIT_LE))
        seen.append(wire.pdu(*peer.read_pdu(conn)))
        conn.sendall(wire.p_data(wire.pdv(wire.c_echo_rsp(1, 0x0000))))
        seen.append(wire.pdu(*peer.read_pdu(conn)))
        conn.sendall(wire.RELEASE_RP)

    peer = scripted_peer(script)
    syntaxes = (wire.EXPLICIT_LE, wire.IMPLICIT_LE, wire.EXPLICIT_BE)
    result = scu.echo_association(
        "127.0.0.1",
        peer.port,
        called_aet="PACS",
        calling_aet="PROBE",
        max_pdu=32768,
        transfer_syntaxes=syntaxes,
    )
    peer.close()
    assert result.ok
    request = wire.associate_rq(
        "PACS",
        "PROBE",
        transfer_syntaxes=syntaxes,
        max_pdu=32768,
        class_uid=scu.IMPLEMENTATION_CLASS_UID,
        version_name=scu.IMPLEMENTATION_VERSION_NAME,
    )
    assert seen == [request, wire.echo_request(1), wire.RELEASE_RQ]


def test_silent_peer_times_out_in_acse_and_is_aborted(scripted_peer: Callable[..., ScriptedPeer]) -> None:
    """A peer that accepts TCP but never answers gives EchoTimeout after the ACSE timeout, then an A-ABORT."""
    peer = scripted_peer(reply_after_request())
    started = time.monotonic()
    with pytest.raises(scu.EchoTimeout, match=r"ACSE timeout \(0.5 s\)") as caught:
        scu.echo_association("127.0.0.1", peer.port, acse_timeout=0.5)
    assert 0.4 < time.monotonic() - started < 5
    assert caught.value.stage == "acse"
    assert caught.value.exit_code == 5
    peer.close()
    assert peer.received == [wire.Pdu.ASSOCIATE_RQ, wire.Pdu.ABORT]


def test_silent_peer_after_accept_times_out_in_dimse(scripted_peer: Callable[..., ScriptedPeer]) -> None:
    """A peer that accepts the association but never answers the C-ECHO-RQ gives a DIMSE-stage timeout."""
    peer = scripted_peer(reply_after_request(wire.associate_ac()))
    with pytest.raises(scu.EchoTimeout, match="waiting for the C-ECHO-RSP to message 1") as caught:
        scu.echo_association("127.0.0.1", peer.port, dimse_timeout=0.3)
    assert caught.value.stage == "dimse"


_VALID_AC = wire.associate_ac()
_MALFORMED = {
    "http": (b"HTTP/1.1 400 Bad Request\r\n\r\n", False, "answered in HTTP while waiting for the A-ASSOC"),
    "garbage": (b"SSH-2.0-OpenSSH_9.2\r\n", False, "unrecognised PDU type 0x53"),
    "tls alert": (b"\x15\x03\x03\x00\x02\x02\x28", False, "answered with TLS (record type 0x15)"),
    "huge length": (b"\x02\x00\xff\xff\xff\xff", False, "announces 4294967295 bytes"),
    "truncated": (_VALID_AC[:16], True, f"closed by peer after 10 of {len(_VALID_AC) - 6} bytes"),
    "item overrun": (
        wire.pdu(wire.Pdu.ASSOCIATE_AC, bytes(68) + struct.pack(">BBH", 0x10, 0, 200) + b"1.2."),
        False,
        "item 0x10 in A-ASSOCIATE-AC announces 200 bytes but only 4 remain",
    ),
    "no context": (wire.pdu(wire.Pdu.ASSOCIATE_AC, bytes(68)), False, "no result for presentation context 1"),
    "long reject": (wire.pdu(wire.Pdu.ASSOCIATE_RJ, bytes(10)), False, "A-ASSOCIATE-RJ with a 10-byte body"),
    "unexpected release": (wire.RELEASE_RP, False, "unexpected A-RELEASE-RP"),
    "unoffered syntax": (
        wire.associate_ac(transfer_syntax=JPEG_BASELINE),
        False,
        "accepted transfer syntax '1.2.840.10008.1.2.4.50', which was not offered",
    ),
    "pdv overrun": (
        _VALID_AC + wire.pdu(wire.Pdu.P_DATA_TF, struct.pack(">IBB", 500, 1, 0x03) + b"\x00" * 10),
        False,
        "PDV item length 500 does not fit",
    ),
    "data set fragment": (
        _VALID_AC + wire.pdu(wire.Pdu.P_DATA_TF, struct.pack(">IBB", 4, 1, 0x02) + b"\x00\x00"),
        False,
        "unexpected data set fragment",
    ),
    "wrong message id": (
        _VALID_AC + wire.p_data(wire.pdv(wire.c_echo_rsp(7, 0))),
        False,
        "C-ECHO-RSP answers message 7, expected 1",
    ),
}


@pytest.mark.parametrize(("answer", "then_close", "message"), _MALFORMED.values(), ids=_MALFORMED.keys())
def test_malformed_answers_raise_protocol_error_quickly(
    scripted_peer: Callable[..., ScriptedPeer], answer: bytes, then_close: bool, message: str
) -> None:
    """Garbage, truncated, oversized or inconsistent PDUs raise ProtocolError at once instead of hanging."""
    peer = scripted_peer(reply_after_request(answer, then_close=then_close))
    started = time.monotonic()
    with pytest.raises(scu.ProtocolError, match=re.escape(message)) as caught:
        scu.echo_association("127.0.0.1", peer.port, acse_timeout=10, dimse_timeout=10)
    assert time.monotonic() - started < 5
    assert caught.value.exit_code == 3


def test_transient_rejection_by_presentation_layer(scripted_peer: Callable[..., ScriptedPeer]) -> None:
    """An A-ASSOCIATE-RJ 2/3/1 is reported as transient temporary congestion."""
    peer = scripted_peer(reply_after_request(wire.associate_rj(2, 3, 1)))
    with pytest.raises(scu.AssociationRejected) as caught:
        scu.echo_association("127.0.0.1", peer.port)
    assert caught.value.reason_text == "Temporary congestion"
    assert str(caught.value) == (
        "association rejected: transient, service-provider (presentation related), "
        "temporary congestion (2/3/1)"
    )


def test_peer_abort_is_reported(scripted_peer: Callable[..., ScriptedPeer]) -> None:
    """An A-ABORT in answer to the A-ASSOCIATE-RQ raises AssociationAborted with source and reason."""
    peer = scripted_peer(reply_after_request(wire.abort(2, 1)))
    with pytest.raises(scu.AssociationAborted) as caught:
        scu.echo_association("127.0.0.1", peer.port)
    assert (caught.value.source, caught.value.reason) == (2, 1)
    assert caught.value.reason_text == "Unrecognised PDU"
    assert str(caught.value) == (
        "association aborted by service-provider while waiting for the A-ASSOCIATE response: "
        "unrecognised PDU (source 2, reason 1)"
    )


# --------------------------------------------------------------------------
# Pure functions and the import footprint
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PACS@pacs.example:104", ("PACS", "pacs.example", 104)),
        ("pacs.example", ("ANY-SCP", "pacs.example", 11112)),
        ("127.0.0.1:4242", ("ANY-SCP", "127.0.0.1", 4242)),
        ("[::1]:104", ("ANY-SCP", "::1", 104)),
        ("::1", ("ANY-SCP", "::1", 11112)),
        ("AE@[fe80::1%eth0]", ("AE", "fe80::1%eth0", 11112)),
        ("A@B@host", ("A@B", "host", 11112)),
        ("  ECHO@host  ", ("ECHO", "host", 11112)),
    ],
)
def test_parse_address_accepts(text: str, expected: tuple[str, str, int]) -> None:
    """Valid [AET@]HOST[:PORT] forms, IPv6 included, split into (called AET, host, port)."""
    assert scu.parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty address"),
        ("host:", "invalid port ''"),
        ("host:0", "port 0 out of range"),
        ("host:70000", "port 70000 out of range"),
        ("host:http", "invalid port 'http'"),
        ("[::1", "missing ']'"),
        ("[::1]104", "unexpected '104' after ']'"),
        ("[nope]:104", "invalid IPv6 address 'nope'"),
        ("1::2::3", "invalid IPv6 address '1::2::3'"),
        ("@host", "called AE title '' must not be empty or all spaces"),
        (
            "SEVENTEEN-CHARS-X@host",
            "called AE title 'SEVENTEEN-CHARS-X' must be at most 16 characters (got 17)",
        ),
        ("BAD\\AE@host", "must not contain a backslash"),
        ("BAD\tAE@host", "must not contain control characters"),
        ("CAFÉ@host", "must use the DICOM default character repertoire (ASCII)"),
        ("ho st", "invalid host 'ho st'"),
        ("AE@:104", "missing host"),
    ],
)
def test_parse_address_rejects(text: str, message: str) -> None:
    """Malformed addresses raise ValueError naming the bad part."""
    with pytest.raises(ValueError, match=re.escape(message)):
        scu.parse_address(text)


def test_parse_address_defaults() -> None:
    """The default port and called AE title apply only when the address omits them."""
    assert scu.parse_address("host", default_port=104, default_called_aet="PACS") == ("PACS", "host", 104)
    assert scu.parse_address("X@host:5", default_port=104, default_called_aet="PACS") == ("X", "host", 5)


@pytest.mark.parametrize(
    ("status", "category"),
    [
        (0x0000, "Success"),
        (0x0001, "Warning"),
        (0x0107, "Warning"),
        (0x0116, "Warning"),
        (0xB000, "Warning"),
        (0xBFFF, "Warning"),
        (0xFE00, "Cancel"),
        (0xFF00, "Pending"),
        (0xFF01, "Pending"),
        (0x0110, "Failure"),
        (0x0211, "Failure"),
        (0xA700, "Failure"),
        (0xC000, "Failure"),
    ],
)
def test_status_category(status: int, category: str) -> None:
    """DIMSE statuses fall into the PS3.7 C.1 categories."""
    assert scu.status_category(status) == category


def test_exit_codes_and_failed_status_message() -> None:
    """Each error class carries a distinct exit code, and a failed status names its category."""
    failed = scu.EchoFailedStatus(0x0110)
    assert str(failed) == "C-ECHO status 0x0110 (Failure)"
    assert failed.status == 0x0110
    codes = {
        cls.__name__: cls.exit_code
        for cls in (
            scu.ConnectFailed,
            scu.AssociationRejected,
            scu.AssociationAborted,
            scu.NoAcceptedContext,
            scu.ProtocolError,
            scu.EchoFailedStatus,
            scu.EchoTimeout,
        )
    }
    assert codes == {
        "ConnectFailed": 2,
        "AssociationRejected": 3,
        "AssociationAborted": 3,
        "NoAcceptedContext": 3,
        "ProtocolError": 3,
        "EchoFailedStatus": 4,
        "EchoTimeout": 5,
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repeat": 0}, "repeat must be between 1 and 65535"),
        ({"calling_aet": ""}, "calling AE title '' must not be empty or all spaces"),
        ({"acse_timeout": 0}, "acse_timeout must be positive"),
        ({"transfer_syntaxes": []}, "between 1 and 128 transfer syntaxes are required, got 0"),
        ({"transfer_syntaxes": ["1.2.08"]}, "'1.2.08' is not a valid UID"),
        ({"max_pdu": -1}, "max_pdu must be between"),
    ],
)
def test_invalid_arguments_raise_value_error_before_connecting(kwargs: dict[str, Any], message: str) -> None:
    """Bad arguments are refused with ValueError without touching the network."""
    with pytest.raises(ValueError, match=message):
        scu.echo_association("127.0.0.1", closed_port(), **kwargs)


def test_import_pulls_in_neither_pynetdicom_nor_pydicom() -> None:
    """Importing echo_scp.scu in a fresh interpreter loads neither pynetdicom nor pydicom."""
    code = (
        "import sys, echo_scp.scu\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('pynetdicom', 'pydicom'))\n"
        "assert not loaded, loaded\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SERVICE_DIR), os.environ.get("PYTHONPATH")])),
    }
    completed = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=20, check=False
    )
    assert completed.returncode == 0, completed.stderr


# --------------------------------------------------------------------------
# Trace and deadline (used by /probe)
# --------------------------------------------------------------------------


def test_trace_times_each_phase_and_names_the_peer(start_scp: Callable[..., Scp]) -> None:
    """A trace gets every phase's duration, the peer address and the implementation the peer announced."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    scp = start_scp()
    trace = scu.EchoTrace()
    scu.echo_association("127.0.0.1", scp.port, repeat=2, trace=trace)
    assert set(trace.phases) == {"resolve", "connect", "associate", "echo", "release"}
    assert all(seconds > 0 for seconds in trace.phases.values())
    assert trace.peer_address == ("127.0.0.1", scp.port)
    assert trace.accepted and trace.statuses == [0, 0]
    assert trace.implementation_class_uid == str(PYNETDICOM_IMPLEMENTATION_UID)
    assert trace.implementation_version_name == PYNETDICOM_IMPLEMENTATION_VERSION
    assert trace.tls_version is None and trace.peer_certificate is None


def test_trace_keeps_what_came_before_a_rejection(start_scp: Callable[..., Scp]) -> None:
    """After a rejection the trace still has the connect and associate phases, and no acceptance."""
    scp = start_scp(require_called_aet=True)
    trace = scu.EchoTrace()
    with pytest.raises(scu.AssociationRejected):
        scu.echo_association("127.0.0.1", scp.port, called_aet="WRONG", trace=trace)
    assert {"connect", "associate"} <= set(trace.phases) and "echo" not in trace.phases
    assert not trace.accepted


def test_deadline_bounds_the_whole_association(scripted_peer: Callable[..., ScriptedPeer]) -> None:
    """A peer that accepts and then never answers the C-ECHO is cut off at the overall deadline."""
    peer = scripted_peer(reply_after_request(wire.associate_ac(), then_close=False))
    started = time.monotonic()
    with pytest.raises(scu.EchoTimeout, match="deadline reached while waiting for the C-ECHO-RSP"):
        scu.echo_association(
            "127.0.0.1", peer.port, acse_timeout=10, dimse_timeout=10, deadline=started + 0.5
        )
    assert 0.4 < time.monotonic() - started < 2


def test_connect_failures_say_what_kind() -> None:
    """ConnectFailed.kind tells a refused port from a name that does not resolve."""
    with pytest.raises(scu.ConnectFailed) as refused:
        scu.echo_association("127.0.0.1", closed_port())
    assert refused.value.kind == "refused"
    with pytest.raises(scu.ConnectFailed) as unresolved:
        scu.echo_association("no-such-host.invalid", 104)
    assert unresolved.value.kind == "resolve"
