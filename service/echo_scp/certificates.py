"""The daemon's own certificate files: validity periods, and noticing a file replaced on disk.

Standard library only (``cryptography`` is not a runtime dependency). The
``ssl`` module reads a certificate's dates only for CA certificates
(``SSLContext.get_ca_certs`` skips the rest) or for a peer after a verified
handshake, so the validity period is read from the DER encoding here: it sits
at a fixed place in every X.509 certificate (RFC 5280, 4.1).

A replaced file is noticed by its identity (device, inode, size, times): a
Kubernetes Secret volume swaps its ``..data`` symlink to a new folder, which
gives every file a new inode; an edit in place changes size or times. What
was loaded is remembered as a :class:`FileState`; :class:`FileWatch` says when
the files on disk have changed since and then stayed the same for one look,
so that a copy in progress (certificate first, key a moment later) is not
loaded half done.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import hashlib
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", re.DOTALL)
# DER tags (X.690): the ones on the way to a certificate's validity.
_SEQUENCE, _INTEGER, _VERSION = 0x30, 0x02, 0xA0
_UTC_TIME, _GENERALIZED_TIME = 0x17, 0x18


@dataclass(frozen=True)
class Validity:
    """When one certificate is valid: Unix times, both ends included."""

    not_before: float
    not_after: float


def validities(pem: bytes) -> tuple[Validity, ...]:
    """The validity of each certificate in a PEM text, in file order; raises ValueError on a bad one."""
    found = []
    for match in _PEM_CERTIFICATE.finditer(pem):
        try:
            der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
        except binascii.Error as exc:
            raise ValueError(f"a PEM certificate is not base64: {exc}") from None
        found.append(der_validity(der))
    return tuple(found)


def der_validity(der: bytes) -> Validity:
    """The validity period of one DER-encoded X.509 certificate; raises ValueError if it has none."""
    tag, start, _end = _element(der, 0)
    _expect(tag, _SEQUENCE, "Certificate")
    tag, at, _end = _element(der, start)
    _expect(tag, _SEQUENCE, "TBSCertificate")
    tag, _start, end = _element(der, at)
    if tag == _VERSION:  # [0] EXPLICIT, absent for v1 certificates
        at = end
        tag, _start, end = _element(der, at)
    _expect(tag, _INTEGER, "serialNumber")
    for what in ("signature", "issuer"):
        tag, _start, end = _element(der, end)
        _expect(tag, _SEQUENCE, what)
    tag, start, _end = _element(der, end)
    _expect(tag, _SEQUENCE, "validity")
    before_tag, before_start, before_end = _element(der, start)
    after_tag, after_start, after_end = _element(der, before_end)
    return Validity(
        _time(before_tag, der[before_start:before_end]), _time(after_tag, der[after_start:after_end])
    )


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the DER element at ``at``."""
    if at + 2 > len(der):
        raise ValueError("truncated DER")
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or at + count > len(der):
            raise ValueError("unsupported DER length")
        length = int.from_bytes(der[at : at + count], "big")
        at += count
    if at + length > len(der):
        raise ValueError("truncated DER")
    return tag, at, at + length


def _expect(tag: int, wanted: int, what: str) -> None:
    if tag != wanted:
        raise ValueError(f"not an X.509 certificate: {what} has tag 0x{tag:02x}")


def _time(tag: int, value: bytes) -> float:
    """RFC 5280's UTCTime (YYMMDDHHMMSSZ, 1950-2049) or GeneralizedTime (YYYYMMDDHHMMSSZ)."""
    text = value.decode("ascii", "replace")
    if tag == _UTC_TIME and re.fullmatch(r"\d{12}Z", text):
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif not (tag == _GENERALIZED_TIME and re.fullmatch(r"\d{14}Z", text)):
        raise ValueError(f"unsupported certificate time {text!r}")
    fields = [int(text[i:j]) for i, j in ((0, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 14))]
    return float(calendar.timegm((*fields, 0, 0, 0)))


def format_time(timestamp: float) -> str:
    """A Unix time as operators read certificate dates: ``2026-03-01 12:00:00 UTC``."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def validity_problem(validity: Validity, now: float, label: str = "certificate") -> str | None:
    """Why a certificate is not valid at ``now`` (expired, not yet valid), or None."""
    if now > validity.not_after:
        return f"{label} expired on {format_time(validity.not_after)}"
    if now < validity.not_before:
        return f"{label} is not valid until {format_time(validity.not_before)}"
    return None


def labels(count: int, noun: str = "certificate") -> list[str]:
    """How to name each of ``count`` certificates of a file in a message."""
    return [noun] if count == 1 else [f"{noun} {i} of {count}" for i in range(1, count + 1)]


# One file as seen by stat() (following symlinks), or None when it is missing.
Identity = tuple[int, int, int, int, int] | None


def _identity(path: Path) -> Identity:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _digest(contents: Iterable[bytes | None]) -> bytes:
    digest = hashlib.sha256()
    for content in contents:
        # A missing file and an empty one differ; the length keeps files apart.
        digest.update(b"-" if content is None else len(content).to_bytes(8, "big") + content)
    return digest.digest()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


@dataclass(frozen=True, eq=False)
class FileState:
    """A set of files as they were when loaded: identities and a digest of their contents."""

    paths: tuple[Path, ...]
    identities: tuple[Identity, ...]
    digest: bytes

    @classmethod
    def capture(cls, paths: Sequence[Path]) -> tuple[FileState, dict[Path, bytes | None]]:
        """The state of ``paths`` and their contents, taken before anything else reads them.

        Identities are taken first, then the contents: whatever loads the files
        afterwards reads them as they are now or newer, and a newer file has a
        new identity, so a change is never mistaken for what was loaded.
        """
        paths = tuple(paths)
        identities = tuple(_identity(path) for path in paths)
        contents = {path: _read(path) for path in paths}
        return cls(paths, identities, _digest(contents[path] for path in paths)), contents

    def identities_now(self) -> tuple[Identity, ...]:
        return tuple(_identity(path) for path in self.paths)

    def digest_now(self) -> bytes:
        return _digest(_read(path) for path in self.paths)


class FileWatch:
    """Says when the files of a :class:`FileState` are replaced on disk; a look is a ``stat`` per file."""

    def __init__(self, state: FileState) -> None:
        self.state = state
        self._seen = state.identities
        self._pending: tuple[Identity, ...] | None = None

    def replaced(self) -> bool:
        """True once the files differ from what was loaded and have not changed since the last look.

        A change is reported once: a replacement that then fails to load is not
        tried again until the files change once more. Files touched without a
        change of content (``chmod``, ``touch``) are not reported.
        """
        now = self.state.identities_now()
        if now == self._seen:
            self._pending = None
            return False
        if now != self._pending:
            self._pending = now  # look once more: a copy may be half done
            return False
        self._seen, self._pending = now, None
        return self.state.digest_now() != self.state.digest
