"""The connection table: one record per peer connection, and admission control.

Every connection gets a :class:`Connection` record when it opens, keyed by its
pynetdicom ``Association``; the record carries the :class:`ListenerRuntime`
snapshot that was current when the connection arrived, so a reload never
changes the rules halfway through an association. The table owns the
admission state: association slots per listener and per known peer (calling
AE title), the connections still waiting
for their A-ASSOCIATE-RQ (and which of them to evict under a flood), and the
set of open connections that shutdown aborts. It neither logs nor counts;
``reporter.py`` does that, and the listener that accepted a socket closes it.

Connections made by the readiness self-check are recognised by their source
address (registered in :class:`SelfCheckPorts` before they connect).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from echo_scp.protocol import Rejection
    from echo_scp.runtime import ListenerRuntime

OTHER_AE = "other"
# A stream of garbage makes pynetdicom complain once per bad PDU: keep a few.
_KEPT_PROBLEMS = 3
_PROBLEM_LENGTH = 300


class SelfCheckPorts:
    """Source addresses of the daemon's own C-ECHOs (readiness, probes), thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._addresses: set[tuple[str, int]] = set()

    def add(self, address: tuple[str, int]) -> None:
        with self._lock:
            self._addresses.add((address[0], address[1]))

    def discard(self, address: tuple[str, int]) -> None:
        with self._lock:
            self._addresses.discard((address[0], address[1]))

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, tuple) or len(address) < 2:
            return False
        with self._lock:
            return (address[0], address[1]) in self._addresses


@dataclass(eq=False)
class Connection:
    """What we know about one peer connection and its association."""

    id: int
    runtime: ListenerRuntime
    peer_host: str
    peer_port: int
    opened: float
    self_check: bool
    calling_ae: str | None = None
    called_ae: str | None = None
    calling_label: str = OTHER_AE
    outcome: str = "closed_before_request"
    accepted: bool = False
    holds_slot: bool = False
    # The (listener, calling AE title) slot this connection holds, if it is a known peer's.
    peer_slot: tuple[str, str] | None = None
    echoes: int = 0
    transfer_syntax: str | None = None
    rejection: Rejection | None = None
    abort_source: str | None = None
    release_requested: bool = False
    evicted: bool = False
    tls_failure: str | None = None
    rejected_abstract_syntaxes: list[str] = field(default_factory=list)
    # What pynetdicom (or the engine) found wrong with what the peer sent:
    # the first few messages, and how many there were.
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
    ended: bool = False
    dimse_received_at: float | None = None
    # The accepted socket, closed by the listener when the record is finished:
    # when a peer resets the connection pynetdicom's shutdown() raises and it
    # skips close(), leaving the descriptor to the garbage collector.
    sock: Any = None
    # False when the engine closes the socket itself (the event engine's
    # reactor owns its descriptors: closing one under it could hit a reused number).
    close_socket: bool = True

    @property
    def listener(self) -> str:
        return self.runtime.name

    def add_problem(self, message: str) -> None:
        """Record one of pynetdicom's complaints about this peer (the connection's ``log_sink``)."""
        self.problem_count += 1
        if len(self.problems) < _KEPT_PROBLEMS:
            self.problems.append(message[:_PROBLEM_LENGTH])

    def fields(self) -> dict[str, Any]:
        """Log fields identifying the connection."""
        return {
            "listener": self.listener,
            "assoc_id": self.id,
            "peer_host": self.peer_host,
            "peer_port": self.peer_port,
            "calling_ae": self.calling_ae,
            "called_ae": self.called_ae,
        }


class ConnectionTable:
    """Open connections of every listener, their association slots and pending set.

    Methods are called from pynetdicom's threads and are safe to call
    concurrently.
    """

    def __init__(
        self, *, self_check_ports: SelfCheckPorts, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.self_check_ports = self_check_ports
        self.clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._connections: dict[object, Connection] = {}
        self._slots: dict[str, int] = {}
        # Associations of each known peer, counted whether or not it has a
        # limit, so that a limit added by a reload counts those already open.
        self._peer_slots: dict[tuple[str, str], int] = {}
        # Per listener, oldest first: peer connections that may still be waiting
        # for their A-ASSOCIATE-RQ. A superset: those that moved on are dropped
        # when it grows past a limit (each once), so a check is O(1) amortised.
        self._pending: dict[str, dict[Connection, None]] = {}

    def open(self, key: object, runtime: ListenerRuntime, address: tuple[Any, ...]) -> Connection:
        """Record a new connection (before any TLS handshake)."""
        host, port = str(address[0]), int(address[1])
        conn = Connection(
            id=next(self._ids),
            runtime=runtime,
            peer_host=host,
            peer_port=port,
            opened=self.clock(),
            self_check=(host, port) in self.self_check_ports,
        )
        with self._lock:
            self._connections[key] = conn
            if not conn.self_check:
                self._pending.setdefault(conn.listener, {})[conn] = None
        return conn

    def get(self, key: object) -> Connection | None:
        with self._lock:
            return self._connections.get(key)

    def evict_candidate(self, listener: str, limit: int) -> Connection | None:
        """The oldest connection still waiting for its A-ASSOCIATE-RQ, if more than ``limit`` wait.

        The self-check is never chosen: it must get through a flood. The
        chosen record is marked evicted, so it is chosen once.
        """
        with self._lock:
            pending = self._pending.get(listener)
            if pending is None or len(pending) <= limit:
                return None
            for moved_on in [c for c in pending if c.outcome != "closed_before_request" or c.evicted]:
                del pending[moved_on]
            if len(pending) <= limit:
                return None
            # Oldest first: insertion order is the order of opening.
            conn = next(iter(pending))
            del pending[conn]
            conn.evicted = True
            return conn

    def hold_slots(
        self, conn: Connection, limit: int, *, peer: str | None = None, peer_limit: int | None = None
    ) -> str | None:
        """Take an association slot of the listener, and of ``peer`` (a known calling AE title) if given.

        Returns None when the slots are taken, else the limit that refused
        (``"peer"``, checked first, or ``"listener"``); nothing is taken then.
        """
        with self._lock:
            peer_key = (conn.listener, peer) if peer is not None else None
            if (
                peer_key is not None
                and peer_limit is not None
                and self._peer_slots.get(peer_key, 0) >= peer_limit
            ):
                return "peer"
            taken = self._slots.get(conn.listener, 0)
            if taken >= limit:
                return "listener"
            self._slots[conn.listener] = taken + 1
            conn.holds_slot = True
            if peer_key is not None:
                self._peer_slots[peer_key] = self._peer_slots.get(peer_key, 0) + 1
                conn.peer_slot = peer_key
            return None

    def finish(self, key: object) -> Connection | None:
        """Remove a connection's record and give back its slot; None if already finished."""
        with self._lock:
            conn = self._connections.pop(key, None)
            if conn is None or conn.ended:
                return None
            conn.ended = True
            self._pending.get(conn.listener, {}).pop(conn, None)
            if conn.holds_slot:
                self._slots[conn.listener] -= 1
            if conn.peer_slot is not None:
                left = self._peer_slots[conn.peer_slot] - 1
                if left:
                    self._peer_slots[conn.peer_slot] = left
                else:
                    # Peers come and go with reloads: keep the table to those holding slots.
                    del self._peer_slots[conn.peer_slot]
        return conn

    def finished(self, is_finished: Callable[[object], bool]) -> list[Connection]:
        """Finish and return the records whose connection ended without a close event."""
        with self._lock:
            keys = [key for key in self._connections if is_finished(key)]
        return [conn for conn in map(self.finish, keys) if conn is not None]

    def open_keys(self, listener: str | None = None) -> list[object]:
        """Keys of the open connections (of one listener, or of all)."""
        with self._lock:
            return [k for k, c in self._connections.items() if listener is None or c.listener == listener]
