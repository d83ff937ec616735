"""The one place where DICOM events become metrics and log events.

``listener.py`` binds pynetdicom's event handlers and calls the methods here;
this module never talks to pynetdicom's state machine. Every connection gets a
:class:`Connection` record when it opens; the record is finalised exactly once,
when pynetdicom reports the connection closed or, because some of its code
paths close sockets without that event, when the sweeper sees the association
thread gone. Finalising writes the canonical ``association_ended`` log line.

Connections made by the readiness self-check are recognised by their source
port (registered in :class:`SelfCheckPorts` before they connect) and are kept
out of the peer metrics.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from echo_scp.metrics import OTHER_AE, Metrics
from echo_scp.protocol import Rejection
from echo_scp.transfer_syntax import transfer_syntax_name


class SelfCheckPorts:
    """Source addresses of the daemon's own readiness C-ECHOs, thread-safe."""

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


@dataclass
class Connection:
    """What we know about one peer connection and its association."""

    id: int
    listener: str
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
    echoes: int = 0
    transfer_syntax: str | None = None
    rejection: Rejection | None = None
    abort_source: str | None = None
    release_requested: bool = False
    evicted: bool = False
    tls_failure: str | None = None
    ended: bool = False
    dimse_received_at: float | None = None
    # The accepted socket, closed again when the record is finalised: when a
    # peer resets the connection pynetdicom's shutdown() raises and it skips
    # close(), leaving the descriptor to the garbage collector.
    sock: Any = None

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


class Observer:
    """Turns connection and association events into metrics and log events.

    Methods are called from pynetdicom's threads; they are safe to call
    concurrently and never raise (``listener.py`` guards each call too).
    """

    def __init__(
        self,
        metrics: Metrics,
        log: Any,
        *,
        self_check_ports: SelfCheckPorts,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.log = log
        self.self_check_ports = self_check_ports
        self._clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._connections: dict[object, Connection] = {}
        self._slots: dict[str, int] = {}
        self._allowed: dict[str, frozenset[str]] = {}

    # -- listener registration ------------------------------------------------

    def add_listener(self, name: str, allowed_calling_aes: Iterable[str]) -> None:
        """Pre-create a listener's series and remember its calling-AE label set."""
        allowed = frozenset(allowed_calling_aes)
        with self._lock:
            self._allowed[name] = allowed
            self._slots.setdefault(name, 0)
        self.metrics.add_listener(name, sorted(allowed))

    # -- events ---------------------------------------------------------------

    def connection_opened(self, key: object, listener: str, address: tuple[Any, ...]) -> Connection:
        """A peer connected (before any TLS handshake)."""
        host, port = str(address[0]), int(address[1])
        conn = Connection(
            id=next(self._ids),
            listener=listener,
            peer_host=host,
            peer_port=port,
            opened=self._clock(),
            self_check=(host, port) in self.self_check_ports,
        )
        with self._lock:
            self._connections[key] = conn
        if not conn.self_check:
            self.metrics.connections_opened.labels(listener).inc()
            self.metrics.connections_open.labels(listener).inc()
        self.log.debug("connection_opened", **conn.fields())
        return conn

    def evict_candidate(self, listener: str, limit: int) -> tuple[object, Connection] | None:
        """The oldest connection still waiting to send its A-ASSOCIATE-RQ, if more than ``limit`` wait.

        The self-check is never chosen: it must get through a flood.
        """
        with self._lock:
            waiting = [
                (key, conn)
                for key, conn in self._connections.items()
                if conn.listener == listener
                and conn.outcome == "closed_before_request"
                and not conn.self_check
                and not conn.evicted
            ]
            if len(waiting) <= limit:
                return None
            key, conn = min(waiting, key=lambda item: item[1].opened)
            conn.evicted = True
            return key, conn

    def evicted(self, conn: Connection, limit: int) -> None:
        if not conn.self_check:
            self.metrics.connections_dropped.labels(conn.listener, "pending_limit").inc()
        self.log.warning("connection_evicted", reason="pending_limit", max_pending=limit, **conn.fields())

    def get(self, key: object) -> Connection | None:
        with self._lock:
            return self._connections.get(key)

    def tls_failed(self, conn: Connection, reason: str, detail: str) -> None:
        conn.tls_failure = reason
        conn.outcome = "tls_failed"
        if not conn.self_check:
            self.metrics.tls_handshake_failures.labels(conn.listener, reason).inc()
        self.log.warning("tls_handshake_failed", reason=reason, detail=detail, **conn.fields())

    def requested(self, conn: Connection, calling_ae: str, called_ae: str) -> None:
        conn.calling_ae, conn.called_ae = calling_ae, called_ae
        with self._lock:
            allowed = self._allowed.get(conn.listener, frozenset())
        conn.calling_label = calling_ae if calling_ae in allowed else OTHER_AE
        conn.outcome = "requested"
        self.log.debug("association_requested", **conn.fields())

    def try_hold_slot(self, conn: Connection, limit: int) -> bool:
        """Take one of the listener's association slots unless all are taken."""
        with self._lock:
            if self._slots[conn.listener] >= limit:
                return False
            self._slots[conn.listener] += 1
            conn.holds_slot = True
            return True

    def rejected(self, conn: Connection, result: int, source: int, reason: int) -> None:
        conn.rejection = Rejection(result, source, reason)
        conn.outcome = "rejected"
        words = conn.rejection.labels
        if not conn.self_check:
            self.metrics.associations.labels(conn.listener, conn.calling_label, "rejected").inc()
            self.metrics.rejections.labels(conn.listener, *words).inc()
        self.log.info(
            "association_rejected",
            result=words[0],
            source=words[1],
            reason=words[2],
            code=conn.rejection.code,
            **conn.fields(),
        )

    def accepted(self, conn: Connection, transfer_syntax: str | None) -> None:
        conn.accepted = True
        conn.outcome = "accepted"
        conn.transfer_syntax = transfer_syntax
        if not conn.self_check:
            self.metrics.associations.labels(conn.listener, conn.calling_label, "accepted").inc()
            self.metrics.associations_active.labels(conn.listener).inc()
        self.log.debug(
            "association_accepted",
            transfer_syntax=transfer_syntax_name(transfer_syntax) if transfer_syntax else None,
            **conn.fields(),
        )

    def dimse_received(self, conn: Connection) -> None:
        conn.dimse_received_at = self._clock()

    def echo(self, conn: Connection, message_id: int | None, status: int) -> None:
        """A C-ECHO-RQ is being answered with ``status``."""
        conn.echoes += 1
        if not conn.self_check:
            label = "success" if status == 0 else "failure"
            self.metrics.echo_requests.labels(conn.listener, conn.calling_label, label).inc()
        self.log.debug("c_echo", message_id=message_id, status=f"0x{status:04X}", **conn.fields())

    def echo_response_sent(self, conn: Connection) -> None:
        started, conn.dimse_received_at = conn.dimse_received_at, None
        if started is not None and not conn.self_check:
            self.metrics.echo_duration.labels(conn.listener).observe(self._clock() - started)

    def released(self, conn: Connection) -> None:
        if conn.outcome in ("released", "aborted"):
            return
        conn.outcome = "released"
        if not conn.self_check:
            self.metrics.associations.labels(conn.listener, conn.calling_label, "released").inc()
        self.log.debug("association_released", **conn.fields())

    def release_requested(self, conn: Connection) -> None:
        """The peer sent A-RELEASE-RQ (reported ahead of pynetdicom's EVT_RELEASED)."""
        conn.release_requested = True

    def abort_received(self, conn: Connection, source: str) -> None:
        """Remember who aborted, ahead of pynetdicom's EVT_ABORTED."""
        conn.abort_source = source

    def aborted(self, conn: Connection, local: bool) -> None:
        if conn.outcome in ("released", "aborted"):
            return
        conn.outcome = "aborted"
        source = "local" if local else (conn.abort_source or "peer")
        conn.abort_source = source
        if not conn.self_check:
            self.metrics.associations.labels(conn.listener, conn.calling_label, "aborted").inc()
            self.metrics.aborts.labels(conn.listener, source).inc()
        self.log.info("association_aborted", abort_source=source, **conn.fields())

    def closed(self, key: object) -> None:
        """The connection is gone: finalise its record once."""
        with self._lock:
            conn = self._connections.pop(key, None)
            if conn is None or conn.ended:
                return
            conn.ended = True
            if conn.holds_slot:
                self._slots[conn.listener] -= 1
        duration = self._clock() - conn.opened
        if conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.close()
        if not conn.self_check:
            self.metrics.connections_open.labels(conn.listener).dec()
            if conn.outcome == "closed_before_request" and not conn.evicted:
                self.metrics.connections_dropped.labels(conn.listener, "no_request").inc()
            if conn.accepted:
                self.metrics.associations_active.labels(conn.listener).dec()
                self.metrics.association_duration.labels(conn.listener).observe(duration)
        if conn.accepted and conn.outcome == "accepted":
            # pynetdicom can report the close before the association thread
            # reports the release or abort that caused it.
            if conn.release_requested and conn.abort_source is None:
                self.released(conn)
            else:
                conn.abort_source = conn.abort_source or "provider"
                self.aborted(conn, local=False)
        fields: dict[str, Any] = {
            **conn.fields(),
            "outcome": conn.outcome,
            "echoes": conn.echoes,
            "duration_s": round(duration, 6),
        }
        if conn.transfer_syntax:
            fields["transfer_syntax"] = transfer_syntax_name(conn.transfer_syntax)
        if conn.rejection:
            fields["rejection"] = conn.rejection.code
        if conn.abort_source:
            fields["abort_source"] = conn.abort_source
        if conn.tls_failure:
            fields["tls_failure"] = conn.tls_failure
        if conn.self_check:
            self.log.debug("association_ended", self_check=True, **fields)
        else:
            self.log.info("association_ended", **fields)

    def sweep(self, is_finished: Callable[[object], bool]) -> int:
        """Finalise records whose connection ended without a close event."""
        with self._lock:
            keys = [key for key in self._connections if is_finished(key)]
        for key in keys:
            self.closed(key)
        return len(keys)

    def open_keys(self, listener: str) -> list[object]:
        """Keys of the listener's connections that have not ended."""
        with self._lock:
            return [k for k, c in self._connections.items() if c.listener == listener]
