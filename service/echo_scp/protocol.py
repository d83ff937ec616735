"""The DICOM facts echo-scp relies on, each written down once.

Upper-layer PDU and item types (PS3.8 9.3), the A-ASSOCIATE-RJ and A-ABORT
fields in words (PS3.8 9.3.4, 9.3.8), presentation context results (PS3.8
9.3.3.2), the C-ECHO command set (PS3.7 9.3.5, E.1), AE title and UID rules
(PS3.5 6.2, 9.1), the UIDs the project uses, and how this implementation names
itself in an association (PS3.7 D.3.3.2).

Standard library only, like ``scu.py``, which imports it: the probe client
starts every few seconds, and start-up is its cost. The daemon's modules
(engine, listener, metrics, settings) import the same facts from here.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from echo_scp import __version__

# --------------------------------------------------------------------------
# Upper layer PDUs (PS3.8 9.3.1, Table 9-11) and their items
# --------------------------------------------------------------------------

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
PDU_NAMES = {
    A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
    A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    P_DATA_TF: "P-DATA-TF",
    A_RELEASE_RQ: "A-RELEASE-RQ",
    A_RELEASE_RP: "A-RELEASE-RP",
    A_ABORT: "A-ABORT",
}

# Item and sub-item types (PS3.8 9.3.2, 9.3.3 and Annex D).
ITEM_APPLICATION_CONTEXT = 0x10
ITEM_PRESENTATION_CONTEXT_RQ = 0x20
ITEM_PRESENTATION_CONTEXT_AC = 0x21
ITEM_ABSTRACT_SYNTAX = 0x30
ITEM_TRANSFER_SYNTAX = 0x40
ITEM_USER_INFORMATION = 0x50
ITEM_MAXIMUM_LENGTH = 0x51
ITEM_IMPLEMENTATION_CLASS_UID = 0x52
ITEM_IMPLEMENTATION_VERSION_NAME = 0x55

# Type, reserved, length: a PDU header is 6 bytes, an item header 4 (both big
# endian); a PDV item is its length (counting the two bytes that follow),
# presentation context ID and message control header.
PDU_HEADER = struct.Struct(">BBI")
ITEM_HEADER = struct.Struct(">BBH")
PDV_HEADER = struct.Struct(">IBB")
# Message control header bits (PS3.8 E.2).
MCH_COMMAND = 0x01
MCH_LAST = 0x02


def encode_pdu(pdu_type: int, body: bytes) -> bytes:
    """A PDU: its 6-byte header, then ``body``."""
    return PDU_HEADER.pack(pdu_type, 0, len(body)) + body


def encode_item(item_type: int, value: bytes) -> bytes:
    """An item or sub-item: its 4-byte header, then ``value``."""
    return ITEM_HEADER.pack(item_type, 0, len(value)) + value


# --------------------------------------------------------------------------
# A-ASSOCIATE-RJ (PS3.8 9.3.4, Table 9-21)
# --------------------------------------------------------------------------

# Each code in words, and in snake case for metric labels and log fields (the
# label values are public: dashboards select on them). The words are the
# standard's, shortened and spelt as pynetdicom prints them ("recognised";
# PS3.8 and DCMTK write "recognized").
REJECT_RESULTS: dict[int, tuple[str, str]] = {
    1: ("permanent", "permanent"),
    2: ("transient", "transient"),
}
REJECT_SOURCES: dict[int, tuple[str, str]] = {
    1: ("service-user", "service_user"),
    2: ("service-provider (ACSE related)", "service_provider_acse"),
    3: ("service-provider (presentation related)", "service_provider_presentation"),
}
# (source, reason) -> words: the reason's meaning depends on the source. Every
# other value is reserved.
REJECT_REASONS: dict[tuple[int, int], tuple[str, str]] = {
    (1, 1): ("No reason given", "no_reason_given"),
    (1, 2): ("Application context name not supported", "application_context_name_not_supported"),
    (1, 3): ("Calling AE title not recognised", "calling_ae_title_not_recognised"),
    (1, 7): ("Called AE title not recognised", "called_ae_title_not_recognised"),
    (2, 1): ("No reason given", "no_reason_given"),
    (2, 2): ("Protocol version not supported", "protocol_version_not_supported"),
    (3, 1): ("Temporary congestion", "temporary_congestion"),
    (3, 2): ("Local limit exceeded", "local_limit_exceeded"),
}
# What an undefined code is called: bounded, so a peer cannot mint labels.
UNKNOWN_LABEL = "unknown"


class Rejection(NamedTuple):
    """The result, source and reason of an A-ASSOCIATE-RJ, with their words."""

    result: int
    source: int
    reason: int

    @property
    def code(self) -> str:
        """``result/source/reason``, as logs and DCMTK write it (``1/1/7``)."""
        return f"{self.result}/{self.source}/{self.reason}"

    def _names(self) -> tuple[tuple[str, str], tuple[str, str], tuple[str, str]]:
        # (words, label) of the result, the source and the reason.
        return (
            REJECT_RESULTS.get(self.result, (f"unknown result {self.result}", UNKNOWN_LABEL)),
            REJECT_SOURCES.get(self.source, (f"unknown source {self.source}", UNKNOWN_LABEL)),
            REJECT_REASONS.get((self.source, self.reason), ("Reserved", UNKNOWN_LABEL)),
        )

    @property
    def words(self) -> tuple[str, str, str]:
        """Result, source and reason in words; undefined codes are named as such."""
        result, source, reason = self._names()
        return result[0], source[0], reason[0]

    @property
    def labels(self) -> tuple[str, str, str]:
        """Result, source and reason in snake case; undefined codes are ``unknown``."""
        result, source, reason = self._names()
        return result[1], source[1], reason[1]


# The rejections the daemon sends. AE title problems are permanent: the peer's
# configuration must change. The limits are transient: try again later.
REJECT_CALLED_AE = Rejection(1, 1, 7)
REJECT_CALLING_AE = Rejection(1, 1, 3)
REJECT_LOCAL_LIMIT = Rejection(2, 3, 2)
REJECT_CONGESTION = Rejection(2, 3, 1)


def encode_associate_rj(rejection: Rejection) -> bytes:
    """The A-ASSOCIATE-RJ PDU for ``rejection``: a reserved byte, then result, source, reason."""
    return encode_pdu(A_ASSOCIATE_RJ, bytes((0, rejection.result, rejection.source, rejection.reason)))


# --------------------------------------------------------------------------
# A-ABORT (PS3.8 9.3.8, Table 9-26) and presentation context results
# --------------------------------------------------------------------------

ABORT_SOURCE_USER = 0
ABORT_SOURCE_PROVIDER = 2
ABORT_SOURCES = {ABORT_SOURCE_USER: "service-user", 1: "reserved", ABORT_SOURCE_PROVIDER: "service-provider"}
# The reason is only significant when the source is the service-provider.
ABORT_REASON_NOT_SPECIFIED = 0
ABORT_UNRECOGNISED_PDU = 1
ABORT_UNEXPECTED_PDU = 2
ABORT_INVALID_PARAMETER = 6
ABORT_REASONS = {
    ABORT_REASON_NOT_SPECIFIED: "Reason not specified",
    ABORT_UNRECOGNISED_PDU: "Unrecognised PDU",
    ABORT_UNEXPECTED_PDU: "Unexpected PDU",
    4: "Unrecognised PDU parameter",
    5: "Unexpected PDU parameter",
    ABORT_INVALID_PARAMETER: "Invalid PDU parameter value",
}

# Result of a presentation context in an A-ASSOCIATE-AC (PS3.8 9.3.3.2, Table 9-18).
CONTEXT_ACCEPTED = 0
CONTEXT_RESULTS = {
    CONTEXT_ACCEPTED: "acceptance",
    1: "user rejection",
    2: "no reason (provider rejection)",
    3: "abstract syntax not supported (provider rejection)",
    4: "transfer syntaxes not supported (provider rejection)",
}

# --------------------------------------------------------------------------
# UIDs and this implementation's identity
# --------------------------------------------------------------------------

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
TRANSFER_SYNTAX_NAMES = {
    IMPLICIT_VR_LITTLE_ENDIAN: "Implicit VR Little Endian",
    EXPLICIT_VR_LITTLE_ENDIAN: "Explicit VR Little Endian",
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: "Deflated Explicit VR Little Endian",
    EXPLICIT_VR_BIG_ENDIAN: "Explicit VR Big Endian",
}

# Sent by the daemon and by the client, so that a peer's logs tell echo-scp
# from other pynetdicom applications: a fixed UUID-derived UID (PS3.5 B.2),
# and a version name that changes with each release (at most 16 characters).
IMPLEMENTATION_CLASS_UID = "2.25.118839460264178416439393285830716222240"
IMPLEMENTATION_VERSION_NAME = f"ECHO_SCP_{__version__}"[:16]

# --------------------------------------------------------------------------
# The C-ECHO command set (PS3.7 9.3.5 and E.1), always Implicit VR Little Endian
# --------------------------------------------------------------------------

C_ECHO_RQ_FIELD = 0x0030
C_ECHO_RSP_FIELD = 0x8030
NO_DATA_SET = 0x0101
STATUS_SUCCESS = 0x0000
# Every command element is in group 0000; these are its element numbers.
COMMAND_GROUP = 0x0000
COMMAND_GROUP_LENGTH = 0x0000
AFFECTED_SOP_CLASS_UID = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
COMMAND_DATA_SET_TYPE = 0x0800
STATUS = 0x0900
# Group, element, value length.
ELEMENT_HEADER = struct.Struct("<HHI")

# --------------------------------------------------------------------------
# Value rules and addresses
# --------------------------------------------------------------------------

AE_TITLE_MAX_LENGTH = 16
UID_MAX_LENGTH = 64


def ae_title_problem(value: str) -> str | None:
    """What makes ``value`` break PS3.5's AE VR rules (6.2), or None if nothing does.

    Leading and trailing spaces are not significant; the rest must be 1 to 16
    characters of the default repertoire, without control characters or the
    backslash (DICOM's value separator).
    """
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        return "must not contain control characters"
    if "\\" in value:
        return "must not contain a backslash"
    if not value.isascii():
        return "must use the DICOM default character repertoire (ASCII)"
    stripped = value.strip(" ")
    if not stripped:
        return "must not be empty or all spaces"
    if len(stripped) > AE_TITLE_MAX_LENGTH:
        return f"must be at most {AE_TITLE_MAX_LENGTH} characters (got {len(stripped)})"
    return None


def check_ae_title(value: str, what: str = "AE title") -> str:
    """Return the AE title without its insignificant spaces, or raise ValueError "``what`` must ..."."""
    problem = ae_title_problem(value)
    if problem is not None:
        raise ValueError(f"{what} {problem}")
    return value.strip(" ")


def is_valid_uid(value: str) -> bool:
    """Whether ``value`` is a UID (PS3.5 9.1): numbers without leading zeros, dot-separated, 64 characters."""
    return 0 < len(value) <= UID_MAX_LENGTH and all(
        part.isascii() and part.isdigit() and (part == "0" or part[0] != "0") for part in value.split(".")
    )


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (``[::1]:11112``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
