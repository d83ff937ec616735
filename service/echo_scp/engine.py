"""An event-driven association engine for ``AE.make_server``: no polling loops.

pynetdicom's acceptor polls. Each association has a DUL thread that sleeps
1 ms whenever it is idle and an association thread that sleeps 1 ms on every
loop, so a C-ECHO round trip waits on two polls, every idle association costs
CPU, and ``AssociationSocket.ready`` uses ``select()``, which fails for file
descriptors above 1024 (the connection is then silently dropped). This module
subclasses the pieces so that every thread blocks until there is work:

* :class:`EventDULServiceProvider` blocks in ``poll()`` (a
  ``selectors.PollSelector``) on the peer's socket and a wake-up channel (an
  ``eventfd``, or a socket pair where there is none). Queueing a primitive or
  an event for the DUL, or killing it, writes to the channel; the wait times
  out when the ARTIM timer runs out. Each turn of the loop is pynetdicom's:
  ARTIM check, ``_process_recv_primitive`` or ``_is_transport_event``, then
  one ``state_machine.do_action``, so the state machine, PDU decoding and every
  ``EVT_*`` trigger are pynetdicom's own. ``PollSelector`` rather than
  ``DefaultSelector`` (epoll): with two descriptors per wait epoll only adds a
  descriptor and three system calls per association, and ``poll()`` reports a
  descriptor closed under it (POLLNVAL) where epoll silently forgets it. The
  loop also survives what ends pynetdicom's with the connection left open: a
  local primitive arriving after the peer aborted (dropped), an exception in a
  state machine action (A-ABORT, as for a failed read).
* :class:`PollingAssociationSocket` answers ``ready`` with ``poll()``, so
  descriptors above 1024 work, reads ahead (one ``recv`` per PDU, not two)
  and always closes its socket on shutdown.
* :class:`EventAssociation` waits on a condition that the DIMSE message queue,
  the DUL-to-user queue, the DUL's exit and ``kill()`` signal, with the network
  idle timer's remaining time as the timeout. It still serves requests with
  ``_serve_request``, releases with ``acse.is_release_requested`` and
  ``acse.send_release(is_response=True)``, and fires EVT_RELEASED and
  EVT_ABORTED as pynetdicom does. Waiting for the A-ASSOCIATE-RQ ends as soon
  as the DUL stops (a peer that disconnects first no longer holds the thread
  for the whole ACSE timeout), and an association killed from another thread
  lets its DUL finish (send the A-ABORT) before the socket is closed. Its DUL
  and DIMSE provider are pynetdicom's own objects, upgraded in place to the
  subclasses here (see :meth:`EventDULServiceProvider.adopt`).
* :class:`EventDIMSEServiceProvider` answers C-ECHO from :class:`EchoTemplates`:
  a request byte-identical but for its message ID to one pynetdicom decoded
  before, and a response like one pynetdicom encoded before, skip pydicom.
* :class:`EventRequestHandler` builds the association without the per
  association ``deepcopy`` of the presentation contexts (negotiation only
  reads them), without a ``getaddrinfo`` for the local address, and with the
  server's event handlers copied instead of bound one by one. EVT_CONN_OPEN
  fires on the association's own thread, just before its DUL starts, so that
  :class:`EventAssociationServer` can accept on its own thread without a
  thread per request and a slow TLS handshake still never blocks accepting.
* :class:`EventAssociationServer` accepts in an event-driven ``serve_forever``
  (the listening socket and a wake-up channel, so ``shutdown()`` is immediate),
  listens with ``request_queue_size`` = the listener's backlog, and does not
  force ``gc.collect()`` every 60 requests.

Each pynetdicom name these classes rely on is a check in ``seam.py``, with
the reason; a listener runs pynetdicom's stock engine instead when one of
them fails on the installed pynetdicom.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from io import BytesIO
from typing import Any, Protocol, cast

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_ECHO_RQ, C_ECHO_RSP
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.dsutils import decode, encode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.timer import Timer
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)
from pynetdicom.utils import make_target

from echo_scp.protocol import (
    ABORT_REASON_NOT_SPECIFIED,
    ABORT_SOURCE_PROVIDER,
    C_ECHO_RQ_FIELD,
    COMMAND_GROUP,
    ELEMENT_HEADER,
    MCH_COMMAND,
    MCH_LAST,
    MESSAGE_ID,
    MESSAGE_ID_BEING_RESPONDED_TO,
    NO_DATA_SET,
    REJECT_CONGESTION,
    REJECT_LOCAL_LIMIT,
    Rejection,
    encode_associate_rj,
)

LOGGER = logging.getLogger(__name__)
# pynetdicom's own narration goes to its loggers, whose level the daemon sets
# apart from ours (logs.py); the replaced loops narrate under the same names.
_DUL_LOG = logging.getLogger("pynetdicom.dul")
_ASSOC_LOG = logging.getLogger("pynetdicom.association")
_DIMSE_LOG = logging.getLogger("pynetdicom.dimse")
_READ = selectors.EVENT_READ
_ECHO_RQ_KEYWORDS = frozenset(
    {"CommandGroupLength", "AffectedSOPClassUID", "CommandField", "MessageID", "CommandDataSetType"}
)
_LAST_COMMAND_FRAGMENT = MCH_COMMAND | MCH_LAST
# Sent when no association can be started for a connection (2/3/2), and at
# shutdown to connections still waiting in the listen backlog (2/3/1: "try again").
_REJECT_LOCAL_LIMIT = encode_associate_rj(REJECT_LOCAL_LIMIT)
_REJECT_CONGESTION = encode_associate_rj(REJECT_CONGESTION)
# How long refused backlog connections get to read the rejection.
_REFUSE_LINGER = 0.5
# State machine events raised by a primitive from the local user (PS3.8 9.2).
LOCAL_PRIMITIVE_EVENTS = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})


class AcceptorProfile(Protocol):
    """What a new association is built from; read once per connection (``runtime.ListenerRuntime``)."""

    @property
    def ae_title(self) -> str: ...
    @property
    def contexts(self) -> Sequence[PresentationContext]: ...
    @property
    def ssl_context(self) -> ssl.SSLContext | None: ...
    @property
    def acse_timeout(self) -> float: ...
    @property
    def dimse_timeout(self) -> float: ...
    @property
    def network_timeout(self) -> float: ...
    @property
    def maximum_pdu_size(self) -> int: ...
    @property
    def pdu_logging(self) -> bool: ...


# pynetdicom's debug handlers, bound by default ("standard" log handler level).
STANDARD_LOG_HANDLERS = frozenset(
    {
        standard_dimse_recv_handler,
        standard_dimse_sent_handler,
        standard_pdu_recv_handler,
        standard_pdu_sent_handler,
    }
)


class _Signal:
    """Wakes threads waiting for "something changed"; safe for several waiters.

    A waiter reads ``generation``, checks its conditions, then calls
    ``wait(seen, timeout)``, which returns at once if anything was signalled
    since it read ``generation``: no wake-up is lost between check and wait.
    """

    __slots__ = ("_cond", "generation")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.generation = 0

    def notify(self) -> None:
        with self._cond:
            self.generation += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float | None) -> None:
        with self._cond:
            if self.generation == seen:
                self._cond.wait(timeout)


class _WakeChannel:
    """A descriptor that poll() sees readable after ``set()`` until ``drain()``."""

    def __init__(self) -> None:
        self._pair: tuple[socket.socket, socket.socket] | None = None
        if hasattr(os, "eventfd"):
            # One descriptor instead of a pipe's or a socket pair's two.
            self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            reader, writer = socket.socketpair()
            reader.setblocking(False)
            writer.setblocking(False)
            self._pair = (reader, writer)
            self._fd = reader.fileno()

    def fileno(self) -> int:
        return self._fd

    def set(self) -> None:
        with contextlib.suppress(BlockingIOError):
            if self._pair is None:
                os.eventfd_write(self._fd, 1)
            else:  # pragma: no cover - not Linux
                self._pair[1].send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            if self._pair is None:
                os.eventfd_read(self._fd)
            else:  # pragma: no cover - not Linux
                self._pair[0].recv(4096)

    def close(self) -> None:
        if self._pair is None:
            os.close(self._fd)
        else:  # pragma: no cover - not Linux
            for sock in self._pair:
                sock.close()


class _WakingQueue(queue.Queue[Any]):
    """A queue that calls ``wake`` after every ``put``."""

    _wake: Callable[[], None]

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    @classmethod
    def adopt(cls, plain: queue.Queue[Any], wake: Callable[[], None]) -> _WakingQueue:
        """Make one of pynetdicom's queues wake ``wake``, in place (it only gains a method)."""
        plain.__class__ = cls
        adopted = cast(_WakingQueue, plain)
        adopted._wake = wake
        return adopted

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


def _running_deadline(timer: Timer) -> float | None:
    """Seconds until a started, unstopped timer expires (>= 0), else None."""
    if timer.timeout is None or timer._start_time is None or timer._end_time is not None:
        return None
    return max(0.0, timer.remaining)


class PollingAssociationSocket(AssociationSocket):
    """An AssociationSocket that reads ahead and whose ``ready`` uses poll().

    poll() works for any descriptor number. Reading up to 64 KiB at a time
    instead of pynetdicom's exact-size reads takes one system call per PDU
    instead of two (the 6-byte header, then the body).
    """

    _READ_SIZE = 65536

    def __init__(self, assoc: Association, client_socket: socket.socket | None = None) -> None:
        self._poller: Any = None
        self._polled_fd = -1
        self._buffer = bytearray()
        super().__init__(assoc, client_socket=client_socket)

    @property
    def buffered(self) -> bool:
        """Whether bytes are waiting that poll() on the descriptor cannot see."""
        sock = self.socket
        return bool(self._buffer) or (isinstance(sock, ssl.SSLSocket) and bool(sock.pending()))

    def recv(self, nr_bytes: int) -> bytearray:
        """``nr_bytes`` bytes, or fewer if the peer closed; socket errors propagate as in pynetdicom."""
        buffer = self._buffer
        sock = cast(socket.socket, self.socket)
        while len(buffer) < nr_bytes:
            # Never more at once: recv() allocates its whole size, and the
            # length came from the peer (a 4 GiB PDU header, say).
            chunk = sock.recv(self._READ_SIZE)
            if not chunk:
                break
            buffer += chunk
        data = buffer[:nr_bytes]
        del buffer[:nr_bytes]
        return data

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if self._buffer:
            return True
        try:
            fd = sock.fileno()
            if fd < 0:
                raise ValueError("socket closed")
            if fd != self._polled_fd:
                self._poller = select.poll()
                self._poller.register(fd, select.POLLIN)
                self._polled_fd = fd
            events = self._poller.poll(0)
        except (OSError, ValueError):
            # Evt17: Transport connection closed, as pynetdicom's select() path does.
            self.event_queue.put("Evt17")
            return False
        if events and events[0][1] & select.POLLNVAL:
            self.event_queue.put("Evt17")
            return False
        # An SSLSocket can hold decrypted bytes that poll() cannot see.
        if isinstance(sock, ssl.SSLSocket):
            return bool(events) or bool(sock.pending())
        return bool(events)

    def _shutdown_socket(self) -> None:
        # pynetdicom skips close() when shutdown() raises (the peer reset the
        # connection), leaving the descriptor to the garbage collector.
        sock = self.socket
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()


class EventDULServiceProvider(DULServiceProvider):
    """A DUL service provider whose reactor blocks in poll() instead of sleeping."""

    def __init__(self, assoc: EventAssociation) -> None:
        super().__init__(assoc)
        self._add_event_state(assoc)

    @classmethod
    def adopt(cls, dul: DULServiceProvider, assoc: EventAssociation) -> EventDULServiceProvider:
        """Turn the DUL that ``Association.__init__`` built into this class, in place.

        The subclass only adds state and methods, so nothing is lost; no
        second DUL (a Thread, four queues, timers, a state machine) is built
        per association, and the timers keep the timeouts ``Association``
        applied to them: replacing the DUL would need ``acse_timeout`` and
        ``network_timeout`` set again, or ARTIM would fall back to 30 s.
        """
        dul.__class__ = cls
        adopted = cast(EventDULServiceProvider, dul)
        adopted._add_event_state(assoc)
        return adopted

    def _add_event_state(self, assoc: EventAssociation) -> None:
        # Thread.__init__ captured pynetdicom's run_reactor as the thread's
        # target before an adopted DUL changed class; run() uses this instead.
        self._event_target: Callable[[], Any] | None = make_target(self.run_reactor)
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._channel: _WakeChannel | None = None
        self._reactor_ident: int | None = None
        #: True once the reactor loop has ended; set before the association is signalled.
        self.reactor_done = False
        #: Set while the state machine rests in Sta1 after work, and when the reactor ends.
        self.idle_or_done = threading.Event()
        self._user_signal = assoc.signal
        # Empty until the association starts: adopted, not rebuilt.
        self.event_queue = _WakingQueue.adopt(self.event_queue, self.wake)
        self.to_provider_queue = _WakingQueue.adopt(self.to_provider_queue, self.wake)
        self.to_user_queue = _WakingQueue.adopt(self.to_user_queue, assoc.signal.notify)

    # -- waking the reactor ---------------------------------------------------

    def wake(self) -> None:
        """Make the reactor look at its queues and flags now."""
        # The reactor itself always looks at its queues before it blocks, and
        # one unread wake-up is enough for any number of puts.
        if self._wake_pending or threading.get_ident() == self._reactor_ident:
            return
        with self._wake_lock:
            # Under the lock: the channel is closed (and its descriptor number
            # possibly reused) as soon as the reactor ends.
            if self._channel is None or self._wake_pending:
                return
            self._wake_pending = True
            self._channel.set()

    def kill_dul(self) -> None:
        self._kill_thread = True
        self.wake()

    def stop_dul(self) -> bool:
        """Stop the reactor if the state machine is in Sta1; wait for it to end."""
        if self.state_machine.current_state != "Sta1":
            return False
        self.kill_dul()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        return True

    # -- the reactor ----------------------------------------------------------

    def run(self) -> None:
        target, self._event_target = self._event_target, None
        if target is not None:
            target()

    def run_reactor(self) -> None:
        self._reactor_ident = threading.get_ident()
        channel = _WakeChannel()
        with self._wake_lock:
            self._channel = channel
        selector = selectors.PollSelector()
        selector.register(channel.fileno(), _READ)
        watched = [-1]
        # Whether the last wait saw the peer's socket readable: pynetdicom
        # polls the socket on every turn, here only when there is cause to.
        readable = False
        self._idle_timer.start()
        try:
            self.assoc._dul_ready.set()
            while not self._kill_thread:
                # The ARTIM timer first, so its event is queued ahead of others.
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    # Encode and send a primitive from the user, or read a PDU.
                    if self._process_recv_primitive():
                        pass
                    elif readable or self._transport_needs_look():
                        readable = False
                        if self._is_transport_event():
                            self._idle_timer.restart()
                except Exception as exc:
                    self._abort_after_error(exc)
                    return
                try:
                    event = self.event_queue.get_nowait()
                except queue.Empty:
                    readable = self._wait(selector, channel, watched)
                    continue
                if self._is_stale(event):
                    continue
                try:
                    self.state_machine.do_action(event)
                except Exception as exc:
                    # pynetdicom lets this end the thread with the connection
                    # open; treat it like a failure to read or send.
                    self._abort_after_error(exc)
                    return
                if self.state_machine.current_state == "Sta1":
                    self.idle_or_done.set()
                elif self.idle_or_done.is_set():
                    self.idle_or_done.clear()
        finally:
            with self._wake_lock:
                self._channel = None
            selector.close()
            channel.close()
            self.reactor_done = True
            self.idle_or_done.set()
            self._user_signal.notify()

    def _is_stale(self, event: str) -> bool:
        """Drop a local primitive, or ARTIM expiry, that the state machine has moved past.

        The association thread answers an A-ASSOCIATE-RQ or an A-RELEASE-RQ
        while this thread goes on reading: if the peer aborts or sends
        something invalid meanwhile, the answer reaches a state machine
        already in Sta13 (closing) or Sta1, where PS3.8 defines no transition
        for it. pynetdicom raises InvalidEventError there, which ends this
        thread with the connection still open.
        """
        state = self.state_machine.current_state
        if (event, state) in TRANSITION_TABLE:
            return False
        if event in LOCAL_PRIMITIVE_EVENTS:
            # The event was raised for the primitive at the head of the queue;
            # the action that would have taken it off never runs.
            with contextlib.suppress(queue.Empty):
                self.to_provider_queue.get_nowait()
        elif event != "Evt18":
            return False
        _DUL_LOG.debug("Dropped %s received in %s: the association is already ending", event, state)
        if event == "Evt15" and state == "Sta2" and self.socket is not None:
            # An abort (at shutdown, say) before the peer's A-ASSOCIATE-RQ: there
            # is no association to send an A-ABORT on, so close the connection
            # (Evt17, AA-5) instead of waiting for the ARTIM timer.
            self.socket.close()
        return True

    def _transport_needs_look(self) -> bool:
        """Whether to look at the socket although the last wait did not report it readable."""
        # In Sta13 pynetdicom closes the connection once nothing is left to
        # read, which it finds out by looking.
        if self.state_machine.current_state == "Sta13":
            return True
        assoc_socket = self.socket
        return isinstance(assoc_socket, PollingAssociationSocket) and assoc_socket.buffered

    def _wait(self, selector: selectors.BaseSelector, channel: _WakeChannel, watched: list[int]) -> bool:
        """Block until the peer sends, a wake-up arrives or the ARTIM timer runs out.

        Returns whether the peer's socket is readable (or closed).
        """
        assoc_socket = self.socket
        sock = assoc_socket.socket if assoc_socket is not None and assoc_socket._is_connected else None
        fd = sock.fileno() if sock is not None else -1
        if fd != watched[0]:
            if watched[0] >= 0:
                selector.unregister(watched[0])
            if fd >= 0:
                selector.register(fd, _READ)
            watched[0] = fd
        readable = False
        for key, _ in selector.select(_running_deadline(self.artim_timer)):
            if key.fd == channel.fileno():
                channel.drain()
                self._wake_pending = False
            else:
                readable = True
        return readable

    def _abort_after_error(self, exc: Exception) -> None:
        # What pynetdicom's reactor does when reading or sending fails: an
        # A-ABORT that bypasses the state machine, then both reactors stop.
        _DUL_LOG.error("Exception in DUL.run(), aborting association")
        _DUL_LOG.exception(exc)
        pdu = A_ABORT_RQ()
        pdu.source = ABORT_SOURCE_PROVIDER
        pdu.reason_diagnostic = ABORT_REASON_NOT_SPECIFIED
        if self.socket is not None:
            self.socket.send(pdu.encode())
        assoc = self.assoc
        assoc.is_aborted = True
        assoc.is_established = False
        assoc._kill = True
        self._kill_thread = True

    # -- the service user's side ------------------------------------------------

    def receive_pdu(self, wait: bool = False, timeout: float | None = None) -> Any:
        """pynetdicom's ``receive_pdu``, except that a wait ends when the reactor does.

        Once the reactor has stopped nothing more can arrive, so a peer that
        drops the connection before its A-ASSOCIATE-RQ frees the association
        thread at once instead of after the ACSE timeout.
        """
        if not wait:
            return super().receive_pdu(wait=False)
        signal = self._user_signal
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            seen = signal.generation
            # Read before looking at the queue: all the reactor queued is then in it.
            finished = self.reactor_done
            primitive = super().receive_pdu(wait=False)
            if primitive is not None or finished:
                return primitive
            remaining = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
            signal.wait(seen, remaining)


def _value_offset(encoded: bytes, element: int) -> int | None:
    """Where the two-byte (US) value of command ``element`` starts in an Implicit VR LE command set.

    The Message ID of a C-ECHO-RQ and the Message ID Being Responded To of a
    C-ECHO-RSP are the one field that changes from one message to the next.
    """
    position = 0
    while position + ELEMENT_HEADER.size <= len(encoded):
        group, number, length = ELEMENT_HEADER.unpack_from(encoded, position)
        position += ELEMENT_HEADER.size
        if (group, number) == (COMMAND_GROUP, element):
            return position if length == 2 and position + 2 <= len(encoded) else None
        position += length
    return None


def echo_request_primitive(message_id: int, sop_class: Any, context_id: int) -> C_ECHO:
    """The C-ECHO primitive ``DIMSEMessage.message_to_primitive`` makes of a C-ECHO-RQ like this."""
    echo = C_ECHO()
    echo.MessageID = message_id
    echo.AffectedSOPClassUID = sop_class
    echo._context_id = context_id
    echo._dataset_path = None
    echo._dataset_file = None
    return echo


class EchoTemplates:
    """C-ECHO command sets that pynetdicom has decoded or encoded once, reused.

    Decoding and encoding a command set through pydicom is most of the CPU a
    C-ECHO costs, yet one peer's requests, and our answers, differ only in a
    message ID. A request whose bytes equal, but for the Message ID, one that
    pynetdicom decoded to a C-ECHO-RQ before gets the same primitive; a
    response is pynetdicom's encoding of an earlier one with the Message ID
    Being Responded To patched in. Anything else takes pynetdicom's path.
    """

    _LIMIT = 64

    def __init__(self) -> None:
        self._templates: dict[tuple[str, int, str | None], tuple[bytes, int] | None] = {}
        # Request bytes with the Message ID zeroed -> its Affected SOP Class
        # UID, or None for bytes that are not a plain C-ECHO-RQ.
        self._requests: dict[bytes, Any] = {}

    def request(self, primitive: P_DATA) -> tuple[int, bytes, int, Any] | None:
        """(context ID, command set, message ID, SOP class UID) of a known C-ECHO-RQ, else None.

        An unknown one that is a plain C-ECHO-RQ is decoded by pynetdicom's
        own decoder and learnt; the caller still hands it to pynetdicom.
        """
        pdvs = primitive.presentation_data_value_list
        if len(pdvs) != 1:
            return None
        context_id, data = pdvs[0]
        if not data or data[0] != _LAST_COMMAND_FRAGMENT:
            return None
        encoded = bytes(data[1:])
        offset = _value_offset(encoded, MESSAGE_ID)
        if offset is None:
            return None
        masked = encoded[:offset] + b"\0\0" + encoded[offset + 2 :]
        try:
            sop_class = self._requests[masked]
        except KeyError:
            self._learn(encoded, masked)
            return None
        if sop_class is None:
            return None
        return context_id, encoded, int.from_bytes(encoded[offset : offset + 2], "little"), sop_class

    def _learn(self, encoded: bytes, masked: bytes) -> None:
        if len(self._requests) >= self._LIMIT:
            self._requests.clear()
        self._requests[masked] = None
        try:
            command_set = decode(BytesIO(encoded), True, True)
            keywords = {element.keyword for element in command_set}
            if (
                keywords != _ECHO_RQ_KEYWORDS
                or command_set.CommandField != C_ECHO_RQ_FIELD
                or command_set.CommandDataSetType != NO_DATA_SET
                or command_set.CommandGroupLength != len(encoded) - 12  # after its own 12 bytes
            ):
                return
            # The setter pynetdicom's decoder uses: only a UID it accepts is learnt.
            C_ECHO().AffectedSOPClassUID = command_set.AffectedSOPClassUID
        except Exception:
            return
        self._requests[masked] = command_set.AffectedSOPClassUID

    def encode(self, primitive: C_ECHO) -> bytes | None:
        """The encoded command set for ``primitive``, or None to let pynetdicom encode it."""
        status, message_id = primitive.Status, primitive.MessageIDBeingRespondedTo
        if not isinstance(status, int) or not isinstance(message_id, int):
            return None
        key = (str(primitive.AffectedSOPClassUID or ""), status, primitive.ErrorComment)
        try:
            entry = self._templates[key]
        except KeyError:
            entry = self._make(primitive)
            if len(self._templates) >= self._LIMIT:
                self._templates.clear()
            self._templates[key] = entry
        if entry is None:
            return None
        template, offset = entry
        return template[:offset] + message_id.to_bytes(2, "little") + template[offset + 2 :]

    @staticmethod
    def _make(primitive: C_ECHO) -> tuple[bytes, int] | None:
        message = C_ECHO_RSP()
        message.primitive_to_message(primitive)
        encoded = cast(bytes, encode(message.command_set, True, True))
        offset = _value_offset(encoded, MESSAGE_ID_BEING_RESPONDED_TO)
        return None if offset is None else (encoded, offset)


class _LazyCommandSet:
    """A DIMSE message whose encoded command set is decoded only when asked for.

    Not DIMSEMessage.__init__: building and filling its Dataset is the cost
    these classes exist to avoid.
    """

    def __init__(self, encoded: bytes, context_id: int, *, received: bool) -> None:
        self.context_id: int | None = context_id
        self.encoded_command_set = BytesIO(encoded if received else b"")
        self.data_set: BytesIO | None = BytesIO()
        self._data_set_path = None
        self._data_set_file = None
        self._encoded = encoded
        self._decoded: Dataset | None = None

    @property
    def command_set(self) -> Dataset:
        if self._decoded is None:
            self._decoded = decode(BytesIO(self._encoded), True, True)
        return self._decoded

    @command_set.setter
    def command_set(self, value: Dataset) -> None:
        self._decoded = value


class TemplateEchoRequest(_LazyCommandSet, C_ECHO_RQ):  # type: ignore[misc]
    """A received C-ECHO-RQ message whose command set is decoded only when asked for."""

    def __init__(self, encoded: bytes, context_id: int) -> None:
        super().__init__(encoded, context_id, received=True)


class TemplateEchoResponse(_LazyCommandSet, C_ECHO_RSP):  # type: ignore[misc]
    """A C-ECHO-RSP message whose command set was encoded from a template.

    ``command_set`` is decoded only if someone (an EVT_DIMSE_SENT handler)
    asks for it; the message is then encoded from it as pynetdicom would.
    """

    def __init__(self, encoded: bytes, context_id: int) -> None:
        super().__init__(encoded, context_id, received=False)

    def encode_msg(self, context_id: int, max_pdu_length: int) -> Iterator[P_DATA]:
        encoded = self._encoded
        if self._decoded is not None or (max_pdu_length and len(encoded) > max_pdu_length - 6):
            yield from super().encode_msg(context_id, max_pdu_length)
            return
        self.context_id = context_id
        pdata = P_DATA()
        # One PDV: the whole command set, last fragment.
        pdata.presentation_data_value_list.append((context_id, bytes((_LAST_COMMAND_FRAGMENT,)) + encoded))
        yield pdata


class EventDIMSEServiceProvider(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with a signalling message queue and templated C-ECHO-RSPs."""

    _templates: EchoTemplates | None

    def __init__(self, assoc: EventAssociation, templates: EchoTemplates | None) -> None:
        super().__init__(assoc)
        self._add_event_state(assoc, templates)

    @classmethod
    def adopt(
        cls, dimse: DIMSEServiceProvider, assoc: EventAssociation, templates: EchoTemplates | None
    ) -> EventDIMSEServiceProvider:
        """Turn the provider that ``Association.__init__`` built into this class, in place."""
        dimse.__class__ = cls
        adopted = cast(EventDIMSEServiceProvider, dimse)
        adopted._add_event_state(assoc, templates)
        return adopted

    def _add_event_state(self, assoc: EventAssociation, templates: EchoTemplates | None) -> None:
        self.msg_queue = _WakingQueue.adopt(self.msg_queue, assoc.signal.notify)
        self._templates = templates

    def receive_primitive(self, primitive: P_DATA) -> None:
        pdvs = primitive.presentation_data_value_list
        if len(pdvs) <= 1:
            self._receive_one(primitive)
            return
        # PS3.8 9.3.5: a P-DATA-TF may carry several PDVs, ending one message
        # and starting (or completing) the next. pynetdicom's decoder stops at
        # the first complete message and drops the rest; handing it one PDV at
        # a time keeps every message, fragments across P-DATAs included.
        for context_id, data in pdvs:
            single = P_DATA()
            # Its setter checks for [ID, bytes] lists, though it is typed as tuples.
            single.presentation_data_value_list = [[context_id, bytes(data)]]  # type: ignore[list-item]
            self._receive_one(single)

    def _receive_one(self, primitive: P_DATA) -> None:
        request = None
        if self.message is None and self._templates is not None:
            request = self._templates.request(primitive)
        if request is None:
            try:
                super().receive_primitive(primitive)
            except Exception as exc:
                # pynetdicom answers a DIMSE message it cannot turn into a
                # primitive with Evt19 (invalid PDU: A-ABORT); a command set
                # it cannot even decode raises instead. Answer both alike.
                _DIMSE_LOG.error("Received an invalid DIMSE message")
                _DIMSE_LOG.exception(exc)
                self.message = None
                self.dul.event_queue.put("Evt19")
            return
        context_id, encoded, message_id, sop_class = request
        message = TemplateEchoRequest(encoded, context_id)
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": message})
        self.msg_queue.put((context_id, echo_request_primitive(message_id, sop_class, context_id)))

    def send_msg(self, primitive: Any, context_id: int) -> None:
        encoded = None
        if (
            self._templates is not None
            and type(primitive) is C_ECHO
            and primitive.MessageIDBeingRespondedTo is not None
        ):
            encoded = self._templates.encode(primitive)
        if encoded is None:
            super().send_msg(primitive, context_id)
            return
        message = TemplateEchoResponse(encoded, context_id)
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
        for pdata in message.encode_msg(context_id, self.maximum_pdu_size):
            self.dul.send_pdu(pdata)


class EventAssociation(Association):
    """An Association whose acceptor reactor waits on a condition instead of polling."""

    dul: EventDULServiceProvider

    def __init__(
        self,
        ae: ApplicationEntity,
        mode: str,
        *,
        handlers: dict[Any, Any] | None = None,
        echo_templates: EchoTemplates | None = None,
    ) -> None:
        self.signal = _Signal()
        #: The AcceptorProfile this association was built from (a listener's runtime snapshot).
        self.profile: Any = None
        self._handler_copy = handlers
        self._conn_open_address: Any = None
        super().__init__(ae, mode)
        self.dul = EventDULServiceProvider.adopt(self.dul, self)
        self.dimse = EventDIMSEServiceProvider.adopt(self.dimse, self, echo_templates)

    def _bind_defaults(self) -> None:
        if self._handler_copy is None:
            super()._bind_defaults()
            return
        # The server's table already holds the default handlers and ours.
        self._handlers = self._handler_copy
        self._handler_copy = None

    def defer_conn_open(self, address: Any) -> None:
        """Trigger EVT_CONN_OPEN for ``address`` on this association's thread when it starts."""
        self._conn_open_address = address

    def run_reactor(self) -> None:
        address, self._conn_open_address = self._conn_open_address, None
        if address is not None:
            evt.trigger(self, evt.EVT_CONN_OPEN, {"address": address})
        super().run_reactor()

    def kill(self) -> None:
        """Kill the association thread; wait for the DUL to stop, without polling."""
        self._reactor_checkpoint.set()
        self._kill = True
        self.is_established = False
        self._is_paused = True
        self.signal.notify()
        self._await_dul()

    def _await_dul(self) -> None:
        dul = self.dul
        if threading.current_thread() is dul:
            dul.kill_dul()
            return
        while dul.is_alive() and not dul.stop_dul():
            if dul.reactor_done:
                dul.join()
                return
            # Bounded so that a missed edge costs a second, not a hang.
            dul.idle_or_done.wait(1.0)

    def _idle_wait(self) -> float | None:
        if self.network_timeout is None:
            return None
        return max(0.0, self.dul._idle_timer.remaining)

    def _run_reactor(self) -> None:
        """The acceptor loop of pynetdicom's ``_run_reactor``, woken by events."""
        signal = self.signal
        dul = self.dul
        self._is_paused = False
        while not self._kill:
            seen = signal.generation
            # Association.release() and the send_*() methods pause the
            # reactor by clearing the checkpoint and waiting for _is_paused.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                _ASSOC_LOG.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                _ASSOC_LOG.info(
                    "Association Aborted" + (" (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else "")
                )
                # Takes the primitive off the queue so that EVT_ACSE_RECV fires.
                dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if dul.reactor_done or not dul.is_alive():
                self.kill()
                return

            if dul.idle_timer_expired():
                _ASSOC_LOG.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return

            if msg is None and not self._kill:
                self._is_paused = True
                signal.wait(seen, self._idle_wait())
        # Killed from another thread (abort() at shutdown, say): the A-ABORT
        # is queued for the DUL; let it go out before run_reactor closes the socket.
        self._await_dul()


def handler_table(server: ThreadedAssociationServer, *, pdu_logging: bool = True) -> dict[Any, Any]:
    """A copy of a server's bound event handlers, in the layout ``Association.bind`` gives.

    Without ``pdu_logging`` pynetdicom's standard PDU and DIMSE debug handlers
    are left out: they format every PDU even when the log level drops the
    result. pynetdicom binds them when ``_config.LOG_HANDLER_LEVEL`` is
    "standard" (its default), which is process-wide and not ours to change.
    """
    table: dict[Any, Any] = {}
    for event in server.get_events():
        bound = server.get_handlers(event)
        if isinstance(bound, list):
            table[event] = [h for h in bound if pdu_logging or h[0] not in STANDARD_LOG_HANDLERS]
        else:
            table[event] = bound
    return table


class EventRequestHandler(RequestHandler):
    """Builds an :class:`EventAssociation` for each accepted connection."""

    server: EventAssociationServer

    def handle(self) -> None:
        assoc = self.make_association()
        assoc.defer_conn_open(self.client_address)
        assoc.start()

    def make_association(self) -> EventAssociation:
        server = self.server
        ae = server.ae
        profile = server.accepting_profile
        # pynetdicom's PDU debug handlers look formatters up by the exact
        # message class: with them bound, the templates' subclasses stay out.
        assoc = EventAssociation(
            ae,
            "acceptor",
            handlers=handler_table(server, pdu_logging=profile.pdu_logging),
            echo_templates=None if profile.pdu_logging else server.echo_templates,
        )
        assoc.profile = profile
        assoc._server = server
        # "AcceptorThread" is what AssociationServer.active_associations looks for.
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(PollingAssociationSocket(assoc, client_socket=self.request))

        # The profile's timeouts, set through Association's setters (they
        # reach the DUL's timers) instead of the AE-wide values.
        assoc.acse_timeout = profile.acse_timeout
        assoc.dimse_timeout = profile.dimse_timeout
        assoc.network_timeout = profile.network_timeout
        acceptor = assoc.acceptor
        acceptor.maximum_length = profile.maximum_pdu_size
        acceptor.ae_title = profile.ae_title
        acceptor.address_info = server.local_info
        acceptor.implementation_class_uid = ae.implementation_class_uid
        acceptor.implementation_version_name = ae.implementation_version_name
        # Shared, not deep-copied: negotiation reads the supported contexts and
        # builds new PresentationContext objects for its answer.
        acceptor.supported_contexts = list(profile.contexts)
        assoc.requestor.address_info = AddressInformation.from_tuple(self.client_address)
        return assoc


class EventAssociationServer(ThreadedAssociationServer):
    """An association server that accepts in an event-driven loop on its own thread.

    Connections are handled on the accepting thread (building an association
    and starting its thread is quick; EVT_CONN_OPEN and any TLS handshake run
    on the association's thread), so there is no thread per request.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        ae: ApplicationEntity,
        address: tuple[str, int] | tuple[str, int, int, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        request_handler: Callable[..., Any] | None = None,
        *,
        profile: Callable[[], AcceptorProfile],
        request_queue_size: int = 128,
        on_refused: Callable[[Rejection, list[Any]], None] | None = None,
    ) -> None:
        #: Told about the A-ASSOCIATE-RJs sent here, outside any association
        #: (the rejection, the peers' addresses), so that they are counted like the others.
        self.on_refused = on_refused
        # server_activate() (in the base constructor) listens with this backlog.
        self.request_queue_size = request_queue_size
        self._channel: _WakeChannel | None = _WakeChannel()
        self._stop_serving = False
        self._serving = threading.Event()
        self._served = threading.Event()
        # The liveness heartbeat: ping() wakes the loop, which stamps last_pong.
        self.last_ping = self.last_pong = time.monotonic()
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            ssl_context,
            evt_handlers=evt_handlers,
            request_handler=request_handler or EventRequestHandler,
        )
        self._profile = profile
        self.accepting_profile = profile()
        self.echo_templates = EchoTemplates()
        self.local_info = AddressInformation.from_tuple(self.server_address)
        # pynetdicom gives the listening socket the network timeout; a
        # connection gone between poll() and accept() would then hold the
        # accept loop (and shutdown) for that long.
        if self.socket is not None:
            self.socket.setblocking(False)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection and take the profile it will be served with.

        The profile is read once per connection: TLS wrapping and, on this same
        thread right after, the association's negotiation use the same one.
        """
        profile = self._profile()
        assert self.socket is not None
        client_socket, address = self.socket.accept()
        if profile.ssl_context is not None:
            client_socket = profile.ssl_context.wrap_socket(client_socket, server_side=True)
        self.accepting_profile = profile
        return client_socket, address

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept connections until ``shutdown()``; ``poll_interval`` is unused (no polling)."""
        self._serving.set()
        channel = self._channel
        try:
            if self._stop_serving or channel is None or self.socket is None:
                return
            with selectors.PollSelector() as selector:
                selector.register(self.socket.fileno(), _READ)
                selector.register(channel.fileno(), _READ)
                while not self._stop_serving:
                    for key, _ in selector.select():
                        if key.fd == channel.fileno():
                            channel.drain()
                        elif not self._stop_serving:
                            self._handle_request_noblock()  # type: ignore[attr-defined]
                    self.last_pong = time.monotonic()
        finally:
            self._served.set()

    def ping(self) -> None:
        """Ask the accept loop to show it is making progress (it sets ``last_pong``)."""
        channel = self._channel
        if channel is not None and self.last_pong >= self.last_ping:
            self.last_ping = time.monotonic()
            channel.set()

    def stalled_for(self) -> float:
        """Seconds since an unanswered ping was sent (0 while the loop answers)."""
        if self.last_pong >= self.last_ping:
            return 0.0
        return time.monotonic() - self.last_ping

    def process_request(self, request: Any, client_address: Any) -> None:
        # On the accepting thread; socketserver's _handle_request_noblock
        # reports an exception through handle_error and closes the request.
        self.finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """An association could not be started (no thread left, say): reject, never just hang up."""
        LOGGER.exception("could not start an association for %s", client_address)
        if isinstance(request, socket.socket) and not isinstance(request, ssl.SSLSocket):
            # Told first: the self-check forgets its source address once answered.
            self._refused(REJECT_LOCAL_LIMIT, [client_address])
            with contextlib.suppress(OSError):
                request.send(_REJECT_LOCAL_LIMIT, socket.MSG_DONTWAIT)

    def _refused(self, rejection: Rejection, addresses: list[Any]) -> None:
        if addresses and self.on_refused is not None:
            with contextlib.suppress(Exception):  # bookkeeping must not stop a shutdown
                self.on_refused(rejection, addresses)

    def service_actions(self) -> None:
        """Nothing: the cyclic garbage collector runs on its own schedule."""

    def shutdown(self) -> None:
        """Stop accepting, close the listening socket and leave the AE's server list.

        Established associations carry on; ``ae.shutdown()`` aborts them before
        it calls this.
        """
        self._stop_serving = True
        channel = self._channel
        if channel is not None:
            channel.set()
        if self._serving.is_set():
            self._served.wait()
        self._refuse_backlog()
        self.server_close()
        with contextlib.suppress(ValueError):
            self.ae._servers.remove(self)

    def _refuse_backlog(self) -> None:
        """Answer connections the kernel already queued with A-ASSOCIATE-RJ 2/3/1.

        Closing a listening socket resets whatever waits in its backlog, which
        a peer sees as a dropped connection after a successful connect; a
        rejection says "temporary congestion, try again". TLS listeners would
        need a handshake per connection first, so their backlog is reset.
        """
        sock = self.socket
        if sock is None or sock.fileno() == -1 or self._profile().ssl_context is not None:
            return
        queued: list[socket.socket] = []
        addresses: list[Any] = []
        with contextlib.suppress(OSError):
            for _ in range(self.request_queue_size + 64):
                conn, address = sock.accept()
                queued.append(conn)
                addresses.append(address)
        if not queued:
            return
        # Told first: the self-check forgets its source address once answered.
        self._refused(REJECT_CONGESTION, addresses)
        for conn in queued:
            with contextlib.suppress(OSError):
                conn.setblocking(False)
                conn.send(_REJECT_CONGESTION)
                conn.shutdown(socket.SHUT_WR)
        # Read (and drop) what they sent so that closing sends FIN, not a reset
        # that could destroy the rejection before the peer reads it.
        deadline = time.monotonic() + _REFUSE_LINGER
        open_ = list(queued)
        while open_ and time.monotonic() < deadline:
            with selectors.PollSelector() as selector:
                for conn in open_:
                    with contextlib.suppress(OSError, ValueError):
                        selector.register(conn, _READ)
                events = selector.select(max(0.0, deadline - time.monotonic()))
            ready = [cast(socket.socket, key.fileobj) for key, _ in events]
            for peer in ready:
                try:
                    if not peer.recv(65536):
                        open_.remove(peer)
                except BlockingIOError:
                    pass
                except OSError:
                    open_.remove(peer)
        for conn in queued:
            conn.close()

    def server_close(self) -> None:
        if self.socket is not None and self.socket.fileno() != -1:
            super().server_close()
        # The loop may still be running when the base constructor fails to bind.
        if self._served.is_set() or not self._serving.is_set():
            channel, self._channel = self._channel, None
            if channel is not None:
                channel.close()
