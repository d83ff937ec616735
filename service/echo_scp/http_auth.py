"""HTTP basic authentication against bcrypt hashes, bounded so that it cannot be used to load the daemon.

bcrypt is slow on purpose (about 0.2 s of one core at cost 12), so an endpoint
that ran it for every request would let anyone with a loop keep the CPU busy,
and a DICOM ping target must keep answering. Two bounds, as the Prometheus
exporter-toolkit has them:

* credentials that verified are cached, keyed by the user name and the SHA-256
  of the password (the password itself is not kept), so a scraper pays for
  bcrypt once, not every scrape; the cache holds at most ``CACHE_SIZE``
  entries and only correct passwords enter it, so a flood of wrong ones cannot
  evict a scraper's;
* at most ``MAX_CONCURRENT_CHECKS`` bcrypt checks run at once. A request that
  gets no turn within ``CHECK_WAIT`` seconds is refused as ``busy`` (the HTTP
  endpoint answers 429 with ``Retry-After``) rather than queueing threads
  without bound.

An unknown user name is checked against a configured hash all the same, so the
answer takes as long as for a known user with a wrong password.

``bcrypt`` is imported when a :class:`BasicAuth` is built, that is only when
users are configured.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping

CACHE_SIZE = 64
MAX_CONCURRENT_CHECKS = 1
CHECK_WAIT = 1.0
REALM = "echo-scp"


class Verdict(enum.Enum):
    """The outcome of checking one request's credentials; the values are metric label values."""

    OK = "ok"
    MISSING = "missing"
    INVALID = "invalid"
    BUSY = "busy"


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """(user, password) from an ``Authorization: Basic ...`` header, or None if there is none."""
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


class BasicAuth:
    """Checks basic credentials against ``users`` (name -> bcrypt hash); thread-safe."""

    def __init__(
        self,
        users: Mapping[str, str],
        *,
        max_concurrent: int = MAX_CONCURRENT_CHECKS,
        wait: float = CHECK_WAIT,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        if not users:
            raise ValueError("basic authentication needs at least one user")
        import bcrypt  # only when basic authentication is configured

        self._checkpw = bcrypt.checkpw
        self._users = {name: hashed.encode("ascii") for name, hashed in users.items()}
        # For unknown users: the same work as a wrong password for a known one.
        self._decoy = next(iter(self._users.values()))
        self._turns = threading.BoundedSemaphore(max_concurrent)
        self._wait = wait
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._lock = threading.Lock()
        # How many bcrypt comparisons ran (the cache's effect, observable).
        self.bcrypt_checks = 0

    def check(self, header: str | None) -> Verdict:
        """Whether the ``Authorization`` header carries valid credentials."""
        credentials = parse_basic(header)
        if credentials is None:
            return Verdict.INVALID if header else Verdict.MISSING
        user, password = credentials
        key = (user, hashlib.sha256(password.encode("utf-8")).digest())
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return Verdict.OK
        if not self._turns.acquire(timeout=self._wait):
            return Verdict.BUSY
        try:
            ok = self._bcrypt(user, password)
        finally:
            self._turns.release()
        if not ok:
            return Verdict.INVALID
        with self._lock:
            self._cache[key] = None
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return Verdict.OK

    def _bcrypt(self, user: str, password: str) -> bool:
        hashed = self._users.get(user)
        with self._lock:
            self.bcrypt_checks += 1
        try:
            matched = bool(self._checkpw(password.encode("utf-8"), hashed or self._decoy))
        except ValueError:
            # bcrypt refuses passwords over 72 bytes rather than truncate them.
            matched = False
        return matched and hashed is not None
