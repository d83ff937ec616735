"""Transfer syntax names and UIDs accepted in the configuration."""

from __future__ import annotations

from functools import cache

from pydicom.uid import UID_dictionary  # type: ignore[attr-defined]  # re-exported, untyped

from echo_scp.protocol import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    is_valid_uid,
)

# Our default: pynetdicom's DEFAULT_TRANSFER_SYNTAXES, the uncompressed set, in
# its order. (pynetdicom 3.0's echoscp app accepts every syntax it knows,
# ALL_TRANSFER_SYNTAXES, compressed ones included.) A C-ECHO carries no data set,
# so the transfer syntax never has to decode anything here; a ping target that
# offers only what every DICOM node must support says the truth about what it can
# do, and a peer proposing only a compressed syntax learns that from the answer.
DEFAULT_TRANSFER_SYNTAXES = (
    IMPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
)


@cache
def _known() -> dict[str, str]:
    """Lower-cased keyword ('implicitvrlittleendian') and name -> UID."""
    names: dict[str, str] = {}
    for uid, (name, kind, _info, _retired, keyword) in UID_dictionary.items():
        if kind == "Transfer Syntax":
            names[keyword.lower()] = uid
            names[name.lower()] = uid
    return names


def resolve_transfer_syntax(value: str) -> str:
    """Return the UID for a transfer syntax keyword, name or UID.

    Names are pydicom's keywords (``ExplicitVRLittleEndian``) or DICOM's names
    (``Explicit VR Little Endian``), case-insensitive. A UID that is not a
    known transfer syntax is accepted if well formed, for private syntaxes.
    """
    text = value.strip()
    if text and text[0].isdigit():
        # Checked here rather than with pydicom's UID.is_valid, which warns.
        if not is_valid_uid(text):
            raise ValueError(f"{value!r} is not a valid UID")
        return text
    uid = _known().get(text.lower())
    if uid is None:
        raise ValueError(
            f"unknown transfer syntax {value!r}; use a UID or a name such as "
            "'ImplicitVRLittleEndian' or 'ExplicitVRLittleEndian'"
        )
    return uid


def transfer_syntax_name(uid: str) -> str:
    """DICOM's name for a transfer syntax UID, or the UID itself."""
    entry = UID_dictionary.get(uid)
    return entry[0] if entry else uid
