"""One DICOM listener: an AE serving associations, with our policy and event handlers.

The listener's ``engine`` setting picks how associations run: ``event``
(default) builds the server with ``AE.make_server`` from ``engine.py``'s
classes and runs its accept loop on a thread of ours; ``pynetdicom`` uses
``AE.start_server(block=False)`` and pynetdicom's stock polling threads, kept
for comparison (the benchmark) and as a fallback.

Each listener has its own ``ApplicationEntity`` so that timeouts, PDU size and
limits are per listener. The association policy (called and calling AE title,
concurrent association limit) is enforced in our ``EVT_REQUESTED`` handler
rather than by pynetdicom's ``require_*`` settings because pynetdicom counts
connections that have not yet sent an A-ASSOCIATE-RQ against the limit and
cannot exempt the readiness self-check.

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

from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RSP
from pynetdicom.pdu import A_ABORT_RQ, A_RELEASE_RQ
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from echo_scp import __version__
from echo_scp.observer import Connection, Observer
from echo_scp.seam import choose_engine
from echo_scp.settings import ListenerSettings
from echo_scp.tls import server_context

SUCCESS = 0x0000
# A-ASSOCIATE-RJ (result, source, reason) triples, PS3.8 9.3.4.
REJECT_CALLED_AE = (1, 1, 7)
REJECT_CALLING_AE = (1, 1, 3)
REJECT_LIMIT = (2, 3, 2)
_IMPLEMENTATION_VERSION = f"ECHO_SCP_{__version__}"[:16]
# shutdown() has returned once the accept loop has; pynetdicom's own loop
# notices within its 0.5 s poll interval.
_STOP_JOIN_TIMEOUT = 2.0


class ListenerStartError(Exception):
    """A listener could not bind or start; the message names the address."""


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def decide(
    settings: ListenerSettings, *, called_ae: str, calling_ae: str, self_check: bool
) -> tuple[int, int, int] | None:
    """The A-ASSOCIATE-RJ to send for these AE titles, or None to go on.

    Permanent problems are reported before the transient limit so that a
    misconfigured peer learns what to fix. The self-check is exempt from the
    calling-AE allow-list; it always uses the right called AE title.
    """
    if settings.require_called_ae_title and called_ae.strip() != settings.ae_title:
        return REJECT_CALLED_AE
    allowed = settings.allowed_calling_ae_titles
    if allowed and not self_check and calling_ae.strip() not in allowed:
        return REJECT_CALLING_AE
    return None


class Listener:
    """A running DICOM listener and the handlers that report on it."""

    def __init__(self, settings: ListenerSettings, observer: Observer, *, debug: bool = False) -> None:
        self.settings = settings
        self.observer = observer
        self._debug = debug
        self.server: ThreadedAssociationServer | None = None
        self._serve_thread: threading.Thread | None = None
        #: The engine running once started: the configured one unless seam.py ruled it out.
        self.engine: str = settings.engine
        self._ssl_context = server_context(settings.tls) if settings.tls else None
        self.ae = self._make_ae()

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is real even when configured as 0."""
        if self.server is None:
            return self.settings.host, self.settings.port
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.maximum_pdu_size = s.max_pdu_size
        # Our EVT_REQUESTED handler enforces these; see the module docstring.
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.maximum_associations = 1_000_000
        ae.implementation_version_name = _IMPLEMENTATION_VERSION
        return ae

    def start(self) -> None:
        """Bind and start accepting; raises ListenerStartError naming the address."""
        if not self._debug:
            # pynetdicom's per-PDU debug handlers format every PDU even when the
            # log level drops the result; only bind them when debugging.
            _config.LOG_HANDLER_LEVEL = "none"
        contexts = [build_context(Verification, self.settings.transfer_syntaxes)]
        where = format_address(self.settings.host, self.settings.port)
        self.engine = choose_engine(self.settings.engine, self.observer.log, listener=self.name)
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
            ssl_context=self._ssl_context,
            evt_handlers=self._handlers(),
            server_class=EventAssociationServer,
            request_handler=EventRequestHandler,
            request_queue_size=self.settings.listen_backlog,
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
            ssl_context=self._ssl_context,
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

    def stop_accepting(self) -> None:
        """Stop the accept loop and close the listening socket; established associations carry on."""
        server = self.server
        if server is None:
            return
        with contextlib.suppress(OSError, ValueError):
            server.shutdown()
        thread = self._serve_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_STOP_JOIN_TIMEOUT)

    def needs_restart(self, new: ListenerSettings) -> bool:
        """Whether ``new`` changes what the socket is bound to (a live update cannot)."""
        old = self.settings
        if (old.host, old.listen_backlog) != (new.host, new.listen_backlog):
            return True
        # Port 0 means "any": keep whatever port was bound unless a real one is asked for.
        return new.port not in (0, self.address[1]) or (new.port == 0 and old.port != 0)

    def reconfigure(self, new: ListenerSettings) -> None:
        """Apply new settings to associations that start from now on.

        Established associations keep what they negotiated. Raises
        ssl.SSLError or OSError, before changing anything, if new TLS files do
        not load.
        """
        context = server_context(new.tls) if new.tls else None
        contexts = [build_context(Verification, new.transfer_syntaxes)]
        ae = self.ae
        ae.acse_timeout = new.acse_timeout
        ae.dimse_timeout = new.dimse_timeout
        ae.network_timeout = new.network_timeout
        ae.maximum_pdu_size = new.max_pdu_size
        self.settings = new  # policy and handshake settings are read per connection
        self._ssl_context = context
        server = self.server
        if server is not None:
            # Read by pynetdicom for each new connection: get_request wraps with
            # ssl_context, the request handler copies ae_title and contexts.
            server.ae_title = new.ae_title
            server.contexts = contexts
            server.ssl_context = context

    def open_associations(self) -> list[Association]:
        return [key for key in self.observer.open_keys(self.name) if isinstance(key, Association)]

    # -- event handlers ---------------------------------------------------------

    def _handlers(self) -> list[Any]:
        guarded = _guard(self.observer.log)
        return [
            (evt.EVT_CONN_OPEN, guarded(self._on_conn_open)),
            (evt.EVT_CONN_CLOSE, guarded(self._on_conn_close)),
            (evt.EVT_REQUESTED, guarded(self._on_requested)),
            (evt.EVT_ACCEPTED, guarded(self._on_accepted)),
            (evt.EVT_RELEASED, guarded(self._on_released)),
            (evt.EVT_ABORTED, guarded(self._on_aborted)),
            (evt.EVT_ACSE_RECV, guarded(self._on_acse_recv)),
            (evt.EVT_PDU_RECV, guarded(self._on_pdu_recv)),
            (evt.EVT_DIMSE_RECV, guarded(self._on_dimse_recv)),
            (evt.EVT_DIMSE_SENT, guarded(self._on_dimse_sent)),
            (evt.EVT_C_ECHO, self._on_c_echo),
        ]

    def _conn(self, event: evt.Event) -> Connection | None:
        return self.observer.get(event.assoc)

    def _on_conn_open(self, event: evt.Event) -> None:
        conn = self.observer.connection_opened(event.assoc, self.name, event.address)  # type: ignore[attr-defined]
        assoc_socket = event.assoc.dul.socket
        sock = assoc_socket.socket if assoc_socket is not None else None
        if sock is None:
            return
        conn.sock = sock
        if not conn.self_check:
            self._evict_if_crowded()
        if isinstance(sock, ssl.SSLSocket) and self.settings.tls is not None:
            self._handshake(event.assoc, conn, sock, self.settings.tls.handshake_timeout)
        # A peer that stops in the middle of a PDU would otherwise block the
        # connection's reader thread forever: pynetdicom reads with no timeout.
        if sock.fileno() != -1:
            sock.settimeout(self.settings.network_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if conn.tls_failure is None:
                # Until the A-ASSOCIATE-RQ arrives the wait is the shorter of
                # the request and ACSE timeouts; _on_requested puts it back.
                event.assoc.acse_timeout = min(self.settings.request_timeout, self.settings.acse_timeout)

    def _evict_if_crowded(self) -> None:
        """Close the longest-waiting silent connection when too many wait for their RQ."""
        limit = self.settings.max_pending_connections
        candidate = self.observer.evict_candidate(self.name, limit)
        if candidate is None:
            return
        _key, victim = candidate
        self.observer.evicted(victim, limit)
        if victim.sock is not None:
            # Its reader thread sees end-of-file and winds the connection up.
            with contextlib.suppress(OSError):
                victim.sock.shutdown(socket.SHUT_RDWR)

    def _handshake(self, assoc: Association, conn: Connection, sock: ssl.SSLSocket, timeout: float) -> None:
        """Complete the TLS handshake on this connection's own thread, with a deadline."""
        sock.settimeout(timeout)
        try:
            sock.do_handshake()
            return
        except TimeoutError:
            reason, detail = "timeout", f"no handshake within {timeout:g} s"
        except ssl.SSLCertVerificationError as exc:
            reason, detail = "certificate", exc.verify_message or str(exc)
        except ssl.SSLError as exc:
            reason, detail = "protocol", exc.reason or str(exc)
        except OSError as exc:
            reason, detail = "closed", exc.strerror or str(exc)
        self.observer.tls_failed(conn, reason, detail)
        # Let the association thread end at once instead of waiting the ACSE
        # timeout for an A-ASSOCIATE-RQ that cannot come.
        assoc.acse_timeout = 0
        with contextlib.suppress(OSError):
            sock.close()

    def _on_conn_close(self, event: evt.Event) -> None:
        # The DUL closes the connection before the association thread has
        # taken a received A-ABORT off its queue, so look at the queue here to
        # tell a peer's abort from a dropped connection.
        conn = self._conn(event)
        if conn is not None:
            pending = event.assoc.dul.peek_next_pdu()
            if event.assoc._sent_abort:
                # We aborted (idle timeout, shutdown) and the close overtook
                # the association thread's EVT_ABORTED.
                self.observer.abort_received(conn, "local")
            elif isinstance(pending, A_P_ABORT):
                self.observer.abort_received(conn, "provider")
            elif isinstance(pending, A_ABORT):
                self.observer.abort_received(conn, "peer")
        self.observer.closed(event.assoc)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        conn = self._conn(event)
        if conn is None:
            return
        assoc.acse_timeout = self.settings.acse_timeout
        rq = assoc.requestor.primitive
        if rq is None:
            return
        calling, called = str(rq.calling_ae_title).strip(), str(rq.called_ae_title).strip()
        self.observer.requested(conn, calling, called)
        rejection = decide(self.settings, called_ae=called, calling_ae=calling, self_check=conn.self_check)
        limited = not conn.self_check and rejection is None
        if limited and not self.observer.try_hold_slot(conn, self.settings.max_associations):
            rejection = REJECT_LIMIT
        if rejection is None:
            return
        self.observer.rejected(conn, *rejection)
        assoc.acse.send_reject(*rejection)
        # As pynetdicom does for its own rejections: wait until the RJ is out
        # before the reactor closes the socket.
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        conn = self._conn(event)
        if conn is None:
            return
        contexts = event.assoc.accepted_contexts
        syntax = str(contexts[0].transfer_syntax[0]) if contexts else None
        self.observer.accepted(conn, syntax)

    def _on_released(self, event: evt.Event) -> None:
        conn = self._conn(event)
        if conn is not None:
            self.observer.released(conn)

    def _on_aborted(self, event: evt.Event) -> None:
        conn = self._conn(event)
        if conn is not None:
            self.observer.aborted(conn, local=bool(event.assoc._sent_abort))

    def _on_acse_recv(self, event: evt.Event) -> None:
        primitive = event.primitive  # type: ignore[attr-defined]
        conn = self._conn(event)
        if conn is None:
            return
        if isinstance(primitive, A_P_ABORT):
            self.observer.abort_received(conn, "provider")
        elif isinstance(primitive, A_ABORT):
            self.observer.abort_received(conn, "peer")

    def _on_pdu_recv(self, event: evt.Event) -> None:
        # Seen on the reader thread as the PDU arrives: the connection can close
        # before the association thread reports the release or the abort, and
        # the record must still say which it was.
        pdu = event.pdu  # type: ignore[attr-defined]
        if isinstance(pdu, (A_RELEASE_RQ, A_ABORT_RQ)):
            conn = self._conn(event)
            if conn is not None:
                if isinstance(pdu, A_RELEASE_RQ):
                    self.observer.release_requested(conn)
                else:
                    self.observer.abort_received(conn, "peer")

    def _on_dimse_recv(self, event: evt.Event) -> None:
        conn = self._conn(event)
        if conn is not None:
            self.observer.dimse_received(conn)

    def _on_dimse_sent(self, event: evt.Event) -> None:
        conn = self._conn(event)
        # isinstance: the event engine sends a subclass encoded from a template.
        if conn is not None and isinstance(event.message, C_ECHO_RSP):
            self.observer.echo_response_sent(conn)

    def _on_c_echo(self, event: evt.Event) -> int:
        # An intervention handler: whatever happens in the bookkeeping, the
        # peer gets Success, never an exception turned into a failure status.
        try:
            conn = self._conn(event)
            if conn is not None:
                self.observer.echo(conn, getattr(event.request, "MessageID", None), SUCCESS)
        except Exception:
            _log_bookkeeping_error(self.observer.log, "EVT_C_ECHO")
        return SUCCESS


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


def _log_bookkeeping_error(log: Any, event_name: str) -> None:
    with contextlib.suppress(Exception):
        log.exception("bookkeeping_failed", pynetdicom_event=event_name)
