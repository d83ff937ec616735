"""A small C-ECHO client (Verification SCU) speaking the DICOM upper layer by hand.

It imports only the standard library, not pynetdicom or pydicom: it runs as a
Kubernetes exec probe and as the daemon's readiness self-check every few
seconds, and importing pynetdicom costs several times more than the echo
itself. The PDUs are built and parsed with ``struct`` after DICOM PS3.8
section 9.3 (upper layer PDUs) and PS3.7 (the C-ECHO command set); the codes,
words and value rules come from ``protocol.py``, which the daemon shares.

Only what a Verification association needs is implemented: one presentation
context (id 1), command sets with no data set, and a peer that is assumed
hostile, so every length read off the wire is checked before it is trusted.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from echo_scp.protocol import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    ABORT_INVALID_PARAMETER,
    ABORT_REASON_NOT_SPECIFIED,
    ABORT_REASONS,
    ABORT_SOURCE_PROVIDER,
    ABORT_SOURCE_USER,
    ABORT_SOURCES,
    ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNISED_PDU,
    AFFECTED_SOP_CLASS_UID,
    APPLICATION_CONTEXT_NAME,
    C_ECHO_RQ_FIELD,
    C_ECHO_RSP_FIELD,
    COMMAND_DATA_SET_TYPE,
    COMMAND_FIELD,
    COMMAND_GROUP,
    COMMAND_GROUP_LENGTH,
    CONTEXT_ACCEPTED,
    CONTEXT_RESULTS,
    ELEMENT_HEADER,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    IMPLICIT_VR_LITTLE_ENDIAN,
    ITEM_ABSTRACT_SYNTAX,
    ITEM_APPLICATION_CONTEXT,
    ITEM_HEADER,
    ITEM_IMPLEMENTATION_CLASS_UID,
    ITEM_IMPLEMENTATION_VERSION_NAME,
    ITEM_MAXIMUM_LENGTH,
    ITEM_PRESENTATION_CONTEXT_AC,
    ITEM_PRESENTATION_CONTEXT_RQ,
    ITEM_TRANSFER_SYNTAX,
    ITEM_USER_INFORMATION,
    MCH_COMMAND,
    MCH_LAST,
    MESSAGE_ID,
    MESSAGE_ID_BEING_RESPONDED_TO,
    NO_DATA_SET,
    P_DATA_TF,
    PDU_HEADER,
    PDU_NAMES,
    PDV_HEADER,
    STATUS,
    STATUS_SUCCESS,
    VERIFICATION_SOP_CLASS,
    Rejection,
    check_ae_title,
    encode_item,
    encode_pdu,
    format_address,
    is_valid_uid,
)

if TYPE_CHECKING:
    # ssl is imported inside the functions that use it: the plain-TCP probe
    # never needs it, and importing it costs about 10 ms of each probe's start.
    import ssl
    from collections.abc import Callable, Sequence

__all__ = [
    "APPLICATION_CONTEXT_NAME",
    "DEFAULT_TRANSFER_SYNTAXES",
    "EXPLICIT_VR_BIG_ENDIAN",
    "EXPLICIT_VR_LITTLE_ENDIAN",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "IMPLICIT_VR_LITTLE_ENDIAN",
    "MAX_RECEIVED_PDU_LENGTH",
    "VERIFICATION_SOP_CLASS",
    "AssociationAborted",
    "AssociationRejected",
    "ConnectFailed",
    "EchoError",
    "EchoFailedStatus",
    "EchoResult",
    "EchoTimeout",
    "EchoTrace",
    "NoAcceptedContext",
    "ProtocolError",
    "TlsFileError",
    "client_ssl_context",
    "echo",
    "echo_association",
    "parse_address",
    "status_category",
]

DEFAULT_TRANSFER_SYNTAXES: tuple[str, ...] = (
    IMPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
)
# A C-ECHO-RSP is about 100 bytes and an A-ASSOCIATE-AC a few hundred; a peer
# announcing more than this is broken or hostile, and we must not allocate it.
MAX_RECEIVED_PDU_LENGTH = 1 << 20
# Bound on a command set reassembled from fragments, which may span PDUs.
_MAX_COMMAND_SET_LENGTH = 64 * 1024

_PRESENTATION_CONTEXT_ID = 1

# Peers that write a PDU in several small writes without TCP_NODELAY (DCMTK's
# storescp sends the P-DATA-TF header and its PDV separately) stall on Nagle
# until this side's delayed ACK, 40 ms per answer on Linux. Asking for an
# immediate ACK before each read (the option does not stick) removes the stall.
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)

# Default bound on each wait (connect plus TLS, each ACSE answer, each C-ECHO
# answer): a probe wants an answer within seconds, and a port that accepts and
# never answers (a dead web server) would otherwise hold it for half a minute.
DEFAULT_TIMEOUT = 10.0

# --------------------------------------------------------------------------
# Results and errors
# --------------------------------------------------------------------------


# NamedTuples and a plain class rather than dataclasses: importing dataclasses
# (and the inspect module behind it) would cost an exec probe about a third of
# its start-up.
class EchoResult(NamedTuple):
    """The outcome of one association: a C-ECHO status for each request sent."""

    statuses: tuple[int, ...]
    transfer_syntax: str
    peer_max_pdu: int
    elapsed: float

    @property
    def ok(self) -> bool:
        """True when every C-ECHO answered Success (0x0000)."""
        return all(status == STATUS_SUCCESS for status in self.statuses)


class EchoTrace:
    """What ``echo_association`` saw, filled in as it goes, so a failure keeps what came before.

    ``phases`` maps "resolve", "connect", "tls", "associate", "echo" (all the
    C-ECHOs) and "release" (or the A-ABORT with ``abort``) to the seconds spent
    in each phase that was started, including the one that failed.
    """

    __slots__ = (
        "accepted",
        "implementation_class_uid",
        "implementation_version_name",
        "peer_address",
        "peer_certificate",
        "phases",
        "statuses",
        "tls_version",
    )

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.peer_address: tuple[str, int] | None = None
        # True once the peer answered the A-ASSOCIATE-RQ with an A-ASSOCIATE-AC.
        self.accepted = False
        self.tls_version: str | None = None
        # DER of the certificate the peer presented (the leaf).
        self.peer_certificate: bytes | None = None
        self.implementation_class_uid: str | None = None
        self.implementation_version_name: str | None = None
        self.statuses: list[int] = []

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"EchoTrace({fields})"


class _Phase:
    """Adds the time spent in a ``with`` block to one phase of a trace."""

    def __init__(self, trace: EchoTrace, name: str) -> None:
        self._trace = trace
        self._name = name
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        spent = time.monotonic() - self._started
        self._trace.phases[self._name] = self._trace.phases.get(self._name, 0.0) + spent


class EchoError(Exception):
    """Base of every failure to run a C-ECHO; ``exit_code`` is the CLI's exit status."""

    exit_code: ClassVar[int] = 1


class ConnectFailed(EchoError):
    """No transport: DNS failure, TCP refused/unreachable/timed out, or TLS failed.

    ``kind`` says which: "resolve", "refused", "timeout" (TCP connect or TLS
    handshake), "tls" or "connect" (any other socket error).
    """

    exit_code: ClassVar[int] = 2

    def __init__(self, message: str, kind: str = "connect") -> None:
        self.kind = kind
        super().__init__(message)


class AssociationRejected(EchoError):
    """The peer answered the A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ."""

    exit_code: ClassVar[int] = 3

    def __init__(self, result: int, source: int, reason: int) -> None:
        self.result = result
        self.source = source
        self.reason = reason
        rejection = Rejection(result, source, reason)
        self.result_text, self.source_text, self.reason_text = rejection.words
        super().__init__(
            f"association rejected: {self.result_text}, {self.source_text}, "
            f"{_lower_first(self.reason_text)} ({rejection.code})"
        )


class AssociationAborted(EchoError):
    """The peer sent an A-ABORT."""

    exit_code: ClassVar[int] = 3

    def __init__(self, source: int, reason: int, stage: str) -> None:
        self.source = source
        self.reason = reason
        self.source_text = ABORT_SOURCES.get(source, f"unknown source {source}")
        # The reason is only defined for provider-initiated aborts.
        self.reason_text = (
            ABORT_REASONS.get(reason, "Reserved")
            if source == ABORT_SOURCE_PROVIDER
            else ABORT_REASONS[ABORT_REASON_NOT_SPECIFIED]
        )
        super().__init__(
            f"association aborted by {self.source_text} while {stage}: "
            f"{_lower_first(self.reason_text)} (source {source}, reason {reason})"
        )


class NoAcceptedContext(EchoError):
    """The peer accepted the association but not the Verification presentation context."""

    exit_code: ClassVar[int] = 3

    def __init__(self, result: int) -> None:
        self.result = result
        self.result_text = CONTEXT_RESULTS.get(result, f"unknown result {result}")
        super().__init__(f"Verification presentation context rejected: {self.result_text} (result {result})")


class EchoTimeout(EchoError):
    """The peer did not answer in time; ``stage`` is "acse", "dimse" or "network"."""

    exit_code: ClassVar[int] = 5

    def __init__(self, message: str, stage: str) -> None:
        self.stage = stage
        super().__init__(message)


class ProtocolError(EchoError):
    """The peer sent something malformed or unexpected, or dropped the connection."""

    exit_code: ClassVar[int] = 3

    def __init__(
        self, message: str, abort_reason: int = ABORT_INVALID_PARAMETER, *, tls_suspected: bool = False
    ) -> None:
        # The A-ABORT reason this client sends the peer before closing.
        self.abort_reason = abort_reason
        # Plain DICOM seems to have met a TLS port (reset, closed or a TLS record).
        self.tls_suspected = tls_suspected
        super().__init__(message)


class TlsFileError(OSError):
    """A TLS file given to ``client_ssl_context`` cannot be used; the message names it."""

    def __init__(self, message: str, path: str | None) -> None:
        self.path = path
        super().__init__(message)


class EchoFailedStatus(EchoError):
    """A C-ECHO completed with a status other than Success."""

    exit_code: ClassVar[int] = 4

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(f"C-ECHO status 0x{status:04X} ({status_category(status)})")


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def status_category(status: int) -> str:
    """Name the PS3.7 C.1 category of a DIMSE status.

    One of "Success", "Warning", "Failure", "Cancel" or "Pending".
    """
    if status == STATUS_SUCCESS:
        return "Success"
    if status == 0xFE00:
        return "Cancel"
    if status in (0xFF00, 0xFF01):
        return "Pending"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "Warning"
    return "Failure"


# --------------------------------------------------------------------------
# Addresses and arguments
# --------------------------------------------------------------------------


def _is_ipv6_literal(text: str) -> bool:
    address, _, scope = text.partition("%")
    if "%" in text and not scope:
        return False
    try:
        socket.inet_pton(socket.AF_INET6, address)
    except (OSError, ValueError):
        return False
    return True


def _check_host_name(host: str, address: str) -> None:
    if not host:
        raise ValueError(f"missing host in address {address!r}")
    allowed = all(char.isalnum() or char in "-._" for char in host)
    if not host.isascii() or not allowed:
        raise ValueError(f"invalid host {host!r} in address {address!r}")


def _parse_port(text: str, address: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"invalid port {text!r} in address {address!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535 in address {address!r}")
    return port


def parse_address(
    text: str, *, default_port: int = 11112, default_called_aet: str = "ANY-SCP"
) -> tuple[str, str, int]:
    """Split ``[AET@]HOST[:PORT]`` into ``(called_aet, host, port)``.

    IPv6 addresses are written ``[::1]:11112``, or bare (``::1``) when there is
    no port. Raises ValueError, naming the bad part, for anything malformed.
    """
    address = text.strip()
    if not address:
        raise ValueError("empty address; expected [AET@]HOST[:PORT]")
    # AE titles may contain '@' but host names cannot, so split at the last one.
    aet_part, at, rest = address.rpartition("@")
    called_aet = check_ae_title(aet_part, f"called AE title {aet_part!r}") if at else default_called_aet
    port = default_port
    if rest.startswith("["):
        host, bracket, after = rest[1:].partition("]")
        if not bracket:
            raise ValueError(f"missing ']' after IPv6 address in {address!r}")
        if not _is_ipv6_literal(host):
            raise ValueError(f"invalid IPv6 address {host!r} in address {address!r}")
        if after:
            if not after.startswith(":"):
                raise ValueError(f"unexpected {after!r} after ']' in address {address!r}")
            port = _parse_port(after[1:], address)
    elif rest.count(":") > 1:
        host = rest
        if not _is_ipv6_literal(host):
            raise ValueError(
                f"invalid IPv6 address {host!r} in address {address!r} "
                "(write an IPv6 address with a port as [ADDRESS]:PORT)"
            )
    else:
        host, colon, port_text = rest.partition(":")
        _check_host_name(host, address)
        if colon:
            port = _parse_port(port_text, address)
    return called_aet, host, port


# --------------------------------------------------------------------------
# PDU encoding
# --------------------------------------------------------------------------


def _associate_rq(called_aet: str, calling_aet: str, max_pdu: int, transfer_syntaxes: Sequence[str]) -> bytes:
    context = bytes((_PRESENTATION_CONTEXT_ID, 0, 0, 0)) + encode_item(
        ITEM_ABSTRACT_SYNTAX, VERIFICATION_SOP_CLASS.encode("ascii")
    )
    for uid in transfer_syntaxes:
        context += encode_item(ITEM_TRANSFER_SYNTAX, uid.encode("ascii"))
    user_information = (
        encode_item(ITEM_MAXIMUM_LENGTH, struct.pack(">I", max_pdu))
        + encode_item(ITEM_IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_CLASS_UID.encode("ascii"))
        + encode_item(
            ITEM_IMPLEMENTATION_VERSION_NAME,
            IMPLEMENTATION_VERSION_NAME.encode("ascii"),
        )
    )
    body = (
        struct.pack(
            ">HH16s16s32x",
            1,  # protocol version
            0,
            called_aet.encode("ascii").ljust(16),
            calling_aet.encode("ascii").ljust(16),
        )
        + encode_item(ITEM_APPLICATION_CONTEXT, APPLICATION_CONTEXT_NAME.encode("ascii"))
        + encode_item(ITEM_PRESENTATION_CONTEXT_RQ, context)
        + encode_item(ITEM_USER_INFORMATION, user_information)
    )
    return encode_pdu(A_ASSOCIATE_RQ, body)


def _release_rq() -> bytes:
    return encode_pdu(A_RELEASE_RQ, bytes(4))


def _release_rp() -> bytes:
    return encode_pdu(A_RELEASE_RP, bytes(4))


def _abort(source: int, reason: int) -> bytes:
    return encode_pdu(A_ABORT, bytes((0, 0, source, reason)))


def _element(element: int, value: bytes) -> bytes:
    return ELEMENT_HEADER.pack(COMMAND_GROUP, element, len(value)) + value


def _c_echo_rq(message_id: int) -> bytes:
    """Encode a C-ECHO-RQ command set, always Implicit VR Little Endian (PS3.7 6.3.1)."""
    sop_class = VERIFICATION_SOP_CLASS.encode("ascii")
    if len(sop_class) % 2:
        sop_class += b"\x00"  # UI values are padded to even length with NUL
    elements = (
        _element(AFFECTED_SOP_CLASS_UID, sop_class)
        + _element(COMMAND_FIELD, struct.pack("<H", C_ECHO_RQ_FIELD))
        + _element(MESSAGE_ID, struct.pack("<H", message_id))
        + _element(COMMAND_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET))
    )
    return _element(COMMAND_GROUP_LENGTH, struct.pack("<I", len(elements))) + elements


def _p_data_pdus(command: bytes, peer_max_pdu: int) -> list[bytes]:
    """Split a command set into P-DATA-TF PDUs no larger than the peer accepts."""
    # The peer's maximum length bounds the PDU's variable field (PS3.8 D.1);
    # each PDV item spends 6 of those bytes on its own header.
    fragment_size = len(command) if peer_max_pdu == 0 else peer_max_pdu - 6
    if fragment_size < 1:
        raise ProtocolError(f"peer's maximum PDU length {peer_max_pdu} is too small to carry a command")
    pdus = []
    for start in range(0, len(command), fragment_size):
        fragment = command[start : start + fragment_size]
        last = start + fragment_size >= len(command)
        control = MCH_COMMAND | (MCH_LAST if last else 0)
        pdv = PDV_HEADER.pack(len(fragment) + 2, _PRESENTATION_CONTEXT_ID, control)
        pdus.append(encode_pdu(P_DATA_TF, pdv + fragment))
    return pdus


# --------------------------------------------------------------------------
# PDU parsing
# --------------------------------------------------------------------------


class _Accepted(NamedTuple):
    """What the A-ASSOCIATE-AC says about presentation context 1."""

    result: int
    transfer_syntax: str
    peer_max_pdu: int
    implementation_class_uid: str | None = None
    implementation_version_name: str | None = None


def _iter_items(data: bytes, start: int, where: str) -> list[tuple[int, bytes]]:
    """Split a run of items/sub-items, checking each length against what is left."""
    items = []
    offset = start
    while offset < len(data):
        if len(data) - offset < ITEM_HEADER.size:
            raise ProtocolError(f"truncated item header in {where}")
        item_type, _, length = ITEM_HEADER.unpack_from(data, offset)
        offset += ITEM_HEADER.size
        if length > len(data) - offset:
            raise ProtocolError(
                f"item 0x{item_type:02X} in {where} announces {length} bytes "
                f"but only {len(data) - offset} remain"
            )
        items.append((item_type, data[offset : offset + length]))
        offset += length
    return items


def _decode_uid(value: bytes, where: str) -> str:
    try:
        # Some implementations pad UIDs with NUL or space despite PS3.8 9.3.2.2.
        return value.decode("ascii").rstrip("\x00 ")
    except UnicodeDecodeError:
        raise ProtocolError(f"non-ASCII UID in {where}") from None


def _parse_associate_ac(body: bytes) -> _Accepted:
    # Protocol version, reserved, called AE, calling AE, 32 reserved bytes.
    fixed = 2 + 2 + 16 + 16 + 32
    if len(body) < fixed:
        raise ProtocolError(f"A-ASSOCIATE-AC of {len(body)} bytes is shorter than {fixed}")
    context: tuple[int, str] | None = None
    peer_max_pdu = 0
    implementation: dict[int, str] = {}
    for item_type, value in _iter_items(body, fixed, "A-ASSOCIATE-AC"):
        if item_type == ITEM_PRESENTATION_CONTEXT_AC:
            if len(value) < 4:
                raise ProtocolError("presentation context item shorter than 4 bytes")
            if value[0] != _PRESENTATION_CONTEXT_ID:
                continue
            syntaxes = [
                _decode_uid(sub_value, "transfer syntax sub-item")
                for sub_type, sub_value in _iter_items(value, 4, "presentation context item")
                if sub_type == ITEM_TRANSFER_SYNTAX
            ]
            if value[2] == 0 and not syntaxes:
                raise ProtocolError("presentation context 1 accepted without a transfer syntax")
            context = (value[2], syntaxes[0] if syntaxes else "")
        elif item_type == ITEM_USER_INFORMATION:
            for sub_type, sub_value in _iter_items(value, 0, "user information item"):
                if sub_type == ITEM_MAXIMUM_LENGTH:
                    if len(sub_value) != 4:
                        raise ProtocolError(f"maximum length sub-item of {len(sub_value)} bytes, expected 4")
                    (peer_max_pdu,) = struct.unpack(">I", sub_value)
                elif sub_type in (ITEM_IMPLEMENTATION_CLASS_UID, ITEM_IMPLEMENTATION_VERSION_NAME):
                    # Reported, never acted on: what a peer calls itself.
                    implementation[sub_type] = sub_value.decode("ascii", "replace").rstrip("\x00 ")
    if context is None:
        raise ProtocolError(
            f"A-ASSOCIATE-AC has no result for presentation context {_PRESENTATION_CONTEXT_ID}"
        )
    result, transfer_syntax = context
    return _Accepted(
        result,
        transfer_syntax,
        peer_max_pdu,
        implementation.get(ITEM_IMPLEMENTATION_CLASS_UID),
        implementation.get(ITEM_IMPLEMENTATION_VERSION_NAME),
    )


def _parse_fixed_four(pdu_type: int, body: bytes) -> bytes:
    """Body of A-ASSOCIATE-RJ, A-RELEASE-RP/RQ and A-ABORT, which is always 4 bytes."""
    if len(body) != 4:
        raise ProtocolError(f"{PDU_NAMES[pdu_type]} with a {len(body)}-byte body, expected 4")
    return body


def _parse_command_set(data: bytes) -> dict[int, bytes]:
    """Map element number -> value for an Implicit VR LE command set (group 0000)."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if len(data) - offset < ELEMENT_HEADER.size:
            raise ProtocolError("truncated element header in C-ECHO-RSP command set")
        group, element, length = ELEMENT_HEADER.unpack_from(data, offset)
        offset += ELEMENT_HEADER.size
        if group != COMMAND_GROUP:
            raise ProtocolError(f"element ({group:04X},{element:04X}) outside group 0000 in a command set")
        if length > len(data) - offset:
            raise ProtocolError(
                f"element (0000,{element:04X}) announces {length} bytes "
                f"but only {len(data) - offset} remain in the command set"
            )
        elements[element] = data[offset : offset + length]
        offset += length
    return elements


def _us(elements: dict[int, bytes], element: int, name: str) -> int:
    value = elements.get(element)
    if value is None:
        raise ProtocolError(f"C-ECHO-RSP lacks {name} (0000,{element:04X})")
    if len(value) != 2:
        raise ProtocolError(f"C-ECHO-RSP {name} (0000,{element:04X}) is {len(value)} bytes, expected 2")
    (number,) = struct.unpack("<H", value)
    return int(number)


def _check_c_echo_rsp(command: bytes, message_id: int) -> int:
    """Validate a reassembled C-ECHO-RSP and return its status."""
    elements = _parse_command_set(command)
    command_field = _us(elements, COMMAND_FIELD, "CommandField")
    if command_field != C_ECHO_RSP_FIELD:
        raise ProtocolError(
            f"expected a C-ECHO-RSP (CommandField 0x{C_ECHO_RSP_FIELD:04X}), "
            f"got CommandField 0x{command_field:04X}",
            ABORT_UNEXPECTED_PDU,
        )
    responded_to = _us(elements, MESSAGE_ID_BEING_RESPONDED_TO, "MessageIDBeingRespondedTo")
    if responded_to != message_id:
        raise ProtocolError(f"C-ECHO-RSP answers message {responded_to}, expected {message_id}")
    if COMMAND_DATA_SET_TYPE in elements:
        data_set_type = _us(elements, COMMAND_DATA_SET_TYPE, "CommandDataSetType")
        if data_set_type != NO_DATA_SET:
            raise ProtocolError(f"C-ECHO-RSP announces a data set (CommandDataSetType 0x{data_set_type:04X})")
    return _us(elements, STATUS, "Status")


# --------------------------------------------------------------------------
# Transport
# --------------------------------------------------------------------------


def _bind_address(family: int, destination: str) -> tuple[str, int]:
    """Local address to bind before connecting, so on_bound can see the port."""
    if family == socket.AF_INET6:
        return ("::1" if destination == "::1" else "::", 0)
    return ("127.0.0.1" if destination.startswith("127.") else "0.0.0.0", 0)


def _connect(
    host: str,
    port: int,
    timeout: float,
    source_address: tuple[str, int] | None,
    on_bound: Callable[[tuple[str, int]], None] | None,
    deadline: float,
    trace: EchoTrace,
) -> socket.socket:
    """Open a TCP connection by ``deadline``, trying each resolved address until one answers."""
    try:
        with _Phase(trace, "resolve"):
            addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ConnectFailed(f"cannot resolve host {host!r}: {exc.strerror}", "resolve") from exc
    except UnicodeError as exc:
        # The IDNA codec rejects names such as "a..b" before any lookup.
        raise ConnectFailed(f"cannot resolve host {host!r}: invalid host name", "resolve") from exc
    with _Phase(trace, "connect"):
        sock = _connect_any(host, port, timeout, source_address, on_bound, deadline, addresses)
    try:
        peer = sock.getpeername()
    except OSError as exc:  # reset as soon as it connected
        sock.close()
        raise ConnectFailed(f"connection lost at once: {exc.strerror or exc}", "connect") from exc
    trace.peer_address = (str(peer[0]), int(peer[1]))
    return sock


def _connect_any(
    host: str,
    port: int,
    timeout: float,
    source_address: tuple[str, int] | None,
    on_bound: Callable[[tuple[str, int]], None] | None,
    deadline: float,
    addresses: list[tuple[Any, Any, int, str, Any]],
) -> socket.socket:
    failure, kind = f"no address for host {host!r}", "resolve"
    for family, sock_type, proto, _, sockaddr in addresses:
        ip = str(sockaddr[0])
        endpoint = format_address(ip, port)
        if ip != host:
            endpoint += f" ({host})"
        sock = socket.socket(family, sock_type, proto)
        try:
            if source_address is not None:
                sock.bind(source_address)
            elif on_bound is not None:
                sock.bind(_bind_address(family, ip))
            if on_bound is not None:
                local = sock.getsockname()
                on_bound((str(local[0]), int(local[1])))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            sock.connect(sockaddr)
            # Every PDU is written with one sendall; Nagle would only add latency.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except TimeoutError:
            sock.close()
            failure, kind = f"connect timed out after {timeout:g} s: {endpoint}", "timeout"
        except ConnectionRefusedError:
            sock.close()
            failure, kind = f"connection refused: {endpoint}", "refused"
        except OSError as exc:
            sock.close()
            failure, kind = f"cannot connect to {endpoint}: {exc.strerror or exc}", "connect"
        except BaseException:
            sock.close()
            raise
    raise ConnectFailed(failure, kind)


def _wrap_tls(
    sock: socket.socket,
    context: ssl.SSLContext,
    server_hostname: str,
    deadline: float,
    endpoint: str,
) -> ssl.SSLSocket:
    """Run the TLS handshake within the connect deadline; failures are ConnectFailed."""
    import ssl

    try:
        tls = context.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False)
    except OSError as exc:
        # The peer reset the connection between connect() and here (a listener
        # stopping or restarting does): no TLS was ever tried.
        _close_half_wrapped(exc)
        sock.close()
        detail = exc.strerror or str(exc)
        raise ConnectFailed(
            f"connection lost before the TLS handshake: {detail}: {endpoint}", "connect"
        ) from exc
    except BaseException:
        sock.close()
        raise
    try:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        tls.settimeout(remaining)
        tls.do_handshake()
    except ssl.SSLCertVerificationError as exc:
        tls.close()
        detail = (exc.verify_message or exc.reason or str(exc)).rstrip(".")
        raise ConnectFailed(f"TLS handshake failed: {detail}: {endpoint}", "tls") from exc
    except ssl.SSLError as exc:
        tls.close()
        detail = str(exc.reason or exc)
        if detail == "WRONG_VERSION_NUMBER":
            # What OpenSSL says when the answer is not TLS at all.
            detail += " (the peer does not speak TLS on this port)"
        raise ConnectFailed(f"TLS handshake failed: {detail}: {endpoint}", "tls") from exc
    except TimeoutError as exc:
        tls.close()
        raise ConnectFailed(f"TLS handshake timed out: {endpoint}", "timeout") from exc
    except OSError as exc:
        tls.close()
        detail = exc.strerror or type(exc).__name__
        raise ConnectFailed(f"TLS handshake failed: {detail}: {endpoint}", "tls") from exc
    except BaseException:
        tls.close()
        raise
    return tls


def _close_half_wrapped(exc: BaseException) -> None:
    """Close the SSLSocket that a failed ``wrap_socket`` made and left open.

    CPython's ``SSLSocket._create`` takes the descriptor over first; when it
    then finds the socket no longer connected, its probe ``recv(1)`` can raise
    (ECONNRESET) without closing the new socket, which only the exception's
    frames still reference. It would be closed when they go, with a
    ResourceWarning.
    """
    import ssl

    frames = exc.__traceback__
    while frames is not None:
        candidate = frames.tb_frame.f_locals.get("self")
        if isinstance(candidate, ssl.SSLSocket):
            with contextlib.suppress(OSError):
                candidate.close()
        frames = frames.tb_next


def _tls_reason(exc: OSError) -> str | None:
    """Return the OpenSSL reason if ``exc`` is a TLS error, else None."""
    # Only a TLS socket raises SSLError, and then ssl is already imported.
    ssl_module = sys.modules.get("ssl")
    if ssl_module is not None and isinstance(exc, ssl_module.SSLError):
        return str(exc.reason or exc)
    return None


class _Wait(NamedTuple):
    """One bounded wait for the peer: which timeout applies, and until when."""

    stage: str  # "acse" or "dimse", as in EchoTimeout.stage
    limit: float
    deadline: float
    doing: str
    # The association's overall deadline ends this wait before its own limit.
    cut_short: bool = False

    @classmethod
    def start(cls, stage: str, limit: float, doing: str, overall: float | None = None) -> _Wait:
        own = time.monotonic() + limit
        if overall is not None and overall < own:
            return cls(stage, limit, overall, doing, cut_short=True)
        return cls(stage, limit, own, doing)


class _Channel:
    """A connected socket with a receive buffer and a deadline on every read."""

    def __init__(
        self, sock: socket.socket, network_timeout: float, *, tls: bool, deadline: float | None = None
    ) -> None:
        self.sock = sock
        self.network_timeout = network_timeout
        self.tls = tls
        self.deadline = deadline
        # Set once the peer has answered the A-ASSOCIATE-RQ; see _lost().
        self.answered = False
        self._buffer = bytearray()

    def send(self, data: bytes, what: str) -> None:
        limit = self.network_timeout
        if self.deadline is not None:
            limit = min(limit, self.deadline - time.monotonic())
        try:
            if limit <= 0:
                raise TimeoutError
            self.sock.settimeout(limit)
            self.sock.sendall(data)
        except TimeoutError as exc:
            if limit < self.network_timeout:
                raise EchoTimeout(f"deadline reached while sending {what}", "network") from exc
            raise EchoTimeout(
                f"network timeout ({self.network_timeout:g} s) while sending {what}",
                "network",
            ) from exc
        except OSError as exc:
            raise self._error(exc, f"sending {what}") from exc

    def send_quietly(self, data: bytes) -> None:
        """Best effort, for an A-ABORT on the way out: the peer may be gone."""
        try:
            self.sock.settimeout(min(self.network_timeout, 2.0))
            self.sock.sendall(data)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _lost(self, detail: str, doing: str) -> EchoError:
        if self.tls and not self.answered:
            # Under TLS 1.3 the client's handshake completes before the server
            # checks the client certificate, so a refused certificate shows up
            # only now: as an alert, a reset or an EOF, depending on timing.
            return ConnectFailed(
                f"TLS connection {detail} while {doing}; the server may have refused the client certificate",
                "tls",
            )
        if not self.tls and not self.answered:
            # A DICOM TLS port resets (or closes) a connection whose first
            # bytes are not a TLS ClientHello; a DICOM service answers with a PDU.
            return ProtocolError(
                f"connection {detail} while {doing}: the port may expect TLS",
                tls_suspected=True,
            )
        return ProtocolError(f"connection {detail} while {doing}")

    def _error(self, exc: OSError, doing: str) -> EchoError:
        reason = _tls_reason(exc)
        if reason is not None:
            return ConnectFailed(f"TLS error while {doing}: {reason}", "tls")
        return self._lost(f"lost ({exc.strerror or exc})", doing)

    def _read_exact(self, count: int, wait: _Wait) -> bytes:
        while len(self._buffer) < count:
            try:
                remaining = wait.deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self.sock.settimeout(remaining)
                if _TCP_QUICKACK is not None:
                    self.sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
                chunk = self.sock.recv(max(count - len(self._buffer), 65536))
            except TimeoutError as exc:
                if wait.cut_short:
                    raise EchoTimeout(f"deadline reached while {wait.doing}", wait.stage) from exc
                raise EchoTimeout(
                    f"{wait.stage.upper()} timeout ({wait.limit:g} s) while {wait.doing}",
                    wait.stage,
                ) from exc
            except OSError as exc:
                raise self._error(exc, wait.doing) from exc
            if not chunk:
                got = f" after {len(self._buffer)} of {count} bytes" if self._buffer else ""
                raise self._lost(f"closed by peer{got}", wait.doing)
            self._buffer += chunk
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def read_pdu(self, wait: _Wait) -> tuple[int, bytes]:
        """Read one whole PDU, refusing unknown types and implausible lengths."""
        header = self._read_exact(PDU_HEADER.size, wait)
        pdu_type, _, length = PDU_HEADER.unpack(header)
        if pdu_type not in PDU_NAMES:
            raise _not_dicom(header, wait.doing, tls=self.tls)
        if length > MAX_RECEIVED_PDU_LENGTH:
            raise ProtocolError(
                f"{PDU_NAMES[pdu_type]} announces {length} bytes while {wait.doing}, "
                f"more than the {MAX_RECEIVED_PDU_LENGTH} this client accepts"
            )
        body = self._read_exact(length, wait)
        if pdu_type == A_ABORT:
            _, _, source, reason = _parse_fixed_four(pdu_type, body)
            raise AssociationAborted(source, reason, wait.doing)
        return pdu_type, body


def _not_dicom(header: bytes, doing: str, *, tls: bool) -> ProtocolError:
    """The error for an answer that does not start like any PDU, naming what it looks like."""
    pdu_type = header[0]
    if header.startswith(b"HTTP/"):
        return ProtocolError(
            f"the peer answered in HTTP while {doing}: it is a web server, not a DICOM service",
            ABORT_UNRECOGNISED_PDU,
        )
    # A TLS record starts with its content type (0x15 alert, 0x16 handshake) and version 3.x.
    if not tls and pdu_type in (0x15, 0x16) and header[1] == 0x03:
        return ProtocolError(
            f"the peer answered with TLS (record type 0x{pdu_type:02X}) while {doing}: the port expects TLS",
            ABORT_UNRECOGNISED_PDU,
            tls_suspected=True,
        )
    return ProtocolError(
        f"unrecognised PDU type 0x{pdu_type:02X} while {doing} "
        "(is the peer a DICOM service, and does it expect TLS?)",
        ABORT_UNRECOGNISED_PDU,
    )


def _unexpected(pdu_type: int, doing: str) -> ProtocolError:
    return ProtocolError(f"unexpected {PDU_NAMES[pdu_type]} while {doing}", ABORT_UNEXPECTED_PDU)


# --------------------------------------------------------------------------
# The association
# --------------------------------------------------------------------------


def _negotiate(
    channel: _Channel,
    called_aet: str,
    calling_aet: str,
    max_pdu: int,
    transfer_syntaxes: Sequence[str],
    acse_timeout: float,
) -> _Accepted:
    channel.send(
        _associate_rq(called_aet, calling_aet, max_pdu, transfer_syntaxes),
        "A-ASSOCIATE-RQ",
    )
    wait = _Wait.start("acse", acse_timeout, "waiting for the A-ASSOCIATE response", channel.deadline)
    pdu_type, body = channel.read_pdu(wait)
    channel.answered = True
    if pdu_type == A_ASSOCIATE_RJ:
        _, result, source, reason = _parse_fixed_four(pdu_type, body)
        raise AssociationRejected(result, source, reason)
    if pdu_type != A_ASSOCIATE_AC:
        raise _unexpected(pdu_type, wait.doing)
    return _parse_associate_ac(body)


def _command_fragments(body: bytes) -> list[tuple[bytes, bool]]:
    """Split a P-DATA-TF body into (command fragment, is last) pairs, validating each PDV."""
    if not body:
        raise ProtocolError("P-DATA-TF without any PDV item")
    fragments: list[tuple[bytes, bool]] = []
    offset = 0
    while offset < len(body):
        if fragments and fragments[-1][1]:
            raise ProtocolError("P-DATA-TF carries more PDVs after the last command fragment")
        if len(body) - offset < PDV_HEADER.size:
            raise ProtocolError("truncated PDV item header in P-DATA-TF")
        length, context_id, control = PDV_HEADER.unpack_from(body, offset)
        start = offset + PDV_HEADER.size
        # The PDV length counts the context id and control bytes (PS3.8 9.3.5.1).
        if length < 2 or length - 2 > len(body) - start:
            raise ProtocolError(f"PDV item length {length} does not fit its {len(body)}-byte P-DATA-TF")
        if context_id != _PRESENTATION_CONTEXT_ID:
            raise ProtocolError(
                f"PDV for presentation context {context_id}, only {_PRESENTATION_CONTEXT_ID} was negotiated"
            )
        if control & ~(MCH_COMMAND | MCH_LAST):
            raise ProtocolError(f"PDV message control header 0x{control:02X} has reserved bits set")
        if not control & MCH_COMMAND:
            raise ProtocolError("unexpected data set fragment; a C-ECHO-RSP has none")
        offset = start + length - 2
        fragments.append((body[start:offset], bool(control & MCH_LAST)))
    return fragments


def _exchange_echo(channel: _Channel, message_id: int, peer_max_pdu: int, dimse_timeout: float) -> int:
    """Send one C-ECHO-RQ and return the status of its reassembled response."""
    for pdu in _p_data_pdus(_c_echo_rq(message_id), peer_max_pdu):
        channel.send(pdu, "the C-ECHO-RQ")
    wait = _Wait.start(
        "dimse", dimse_timeout, f"waiting for the C-ECHO-RSP to message {message_id}", channel.deadline
    )
    command = bytearray()
    while True:
        pdu_type, body = channel.read_pdu(wait)
        if pdu_type != P_DATA_TF:
            raise _unexpected(pdu_type, wait.doing)
        for fragment, last in _command_fragments(body):
            command += fragment
            if len(command) > _MAX_COMMAND_SET_LENGTH:
                raise ProtocolError(f"C-ECHO-RSP command set exceeds {_MAX_COMMAND_SET_LENGTH} bytes")
            if last:
                return _check_c_echo_rsp(bytes(command), message_id)


def _release(channel: _Channel, acse_timeout: float) -> None:
    channel.send(_release_rq(), "A-RELEASE-RQ")
    wait = _Wait.start("acse", acse_timeout, "waiting for the A-RELEASE-RP", channel.deadline)
    while True:
        pdu_type, body = channel.read_pdu(wait)
        if pdu_type == A_RELEASE_RP:
            _parse_fixed_four(pdu_type, body)
            return
        if pdu_type == A_RELEASE_RQ:
            # Release collision (PS3.8 9.2.4): the requestor answers first,
            # then still waits for the peer's A-RELEASE-RP.
            _parse_fixed_four(pdu_type, body)
            channel.send(_release_rp(), "A-RELEASE-RP")
            continue
        raise _unexpected(pdu_type, wait.doing)


def _check_arguments(
    called_aet: str,
    calling_aet: str,
    repeat: int,
    timeouts: dict[str, float | None],
    max_pdu: int,
    transfer_syntaxes: Sequence[str],
) -> tuple[str, str]:
    called = check_ae_title(called_aet, f"called AE title {called_aet!r}")
    calling = check_ae_title(calling_aet, f"calling AE title {calling_aet!r}")
    if not 1 <= repeat <= 0xFFFF:
        raise ValueError(f"repeat must be between 1 and 65535, got {repeat}")
    for name, value in timeouts.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if not 0 <= max_pdu <= 0xFFFFFFFF:
        raise ValueError(f"max_pdu must be between 0 (no limit) and 4294967295, got {max_pdu}")
    if isinstance(transfer_syntaxes, str):
        raise ValueError("transfer_syntaxes must be a sequence of UIDs, not one string")
    if not 1 <= len(transfer_syntaxes) <= 128:
        # 128 keeps the presentation context item well inside its 16-bit length.
        raise ValueError(f"between 1 and 128 transfer syntaxes are required, got {len(transfer_syntaxes)}")
    for uid in transfer_syntaxes:
        if not is_valid_uid(uid):
            raise ValueError(f"transfer syntax {uid!r} is not a valid UID")
    return called, calling


def echo_association(
    host: str,
    port: int,
    *,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "ECHOSCU",
    repeat: int = 1,
    abort: bool = False,
    acse_timeout: float = DEFAULT_TIMEOUT,
    dimse_timeout: float = DEFAULT_TIMEOUT,
    network_timeout: float = DEFAULT_TIMEOUT,
    connect_timeout: float | None = None,
    max_pdu: int = 16382,
    transfer_syntaxes: Sequence[str] = DEFAULT_TRANSFER_SYNTAXES,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    source_address: tuple[str, int] | None = None,
    on_bound: Callable[[tuple[str, int]], None] | None = None,
    deadline: float | None = None,
    trace: EchoTrace | None = None,
) -> EchoResult:
    """Run one association with ``repeat`` C-ECHOs (message IDs 1..N), then release it.

    With ``abort`` the association ends in an A-ABORT instead of a release.
    ``on_bound`` is called with the local (host, port) after the socket is
    bound and before it connects (to ``source_address`` if given, else to the
    loopback address for a loopback peer and the wildcard address otherwise,
    port 0); ``connect_timeout`` (default
    ``network_timeout``) bounds the TCP connect plus the TLS handshake;
    ``acse_timeout`` bounds each wait for an A-ASSOCIATE or A-RELEASE answer and
    ``dimse_timeout`` each wait for a C-ECHO-RSP. ``max_pdu`` is the largest PDU
    this side accepts (0: no limit). ``deadline`` (a ``time.monotonic()``
    value) ends every wait that would outlast it, so that the whole
    association is bounded. Host name resolution is not bounded by any of
    these. ``trace``, when given, is filled in with per-phase durations and
    what the peer presented, also when the association fails.

    A non-success status does not raise: the statuses are in the result.
    Raises EchoError subclasses when there is no association or it fails, and
    ValueError for invalid arguments.
    """
    called, calling = _check_arguments(
        called_aet,
        calling_aet,
        repeat,
        {
            "acse_timeout": acse_timeout,
            "dimse_timeout": dimse_timeout,
            "network_timeout": network_timeout,
            "connect_timeout": connect_timeout,
        },
        max_pdu,
        transfer_syntaxes,
    )
    trace = EchoTrace() if trace is None else trace
    started = time.monotonic()
    connect_limit = network_timeout if connect_timeout is None else connect_timeout
    connect_deadline = started + connect_limit
    if deadline is not None:
        connect_deadline = min(connect_deadline, deadline)
    sock = _connect(host, port, connect_limit, source_address, on_bound, connect_deadline, trace)
    if ssl_context is not None:
        with _Phase(trace, "tls"):
            tls_sock = _wrap_tls(
                sock,
                ssl_context,
                server_hostname or host,
                connect_deadline,
                format_address(host, port),
            )
        trace.tls_version = tls_sock.version()
        trace.peer_certificate = tls_sock.getpeercert(binary_form=True)
        sock = tls_sock
    channel = _Channel(sock, network_timeout, tls=ssl_context is not None, deadline=deadline)
    try:
        with _Phase(trace, "associate"):
            accepted = _negotiate(channel, called, calling, max_pdu, transfer_syntaxes, acse_timeout)
        trace.accepted = True
        trace.implementation_class_uid = accepted.implementation_class_uid
        trace.implementation_version_name = accepted.implementation_version_name
        if accepted.result != CONTEXT_ACCEPTED:
            # As pynetdicom and DCMTK's echoscu do: an association with no usable
            # context is aborted rather than released.
            channel.send_quietly(_abort(ABORT_SOURCE_USER, ABORT_REASON_NOT_SPECIFIED))
            raise NoAcceptedContext(accepted.result)
        if accepted.transfer_syntax not in transfer_syntaxes:
            raise ProtocolError(
                f"peer accepted transfer syntax {accepted.transfer_syntax!r}, which was not offered"
            )
        with _Phase(trace, "echo"):
            for message_id in range(1, repeat + 1):
                trace.statuses.append(
                    _exchange_echo(channel, message_id, accepted.peer_max_pdu, dimse_timeout)
                )
        statuses = tuple(trace.statuses)
        with _Phase(trace, "release"):
            if abort:
                channel.send_quietly(_abort(ABORT_SOURCE_USER, ABORT_REASON_NOT_SPECIFIED))
            else:
                _release(channel, acse_timeout)
        elapsed = time.monotonic() - started
        return EchoResult(statuses, accepted.transfer_syntax, accepted.peer_max_pdu, elapsed)
    except ProtocolError as exc:
        # PS3.8 state machine: an invalid or unexpected PDU is answered with an
        # A-ABORT from the service-provider before closing.
        channel.send_quietly(_abort(ABORT_SOURCE_PROVIDER, exc.abort_reason))
        raise
    except EchoTimeout:
        channel.send_quietly(_abort(ABORT_SOURCE_USER, ABORT_REASON_NOT_SPECIFIED))
        raise
    finally:
        sock.close()


def echo(
    address: str,
    *,
    default_port: int = 11112,
    called_aet: str = "ANY-SCP",
    calling_aet: str = "ECHOSCU",
    abort: bool = False,
    acse_timeout: float = DEFAULT_TIMEOUT,
    dimse_timeout: float = DEFAULT_TIMEOUT,
    network_timeout: float = DEFAULT_TIMEOUT,
    connect_timeout: float | None = None,
    max_pdu: int = 16382,
    transfer_syntaxes: Sequence[str] = DEFAULT_TRANSFER_SYNTAXES,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    source_address: tuple[str, int] | None = None,
    on_bound: Callable[[tuple[str, int]], None] | None = None,
) -> int:
    """Send one C-ECHO to ``[AET@]HOST[:PORT]`` and return its status (0 is Success).

    ``called_aet`` and ``default_port`` apply when the address leaves them out.
    Raises EchoError subclasses when there is no association (connect,
    rejection, abort, timeout, protocol error) and ValueError for a bad
    address; a non-success status is returned, not raised.
    """
    called, host, port = parse_address(address, default_port=default_port, default_called_aet=called_aet)
    result = echo_association(
        host,
        port,
        called_aet=called,
        calling_aet=calling_aet,
        abort=abort,
        acse_timeout=acse_timeout,
        dimse_timeout=dimse_timeout,
        network_timeout=network_timeout,
        connect_timeout=connect_timeout,
        max_pdu=max_pdu,
        transfer_syntaxes=transfer_syntaxes,
        ssl_context=ssl_context,
        server_hostname=server_hostname,
        source_address=source_address,
        on_bound=on_bound,
    )
    return result.statuses[0]


def client_ssl_context(
    *,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    key_password: str | None = None,
    insecure: bool = False,
    minimum_version: str = "TLSv1.2",
) -> ssl.SSLContext:
    """Build a client TLS context: verify the peer against ``ca_file`` (or the system CAs).

    ``cert_file``/``key_file`` present a client certificate for mutual TLS.
    ``insecure`` turns off certificate and host name checks. ``minimum_version``
    is "TLSv1.2" or "TLSv1.3". Raises ValueError for an unknown version and
    TlsFileError (an OSError) naming the file when one cannot be used.
    """
    import ssl

    versions = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
    if minimum_version not in versions:
        raise ValueError(f"unsupported minimum TLS version {minimum_version!r}; use 'TLSv1.2' or 'TLSv1.3'")
    if key_file is not None and cert_file is None:
        raise ValueError("key_file given without cert_file")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsFileError(_tls_file_problem("CA file", ca_file, exc), ca_file) from exc
    context.minimum_version = versions[minimum_version]
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert_file is not None:
        _load_client_certificate(context, cert_file, key_file, key_password)
    return context


def _tls_file_problem(what: str, path: str | None, exc: OSError) -> str:
    """``<what> '<path>': <why>``, in words rather than OpenSSL's "PEM lib"."""
    import ssl

    if not isinstance(exc, ssl.SSLError):
        return f"cannot read {what} {path!r}: {exc.strerror or exc}"
    if what == "CA file":
        return f"{what} {path!r} holds no PEM certificate"
    return f"{what} {path!r} cannot be used: {exc.reason or exc}"


def _load_client_certificate(
    context: ssl.SSLContext, cert_file: str, key_file: str | None, key_password: str | None
) -> None:
    import ssl

    for what, path in (("certificate file", cert_file), ("key file", key_file)):
        if path is not None:
            try:
                with open(path, "rb") as handle:
                    text = handle.read()
            except OSError as exc:
                raise TlsFileError(_tls_file_problem(what, path, exc), path) from exc
            if b"-----BEGIN " not in text:
                raise TlsFileError(f"{what} {path!r} is not in PEM format", path)
    key_path = key_file or cert_file
    # Without a password OpenSSL would prompt on the terminal for an encrypted key.
    password = key_password if key_password is not None else ""
    try:
        context.load_cert_chain(cert_file, key_file, password=password)
    except ssl.SSLError as exc:
        with open(cert_file, "rb") as handle:
            cert_text = handle.read()
        with open(key_path, "rb") as handle:
            key_text = handle.read()
        if b"CERTIFICATE-----" not in cert_text:
            message = f"certificate file {cert_file!r} holds no PEM certificate"
        elif exc.reason == "KEY_VALUES_MISMATCH":
            message = f"key file {key_path!r} does not match certificate file {cert_file!r}"
        elif b"ENCRYPTED" in key_text and key_password is None:
            message = f"key file {key_path!r} is encrypted and no key password was given"
        elif b"ENCRYPTED" in key_text:
            message = f"the key password does not decrypt key file {key_path!r}"
        elif key_file is None:
            message = f"certificate file {cert_file!r} holds no private key, and no key file was given"
        else:
            message = f"key file {key_file!r} holds no PEM private key"
        raise TlsFileError(message, key_path) from exc
