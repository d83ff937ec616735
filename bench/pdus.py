"""The few DICOM upper-layer PDUs the load generator sends and reads, built by hand.

The generator is meant to cost the machine as little as possible per
association, so every request PDU is encoded once, up front, and the answers
are checked only as far as a benchmark needs: the PDU type, that presentation
context 1 was accepted, and the C-ECHO-RSP status. It deliberately does not
reuse ``echo_scp.scu``: a benchmark of the daemon should not share code with
it, and the probe client's thorough validation is not what is measured here.
References: PS3.8 9.3 (PDUs) and PS3.7 9.3.5 / E.1 (the C-ECHO command set).
"""

from __future__ import annotations

import struct

VERIFICATION_SOP_CLASS = b"1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = b"1.2.840.10008.1.2"
_APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
# A UUID-derived UID (PS3.5 B.2) naming this generator in servers' logs.
_IMPLEMENTATION_CLASS_UID = b"2.25.301927395584614092411906712683591946531"
_IMPLEMENTATION_VERSION = b"ECHO_SCP_BENCH"

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

PDU_HEADER = struct.Struct(">BxI")
_ITEM_HEADER = struct.Struct(">BxH")
_ELEMENT_HEADER = struct.Struct("<HHI")
_PDV_HEADER = struct.Struct(">IBB")
_MAX_PDU_RECEIVED = 16384
# Largest PDU body the generator accepts; anything bigger means a broken peer.
MAX_PDU_BODY = 1 << 20

_TAG_STATUS = 0x0900
_MESSAGE_CONTROL_LAST_COMMAND = 0x03


class PduError(Exception):
    """The server answered with something other than what a C-ECHO exchange expects."""


def _item(item_type: int, value: bytes) -> bytes:
    return _ITEM_HEADER.pack(item_type, len(value)) + value


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return PDU_HEADER.pack(pdu_type, len(body)) + body


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT_HEADER.pack(0x0000, element, len(value)) + value


def associate_rq(called_aet: str, calling_aet: str = "ECHOBENCH") -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification in Implicit VR Little Endian only."""
    context = (
        bytes((1, 0, 0, 0)) + _item(0x30, VERIFICATION_SOP_CLASS) + _item(0x40, IMPLICIT_VR_LITTLE_ENDIAN)
    )
    user_information = (
        _item(0x51, struct.pack(">I", _MAX_PDU_RECEIVED))
        + _item(0x52, _IMPLEMENTATION_CLASS_UID)
        + _item(0x55, _IMPLEMENTATION_VERSION)
    )
    fixed = struct.pack(
        ">HH16s16s32x", 1, 0, called_aet.encode("ascii").ljust(16), calling_aet.encode("ascii").ljust(16)
    )
    body = fixed + _item(0x10, _APPLICATION_CONTEXT) + _item(0x20, context) + _item(0x50, user_information)
    return _pdu(A_ASSOCIATE_RQ, body)


def c_echo_rq_parts() -> tuple[bytes, bytes]:
    """A P-DATA-TF carrying one C-ECHO-RQ (Implicit VR LE, one PDV), split around its MessageID.

    ``head + message_id.to_bytes(2, "little") + tail`` is the whole PDU, so a
    client can number thousands of requests without re-encoding any.
    """
    sop_class = VERIFICATION_SOP_CLASS + b"\x00"  # UI values are padded to even length
    before_id = (
        _element(0x0002, sop_class)
        + _element(0x0100, struct.pack("<H", 0x0030))  # CommandField: C-ECHO-RQ
        + _ELEMENT_HEADER.pack(0x0000, 0x0110, 2)  # MessageID; its value follows
    )
    after_id = _element(0x0800, struct.pack("<H", 0x0101))  # CommandDataSetType: none
    group_length = len(before_id) + 2 + len(after_id)
    command_length = 12 + group_length  # the group length element itself is 12 bytes
    pdv_header = _PDV_HEADER.pack(command_length + 2, 1, _MESSAGE_CONTROL_LAST_COMMAND)
    pdu_header = PDU_HEADER.pack(P_DATA_TF, _PDV_HEADER.size + command_length)
    head = pdu_header + pdv_header + _element(0x0000, struct.pack("<I", group_length)) + before_id
    return head, after_id


def c_echo_rq(message_id: int) -> bytes:
    """The whole P-DATA-TF of a C-ECHO-RQ with this MessageID."""
    head, tail = c_echo_rq_parts()
    return head + (message_id & 0xFFFF).to_bytes(2, "little") + tail


RELEASE_RQ = _pdu(A_RELEASE_RQ, bytes(4))
ABORT = _pdu(A_ABORT, bytes(4))


def check_associate_ac(body: bytes) -> None:
    """Raise PduError unless presentation context 1 was accepted (result 0)."""
    offset = 68  # protocol version, reserved, two AE titles, 32 reserved bytes
    while offset + 4 <= len(body):
        item_type, length = _ITEM_HEADER.unpack_from(body, offset)
        if item_type == 0x21 and length >= 4 and body[offset + 4] == 1:
            result = body[offset + 6]
            if result != 0:
                raise PduError(f"presentation context rejected (result {result})")
            return
        offset += 4 + length
    raise PduError("A-ASSOCIATE-AC without presentation context 1")


def echo_status(body: bytes) -> int:
    """The Status of a C-ECHO-RSP carried whole in one P-DATA-TF body.

    Every server under test sends the ~100-byte response as one PDV; a
    fragmented response is reported as an error rather than reassembled.
    """
    if len(body) < _PDV_HEADER.size:
        raise PduError("P-DATA-TF too short")
    pdv_length, _context, control = _PDV_HEADER.unpack_from(body)
    if control != _MESSAGE_CONTROL_LAST_COMMAND or pdv_length + 4 != len(body):
        raise PduError(f"unexpected PDV (control 0x{control:02X}, length {pdv_length})")
    offset = _PDV_HEADER.size
    while offset + 8 <= len(body):
        _group, element, length = _ELEMENT_HEADER.unpack_from(body, offset)
        offset += 8
        if element == _TAG_STATUS and length == 2:
            return int.from_bytes(body[offset : offset + 2], "little")
        offset += length
    raise PduError("C-ECHO-RSP without Status")


def expect(pdu_type: int, wanted: int, body: bytes) -> None:
    """Raise PduError naming what arrived when ``pdu_type`` is not ``wanted``."""
    if pdu_type == wanted:
        return
    if pdu_type == A_ASSOCIATE_RJ and len(body) >= 4:
        raise PduError(f"A-ASSOCIATE-RJ {body[1]}/{body[2]}/{body[3]}")
    if pdu_type == A_ABORT and len(body) >= 4:
        raise PduError(f"A-ABORT source {body[2]} reason {body[3]}")
    raise PduError(f"unexpected PDU type 0x{pdu_type:02X}, expected 0x{wanted:02X}")
