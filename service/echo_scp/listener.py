"""One DICOM listener: an AE serving associations, with our policy and event handlers.

The listener's ``engine`` setting picks how associations run: ``event``
(default) builds the server with ``AE.make_server`` from ``engine.py``'s
classes and runs its accept loop on a thread of ours; ``pynetdicom`` uses
``AE.start_server(block=False)`` and pynetdicom's stock polling threads, kept
for comparison (the benchmark) and as a fallback.

Everything the association path reads comes from the listener's
:class:`~echo_scp.runtime.ListenerRuntime` snapshot. :meth:`Listener.reconfigure`
swaps it with one assignment; the event engine reads it once per accepted
connection and hands it to the association, and every handler here reads the
snapshot recorded with the connection, so an association in progress keeps
the configuration it started with. (The stock engine copies the AE title,
contexts and TLS context into pynetdicom's server on a swap, so for it a
connection accepted during a swap may see parts of both.)

The association policy (called AE title, calling AE title and the networks a
known peer may connect from, concurrent association limits of the listener
and of each known peer) is enforced in our ``EVT_REQUESTED`` handler rather than by
pynetdicom's ``require_*`` settings because pynetdicom counts connections that
have not yet sent an A-ASSOCIATE-RQ against the limit and cannot exempt the
readiness self-check.

The pynetdicom names relied on here and in ``engine.py`` are checked, each
with its reason, in ``seam.py``; ``seam.choose_engine`` picks the stock
engine when the event engine's checks fail on the installed pynetdicom.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RSP
from pynetdicom.pdu import A_ABORT_RQ, A_RELEASE_RQ
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.transport import ThreadedAssociationServer

from echo_scp.connections import Connection, ConnectionTable
from echo_scp.protocol import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    STATUS_SUCCESS,
    Rejection,
    format_address,
)
from echo_scp.reporter import Reporter
from echo_scp.runtime import ListenerRuntime
from echo_scp.seam import choose_engine
from echo_scp.settings import ListenerSettings

# shutdown() has returned once the accept loop has; pynetdicom's own loop
# notices within its 0.5 s poll interval.
_STOP_JOIN_TIMEOUT = 2.0


class ListenerStartError(Exception):
    """A listener could not bind or start; the message names the address."""


def end_connection(conn: Connection, reporter: Reporter, now: float) -> None:
    """Close a finished connection's socket (unless its engine does) and report its end."""
    if conn.sock is not None and conn.close_socket:
        with contextlib.suppress(OSError):
            conn.sock.close()
    reporter.ended(conn, now)


class Listener:
    """A running DICOM listener and the handlers that report on it."""

    def __init__(self, runtime: ListenerRuntime, table: ConnectionTable, reporter: Reporter) -> None:
        self.runtime = runtime
        self.table = table
        self.reporter = reporter
        self.server: ThreadedAssociationServer | None = None
        self._serve_thread: threading.Thread | None = None
        #: The engine running once started: the configured one unless seam.py ruled it out.
        self.engine: str = runtime.settings.engine
        self.ae = self._make_ae()

    @property
    def name(self) -> str:
        return self.runtime.name

    @property
    def settings(self) -> ListenerSettings:
        """The listener's current settings (those of its current snapshot)."""
        return self.runtime.settings

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is real even when configured as 0."""
        if self.server is None:
            return self.settings.host, self.settings.port
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.runtime.ae_title)
        self._apply_ae_settings(ae, self.runtime)
        # Our EVT_REQUESTED handler enforces these; see the module docstring.
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.maximum_associations = 1_000_000
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        return ae

    @staticmethod
    def _apply_ae_settings(ae: AE, runtime: ListenerRuntime) -> None:
        # Read by the stock engine for each association; the event engine
        # takes them from the snapshot instead.
        ae.acse_timeout = runtime.acse_timeout
        ae.dimse_timeout = runtime.dimse_timeout
        ae.network_timeout = runtime.network_timeout
        ae.maximum_pdu_size = runtime.maximum_pdu_size

    def start(self) -> None:
        """Bind and start accepting; raises ListenerStartError naming the address."""
        contexts = list(self.runtime.contexts)
        where = format_address(self.settings.host, self.settings.port)
        self.engine = choose_engine(self.settings.engine, self.reporter.log, listener=self.name)
        try:
            if self.engine == "event":
                self._start_event_engine(contexts)
            else:
                self._start_pynetdicom_engine(contexts)
        except OSError as exc:
            raise ListenerStartError(
                f"listener {self.name!r} cannot listen on {where}: {exc.strerror or exc}"
            ) from exc

    def _start_event_engine(self, contexts: list[Any]) -> None:
        # Imported only now: when it cannot import, seam.py has chosen the stock engine.
        from echo_scp.engine import EventAssociationServer, EventRequestHandler

        server = self.ae.make_server(
            (self.settings.host, self.settings.port),
            ae_title=self.settings.ae_title,
            contexts=contexts,
            ssl_context=self.runtime.ssl_context,
            evt_handlers=self._handlers(),
            server_class=EventAssociationServer,
            request_handler=EventRequestHandler,
            request_queue_size=self.settings.listen_backlog,
            profile=lambda: self.runtime,
            on_refused=self._refused,
            tls_failed=_guard_hook(self.reporter.log, self._on_tls_failed),
        )
        # As start_server does, so that ae.shutdown() stops this server too.
        self.ae._servers.append(server)
        self.server = server
        self._serve_thread = threading.Thread(
            target=server.serve_forever,
            name=f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}",
            daemon=True,
        )
        self._serve_thread.start()

    def _start_pynetdicom_engine(self, contexts: list[Any]) -> None:
        before = set(threading.enumerate())
        self.server = self.ae.start_server(
            (self.settings.host, self.settings.port),
            block=False,
            ae_title=self.settings.ae_title,
            contexts=contexts,
            ssl_context=self.runtime.ssl_context,
            evt_handlers=self._handlers(),
        )
        assert self.server is not None
        # start_server does not hand out its serve_forever thread; it is the
        # one thread that appeared during the call (listeners start one by one).
        self._serve_thread = next(
            (t for t in threading.enumerate() if t not in before and t.name.startswith("AcceptorServer")),
            None,
        )
        # pynetdicom listens with socketserver's backlog of 5, which overflows
        # under bursts; Linux lets a second listen() raise it in place.
        if self.server.socket is not None:
            self.server.socket.listen(self.settings.listen_backlog)

    def accepting(self) -> bool:
        """Whether the accept loop runs on an open socket."""
        server = self.server
        if server is None or server.socket is None or server.socket.fileno() == -1:
            return False
        return self._serve_thread is not None and self._serve_thread.is_alive()

    def ping(self) -> None:
        """Send the accept loop a heartbeat request (the event engine answers them)."""
        ping = getattr(self.server, "ping", None)
        if ping is not None:
            ping()

    def stalled_for(self) -> float:
        """Seconds the accept loop has left a heartbeat unanswered (0: it keeps up)."""
        stalled_for = getattr(self.server, "stalled_for", None)
        return float(stalled_for()) if stalled_for is not None else 0.0

    def stop_accepting(self) -> None:
        """Stop accepting and close the listening socket; established associations carry on.

        The event engine's thread goes on running its associations and ends
        after the last; the stock engine's accept thread is joined.
        """
        server = self.server
        if server is None:
            return
        stop = getattr(server, "stop_accepting", None)
        with contextlib.suppress(OSError, ValueError):
            if stop is not None:
                stop()
            else:
                server.shutdown()
        thread = self._serve_thread
        if stop is None and thread is not None and thread is not threading.current_thread():
            thread.join(_STOP_JOIN_TIMEOUT)

    def needs_restart(self, new: ListenerSettings) -> bool:
        """Whether new ListenerSettings change what the socket is bound to, or the engine."""
        old = self.settings
        if (old.host, old.listen_backlog, old.engine) != (new.host, new.listen_backlog, new.engine):
            return True
        # Port 0 means "any": keep whatever port was bound unless a real one is asked for.
        return new.port not in (0, self.address[1]) or (new.port == 0 and old.port != 0)

    def reconfigure(self, runtime: ListenerRuntime) -> None:
        """Serve associations that start from now on with ``runtime``; one assignment.

        Established associations keep the snapshot they started with.
        """
        self.runtime = runtime
        server = self.server
        if server is not None and self.engine != "event":
            # The stock engine reads these from its server and AE per connection.
            self._apply_ae_settings(self.ae, runtime)
            server.ae_title = runtime.ae_title
            server.contexts = list(runtime.contexts)
            server.ssl_context = runtime.ssl_context

    def open_associations(self) -> list[Association]:
        return [key for key in self.table.open_keys(self.name) if isinstance(key, Association)]

    # -- event handlers ---------------------------------------------------------

    def _handlers(self) -> list[Any]:
        guarded = _guard(self.reporter.log)
        handlers = [
            (evt.EVT_CONN_OPEN, guarded(self._on_conn_open)),
            (evt.EVT_CONN_CLOSE, guarded(self._on_conn_close)),
            (evt.EVT_REQUESTED, guarded(self._on_requested)),
            (evt.EVT_ACCEPTED, guarded(self._on_accepted)),
            (evt.EVT_RELEASED, guarded(self._on_released)),
            (evt.EVT_ABORTED, guarded(self._on_aborted)),
            (evt.EVT_DIMSE_RECV, guarded(self._on_dimse_recv)),
            (evt.EVT_DIMSE_SENT, guarded(self._on_dimse_sent)),
            (evt.EVT_C_ECHO, self._on_c_echo),
        ]
        if self.engine != "event":
            # The stock engine's DUL thread can close the connection before
            # its association thread reports the release or abort that caused
            # it; these see the PDU and the primitive as they arrive. The event
            # engine runs the association's step right after each PDU, so
            # EVT_RELEASED and EVT_ABORTED (or EVT_CONN_CLOSE's look at the
            # queue) always come first, and it is spared a call per PDU.
            handlers += [
                (evt.EVT_ACSE_RECV, guarded(self._on_acse_recv)),
                (evt.EVT_PDU_RECV, guarded(self._on_pdu_recv)),
            ]
        return handlers

    def _conn(self, event: evt.Event) -> Connection | None:
        # The record rides on the association (no lookup under the table's
        # lock); a finished one is no longer reported on.
        conn: Connection | None = getattr(event.assoc, "echo_scp_connection", None)
        return conn if conn is not None and not conn.ended else None

    def _on_conn_open(self, event: evt.Event) -> None:
        assoc = event.assoc
        # The event engine hands over the snapshot the connection was accepted
        # with; the stock engine has none, so take the current one.
        runtime: ListenerRuntime = getattr(assoc, "profile", None) or self.runtime
        if not runtime.pdu_logging and self.engine != "event":
            _unbind_pdu_logging(assoc)
        conn = self.table.open(assoc, runtime, event.address)  # type: ignore[attr-defined]
        assoc.echo_scp_connection = conn  # type: ignore[attr-defined]
        # Where logs.py sends pynetdicom's complaints about this peer.
        assoc.log_sink = conn.add_problem  # type: ignore[attr-defined]
        self.reporter.opened(conn)
        settings = runtime.settings
        assoc_socket = assoc.dul.socket
        sock = assoc_socket.socket if assoc_socket is not None else None
        if sock is None:
            return
        conn.sock = sock
        event_engine = self.engine == "event"
        # The event engine's reactor owns (and closes) its descriptors.
        conn.close_socket = not event_engine
        if not conn.self_check:
            self._evict_if_crowded(settings.max_pending_connections)
        if isinstance(sock, ssl.SSLSocket) and settings.tls is not None and not event_engine:
            # The event engine does the handshake itself, without blocking
            # (and reports a failure through _on_tls_failed).
            self._handshake(assoc, conn, sock, settings.tls.handshake_timeout)
        if sock.fileno() != -1:
            if not event_engine:
                # A peer that stops in the middle of a PDU would otherwise block
                # the connection's reader thread forever: pynetdicom reads with
                # no timeout. (The event engine never blocks: its idle timer
                # cuts such a peer off.)
                sock.settimeout(settings.network_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if conn.tls_failure is None:
                # Until the A-ASSOCIATE-RQ arrives the wait is the shorter of
                # the request and ACSE timeouts; _on_requested puts it back.
                assoc.acse_timeout = min(settings.request_timeout, settings.acse_timeout)

    def _refused(self, rejection: Rejection, addresses: list[Any]) -> None:
        """The engine rejected connections before any association (overload, shutdown)."""
        peers = [address for address in addresses if tuple(address[:2]) not in self.table.self_check_ports]
        if peers:
            self.reporter.refused(self.name, rejection, len(peers))

    def _evict_if_crowded(self, limit: int) -> None:
        """Close the longest-waiting silent connection when too many wait for their RQ."""
        victim = self.table.evict_candidate(self.name, limit)
        if victim is None:
            return
        self.reporter.evicted(victim, limit)
        if victim.sock is not None:
            # Its reader thread sees end-of-file and winds the connection up.
            with contextlib.suppress(OSError):
                victim.sock.shutdown(socket.SHUT_RDWR)

    def _handshake(self, assoc: Association, conn: Connection, sock: ssl.SSLSocket, timeout: float) -> None:
        """Complete the TLS handshake on this connection's own thread, with a deadline (stock engine)."""
        sock.settimeout(timeout)
        try:
            sock.do_handshake()
            return
        except OSError as exc:
            reason, detail = tls_failure(exc, timeout)
        self.reporter.tls_failed(conn, reason, detail)
        # Let the association thread end at once instead of waiting the ACSE
        # timeout for an A-ASSOCIATE-RQ that cannot come.
        assoc.acse_timeout = 0
        with contextlib.suppress(OSError):
            sock.close()

    def _on_tls_failed(self, assoc: Association, exc: BaseException | None) -> None:
        """The event engine's handshake failed (``exc``) or timed out (None); it closes the connection."""
        conn = self.table.get(assoc)
        if conn is None:
            return
        tls = conn.runtime.settings.tls
        timeout = tls.handshake_timeout if tls is not None else 0.0
        reason, detail = tls_failure(exc if exc is not None else TimeoutError(), timeout)
        self.reporter.tls_failed(conn, reason, detail)

    def _on_conn_close(self, event: evt.Event) -> None:
        # The DUL closes the connection before the association thread has
        # taken a received A-ABORT off its queue, so look at the queue here to
        # tell a peer's abort from a dropped connection.
        conn = self.table.finish(event.assoc)
        if conn is None:
            return
        pending = event.assoc.dul.peek_next_pdu()
        if event.assoc._sent_abort:
            # We aborted (idle timeout, shutdown) and the close overtook
            # the association thread's EVT_ABORTED.
            self.reporter.abort_received(conn, "local")
        elif isinstance(pending, A_P_ABORT):
            self.reporter.abort_received(conn, "provider")
        elif isinstance(pending, A_ABORT):
            self.reporter.abort_received(conn, "peer")
        end_connection(conn, self.reporter, self.table.clock())

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        conn = self._conn(event)
        if conn is None:
            return
        runtime = conn.runtime
        assoc.acse_timeout = runtime.acse_timeout
        rq = assoc.requestor.primitive
        if rq is None:
            return
        calling, called = str(rq.calling_ae_title).strip(), str(rq.called_ae_title).strip()
        self.reporter.requested(conn, calling, called)
        refusal = runtime.rejection(
            called_ae=called, calling_ae=calling, peer_host=conn.peer_host, self_check=conn.self_check
        )
        if refusal is None and not conn.self_check:
            peer = runtime.peers.get(calling)
            refused_by = self.table.hold_slots(
                conn,
                runtime.settings.max_associations,
                peer=peer.ae_title if peer else None,
                peer_limit=peer.max_associations if peer else None,
            )
            if refused_by is not None:
                refusal = runtime.limit_refusal(refused_by, calling)
        if refusal is None:
            return
        self.reporter.rejected(conn, refusal.rejection, cause=refusal.cause, **refusal.details)
        assoc.acse.send_reject(*refusal.rejection)
        # As pynetdicom does for its own rejections: wait until the RJ is out
        # before the reactor closes the socket.
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        conn = self._conn(event)
        if conn is None:
            return
        contexts = event.assoc.accepted_contexts
        if not contexts:
            # An A-ASSOCIATE-AC rejecting every presentation context: a peer
            # that wanted another service (a modality sending images here).
            rejected = [str(cx.abstract_syntax) for cx in event.assoc.rejected_contexts]
            self.reporter.no_accepted_context(conn, rejected)
            return
        self.reporter.accepted(conn, str(contexts[0].transfer_syntax[0]))

    def _on_released(self, event: evt.Event) -> None:
        conn = self._conn(event)
        if conn is not None:
            self.reporter.released(conn)

    def _on_aborted(self, event: evt.Event) -> None:
        conn = self._conn(event)
        if conn is not None:
            self.reporter.aborted(conn, local=bool(event.assoc._sent_abort))

    def _on_acse_recv(self, event: evt.Event) -> None:
        primitive = event.primitive  # type: ignore[attr-defined]
        conn = self._conn(event)
        if conn is None:
            return
        if isinstance(primitive, A_P_ABORT):
            self.reporter.abort_received(conn, "provider")
        elif isinstance(primitive, A_ABORT):
            self.reporter.abort_received(conn, "peer")

    def _on_pdu_recv(self, event: evt.Event) -> None:
        # Seen on the reader thread as the PDU arrives: the connection can close
        # before the association thread reports the release or the abort, and
        # the record must still say which it was.
        pdu = event.pdu  # type: ignore[attr-defined]
        if isinstance(pdu, (A_RELEASE_RQ, A_ABORT_RQ)):
            conn = self._conn(event)
            if conn is not None:
                if isinstance(pdu, A_RELEASE_RQ):
                    self.reporter.release_requested(conn)
                else:
                    self.reporter.abort_received(conn, "peer")

    def _on_dimse_recv(self, event: evt.Event) -> None:
        conn = self._conn(event)
        if conn is not None:
            self.reporter.dimse_received(conn, self.table.clock())

    def _on_dimse_sent(self, event: evt.Event) -> None:
        conn = self._conn(event)
        # isinstance: the event engine sends a subclass encoded from a template.
        if conn is not None and isinstance(event.message, C_ECHO_RSP):
            self.reporter.echo_response_sent(conn, self.table.clock())

    def _on_c_echo(self, event: evt.Event) -> int:
        # An intervention handler: whatever happens in the bookkeeping, the
        # peer gets Success, never an exception turned into a failure status.
        try:
            conn = self._conn(event)
            if conn is not None:
                self.reporter.echo(conn, getattr(event.request, "MessageID", None), STATUS_SUCCESS)
        except Exception:
            _log_bookkeeping_error(self.reporter.log, "EVT_C_ECHO")
        return STATUS_SUCCESS


# OpenSSL reasons that mean "the peer's certificate", not the protocol: a missing
# client certificate (RFC 8446's certificate_required), or the peer rejecting ours.
_CERTIFICATE_REASONS = frozenset(
    {
        "PEER_DID_NOT_RETURN_A_CERTIFICATE",
        "NO_CERTIFICATE_RETURNED",
        "CERTIFICATE_VERIFY_FAILED",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }
)


def tls_failure(exc: BaseException, timeout: float) -> tuple[str, str]:
    """(reason label, detail) of a failed TLS handshake."""
    if isinstance(exc, TimeoutError):
        return "timeout", f"no handshake within {timeout:g} s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate", exc.verify_message or str(exc)
    if isinstance(exc, ssl.SSLError):
        return tls_failure_kind(exc), exc.reason or str(exc)
    if isinstance(exc, OSError):
        return "closed", exc.strerror or str(exc)
    return "protocol", str(exc)


def tls_failure_kind(exc: ssl.SSLError) -> str:
    """``certificate`` for a failure about a certificate (missing, untrusted, expired), else ``protocol``."""
    reason = exc.reason or ""
    if reason in _CERTIFICATE_REASONS or "CERTIFICATE" in reason:
        return "certificate"
    return "protocol"


def _unbind_pdu_logging(assoc: Association) -> None:
    """Unbind pynetdicom's PDU debug handlers, which the stock engine binds to every association.

    It binds them while its process-wide ``_config.LOG_HANDLER_LEVEL`` is
    "standard" (the default, not ours to change); they format every PDU.
    """
    from pynetdicom import _handlers

    standard = {
        _handlers.standard_dimse_recv_handler,
        _handlers.standard_dimse_sent_handler,
        _handlers.standard_pdu_recv_handler,
        _handlers.standard_pdu_sent_handler,
    }
    for event, handlers in list(assoc._handlers.items()):
        for handler in list(handlers) if isinstance(handlers, list) else []:
            if handler[0] in standard:
                assoc.unbind(event, handler[0])


def _guard(log: Any) -> Callable[[Callable[[evt.Event], None]], Callable[[evt.Event], None]]:
    def wrap(handler: Callable[[evt.Event], None]) -> Callable[[evt.Event], None]:
        def guarded(event: evt.Event) -> None:
            try:
                handler(event)
            except Exception:
                _log_bookkeeping_error(log, event.event.name)

        guarded.__name__ = handler.__name__
        return guarded

    return wrap


def _guard_hook(log: Any, hook: Callable[..., None]) -> Callable[..., None]:
    def guarded(*args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            _log_bookkeeping_error(log, hook.__name__)

    return guarded


def _log_bookkeeping_error(log: Any, event_name: str) -> None:
    with contextlib.suppress(Exception):
        log.exception("bookkeeping_failed", pynetdicom_event=event_name)
