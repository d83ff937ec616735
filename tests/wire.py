"""A second, hand-written reading of the DICOM upper layer, for tests and benchmarks.

The tests check the daemon and the probe client against these bytes, so this
module is written from the standard, not from the code under test: it imports
nothing from ``echo_scp`` (not ``protocol``, not ``scu``), and it encodes and
parses in its own way. A mistake in ``echo_scp.protocol`` then shows up as a
disagreement instead of being shared by both sides. bench/ imports it too.

References: PS3.8 9.3 (the PDUs; A-ASSOCIATE-RJ in 9.3.4, A-ABORT in 9.3.8),
PS3.8 Annex D (user information) and E.2 (message control header), PS3.7
9.3.5 and E.1 (the C-ECHO command set, Implicit VR Little Endian).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from enum import IntEnum

# UIDs from PS3.6 Annex A.
VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
# Who this peer says it is (PS3.7 D.3.3.2): a UUID-derived UID of its own.
OWN_CLASS_UID = "2.25.301927395584614092411906712683591946531"
OWN_VERSION_NAME = "TESTS_WIRE"

# Type, a reserved byte, then the length of what follows: 6 bytes.
HEADER = struct.Struct(">BxI")


class Pdu(IntEnum):
    """PDU types (PS3.8 Table 9-11)."""

    ASSOCIATE_RQ = 1
    ASSOCIATE_AC = 2
    ASSOCIATE_RJ = 3
    P_DATA_TF = 4
    RELEASE_RQ = 5
    RELEASE_RP = 6
    ABORT = 7

    @property
    def title(self) -> str:
        """The standard's name: A-ASSOCIATE-RQ, P-DATA-TF and so on."""
        return "P-DATA-TF" if self is Pdu.P_DATA_TF else "A-" + self.name.replace("_", "-")


# Message control header bits of a PDV (PS3.8 E.2).
COMMAND = 0b01
LAST = 0b10


class WireError(Exception):
    """The bytes are not what the standard, or the exchange under way, allows."""


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


def pdu(pdu_type: int, body: bytes) -> bytes:
    """A whole PDU: type, reserved byte, 32-bit big-endian length, body."""
    return bytes((pdu_type, 0)) + len(body).to_bytes(4, "big") + body


def item(item_type: int, value: bytes) -> bytes:
    """An item or sub-item: type, reserved byte, 16-bit big-endian length, value."""
    return bytes((item_type, 0)) + len(value).to_bytes(2, "big") + value


def _ae(title: str | bytes) -> bytes:
    raw = title.encode("ascii") if isinstance(title, str) else title
    # Sixteen bytes, space padded; longer input is cut so hostile tests can lie.
    return raw.ljust(16, b" ")[:16]


def _fixed_part(protocol_version: int, called: str | bytes, calling: str | bytes) -> bytes:
    # Protocol version (bit 0), two reserved bytes, the AE titles, 32 reserved bytes.
    return protocol_version.to_bytes(2, "big") + bytes(2) + _ae(called) + _ae(calling) + bytes(32)


def user_information(max_pdu: int, class_uid: str | None, version_name: str | None) -> bytes:
    """The user information item: maximum length, then implementation class UID and version name."""
    value = item(0x51, max_pdu.to_bytes(4, "big"))
    if class_uid is not None:
        value += item(0x52, class_uid.encode("ascii"))
    if version_name is not None:
        value += item(0x55, version_name.encode("ascii"))
    return item(0x50, value)


def associate_rq(
    called: str | bytes = "ECHOSCP",
    calling: str | bytes = "WIRE",
    *,
    abstract_syntax: str = VERIFICATION,
    transfer_syntaxes: tuple[str, ...] = (IMPLICIT_LE,),
    context_id: int = 1,
    max_pdu: int = 16382,
    protocol_version: int = 1,
    class_uid: str | None = OWN_CLASS_UID,
    version_name: str | None = OWN_VERSION_NAME,
) -> bytes:
    """An A-ASSOCIATE-RQ proposing one presentation context."""
    context = bytes((context_id, 0, 0, 0)) + item(0x30, abstract_syntax.encode("ascii"))
    context += b"".join(item(0x40, uid.encode("ascii")) for uid in transfer_syntaxes)
    body = (
        _fixed_part(protocol_version, called, calling)
        + item(0x10, APPLICATION_CONTEXT.encode("ascii"))
        + item(0x20, context)
        + user_information(max_pdu, class_uid, version_name)
    )
    return pdu(Pdu.ASSOCIATE_RQ, body)


def associate_ac(
    called: str = "ANY-SCP",
    calling: str = "ECHOSCU",
    *,
    result: int = 0,
    transfer_syntax: str = IMPLICIT_LE,
    context_id: int = 1,
    max_pdu: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-AC answering one presentation context with ``result`` (0: acceptance)."""
    context = bytes((context_id, 0, result, 0)) + item(0x40, transfer_syntax.encode("ascii"))
    body = (
        _fixed_part(1, called, calling)
        + item(0x10, APPLICATION_CONTEXT.encode("ascii"))
        + item(0x21, context)
        + user_information(max_pdu, None, None)
    )
    return pdu(Pdu.ASSOCIATE_AC, body)


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ: a reserved byte, then result, source and reason/diagnostic."""
    return pdu(Pdu.ASSOCIATE_RJ, bytes((0, result, source, reason)))


def abort(source: int = 0, reason: int = 0) -> bytes:
    """An A-ABORT: two reserved bytes, then source and reason/diagnostic."""
    return pdu(Pdu.ABORT, bytes((0, 0, source, reason)))


RELEASE_RQ = pdu(Pdu.RELEASE_RQ, bytes(4))
RELEASE_RP = pdu(Pdu.RELEASE_RP, bytes(4))
ABORT = abort()


def element(number: int, value: bytes) -> bytes:
    """A command element (group 0000) in Implicit VR Little Endian: tag, 32-bit length, value."""
    return (0).to_bytes(2, "little") + number.to_bytes(2, "little") + len(value).to_bytes(4, "little") + value


def us(number: int) -> bytes:
    """An unsigned short value."""
    return number.to_bytes(2, "little")


def command_set(*elements: bytes) -> bytes:
    """Encoded elements behind their Command Group Length (0000,0000)."""
    body = b"".join(elements)
    return element(0x0000, len(body).to_bytes(4, "little")) + body


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw  # UI values are NUL-padded to even length


def c_echo_rq(message_id: int, sop_class: str = VERIFICATION) -> bytes:
    """A C-ECHO-RQ command set: no data set."""
    return command_set(
        element(0x0002, _uid_value(sop_class)),
        element(0x0100, us(0x0030)),
        element(0x0110, us(message_id)),
        element(0x0800, us(0x0101)),
    )


def c_echo_rsp(message_id: int, status: int, sop_class: str = VERIFICATION) -> bytes:
    """A C-ECHO-RSP command set with ``status``."""
    return command_set(
        element(0x0002, _uid_value(sop_class)),
        element(0x0100, us(0x8030)),
        element(0x0120, us(message_id)),
        element(0x0800, us(0x0101)),
        element(0x0900, us(status)),
    )


def pdv(fragment: bytes, control: int = COMMAND | LAST, context_id: int = 1) -> bytes:
    """A presentation data value item; its length counts the context ID and control bytes."""
    return (len(fragment) + 2).to_bytes(4, "big") + bytes((context_id, control)) + fragment


def p_data(*pdvs: bytes) -> bytes:
    """A P-DATA-TF carrying these PDV items."""
    return pdu(Pdu.P_DATA_TF, b"".join(pdvs))


def echo_request(message_id: int = 1) -> bytes:
    """A P-DATA-TF carrying a whole C-ECHO-RQ in one PDV."""
    return p_data(pdv(c_echo_rq(message_id)))


def echo_request_parts() -> tuple[bytes, bytes]:
    """:func:`echo_request` split around the Message ID value.

    ``head + message_id.to_bytes(2, "little") + tail`` is the whole PDU, so a
    load generator can number thousands of requests without encoding any.
    """
    whole = echo_request(0)
    marker = element(0x0110, us(0))
    start = whole.index(marker) + len(marker) - 2
    return whole[:start], whole[start + 2 :]


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


def split_pdu(data: bytes) -> tuple[int, bytes, bytes] | None:
    """(type, body, what follows) of the first PDU in ``data``, or None if it is not all there."""
    if len(data) < HEADER.size:
        return None
    pdu_type, length = HEADER.unpack_from(data)
    end = HEADER.size + length
    if len(data) < end:
        return None
    return pdu_type, data[HEADER.size : end], data[end:]


def recv_exact(sock: socket.socket, count: int) -> bytes:
    """Exactly ``count`` bytes; EOFError if the peer closes first."""
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """The next (type, body) read off a blocking socket; EOFError if the peer closes first."""
    pdu_type, length = HEADER.unpack(recv_exact(sock, HEADER.size))
    return pdu_type, recv_exact(sock, length)


def items(data: bytes) -> list[tuple[int, bytes]]:
    """(type, value) of each item in a run of items."""
    found = []
    position = 0
    while position < len(data):
        if len(data) - position < 4:
            raise WireError(f"item header cut short at byte {position}")
        kind, length = data[position], int.from_bytes(data[position + 2 : position + 4], "big")
        value = data[position + 4 : position + 4 + length]
        if len(value) != length:
            raise WireError(f"item 0x{kind:02X} announces {length} bytes, {len(value)} remain")
        found.append((kind, value))
        position += 4 + length
    return found


@dataclass
class AssociateAc:
    """What an A-ASSOCIATE-AC says."""

    protocol_version: int
    called: str
    calling: str
    application_context: str = ""
    # Presentation context ID -> (result, transfer syntax or None).
    contexts: dict[int, tuple[int, str | None]] = field(default_factory=dict)
    max_pdu: int | None = None
    class_uid: str | None = None
    version_name: str | None = None


def parse_associate_ac(body: bytes) -> AssociateAc:
    """Decode the body of an A-ASSOCIATE-AC."""
    if len(body) < 68:
        raise WireError(f"A-ASSOCIATE-AC body of {len(body)} bytes, shorter than its 68-byte fixed part")
    answer = AssociateAc(
        protocol_version=int.from_bytes(body[0:2], "big"),
        called=body[4:20].decode("ascii").strip(),
        calling=body[20:36].decode("ascii").strip(),
    )
    for kind, value in items(body[68:]):
        if kind == 0x10:
            answer.application_context = value.decode("ascii")
        elif kind == 0x21:
            if len(value) < 4:
                raise WireError(f"presentation context item of {len(value)} bytes")
            syntaxes = [sub.decode("ascii") for sub_kind, sub in items(value[4:]) if sub_kind == 0x40]
            answer.contexts[value[0]] = (value[2], syntaxes[0] if syntaxes else None)
        elif kind == 0x50:
            for sub_kind, sub in items(value):
                if sub_kind == 0x51:
                    answer.max_pdu = int.from_bytes(sub, "big")
                elif sub_kind == 0x52:
                    answer.class_uid = sub.decode("ascii")
                elif sub_kind == 0x55:
                    answer.version_name = sub.decode("ascii")
    return answer


def check_associate_ac(body: bytes, context_id: int = 1) -> None:
    """Raise WireError unless presentation context ``context_id`` was accepted."""
    result, _ = parse_associate_ac(body).contexts.get(context_id, (None, None))
    if result is None:
        raise WireError(f"A-ASSOCIATE-AC without presentation context {context_id}")
    if result != 0:
        raise WireError(f"presentation context rejected (result {result})")


def pdvs(body: bytes) -> list[tuple[int, int, bytes]]:
    """(context ID, control header, fragment) of each PDV in a P-DATA-TF body."""
    found = []
    position = 0
    while position < len(body):
        length = int.from_bytes(body[position : position + 4], "big")
        if length < 2 or position + 4 + length > len(body):
            raise WireError(f"PDV of length {length} does not fit its {len(body)}-byte P-DATA-TF")
        found.append((body[position + 4], body[position + 5], body[position + 6 : position + 4 + length]))
        position += 4 + length
    return found


def parse_command(data: bytes) -> dict[int, bytes]:
    """Element number -> value of a group 0000 command set."""
    elements: dict[int, bytes] = {}
    position = 0
    while position + 8 <= len(data):
        group, number, length = struct.unpack_from("<HHI", data, position)
        if group != 0:
            raise WireError(f"element ({group:04X},{number:04X}) in a command set")
        if position + 8 + length > len(data):
            raise WireError(f"element (0000,{number:04X}) announces {length} bytes, more than remain")
        elements[number] = data[position + 8 : position + 8 + length]
        position += 8 + length
    if position != len(data):
        raise WireError(f"command set ends inside an element header ({len(data) - position} bytes left)")
    return elements


def echo_response(body: bytes) -> tuple[int, int]:
    """(Message ID Being Responded To, Status) of a C-ECHO-RSP carried whole in one P-DATA-TF body.

    Every server under test sends the ~100-byte response as one PDV; a
    fragmented one is an error here, not reassembled.
    """
    found = pdvs(body)
    if len(found) != 1 or found[0][1] != COMMAND | LAST:
        controls = [f"0x{control:02X}" for _, control, _ in found]
        raise WireError(f"unexpected PDVs (control headers {controls})")
    command = parse_command(found[0][2])
    if command.get(0x0100) != us(0x8030):
        raise WireError(f"not a C-ECHO-RSP (CommandField {command.get(0x0100)!r})")
    responded_to, status = command.get(0x0120, b""), command.get(0x0900, b"")
    if len(responded_to) != 2 or len(status) != 2:
        raise WireError("C-ECHO-RSP without a two-byte MessageIDBeingRespondedTo and Status")
    return int.from_bytes(responded_to, "little"), int.from_bytes(status, "little")


def describe(pdu_type: int, body: bytes) -> str:
    """A PDU in a few words: ``A-ASSOCIATE-RJ 1/1/7``, ``A-ABORT source 2 reason 1``, ``P-DATA-TF``."""
    try:
        name = Pdu(pdu_type).title
    except ValueError:
        return f"unknown PDU type 0x{pdu_type:02X}"
    if pdu_type == Pdu.ASSOCIATE_RJ and len(body) == 4:
        return f"{name} {body[1]}/{body[2]}/{body[3]}"
    if pdu_type == Pdu.ABORT and len(body) == 4:
        return f"{name} source {body[2]} reason {body[3]}"
    return name


def expect(pdu_type: int, wanted: Pdu, body: bytes) -> None:
    """Raise WireError naming what arrived when it is not a ``wanted`` PDU."""
    if pdu_type != wanted:
        raise WireError(f"{describe(pdu_type, body)} (expected {wanted.title})")
