"""An event-driven association engine for ``AE.make_server``: one reactor thread per listener.

pynetdicom's acceptor runs two threads per association: a DUL thread that
sleeps 1 ms whenever it is idle and an association thread that sleeps 1 ms
on every loop, and they hand every PDU to each other through queues. Starting
the two threads, the hand-offs and the polls cost more than pynetdicom's own
PDU codec and negotiation; every idle association costs CPU; and
``AssociationSocket.ready`` uses ``select()``, which fails for descriptors
above 1024. Here every association of a listener runs on the listener's one
thread, the one that accepts, which blocks in ``epoll`` (``poll`` where there
is none) on the listening socket, a wake-up channel and every connection:

* :class:`EventAssociationServer` accepts, builds each association through
  its request handler (pynetdicom's :class:`RequestHandler` API), registers
  the connection and drives it; timers (ARTIM, the network idle timer, TLS
  handshake and send deadlines) sit in one heap and bound the wait. Other
  threads (an abort at shutdown, ``ping()``) only queue work and wake it.
  Stopping accepting leaves established associations running on the thread
  until they end; the thread then ends too.
* :class:`EventDULServiceProvider` is pynetdicom's DUL without its thread:
  :meth:`~EventDULServiceProvider.step` is one turn of pynetdicom's loop
  (ARTIM check, ``_process_recv_primitive`` or ``_is_transport_event``, then
  one ``state_machine.do_action``), taken only when it cannot block: a PDU is
  read only once all of it has arrived. The state machine, PDU decoding and
  every ``EVT_*`` trigger are pynetdicom's own. The loop also survives what
  ends pynetdicom's with the connection left open: a local primitive arriving
  after the peer aborted (dropped), an exception in a state machine action
  (A-ABORT, as for a failed read).
* :class:`EventAssociationSocket` reads whatever has arrived without
  blocking (one ``recv`` per burst, not two per PDU), writes without blocking
  (what the kernel does not take waits for the socket to be writable), does
  the TLS handshake without blocking and with a deadline, and closes only once
  what was queued has been sent.
* :class:`EventAssociation` is pynetdicom's ``Association`` (a Thread that is
  never started): its acceptor sequence, that of ``run_reactor`` and
  ``_run_reactor`` (A-ASSOCIATE-RQ, EVT_REQUESTED, ``negotiate_association``,
  then ``_serve_request``, ``is_release_requested`` and ``send_release``,
  EVT_RELEASED and EVT_ABORTED, the network timeout), runs a step at a time
  after the DUL's. ``is_alive()``, ``ident`` and ``join()`` describe its life
  on the reactor, so code that waits for an association thread keeps working.
  It, its DUL and its DIMSE provider are built with the attributes
  pynetdicom's constructors give them (seam.py compares the two), their
  queues served without locks (see :class:`_ReactorQueue`); an abort on the
  reactor's thread never blocks.
* :class:`EventDIMSEServiceProvider` answers C-ECHO from :class:`EchoTemplates`:
  a request byte-identical but for its message ID to one pynetdicom decoded
  before, and a response like one pynetdicom encoded before, skip pydicom.
* :class:`EventRequestHandler` builds the association without the per
  association ``deepcopy`` of the presentation contexts (negotiation only
  reads them), without a ``getaddrinfo`` for the local address (nor, after
  the first time, for a peer's host), and with a copy of the server's event
  handler table instead of binding them one by one. EVT_CONN_OPEN fires as
  the reactor takes the connection, before its DUL's first turn.

Two process-wide helpers: :func:`memoize_validators` (pynetdicom's documented
validator hook, answers unchanged) runs when a server is built, and
:func:`skip_pydicom_reading_validation` is the daemon's (not an embedder's)
choice.

Each pynetdicom name these classes rely on is a check in ``seam.py``, with
the reason; a listener runs pynetdicom's stock engine instead when one of
them fails on the installed pynetdicom.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import heapq
import itertools
import logging
import os
import queue
import select
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from io import BytesIO
from typing import Any, Protocol, cast

from pydicom.dataset import Dataset
from pynetdicom import _config as _pynetdicom_config
from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.acse import ACSE
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association, ServiceUser
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_ECHO_RQ, C_ECHO_RSP
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.dsutils import decode, encode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import TRANSITION_TABLE, StateMachine
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
    PDU_HEADER,
    PDU_NAMES,
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
_KNOWN_PDU_TYPES = frozenset(PDU_NAMES)
# Poll flags; epoll's and poll()'s have the same values on Linux.
_IN = select.POLLIN
_OUT = select.POLLOUT
_HUP_ERR = select.POLLHUP | select.POLLERR
# Connections accepted per wake-up before the others get their turn.
_ACCEPTS_PER_TURN = 64
# Steps of one association per turn before the others get theirs (a peer
# pipelining thousands of C-ECHOs is served in slices).
_STEPS_PER_TURN = 64
# What a peer that does not read may leave queued before it is not read either.
_OUT_LIMIT = 1 << 20
# What a peer may have sent that is not yet handled before it is not read on:
# a flood of pipelined requests is taken in slices, and others get their turns.
_IN_LIMIT = 256 * 1024
# How long a closing connection may take to send what is queued for it.
_LINGER = 5.0
# Timers fire this much late rather than early: pynetdicom's Timer.expired
# reads its own clock, and a wake-up a microsecond early would spin.
_TIMER_SLACK = 0.001
# After running out of descriptors, how long accepting pauses.
_ACCEPT_BACKOFF = 0.1


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
    @property
    def handshake_timeout(self) -> float: ...


#: Called on the reactor when a TLS handshake fails: (association, exception or None for a timeout).
TlsFailureHook = Callable[[Association, BaseException | None], None]

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
    """Wakes threads waiting for "something changed"; free when nobody waits.

    A waiter reads ``generation``, checks its conditions, then calls
    ``wait(seen, timeout)``, which returns at once if anything was signalled
    since it read ``generation``: no wake-up is lost between check and wait.
    """

    __slots__ = ("_cond", "generation", "waiting")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.generation = 0
        self.waiting = 0

    def notify(self) -> None:
        # Unlocked fast path: a waiter counts itself before it looks at what
        # it waits for, so one that is not counted yet will see the change.
        self.generation += 1
        if self.waiting:
            with self._cond:
                self._cond.notify_all()

    def wait(self, seen: int, timeout: float | None) -> None:
        with self._cond:
            self.waiting += 1
            try:
                if self.generation == seen:
                    self._cond.wait(timeout)
            finally:
                self.waiting -= 1


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
        with contextlib.suppress(BlockingIOError, OSError):
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


class _Poller:
    """``epoll`` where there is one (waits cost nothing per idle connection), else ``poll``."""

    def __init__(self) -> None:
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._poll = select.poll() if self._epoll is None else None

    def register(self, fd: int, mask: int) -> None:
        if self._epoll is not None:
            self._epoll.register(fd, mask)
        else:  # pragma: no cover - not Linux
            cast(Any, self._poll).register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        if self._epoll is not None:
            self._epoll.modify(fd, mask)
        else:  # pragma: no cover - not Linux
            cast(Any, self._poll).modify(fd, mask)

    def unregister(self, fd: int) -> None:
        with contextlib.suppress(OSError, KeyError, ValueError):
            if self._epoll is not None:
                self._epoll.unregister(fd)
            else:  # pragma: no cover - not Linux
                cast(Any, self._poll).unregister(fd)

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
        if self._epoll is not None:
            return self._epoll.poll(-1 if timeout is None else timeout)
        # pragma: no cover - not Linux
        milliseconds = None if timeout is None else timeout * 1000
        waited: list[tuple[int, int]] = cast(Any, self._poll).poll(milliseconds)
        return waited

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()


class _ReactorQueue(queue.Queue[Any]):
    """One of pynetdicom's queues, served without locks by the reactor that owns it.

    Everything pynetdicom puts in and takes out of an association's queues
    happens on the reactor's thread, except a primitive another thread sends
    (an abort at shutdown): ``deque.append`` and ``popleft`` are atomic, and
    such a put calls ``wake``. A blocking ``get`` (another thread waiting for
    a primitive) waits on the association's signal, which the reactor notifies
    after every turn. The queue's locks and conditions are left unused.
    """

    _wake: Callable[[], None] | None
    _signal: _Signal | None

    @classmethod
    def adopt(
        cls, plain: queue.Queue[Any], wake: Callable[[], None] | None, signal: _Signal | None = None
    ) -> _ReactorQueue:
        """Serve one of pynetdicom's queues this way, in place (its deque is kept)."""
        plain.__class__ = cls
        adopted = cast(_ReactorQueue, plain)
        adopted._wake = wake
        adopted._signal = signal
        return adopted

    @classmethod
    def create(cls, wake: Callable[[], None] | None, signal: _Signal | None = None) -> _ReactorQueue:
        """A new, empty queue of this kind, without queue.Queue's lock and three conditions."""
        made = cls.__new__(cls)
        made.queue = deque()
        made.maxsize = 0
        made.unfinished_tasks = 0
        made._wake = wake
        made._signal = signal
        return made

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self.queue.append(item)
        if self._wake is not None:
            self._wake()

    def put_nowait(self, item: Any) -> None:
        self.put(item)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        try:
            return self.queue.popleft()
        except IndexError:
            if not block or self._signal is None:
                raise queue.Empty from None
        signal = self._signal
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            seen = signal.generation
            try:
                return self.queue.popleft()
            except IndexError:
                pass
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise queue.Empty
            signal.wait(seen, remaining)

    def get_nowait(self) -> Any:
        try:
            return self.queue.popleft()
        except IndexError:
            raise queue.Empty from None

    def empty(self) -> bool:
        return not self.queue

    def qsize(self) -> int:
        return len(self.queue)

    def full(self) -> bool:
        return False

    def task_done(self) -> None:
        """Nothing to count: pynetdicom never joins these queues."""

    def join(self) -> None:
        """Nothing to wait for (see task_done)."""


class MemoizedValidator:
    """One of pynetdicom's ``_config.VALIDATORS``, remembering its answers for recent values.

    pynetdicom validates every AE title and UID it decodes or sets, several
    times per association (``set_uid`` builds a pydicom ``UID``, which runs
    pydicom's regex, and then calls the "UI" validator, which builds another
    and runs it again); a peer sends the same few values every time. The
    validators are pure functions of the value (and, for UIDs, of
    ``_config.ENFORCE_UID_CONFORMANCE``, part of the key), so remembering
    their answers changes no result. The memory is bounded: a peer inventing
    values only costs itself misses.
    """

    _LIMIT = 1024

    def __init__(self, validate: Callable[[Any], tuple[bool, str]], *, uid: bool) -> None:
        self.validate = validate
        self._uid = uid
        self._answers: dict[tuple[str, bool], tuple[bool, str]] = {}

    def __call__(self, value: Any) -> tuple[bool, str]:
        if not isinstance(value, str):
            return self.validate(value)
        from pynetdicom import _config

        key = (str(value), bool(self._uid and _config.ENFORCE_UID_CONFORMANCE))
        answers = self._answers
        answer = answers.get(key)
        if answer is None:
            answer = self.validate(value)
            if len(answers) >= self._LIMIT:
                answers.clear()
            answers[key] = answer
        return answer


def memoize_validators() -> None:
    """Wrap pynetdicom's AE title and UID validators in :class:`MemoizedValidator` (once, process-wide).

    ``_config.VALIDATORS`` is pynetdicom's documented hook for replacing
    them; the wrapper keeps whichever validator is installed and its answers,
    so nothing else in the process sees a difference but the time it takes.
    """
    from pynetdicom import _config

    for key in ("AE", "UI"):
        current = _config.VALIDATORS.get(key)
        if current is not None and not isinstance(current, MemoizedValidator):
            _config.VALIDATORS[key] = MemoizedValidator(current, uid=key == "UI")


def skip_pydicom_reading_validation() -> None:
    """Stop pydicom validating the values it builds (a daemon's choice: process-wide).

    Building a ``pydicom.uid.UID`` runs pydicom's check of the value against
    its VR (a regex) and, in its default mode, only warns about an invalid
    one. pynetdicom builds a UID for every UID it decodes or sets (about
    twenty per association) and validates each itself, with its own
    validators, which reject an invalid value or log it as non-conformant: so
    pydicom's pass changes no outcome and only costs time. The daemon reads
    no DICOM files; an embedding application (``testing.EchoServer``) keeps
    its own pydicom settings.
    """
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE


def _running_deadline(timer: Timer) -> float | None:
    """Seconds until a started, unstopped timer expires (>= 0), else None."""
    if timer.timeout is None or timer._start_time is None or timer._end_time is not None:
        return None
    return max(0.0, timer.remaining)


class EventAssociationSocket(AssociationSocket):
    """An AssociationSocket that never blocks: the reactor reads, writes and closes it when it can.

    ``fill()`` reads what has arrived (up to 64 KiB a ``recv``); ``ready`` says
    whether a whole PDU is buffered (or the peer has gone), so pynetdicom's
    ``_read_pdu_data`` never waits; ``send`` writes what the kernel takes and
    queues the rest for when the socket is writable; a close waits until what
    is queued has gone (at most ``_LINGER`` seconds). Only the reactor's
    thread closes the descriptor: another thread's ``_shutdown_socket`` only
    shuts the connection down, which the reactor sees as end of file.
    """

    _READ_SIZE = 65536
    # recv() calls per turn: a flood is read in slices so other peers get theirs.
    _READS_PER_TURN = 16

    def __init__(self, assoc: Association, client_socket: socket.socket | None = None) -> None:
        self._buffer = bytearray()
        self._out = bytearray()
        #: The peer closed its side, reset the connection or the read failed.
        self.eof = False
        #: The descriptor is closed (or was never there).
        self.closed = client_socket is None
        #: A close is waiting for queued bytes to go out, until this monotonic time.
        self.linger_until: float | None = None
        #: The TLS handshake wants the socket writable rather than readable.
        self.handshake_wants_write = False
        #: The descriptor the reactor polls (-1: not registered) and the mask it polls it with.
        self.fd = -1
        self.mask = 0
        # pynetdicom drops .socket on close(); this one is kept until the descriptor is closed.
        self.raw: socket.socket | None = client_socket
        self._tls = isinstance(client_socket, ssl.SSLSocket)
        super().__init__(assoc, client_socket=client_socket)

    @property
    def buffered(self) -> bool:
        """Whether received bytes wait to be read as PDUs."""
        return bool(self._buffer)

    @property
    def pending_output(self) -> int:
        return len(self._out)

    @property
    def wants_input(self) -> bool:
        """Whether to read more: not while much of what was read, or is to be sent, waits."""
        return len(self._buffer) < _IN_LIMIT and len(self._out) <= _OUT_LIMIT

    def fill(self) -> bool:
        """Read what has arrived, without blocking; True if the read budget ran out first."""
        sock = self.raw
        if sock is None or self.eof or self.closed or not self.wants_input:
            return False
        buffer = self._buffer
        size = self._READ_SIZE
        for _ in range(self._READS_PER_TURN):
            try:
                chunk = sock.recv(size)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return False
            except (OSError, ValueError):
                # A reset, a TLS error or a closed descriptor: what pynetdicom's
                # blocking read turns into Evt17 once the buffer is used up.
                self.eof = True
                return False
            if not chunk:
                self.eof = True
                return False
            buffer += chunk
            if len(chunk) < size and not (self._tls and cast(ssl.SSLSocket, sock).pending()):
                return False
        return True

    def pdu_ready(self) -> bool:
        """Whether ``_read_pdu_data`` can run without waiting for the peer."""
        buffer = self._buffer
        if len(buffer) >= PDU_HEADER.size:
            pdu_type, _, length = PDU_HEADER.unpack_from(buffer)
            # An unknown type is rejected on its header alone (Evt19), as pynetdicom does.
            if pdu_type not in _KNOWN_PDU_TYPES or len(buffer) >= PDU_HEADER.size + length:
                return True
        return self.eof

    @property
    def ready(self) -> bool:
        if self.socket is None or self._is_connected is False or self.closed:
            return False
        return self.pdu_ready()

    def recv(self, nr_bytes: int) -> bytearray:
        """Up to ``nr_bytes`` buffered bytes (fewer only once the peer has gone)."""
        buffer = self._buffer
        data = buffer[:nr_bytes]
        del buffer[:nr_bytes]
        return data

    def send(self, bytestream: bytes) -> None:
        """Send now what the kernel takes, queue the rest; Evt17 if the connection is gone."""
        sock = self.raw
        try:
            if sock is None or self.closed:
                raise ConnectionError("not connected")
            if self._out:
                self._out += bytestream
            else:
                try:
                    sent = sock.send(bytestream)
                except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    sent = 0
                if sent < len(bytestream):
                    self._out += memoryview(bytestream)[sent:]
            evt.trigger(self.assoc, evt.EVT_DATA_SENT, {"data": bytestream})
        except Exception:
            # Evt17: Transport connection closed, as pynetdicom's send() does.
            self.event_queue.put("Evt17")

    def flush(self) -> None:
        """Send what is queued, as far as the kernel takes it; close if a close was waiting for it."""
        sock = self.raw
        out = self._out
        while out and sock is not None:
            try:
                sent = sock.send(out)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            except (OSError, ValueError):
                out.clear()
                self.eof = True
                if self.linger_until is None and not self.closed:
                    self.event_queue.put("Evt17")
                break
            del out[:sent]
        if not out and self.linger_until is not None:
            self.close_now()

    def handshake(self) -> bool:
        """One step of the TLS handshake: True once it is complete; raises if it failed."""
        sock = cast(ssl.SSLSocket, self.raw)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.handshake_wants_write = False
            return False
        except ssl.SSLWantWriteError:
            self.handshake_wants_write = True
            return False
        self.handshake_wants_write = False
        return True

    def _shutdown_socket(self) -> None:
        # pynetdicom calls this from close() and from the state machine's
        # closing actions; it skips close() when shutdown() raises (the peer
        # reset the connection), leaving the descriptor to the collector.
        assoc = cast(Any, self.assoc)
        reactor = getattr(assoc, "_reactor", None)
        if reactor is not None and not reactor.on_reactor_thread():
            # Another thread (an abort at shutdown): the reactor owns the
            # descriptor, and sees this as the end of the connection.
            if self.raw is not None and not self.closed:
                with contextlib.suppress(OSError, ValueError):
                    self.raw.shutdown(socket.SHUT_RDWR)
                reactor.wake(assoc)
            return
        if self._out and not self.eof:
            if self.linger_until is None:
                self.linger_until = time.monotonic() + _LINGER
            return
        self.close_now()

    def close_now(self) -> None:
        """Unregister and close the descriptor, dropping anything still queued."""
        self._out.clear()
        self.linger_until = None
        if self.closed:
            return
        self.closed = True
        sock, self.raw = self.raw, None
        if sock is None:
            return
        reactor = getattr(self.assoc, "_reactor", None)
        if reactor is not None:
            reactor.forget_descriptor(self)
        with contextlib.suppress(OSError, ValueError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError, ValueError):
            sock.close()


class EventDULServiceProvider(DULServiceProvider):
    """pynetdicom's DUL service provider without its thread: the reactor takes its turns."""

    def __init__(self, assoc: EventAssociation) -> None:
        # DULServiceProvider.__init__'s attributes, set here rather than by
        # calling it: its four queue.Queue objects (a lock and three conditions
        # each) would be built only to be replaced by lock-free ones. seam.py
        # checks that this gives every attribute pynetdicom's does.
        self._assoc = assoc
        self.socket: AssociationSocket | None = None
        self.event_queue = _ReactorQueue.create(assoc.wake)
        self.to_provider_queue = _ReactorQueue.create(assoc.wake)
        self.to_user_queue = _ReactorQueue.create(None, assoc.signal)
        self._recv_pdu = _ReactorQueue.create(None)
        self._idle_timer = Timer(60)
        self.artim_timer = Timer(30)
        self.state_machine = StateMachine(self)
        self._run_loop_delay = 0.001
        threading.Thread.__init__(self, target=make_target(self.run_reactor))
        self.daemon = False
        self._kill_thread = False
        #: Set once the reactor has taken the association.
        self.running = False
        #: True once the DUL has finished (its connection is closed, or it gave up on it).
        self.reactor_done = False

    # -- the thread that is not there --------------------------------------------

    def start(self) -> None:
        """No thread: the association's reactor runs this DUL."""
        self.running = True

    def run(self) -> None:
        raise RuntimeError("an EventDULServiceProvider runs on its association's reactor")

    def is_alive(self) -> bool:
        return self.running and not self.reactor_done

    def join(self, timeout: float | None = None) -> None:
        cast(EventAssociation, self.assoc).wait_finished(timeout)

    def kill_dul(self) -> None:
        self._kill_thread = True
        cast(EventAssociation, self.assoc).wake()

    def stop_dul(self) -> bool:
        """Stop the DUL if the state machine is in Sta1 (as pynetdicom's does); wait for it to end."""
        if self.state_machine.current_state != "Sta1":
            return False
        self.kill_dul()
        self.join()
        return True

    # -- a turn of the loop -------------------------------------------------------

    def step(self) -> bool:
        """One turn of pynetdicom's DUL loop that cannot block; False when there was nothing to do."""
        if self._kill_thread:
            return False
        # The ARTIM timer first, so its event is queued ahead of others. Only a
        # running timer: pynetdicom's stays "expired" once stopped after its
        # deadline, and would raise Evt18 in every later state.
        artim = self.artim_timer
        if artim._end_time is None and artim.expired:
            self.event_queue.put("Evt18")
        assoc_socket = cast(EventAssociationSocket, self.socket)
        progressed = False
        events = self.event_queue.queue
        try:
            # Encode and send a primitive from the user, or read a PDU (only
            # a whole one: it is in the buffer, so reading it cannot wait).
            # The queues are looked at first: pynetdicom finds an empty one by
            # catching an exception, several times a step.
            if self.to_provider_queue.queue and self._process_recv_primitive():
                progressed = True
            elif assoc_socket is not None and (
                assoc_socket.ready
                or (self.state_machine.current_state == "Sta13" and assoc_socket.socket is not None)
            ):
                # In Sta13 pynetdicom closes the connection once nothing is
                # left to read, which it finds out by looking.
                if self._is_transport_event():
                    self._idle_timer.restart()
                progressed = True
        except Exception as exc:
            self._abort_after_error(exc)
            return True
        if not events:
            return progressed
        event = events.popleft()
        if self._is_stale(event):
            return progressed or event != "Evt18"
        try:
            self.state_machine.do_action(event)
        except Exception as exc:
            # pynetdicom lets this end the thread with the connection
            # open; treat it like a failure to read or send.
            self._abort_after_error(exc)
        return True

    def _is_stale(self, event: str) -> bool:
        """Drop a local primitive, or ARTIM expiry, that the state machine has moved past.

        The association answers an A-ASSOCIATE-RQ or an A-RELEASE-RQ after the
        DUL has read on: if the peer aborted or sent something invalid
        meanwhile, the answer reaches a state machine already in Sta13
        (closing) or Sta1, where PS3.8 defines no transition for it. pynetdicom
        raises InvalidEventError there, which ends its thread with the
        connection still open.
        """
        state = self.state_machine.current_state
        if (event, state) in TRANSITION_TABLE:
            return False
        if event in LOCAL_PRIMITIVE_EVENTS:
            # The event was raised for the primitive at the head of the queue;
            # the action that would have taken it off never runs.
            with contextlib.suppress(queue.Empty):
                self.to_provider_queue.get_nowait()
        elif event == "Evt18":
            # Nothing to time out any more: stop the timer rather than raise it again.
            self.artim_timer.stop()
        else:
            return False
        _DUL_LOG.debug("Dropped %s received in %s: the association is already ending", event, state)
        if event == "Evt15" and state == "Sta2" and self.socket is not None:
            # An abort (at shutdown, say) before the peer's A-ASSOCIATE-RQ: there
            # is no association to send an A-ABORT on, so close the connection
            # (Evt17, AA-5) instead of waiting for the ARTIM timer.
            self.socket.close()
        return True

    def _abort_after_error(self, exc: Exception) -> None:
        # What pynetdicom's reactor does when reading or sending fails: an
        # A-ABORT that bypasses the state machine, then the DUL stops.
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
        """pynetdicom's ``receive_pdu``; a wait (from another thread) also ends when the DUL does."""
        assoc = cast(EventAssociation, self.assoc)
        if not wait or assoc.on_reactor_thread():
            return super().receive_pdu(wait=False)
        signal = assoc.signal
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
    """The C-ECHO primitive ``DIMSEMessage.message_to_primitive`` makes of a C-ECHO-RQ like this.

    ``sop_class`` is a UID the setter already accepted when the template was
    learnt, so it is stored as the setter stores it (seam.py checks that the
    result equals pynetdicom's own).
    """
    echo = C_ECHO()
    echo.MessageID = message_id
    echo._affected_sop_class_uid = sop_class
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
            # The setter pynetdicom's decoder uses: only a UID it accepts is
            # learnt, in the form the setter stores.
            probe = C_ECHO()
            probe.AffectedSOPClassUID = command_set.AffectedSOPClassUID
        except Exception:
            return
        self._requests[masked] = probe.AffectedSOPClassUID

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
    """pynetdicom's DIMSE provider with a lock-free message queue and templated C-ECHO-RSPs."""

    _templates: EchoTemplates | None

    def __init__(self, assoc: EventAssociation, templates: EchoTemplates | None) -> None:
        # DIMSEServiceProvider.__init__'s attributes (seam.py compares them),
        # with a lock-free queue: filled and emptied on the reactor's thread only.
        self._assoc = assoc
        self.cancel_req: dict[int, Any] = {}
        self.message: Any = None
        self.msg_queue = _ReactorQueue.create(None)
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


# Where an acceptor association is in pynetdicom's run_reactor: waiting for the
# A-ASSOCIATE-RQ, in its _run_reactor loop, or over (its DUL may still be closing).
_WAITING = "waiting"
_ESTABLISHED = "established"
_CLOSING = "closing"


class EventAssociation(Association):
    """An acceptor Association run a step at a time by its server's reactor, never as a thread."""

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
        #: The server whose reactor runs this association, once it has started.
        self._reactor: EventAssociationServer | None = None
        self._phase = _WAITING
        self._finished = False
        self._handshake_deadline: float | None = None
        # The reactor's timer for this association: its deadline and the token of its live entry.
        self._scheduled: float | None = None
        self._timer_token = 0
        # What the reactor's timer entries hold instead of the association:
        # emptied when it finishes, so no entry keeps it (and all it points
        # to) alive, out of the cyclic collector's cheap young generation.
        self._timer_handle: list[EventAssociation | None] = [self]
        # Association.__init__'s attributes, in its order, set here rather than
        # by calling it, so that the DUL and the DIMSE provider are built as the
        # engine's own (pynetdicom's would be built first, then replaced).
        # seam.py checks that this gives every attribute pynetdicom's does.
        self._ae = ae
        self.mode = mode
        self._server = None
        self.requestor = ServiceUser(self, "requestor")
        self.acceptor = ServiceUser(self, "acceptor")
        self.is_established = False
        self.is_rejected = False
        self.is_aborted = False
        self.is_released = False
        self._sent_abort = False
        self._sent_release = False
        self._accepted_cx = {}
        self._rejected_cx = []
        self.acse = ACSE(self)
        self.dul = EventDULServiceProvider(self)
        self.dimse = EventDIMSEServiceProvider(self, echo_templates)
        self.acse_timeout = ae.acse_timeout
        self.connection_timeout = ae.connection_timeout
        self.dimse_timeout = ae.dimse_timeout
        self.network_timeout = ae.network_timeout
        self.network_timeout_response = "A-ABORT"
        self._handlers = {}
        self._bind_defaults()
        self._kill = False
        self._started_dul = False
        self._dul_ready = threading.Event()
        self._reactor_checkpoint = threading.Event()
        self._reactor_checkpoint.set()
        self._is_paused = False
        self._timer_resolution = _pynetdicom_config.WINDOWS_TIMER_RESOLUTION
        threading.Thread.__init__(self, target=make_target(self.run_reactor))
        self.daemon = True

    def _bind_defaults(self) -> None:
        if self._handler_copy is None:
            super()._bind_defaults()
            return
        # The server's table already holds the default handlers and ours.
        self._handlers = self._handler_copy
        self._handler_copy = None

    def defer_conn_open(self, address: Any) -> None:
        """Trigger EVT_CONN_OPEN for ``address`` when the reactor takes the connection."""
        self._conn_open_address = address

    # -- a thread's life, on the reactor -------------------------------------------

    def start(self) -> None:
        """Hand the association to its server's reactor (this is called on the reactor's thread)."""
        server = self._server
        if not isinstance(server, EventAssociationServer):
            raise RuntimeError("an EventAssociation runs on an EventAssociationServer's reactor")
        server.adopt(self)

    def run(self) -> None:
        raise RuntimeError("an EventAssociation runs on its server's reactor, not as a thread")

    def is_alive(self) -> bool:
        """True from the moment the reactor takes the association until it has finished."""
        return self._reactor is not None and not self._finished

    @property
    def ident(self) -> int | None:  # type: ignore[override]
        """The reactor thread's identifier once started (None before), as a Thread's would be."""
        reactor = self._reactor
        return reactor.reactor_ident if reactor is not None else None

    def join(self, timeout: float | None = None) -> None:
        self.wait_finished(timeout)

    def wait_finished(self, timeout: float | None = None) -> bool:
        """Wait (on another thread) until the reactor is done with the association; whether it is."""
        signal = self.signal
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            seen = signal.generation
            if self._finished or self._reactor is None:
                return self._finished
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            signal.wait(seen, remaining)

    def on_reactor_thread(self) -> bool:
        reactor = self._reactor
        return reactor is None or threading.get_ident() == reactor.reactor_ident

    def wake(self) -> None:
        """Have the reactor look at this association (a no-op on the reactor's own thread)."""
        reactor = self._reactor
        if reactor is not None and threading.get_ident() != reactor.reactor_ident:
            reactor.wake(self)

    def abort(self, block: bool = True) -> None:
        """pynetdicom's abort; on the reactor's thread it never blocks (the reactor sends the A-ABORT)."""
        super().abort(block=block and not self.on_reactor_thread())

    def _abort_blocking(self, block: bool = True) -> None:
        # pynetdicom's event triggers and service classes set the instance's
        # ``abort`` to this method (or to _abort_nonblocking, which calls it),
        # so overriding abort() is not enough: a blocking abort on the
        # reactor's thread would close the socket before the reactor sends
        # the A-ABORT, then sleep 0.1 s with every other association waiting.
        super()._abort_blocking(block and not self.on_reactor_thread())

    def kill(self) -> None:
        """Stop the association; from another thread, wait until its DUL has stopped, as pynetdicom does."""
        self._reactor_checkpoint.set()
        self._kill = True
        self.is_established = False
        self._is_paused = True
        reactor = self._reactor
        if reactor is None or reactor.on_reactor_thread():
            # The reactor carries on with the DUL: the answer queued before
            # this (a rejection, the A-RELEASE-RP) still goes out.
            return
        reactor.wake(self)
        # Bounded slices, so that a missed wake-up costs a second, not a hang.
        while not self.wait_finished(1.0) and not self.dul.reactor_done:
            reactor.wake(self)

    # -- what the reactor calls ----------------------------------------------------

    @property
    def _sock(self) -> EventAssociationSocket:
        return cast(EventAssociationSocket, self.dul.socket)

    def begin(self) -> None:
        """The reactor has registered the connection: EVT_CONN_OPEN, then the handshake or the first turn."""
        self._started_dul = True
        self.dul.start()
        self.dul._idle_timer.start()
        address, self._conn_open_address = self._conn_open_address, None
        if address is not None:
            evt.trigger(self, evt.EVT_CONN_OPEN, {"address": address})
        sock = self._sock
        if sock._tls and not sock.closed:
            timeout = getattr(self.profile, "handshake_timeout", None) or 10.0
            self._handshake_deadline = time.monotonic() + timeout
            self._handshake_step()
        else:
            self._turn()

    def on_events(self, mask: int) -> None:
        """The connection is readable or writable (or failed)."""
        sock = self._sock
        if mask & _OUT or (mask & _HUP_ERR and sock.pending_output):
            sock.flush()
        if self._handshake_deadline is not None:
            self._handshake_step()
            return
        more = bool(mask & (_IN | _HUP_ERR)) and sock.fill()
        self._turn()
        if more and not self._finished:
            cast(EventAssociationServer, self._reactor).requeue(self)

    def on_wake(self) -> None:
        """Another thread queued something (an abort), or a turn ran out of budget."""
        if self._handshake_deadline is not None:
            if not (self._kill or self.is_aborted):
                return
            # Stopped before the handshake finished: nothing to send, just close.
            self._handshake_deadline = None
            self._sock.close()
        self._turn()

    def on_timer(self) -> None:
        """A deadline this association asked for has come (or gone by)."""
        now = time.monotonic()
        if self._handshake_deadline is not None:
            if now >= self._handshake_deadline:
                self._handshake_failed(None)
            else:
                cast(EventAssociationServer, self._reactor).schedule(self, self._handshake_deadline)
            return
        sock = self._sock
        if sock.linger_until is not None and now >= sock.linger_until:
            sock.close_now()
        self._turn()

    def abandon(self, exc: BaseException) -> None:
        """A bug in a turn: log it, close the connection, and let the others carry on."""
        LOGGER.error("association abandoned after an unexpected error", exc_info=exc)
        self._kill = True
        self.is_established = False
        self.dul._kill_thread = True
        self._sock.close_now()
        self._finish()

    # -- the handshake ---------------------------------------------------------------

    def _handshake_step(self) -> None:
        sock = self._sock
        try:
            done = sock.handshake()
        except Exception as exc:
            self._handshake_failed(exc)
            return
        reactor = cast(EventAssociationServer, self._reactor)
        if not done:
            reactor.update_interest(self)
            reactor.schedule(self, self._handshake_deadline)
            return
        self._handshake_deadline = None
        # The peer's first PDU may already be here.
        sock.fill()
        self._turn()

    def _handshake_failed(self, exc: BaseException | None) -> None:
        """The handshake failed (``exc``) or timed out (None): report it and close the connection."""
        self._handshake_deadline = None
        hook = cast(EventAssociationServer, self._reactor).tls_failed
        if hook is not None:
            try:
                hook(self, exc)
            except Exception:
                LOGGER.exception("the TLS failure hook failed")
        # pynetdicom's close(): the DUL sees Evt17 and ends the connection.
        self._sock.close()
        self._turn()

    # -- turns -----------------------------------------------------------------------

    def _turn(self) -> None:
        """Run DUL and association steps until neither has anything to do, then settle."""
        if self._finished:
            return
        reactor = cast(EventAssociationServer, self._reactor)
        dul = self.dul
        for _ in range(_STEPS_PER_TURN):
            progressed = dul.step()
            if self._phase is not _CLOSING:
                progressed = self._step() or progressed
            if progressed:
                continue
            if (
                self._phase is _CLOSING
                and not dul._kill_thread
                and self._sock.socket is not None
                and not dul.to_provider_queue.queue
                and not dul.event_queue.queue
            ):
                # The association is over and everything it queued has been
                # handled: close the connection, as pynetdicom's run_reactor
                # does when it returns (the DUL then sees Evt17).
                self._sock.close()
                continue
            break
        else:
            reactor.requeue(self)
        self._settle(reactor)

    def _settle(self, reactor: EventAssociationServer) -> None:
        sock = self._sock
        if self.dul._kill_thread:
            if not sock.closed and sock.linger_until is None:
                # The DUL is done with the connection (it may not have closed it).
                sock._shutdown_socket()
            if sock.closed:
                self._finish()
                return
        reactor.update_interest(self)
        reactor.schedule(self, self._deadline())
        self.signal.notify()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._timer_handle[0] = None
        self.dul.reactor_done = True
        reactor = self._reactor
        if reactor is not None:
            reactor.forget(self)
        self.signal.notify()

    def _deadline(self) -> float | None:
        """The monotonic time of the next timer this association waits for, if any."""
        now = time.monotonic()
        dul = self.dul
        deadline = None
        artim = _running_deadline(dul.artim_timer)
        if artim is not None:
            deadline = now + artim
        if self._phase is _ESTABLISHED and self.network_timeout is not None:
            idle = now + max(0.0, dul._idle_timer.remaining)
            deadline = idle if deadline is None else min(deadline, idle)
        linger = self._sock.linger_until
        if linger is not None:
            deadline = linger if deadline is None else min(deadline, linger)
        return deadline

    def _step(self) -> bool:
        """One step of pynetdicom's acceptor run_reactor/_run_reactor; False when there was nothing to do."""
        if self._phase is _WAITING:
            if self._kill:
                self._phase = _CLOSING
                return True
            if not self.dul.to_user_queue.queue:
                return False
            primitive = self.dul.receive_pdu(wait=False)
            if primitive is None:
                return False
            self.requestor.primitive = primitive
            evt.trigger(self, evt.EVT_REQUESTED, {})
            # The handlers used EVT_REQUESTED to send an A-ABORT or an A-ASSOCIATE-RJ.
            if not self.is_aborted and not self.is_rejected:
                self.acse.negotiate_association()
            self._phase = _ESTABLISHED if self.is_established and not self._kill else _CLOSING
            return True
        return self._established_step()

    def _established_step(self) -> bool:
        """One pass of pynetdicom's acceptor ``_run_reactor`` loop, without its sleep."""
        if self._kill:
            self._phase = _CLOSING
            return True
        # Association.release() and the send_*() methods (on another thread)
        # pause the loop by clearing the checkpoint.
        if not self._reactor_checkpoint.is_set():
            return False
        dul = self.dul
        # The queues are looked at first: pynetdicom finds an empty one by
        # catching an exception.
        msg = None
        if self.dimse.msg_queue.queue:
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
        waiting = bool(dul.to_user_queue.queue)
        if waiting and self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            _ASSOC_LOG.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            self._phase = _CLOSING
            return True

        if waiting and self.acse.is_aborted():
            _ASSOC_LOG.info(
                "Association Aborted" + (" (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else "")
            )
            # Takes the primitive off the queue so that EVT_ACSE_RECV fires.
            dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            self._phase = _CLOSING
            return True

        if dul._kill_thread:
            self.kill()
            self._phase = _CLOSING
            return True

        if dul.idle_timer_expired():
            _ASSOC_LOG.error("Network timeout reached")
            # An A-RELEASE in answer would wait for the peer; echo-scp never asks for one.
            self.abort(block=False)
            self.kill()
            self._phase = _CLOSING
            return True
        return bool(msg)


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
    """Builds an :class:`EventAssociation` for each accepted connection and hands it to the reactor."""

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
            handlers=server.handler_copy(pdu_logging=profile.pdu_logging),
            echo_templates=None if profile.pdu_logging else server.echo_templates,
        )
        assoc.profile = profile
        assoc._server = server
        assoc.set_socket(EventAssociationSocket(assoc, client_socket=self.request))

        # The profile's timeouts, set through Association's setters (they
        # reach the DUL's timers) instead of the AE-wide values.
        assoc.acse_timeout = profile.acse_timeout
        assoc.dimse_timeout = profile.dimse_timeout
        assoc.network_timeout = profile.network_timeout
        acceptor = assoc.acceptor
        acceptor.maximum_length = profile.maximum_pdu_size
        acceptor.ae_title = profile.ae_title
        acceptor.address_info = server.local_info
        if acceptor.implementation_class_uid != ae.implementation_class_uid:
            # ServiceUser() has already set the AE's (and validated it).
            acceptor.implementation_class_uid = ae.implementation_class_uid
        acceptor.implementation_version_name = ae.implementation_version_name
        # Shared, not deep-copied: negotiation reads the supported contexts and
        # builds new PresentationContext objects for its answer.
        acceptor.supported_contexts = list(profile.contexts)
        assoc.requestor.address_info = server.peer_info(self.client_address)
        return assoc


class EventAssociationServer(ThreadedAssociationServer):
    """An association server whose one thread accepts and runs every association (the reactor).

    ``serve_forever`` is the reactor: it blocks in epoll on the listening
    socket, a wake-up channel and every connection, with the nearest timer
    as the timeout. :meth:`stop_accepting` closes the listening socket and
    leaves established associations running until they end, after which the
    loop returns; :meth:`shutdown` (what ``AE.shutdown()`` calls) also aborts
    them.
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
        tls_failed: TlsFailureHook | None = None,
    ) -> None:
        #: Told about the A-ASSOCIATE-RJs sent here, outside any association
        #: (the rejection, the peers' addresses), so that they are counted like the others.
        self.on_refused = on_refused
        # server_activate() (in the base constructor) listens with this backlog.
        self.request_queue_size = request_queue_size
        #: Told about every failed TLS handshake (the connection is then closed).
        self.tls_failed = tls_failed
        self._channel: _WakeChannel | None = _WakeChannel()
        # Guards the channel against being written to after the reactor closed it.
        self._channel_lock = threading.Lock()
        self._wake_pending = False
        self._woken: deque[EventAssociation] = deque()
        self._stop_accepting = False
        self._serving = threading.Event()
        self._accepting_stopped = threading.Event()
        self._served = threading.Event()
        # Connections by descriptor, and the associations not yet finished.
        self._fds: dict[int, EventAssociation] = {}
        self._live: set[EventAssociation] = set()
        self._finished_signal = _Signal()
        # (deadline, sequence, token, association): see schedule().
        # (deadline, sequence, token, the association's timer handle): see schedule().
        self._timers: list[tuple[float, int, int, list[EventAssociation | None]]] = []
        self._sequence = itertools.count()
        self._poller: _Poller | None = None
        self._accept_paused_until: float | None = None
        self._handler_tables: dict[bool, dict[Any, Any]] = {}
        self._peer_hosts: dict[str, AddressInformation] = {}
        #: The reactor thread's identifier while it runs.
        self.reactor_ident: int | None = None
        # The liveness heartbeat: ping() wakes the loop, which stamps last_pong.
        self.last_ping = self.last_pong = time.monotonic()
        memoize_validators()
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
        # Accepting never waits: the reactor accepts only when poll says so, and
        # a connection gone between poll() and accept() must not hold it.
        if self.socket is not None:
            self.socket.setblocking(False)

    # -- building associations -------------------------------------------------------

    def handler_copy(self, *, pdu_logging: bool) -> dict[Any, Any]:
        """A fresh copy of the handler table (``handler_table``), the table itself made once."""
        table = self._handler_tables.get(pdu_logging)
        if table is None:
            table = self._handler_tables[pdu_logging] = handler_table(self, pdu_logging=pdu_logging)
        # Association.bind() appends to these lists: each association gets its own.
        return {event: list(bound) if isinstance(bound, list) else bound for event, bound in table.items()}

    def bind(self, event: Any, handler: Any, args: Any = None) -> None:
        self._handler_tables.clear()
        super().bind(event, handler, args)

    def unbind(self, event: Any, handler: Any) -> None:
        self._handler_tables.clear()
        super().unbind(event, handler)

    def peer_info(self, address: tuple[Any, ...]) -> AddressInformation:
        """``AddressInformation.from_tuple(address)``, resolved once per peer host.

        from_tuple() runs getaddrinfo() on the host, a literal address here;
        the result for a host is kept (a bounded number of them) and copied.
        """
        known = self._peer_hosts.get(address[0])
        if known is None:
            info = AddressInformation.from_tuple(address)
            if len(self._peer_hosts) >= 256:
                self._peer_hosts.clear()
            self._peer_hosts[address[0]] = copy.copy(info)
            return info
        info = copy.copy(known)
        info.port = address[1]
        if len(address) == 4:
            info.flowinfo, info.scope_id = address[2], address[3]
        return info

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection and take the profile it will be served with.

        The profile is read once per connection: TLS wrapping and, on this same
        thread right after, the association's negotiation use the same one.
        """
        profile = self._profile()
        assert self.socket is not None
        client_socket, address = self.socket.accept()
        client_socket.setblocking(False)
        if profile.ssl_context is not None:
            try:
                client_socket = profile.ssl_context.wrap_socket(
                    client_socket, server_side=True, do_handshake_on_connect=False
                )
            except BaseException:
                client_socket.close()
                raise
        self.accepting_profile = profile
        return client_socket, address

    @property
    def active_associations(self) -> list[Association]:  # type: ignore[override]
        """The associations the reactor runs (they are not threads)."""
        return list(self._live)

    # -- the reactor -------------------------------------------------------------------

    def on_reactor_thread(self) -> bool:
        return threading.get_ident() == self.reactor_ident

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept and run associations until stopped; ``poll_interval`` is unused (no polling)."""
        self.reactor_ident = threading.get_ident()
        self._serving.set()
        poller = self._poller = _Poller()
        accepting = False
        listening = -1
        try:
            channel = self._channel
            if channel is None or self.socket is None:
                return
            wake_fd = channel.fileno()
            poller.register(wake_fd, _IN)
            if not self._stop_accepting:
                listening = self.socket.fileno()
                poller.register(listening, _IN)
                accepting = True
            fds = self._fds
            while True:
                if accepting and self._stop_accepting:
                    poller.unregister(listening)
                    accepting = False
                    self._accepting_stopped.set()
                if not accepting:
                    self._accepting_stopped.set()
                    if not self._live:
                        return
                for fd, mask in poller.poll(self._timeout()):
                    assoc = fds.get(fd)
                    if assoc is not None:
                        self._dispatch(assoc, assoc.on_events, mask)
                    elif fd == listening:
                        if accepting and not self._stop_accepting:
                            self._accept(poller, listening)
                    elif fd == wake_fd:
                        channel.drain()
                        self._wake_pending = False
                woken = self._woken
                for _ in range(len(woken)):
                    assoc = woken.popleft()
                    if not assoc._finished:
                        self._dispatch(assoc, assoc.on_wake)
                self._run_timers()
                paused = self._accept_paused_until
                if paused is not None and accepting and time.monotonic() >= paused:
                    self._accept_paused_until = None
                    poller.register(listening, _IN)
                self.last_pong = time.monotonic()
        finally:
            self._accepting_stopped.set()
            for assoc in list(self._live):
                # Only if the loop itself failed: nothing will run these any more.
                assoc.abandon(RuntimeError("the reactor stopped"))
            self._poller = None
            poller.close()
            self._close_channel()
            self.reactor_ident = None
            self._served.set()

    def _dispatch(self, assoc: EventAssociation, handler: Callable[..., None], *args: Any) -> None:
        # The thread serves this association meanwhile, as an association's own
        # thread would: what it logs is about this peer (logs.py reads ``assoc``).
        thread = threading.current_thread()
        thread.assoc = assoc  # type: ignore[attr-defined]
        try:
            handler(*args)
        except Exception as exc:
            with contextlib.suppress(Exception):
                assoc.abandon(exc)
        finally:
            thread.assoc = None  # type: ignore[attr-defined]

    def _accept(self, poller: _Poller, listening: int) -> None:
        for _ in range(_ACCEPTS_PER_TURN):
            if self._stop_accepting:
                # Asked to stop meanwhile: what is still queued is refused
                # (2/3/1) by stop_accepting, not accepted to be cut off.
                return
            try:
                request, address = self.get_request()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the listening socket stays readable, so
                    # stop looking at it for a moment instead of spinning.
                    LOGGER.error("cannot accept a connection: %s", exc)
                    poller.unregister(listening)
                    self._accept_paused_until = time.monotonic() + _ACCEPT_BACKOFF
                    return
                # The peer went away before accept(), or a TLS wrap failed.
                continue
            try:
                self.finish_request(request, address)
            except Exception:
                self.handle_error(request, address)
                self.shutdown_request(request)

    def adopt(self, assoc: EventAssociation) -> None:
        """Register an association's connection and start it (on the reactor's thread)."""
        poller = self._poller
        if poller is None or not self.on_reactor_thread():
            raise RuntimeError("associations start on the reactor's thread")
        sock = cast(EventAssociationSocket, assoc.dul.socket)
        raw = cast(socket.socket, sock.raw)
        fd = raw.fileno()
        poller.register(fd, _IN)
        sock.fd, sock.mask = fd, _IN
        self._fds[fd] = assoc
        self._live.add(assoc)
        assoc._reactor = self
        thread = threading.current_thread()
        thread.assoc = assoc  # type: ignore[attr-defined]
        try:
            assoc.begin()
        except Exception as exc:
            # Registered already: closed and finished here, never left behind.
            assoc.abandon(exc)
        finally:
            thread.assoc = None  # type: ignore[attr-defined]

    def update_interest(self, assoc: EventAssociation) -> None:
        """Poll the association's connection for what it now waits for."""
        sock = assoc._sock
        poller = self._poller
        if sock.closed or sock.fd < 0 or poller is None:
            return
        if assoc._handshake_deadline is not None:
            mask = _OUT if sock.handshake_wants_write else _IN
        else:
            pending = sock.pending_output
            mask = _OUT if pending else 0
            if not sock.eof and sock.linger_until is None and sock.wants_input:
                mask |= _IN
        if mask != sock.mask:
            poller.modify(sock.fd, mask)
            sock.mask = mask

    def forget_descriptor(self, sock: EventAssociationSocket) -> None:
        """Stop polling a connection that is about to be closed."""
        fd = sock.fd
        if fd < 0:
            return
        sock.fd, sock.mask = -1, 0
        if self._poller is not None:
            self._poller.unregister(fd)
        if self._fds.get(fd) is sock.assoc:
            del self._fds[fd]

    def forget(self, assoc: EventAssociation) -> None:
        """The association has finished."""
        self.forget_descriptor(assoc._sock)
        self._live.discard(assoc)
        self._finished_signal.notify()

    def requeue(self, assoc: EventAssociation) -> None:
        """Give the association another turn after the others (on the reactor's thread)."""
        self._woken.append(assoc)

    def wake(self, assoc: EventAssociation | None = None) -> None:
        """From another thread: have the reactor look at ``assoc`` (or just wake it)."""
        if assoc is not None:
            self._woken.append(assoc)
        if not self._wake_pending:
            self._wake_pending = True
            self._set_channel()

    def _set_channel(self) -> None:
        with self._channel_lock:
            if self._channel is not None:
                self._channel.set()

    def _close_channel(self) -> None:
        with self._channel_lock:
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    # -- timers ------------------------------------------------------------------------

    def schedule(self, assoc: EventAssociation, deadline: float | None) -> None:
        """Have ``assoc.on_timer()`` run at ``deadline`` (monotonic), unless it runs earlier anyway."""
        if deadline is None:
            return
        scheduled = assoc._scheduled
        if scheduled is not None and scheduled <= deadline:
            # That earlier turn will schedule this one if it is still needed.
            return
        assoc._timer_token += 1
        assoc._scheduled = deadline
        entry = (deadline + _TIMER_SLACK, next(self._sequence), assoc._timer_token, assoc._timer_handle)
        heapq.heappush(self._timers, entry)
        if len(self._timers) > 2 * len(self._live) + 64:
            # Drop the entries superseded or of finished associations.
            self._timers = [e for e in self._timers if (a := e[3][0]) is not None and e[2] == a._timer_token]
            heapq.heapify(self._timers)

    def _timeout(self) -> float | None:
        if self._woken:
            return 0.0
        deadline = self._timers[0][0] if self._timers else None
        if self._accept_paused_until is not None:
            deadline = (
                self._accept_paused_until if deadline is None else min(deadline, self._accept_paused_until)
            )
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _run_timers(self) -> None:
        timers = self._timers
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            _, _, token, handle = heapq.heappop(timers)
            assoc = handle[0]
            if assoc is None or assoc._finished or token != assoc._timer_token:
                continue
            assoc._scheduled = None
            self._dispatch(assoc, assoc.on_timer)
            timers = self._timers

    # -- liveness ----------------------------------------------------------------------

    def ping(self) -> None:
        """Ask the loop to show it is making progress (it sets ``last_pong``)."""
        if self.last_pong >= self.last_ping:
            self.last_ping = time.monotonic()
            self._set_channel()

    def stalled_for(self) -> float:
        """Seconds since an unanswered ping was sent (0 while the loop answers)."""
        if self.last_pong >= self.last_ping:
            return 0.0
        return time.monotonic() - self.last_ping

    # -- errors and stopping -----------------------------------------------------------

    def handle_error(self, request: Any, client_address: Any) -> None:
        """An association could not be started: reject, never just hang up."""
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

    def stop_accepting(self) -> None:
        """Stop accepting and close the listening socket; established associations run on until they end.

        Returns once the reactor no longer looks at the listening socket; the
        reactor's thread ends by itself after the last association.
        """
        self._stop_accepting = True
        if self._serving.is_set() and not self.on_reactor_thread():
            self._set_channel()
            # The reactor may already have returned (then it set this on its way out).
            self._accepting_stopped.wait()
        self._refuse_backlog()
        self.server_close()
        with contextlib.suppress(ValueError):
            self.ae._servers.remove(self)

    def shutdown(self) -> None:
        """Stop accepting and abort every association (``AE.shutdown()`` calls this); waits up to 5 s."""
        self.stop_accepting()
        for assoc in list(self._live):
            with contextlib.suppress(Exception):
                assoc.abort(block=False)
        deadline = time.monotonic() + 5.0
        signal = self._finished_signal
        while self._live and not self.on_reactor_thread():
            seen = signal.generation
            remaining = deadline - time.monotonic()
            if not self._live or remaining <= 0:
                break
            signal.wait(seen, min(remaining, 0.5))

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
        if not self._serving.is_set():
            # The reactor never ran (a failed bind, say): nothing else closes the channel.
            self._close_channel()
