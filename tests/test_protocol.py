"""echo_scp.protocol against the standard: tests/wire.py's encodings, PS3.8's tables, PS3.5's value rules.

The expected values here are copied from the standard (PS3.8 Tables 9-11,
9-18, 9-21 and 9-26; PS3.5 6.2 and 9.1) or come from tests/wire.py and
pydicom, never from protocol.py itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydicom.uid import UID_dictionary  # type: ignore[attr-defined]

from echo_scp import __version__, protocol, scu
from echo_scp.settings import ListenerSettings
from echo_scp.transfer_syntax import resolve_transfer_syntax
from tests import wire

SERVICE_DIR = Path(__file__).resolve().parent.parent / "service"

# PS3.8 Table 9-21, as the standard spells it.
STANDARD_RESULTS = {1: "rejected-permanent", 2: "rejected-transient"}
STANDARD_SOURCES = {
    1: "DICOM UL service-user",
    2: "DICOM UL service-provider (ACSE related function)",
    3: "DICOM UL service-provider (Presentation related function)",
}
STANDARD_REASONS = {
    (1, 1): "no-reason-given",
    (1, 2): "application-context-name-not-supported",
    (1, 3): "calling-AE-title-not-recognized",
    (1, 7): "called-AE-title-not-recognized",
    (2, 1): "no-reason-given",
    (2, 2): "protocol-version-not-supported",
    (3, 1): "temporary-congestion",
    (3, 2): "local-limit-exceeded",
}
# The metric label values already published for the sources (dashboards select on them).
SOURCE_LABELS = {1: "service_user", 2: "service_provider_acse", 3: "service_provider_presentation"}


def _snake(standard: str) -> str:
    """A PS3.8 name as a label: lower case, underscores, and pynetdicom's British spelling."""
    return standard.lower().replace("-", "_").replace("recognized", "recognised")


# -- PDUs ------------------------------------------------------------------------------


def test_pdu_types_and_names_are_the_standards() -> None:
    """The seven PDU types and their names match PS3.8 Table 9-11 as tests/wire.py has them."""
    assert {int(kind): kind.title for kind in wire.Pdu} == protocol.PDU_NAMES
    assert (protocol.A_ASSOCIATE_RQ, protocol.P_DATA_TF, protocol.A_ABORT) == (0x01, 0x04, 0x07)


def test_pdu_and_item_encoders_agree_with_wire() -> None:
    """A PDU and an item have the header layout tests/wire.py writes: type, reserved byte, length."""
    value = b"1.2.840.10008.1.1"
    assert protocol.encode_item(protocol.ITEM_ABSTRACT_SYNTAX, value) == wire.item(0x30, value)
    assert protocol.encode_pdu(protocol.A_RELEASE_RQ, bytes(4)) == wire.RELEASE_RQ
    assert protocol.encode_pdu(protocol.P_DATA_TF, b"") == wire.p_data()


@pytest.mark.parametrize(
    ("rejection", "triple"),
    [
        (protocol.REJECT_CALLED_AE, (1, 1, 7)),
        (protocol.REJECT_CALLING_AE, (1, 1, 3)),
        (protocol.REJECT_LOCAL_LIMIT, (2, 3, 2)),
        (protocol.REJECT_CONGESTION, (2, 3, 1)),
    ],
    ids=["called_ae", "calling_ae", "local_limit", "congestion"],
)
def test_daemon_rejections_encode_as_the_standard_says(
    rejection: protocol.Rejection, triple: tuple[int, int, int]
) -> None:
    """Each rejection the daemon sends is its PS3.8 triple, encoded byte for byte as tests/wire.py does."""
    assert tuple(rejection) == triple
    assert protocol.encode_associate_rj(rejection) == wire.associate_rj(*triple)
    assert rejection.code == "/".join(map(str, triple))


# -- A-ASSOCIATE-RJ words ----------------------------------------------------------------


@pytest.mark.parametrize("result", sorted(STANDARD_RESULTS))
@pytest.mark.parametrize(("source", "reason"), sorted(STANDARD_REASONS))
def test_every_defined_rejection_has_the_standards_words(result: int, source: int, reason: int) -> None:
    """Every triple PS3.8 Table 9-21 defines has words and labels naming its result, source and reason."""
    rejection = protocol.Rejection(result, source, reason)
    result_label, source_label, reason_label = rejection.labels
    assert result_label == STANDARD_RESULTS[result].removeprefix("rejected-")
    assert source_label == SOURCE_LABELS[source]
    assert reason_label == _snake(STANDARD_REASONS[(source, reason)])
    result_words, source_words, reason_words = rejection.words
    assert result_words == result_label
    assert source_words.startswith(STANDARD_SOURCES[source].removeprefix("DICOM UL ")[:16])
    assert _snake(reason_words.replace(" ", "-")) == reason_label


@pytest.mark.parametrize(
    ("triple", "words"),
    [
        ((1, 1, 4), ("permanent", "service-user", "Reserved")),
        ((2, 3, 0), ("transient", "service-provider (presentation related)", "Reserved")),
        ((3, 9, 1), ("unknown result 3", "unknown source 9", "Reserved")),
    ],
)
def test_undefined_rejections_are_named_as_such(triple: tuple[int, int, int], words: tuple[str, ...]) -> None:
    """Reserved or unknown codes get words saying so and only the bounded label ``unknown``."""
    rejection = protocol.Rejection(*triple)
    assert rejection.words == words
    known = {label for label in rejection.labels if label != protocol.UNKNOWN_LABEL}
    assert known <= {"permanent", "transient", "service_user", "service_provider_presentation"}
    assert rejection.labels[2] == protocol.UNKNOWN_LABEL


def test_client_message_uses_the_table() -> None:
    """The probe client's rejection message is built from the same words and code."""
    rejected = scu.AssociationRejected(*protocol.REJECT_LOCAL_LIMIT)
    assert str(rejected) == (
        "association rejected: transient, service-provider (presentation related), "
        "local limit exceeded (2/3/2)"
    )


# -- A-ABORT and presentation context results ---------------------------------------------


def test_abort_words_are_the_standards() -> None:
    """A-ABORT sources and reasons match PS3.8 Table 9-26 (reason 3 is reserved)."""
    standard_reasons = {
        0: "reason-not-specified",
        1: "unrecognized-PDU",
        2: "unexpected-PDU",
        4: "unrecognized-PDU-parameter",
        5: "unexpected-PDU-parameter",
        6: "invalid-PDU-parameter-value",
    }
    assert {code: _snake(text.replace(" ", "-")) for code, text in protocol.ABORT_REASONS.items()} == {
        code: _snake(text) for code, text in standard_reasons.items()
    }
    assert protocol.ABORT_SOURCES == {0: "service-user", 1: "reserved", 2: "service-provider"}
    assert (protocol.ABORT_SOURCE_USER, protocol.ABORT_SOURCE_PROVIDER) == (0, 2)


def test_context_results_are_the_standards() -> None:
    """Presentation context results 0-4 carry PS3.8 Table 9-18's names."""
    standard = {
        0: "acceptance",
        1: "user-rejection",
        2: "no-reason (provider rejection)",
        3: "abstract-syntax-not-supported (provider rejection)",
        4: "transfer-syntaxes-not-supported (provider rejection)",
    }
    assert {code: text.replace(" ", "-") for code, text in protocol.CONTEXT_RESULTS.items()} == {
        code: text.replace(" ", "-") for code, text in standard.items()
    }


# -- UIDs and identity --------------------------------------------------------------------


def test_uids_match_wire_and_pydicom() -> None:
    """The UIDs the project uses are tests/wire.py's, and pydicom names them as protocol.py does."""
    syntaxes = (
        protocol.IMPLICIT_VR_LITTLE_ENDIAN,
        protocol.EXPLICIT_VR_LITTLE_ENDIAN,
        protocol.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        protocol.EXPLICIT_VR_BIG_ENDIAN,
    )
    assert syntaxes == (wire.IMPLICIT_LE, wire.EXPLICIT_LE, wire.DEFLATED_LE, wire.EXPLICIT_BE)
    assert {uid: UID_dictionary[uid][0] for uid in syntaxes} == protocol.TRANSFER_SYNTAX_NAMES
    assert protocol.VERIFICATION_SOP_CLASS == wire.VERIFICATION
    assert UID_dictionary[protocol.VERIFICATION_SOP_CLASS][0] == "Verification SOP Class"
    assert protocol.APPLICATION_CONTEXT_NAME == wire.APPLICATION_CONTEXT


def test_implementation_identity() -> None:
    """The class UID is UUID-derived (PS3.5 B.2); the version name is ECHO_SCP_<version>, 1-16 characters."""
    uid = protocol.IMPLEMENTATION_CLASS_UID
    assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", uid) and int(uid[5:]) < 2**128, uid
    assert len(uid) <= 64
    name = protocol.IMPLEMENTATION_VERSION_NAME
    assert 1 <= len(name) <= 16
    assert name.isascii() and name.isprintable() and "\\" not in name
    expected = f"ECHO_SCP_{__version__}"
    if len(expected) <= 16:
        assert name == expected
    else:  # a long pre-release version is cut, never the prefix
        assert expected.startswith(name) and len(name) == 16
    # The client announces the same identity as the daemon (test_engine checks the daemon's AC).
    assert (uid, name) == (scu.IMPLEMENTATION_CLASS_UID, scu.IMPLEMENTATION_VERSION_NAME)


# -- value rules --------------------------------------------------------------------------

GOOD_AE_TITLES = {
    "ECHOSCP": "ECHOSCP",
    "  PACS  ": "PACS",
    "A" * 16: "A" * 16,
    " " + "B" * 16 + " ": "B" * 16,
    "MY AE": "MY AE",
    "A@B": "A@B",
    "~!#$%^&*()_+{}": "~!#$%^&*()_+{}",
}
BAD_AE_TITLES = {
    "": "must not be empty or all spaces",
    "    ": "must not be empty or all spaces",
    "A" * 17: "must be at most 16 characters (got 17)",
    "A\\B": "must not contain a backslash",
    "A\tB": "must not contain control characters",
    "A\x7fB": "must not contain control characters",
    "\x00": "must not contain control characters",
    "CAFÉ": "must use the DICOM default character repertoire (ASCII)",
}


@pytest.mark.parametrize(("title", "stripped"), GOOD_AE_TITLES.items(), ids=repr)
def test_ae_title_accepted(title: str, stripped: str) -> None:
    """PS3.5 AE values: up to 16 significant characters; spaces at either end do not count."""
    assert protocol.ae_title_problem(title) is None
    assert protocol.check_ae_title(title) == stripped
    assert ListenerSettings.model_validate({"ae_title": title}).ae_title == stripped
    assert scu.parse_address(f"{title}@host")[0] == stripped.strip()


@pytest.mark.parametrize(("title", "problem"), BAD_AE_TITLES.items(), ids=repr)
def test_ae_title_refused_alike_by_settings_and_client(title: str, problem: str) -> None:
    """A title PS3.5 forbids is refused by protocol, the settings and the client, naming the same problem."""
    assert protocol.ae_title_problem(title) == problem
    with pytest.raises(ValueError, match=f"^AE title {re.escape(problem)}$"):
        protocol.check_ae_title(title)
    with pytest.raises(ValidationError, match=re.escape(problem)):
        ListenerSettings.model_validate({"ae_title": title})
    with pytest.raises(ValueError, match=re.escape(problem)):
        scu.echo_association("127.0.0.1", 1, calling_aet=title)


GOOD_UIDS = ["0", "1.2.840.10008.1.2", "1.0.3", "2.25." + "1" * 59, protocol.IMPLEMENTATION_CLASS_UID]
BAD_UIDS = [
    "",
    "1..2",
    ".1",
    "1.",
    "1.02",
    "01.2",
    "1.2.a",
    "1 .2",
    "2.25." + "1" * 60,
    "\u0661.\u0662",
    "1,2",
]


@pytest.mark.parametrize("uid", GOOD_UIDS)
def test_uid_accepted(uid: str) -> None:
    """PS3.5 9.1 UIDs, up to 64 characters, pass the one check and the settings' transfer syntax check."""
    assert protocol.is_valid_uid(uid)
    assert resolve_transfer_syntax(uid) == uid


@pytest.mark.parametrize("uid", BAD_UIDS, ids=repr)
def test_uid_refused(uid: str) -> None:
    """Empty components, leading zeros, non-digits and more than 64 characters are refused everywhere."""
    assert not protocol.is_valid_uid(uid)
    with pytest.raises(ValueError, match="not a valid UID"):
        scu.echo_association("127.0.0.1", 1, transfer_syntaxes=[uid])
    if uid[:1].isdigit():  # the settings read anything else as a transfer syntax name
        with pytest.raises(ValueError, match="not a valid UID"):
            resolve_transfer_syntax(uid)


def test_uid_check_length_boundary() -> None:
    """64 characters is the longest UID; one more is refused."""
    assert protocol.is_valid_uid("1." + "2" * 62) and len("1." + "2" * 62) == 64
    assert not protocol.is_valid_uid("1." + "2" * 63)


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("127.0.0.1", 104, "127.0.0.1:104"),
        ("pacs.example", 11112, "pacs.example:11112"),
        ("::1", 11112, "[::1]:11112"),
        ("fe80::1%eth0", 4242, "[fe80::1%eth0]:4242"),
        ("0.0.0.0", 0, "0.0.0.0:0"),
    ],
)
def test_format_address(host: str, port: int, text: str) -> None:
    """host:port, with IPv6 in brackets; the probe client's address parser reads it back."""
    assert protocol.format_address(host, port) == text
    if port:
        assert scu.parse_address(f"AE@{text}") == ("AE", host, port)


# -- import footprint ---------------------------------------------------------------------


@pytest.mark.parametrize("module", ["echo_scp.protocol", "echo_scp.scu"])
def test_import_loads_only_the_standard_library(module: str) -> None:
    """Importing protocol, or scu (the probe runs it every few seconds), loads nothing outside the stdlib."""
    code = (
        f"import sys, {module}\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "extra = sorted(loaded - set(sys.stdlib_module_names) - {'__main__', 'echo_scp'})\n"
        "assert not extra, extra\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SERVICE_DIR)}
    completed = subprocess.run(
        # -S: no site-packages .pth hooks (the editable install's finder), only what the import pulls in.
        [sys.executable, "-S", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
