"""A raw-socket C-ECHO load generator: sequential, in-association, concurrent and idle load.

Each association is connect, A-ASSOCIATE-RQ, one C-ECHO, A-RELEASE, close,
with TCP_NODELAY set and pre-encoded PDUs (tests/wire.py). Concurrent clients
run as state machines on a selectors (epoll) loop, spread over a few forked
processes, so the generator costs tens of microseconds of CPU per
association and is not what limits the servers under test; every result
carries the generator's own CPU time so that claim can be checked.

Every loop here is bounded by a deadline and by a count; every socket
operation by ``timeout``.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import select
import selectors
import socket
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# The PDUs come from the tests' own reading of the standard, not from echo_scp.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import wire

# After a failed association a client waits this long before the next, so a
# server that refuses instantly is not hammered into a tight error loop.
FAILURE_BACKOFF = 0.01
# Upper bound on associations or echoes per measurement, whatever the duration.
MAX_OPERATIONS = 5_000_000
# How many idle associations are opened at once.
IDLE_BATCH = 50
# How long idle associations get to answer their A-RELEASE-RQ before being cut off.
RELEASE_WAIT = 2.0
# Largest PDU body the generator accepts; anything bigger means a broken peer.
MAX_PDU_BODY = 1 << 20
# How the generator names itself in servers' logs.
CALLING_AET = "ECHOBENCH"
VERSION_NAME = "ECHO_SCP_BENCH"


@dataclass(frozen=True)
class Target:
    """Where the server under test listens and the AE title it answers to."""

    host: str
    port: int
    called_aet: str


@dataclass
class RunResult:
    """What one measurement saw: operations, failures, latencies and CPU times."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0  # wall seconds of the measurement window
    latencies: list[float] = field(default_factory=list)  # seconds per successful operation
    generator_cpu: float = 0.0  # CPU seconds used by the generator's processes
    generator_processes: int = 1
    server_cpu: float | None = None  # CPU seconds used by the server during the window
    unfinished: int = 0  # associations still in progress when the window closed
    oldest_unfinished: float = 0.0  # seconds the oldest of those had been running

    @property
    def failures(self) -> int:
        return sum(self.errors.values())

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0


def associate_request(target: Target) -> bytes:
    """The A-ASSOCIATE-RQ every client sends: Verification in Implicit VR Little Endian only."""
    return wire.associate_rq(target.called_aet, CALLING_AET, version_name=VERSION_NAME)


def error_kind(exc: BaseException) -> str:
    """A short, bounded label for a failure, to count failures by cause."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, wire.WireError):
        return str(exc).split(" (")[0]
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


class _Reader:
    """Reads whole PDUs off a blocking socket, usually with one recv each.

    Each recv is bounded by the socket's timeout and a whole PDU by ``timeout``
    as well, so a peer trickling bytes cannot hold a client forever.
    """

    __slots__ = ("buffer", "sock", "timeout")

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.buffer = b""

    def read_pdu(self) -> tuple[int, bytes]:
        buffer = self.buffer
        deadline = 0.0
        for attempt in range(10_000):  # a PDU body is at most MAX_PDU_BODY
            if len(buffer) >= 6:
                pdu_type, length = wire.HEADER.unpack_from(buffer)
                if length > MAX_PDU_BODY:
                    raise wire.WireError(f"PDU of {length} bytes")
                end = 6 + length
                if len(buffer) >= end:
                    self.buffer = buffer[end:]
                    return pdu_type, buffer[6:end]
            if attempt == 1:
                deadline = time.monotonic() + self.timeout  # the slow path: a PDU in pieces
            elif attempt > 1 and time.monotonic() > deadline:
                raise TimeoutError("PDU not complete in time")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError(errno.ECONNRESET, "closed by peer")
            buffer += chunk
        raise wire.WireError("PDU never completed")


def _abort_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.send(wire.ABORT)


def associate(target: Target, timeout: float, request: bytes | None = None) -> tuple[socket.socket, _Reader]:
    """Open a blocking socket and establish an association; the caller closes it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        sock.connect((target.host, target.port))
        sock.sendall(request or associate_request(target))
        reader = _Reader(sock, timeout)
        pdu_type, body = reader.read_pdu()
        wire.expect(pdu_type, wire.Pdu.ASSOCIATE_AC, body)
        wire.check_associate_ac(body)
    except BaseException:
        sock.close()
        raise
    return sock, reader


def _echo(sock: socket.socket, reader: _Reader, echo_pdu: bytes) -> None:
    sock.sendall(echo_pdu)
    pdu_type, body = reader.read_pdu()
    wire.expect(pdu_type, wire.Pdu.P_DATA_TF, body)
    status = wire.echo_response(body)[1]
    if status != 0:
        raise wire.WireError(f"C-ECHO status 0x{status:04X}")


def _release(sock: socket.socket, reader: _Reader) -> None:
    sock.sendall(wire.RELEASE_RQ)
    pdu_type, body = reader.read_pdu()
    wire.expect(pdu_type, wire.Pdu.RELEASE_RP, body)


def one_association(target: Target, timeout: float, request: bytes | None = None) -> None:
    """Connect, associate, one C-ECHO, release, close; raises on any failure."""
    sock, reader = associate(target, timeout, request)
    try:
        _echo(sock, reader, wire.echo_request(1))
        _release(sock, reader)
    except BaseException:
        _abort_quietly(sock)
        raise
    finally:
        sock.close()


class _CpuMeter:
    """Generator and server CPU time used from construction to ``finish``."""

    def __init__(self, server_cpu: Callable[[], float] | None) -> None:
        self._server_cpu = server_cpu
        self._server_before = server_cpu() if server_cpu else None
        self._generator_before = time.process_time()

    def finish(self, result: RunResult, elapsed: float) -> None:
        result.elapsed = elapsed
        result.generator_cpu = time.process_time() - self._generator_before
        if self._server_cpu and self._server_before is not None:
            result.server_cpu = self._server_cpu() - self._server_before


def sequential_associations(
    target: Target,
    *,
    duration: float,
    timeout: float,
    server_cpu: Callable[[], float] | None = None,
    max_count: int = MAX_OPERATIONS,
) -> RunResult:
    """One client running associations back to back for ``duration`` seconds."""
    request = associate_request(target)
    result = RunResult()
    meter = _CpuMeter(server_cpu)
    started = now = time.monotonic()
    end = started + duration
    for _ in range(max_count):
        if now >= end:
            break
        try:
            one_association(target, timeout, request)
        except (OSError, wire.WireError) as exc:
            result.errors[error_kind(exc)] += 1
            time.sleep(FAILURE_BACKOFF)
            now = time.monotonic()
            continue
        finished = time.monotonic()
        result.latencies.append(finished - now)
        now = finished
    result.ok = len(result.latencies)
    meter.finish(result, now - started)
    return result


def echoes_in_one_association(
    target: Target,
    *,
    duration: float,
    timeout: float,
    server_cpu: Callable[[], float] | None = None,
    max_count: int = MAX_OPERATIONS,
) -> RunResult:
    """One association carrying C-ECHOs back to back for ``duration`` seconds.

    The window, and the server CPU sample, start after the A-ASSOCIATE-AC and
    end before the release, so only the echoes are counted.
    """
    head, tail = wire.echo_request_parts()
    result = RunResult()
    try:
        sock, reader = associate(target, timeout)
    except (OSError, wire.WireError) as exc:
        result.errors[error_kind(exc)] += 1
        return result
    try:
        meter = _CpuMeter(server_cpu)
        started = now = time.monotonic()
        end = started + duration
        message_id = 0
        for _ in range(max_count):
            if now >= end:
                break
            message_id = message_id % 0xFFFF + 1  # 1..65535, then wraps
            _echo(sock, reader, head + message_id.to_bytes(2, "little") + tail)
            result.ok += 1
            if not result.ok % 64:
                now = time.monotonic()
        meter.finish(result, time.monotonic() - started)
        _release(sock, reader)
    except (OSError, wire.WireError) as exc:
        result.errors[error_kind(exc)] += 1
        _abort_quietly(sock)
    finally:
        sock.close()
    return result


# --------------------------------------------------------------------------
# Concurrent clients: a state machine per client on an epoll loop
# --------------------------------------------------------------------------

_CONNECTING, _WAIT_AC, _WAIT_RSP, _WAIT_RP, _IDLE = range(5)
_NEXT_STATE = {_WAIT_AC: _WAIT_RSP, _WAIT_RSP: _WAIT_RP}
_READABLE = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_WRITABLE = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


class _Client:
    """One client's association in progress."""

    __slots__ = ("buffer", "deadline", "outgoing", "sock", "started", "state")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.state = _IDLE
        self.buffer = b""
        self.outgoing = b""
        self.started = 0.0
        self.deadline = 0.0  # of the current operation, or when an idle client starts again


class _ConcurrentLoop:
    """Runs ``clients`` clients until ``end``; one instance per worker process.

    It uses epoll directly rather than selectors, whose bookkeeping costs
    about as much Python time as the protocol itself. Events can be stale (a
    closed socket's number reused within one poll batch), so every handler
    treats "would block" as "not yet" rather than as a failure.
    """

    def __init__(self, target: Target, clients: int, end: float, timeout: float) -> None:
        self.address = (target.host, target.port)
        self.request = associate_request(target)
        self.echo = wire.echo_request(1)
        self.end = end
        self.timeout = timeout
        self.epoll = select.epoll()
        self.by_fd: dict[int, _Client] = {}
        self.clients = [_Client() for _ in range(clients)]
        self.latencies = array("d")
        self.errors: Counter[str] = Counter()
        self.unfinished = 0
        self.oldest_unfinished = 0.0

    def run(self) -> None:
        now = time.monotonic()
        for client in self.clients:
            self._start(client, now)
        # Bounded in time by self.end; the count bound only guards against a bug.
        for _ in range(100 * MAX_OPERATIONS):
            now = time.monotonic()
            if now >= self.end:
                break
            for fd, events in self.epoll.poll(min(0.02, self.end - now)):
                owner = self.by_fd.get(fd)
                if owner is not None:
                    self._ready(owner, events)
            now = time.monotonic()
            for client in self.clients:
                if client.deadline <= now:
                    if client.state == _IDLE:
                        self._start(client, now)
                    else:
                        self._fail(client, "timeout", now)
        for client in self.clients:
            if client.sock is not None:
                # Unfinished at the end of the window: neither success nor failure.
                self.unfinished += 1
                self.oldest_unfinished = max(self.oldest_unfinished, self.end - client.started)
                self._close(client, abort=client.state != _CONNECTING)
        self.epoll.close()

    def _start(self, client: _Client, now: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sock = sock
        client.buffer = b""
        client.started = now
        client.deadline = now + self.timeout
        self.by_fd[sock.fileno()] = client
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            self._fail(client, errno.errorcode.get(code, str(code)), now)
            return
        # On loopback the handshake has usually completed inside connect(), so
        # try the A-ASSOCIATE-RQ at once and wait for writability only if needed.
        client.state = _CONNECTING
        client.outgoing = self.request
        self._flush(client, register=True)

    def _flush(self, client: _Client, *, register: bool = False) -> None:
        """Send what is outgoing; then wait to read, or to write the rest."""
        sock = client.sock
        assert sock is not None
        try:
            sent = sock.send(client.outgoing)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            if exc.errno != errno.ENOTCONN or client.state != _CONNECTING:
                self._fail(client, error_kind(exc), time.monotonic())
                return
            sent = 0
        if sent and client.state == _CONNECTING:
            client.state = _WAIT_AC
        client.outgoing = client.outgoing[sent:]
        mask = _WRITABLE if client.outgoing else _READABLE
        if register:
            self.epoll.register(sock.fileno(), mask)
        elif client.outgoing:
            self.epoll.modify(sock.fileno(), mask)

    def _ready(self, client: _Client, events: int) -> None:
        sock = client.sock
        if sock is None:
            return
        if client.outgoing:
            if not events & _WRITABLE:
                return
            if client.state == _CONNECTING:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self._fail(client, errno.errorcode.get(code, str(code)), time.monotonic())
                    return
            self._flush(client)
            if client.sock is not None and not client.outgoing:
                self.epoll.modify(sock.fileno(), _READABLE)
            return
        try:
            chunk = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(client, error_kind(exc), time.monotonic())
            return
        if not chunk:
            self._fail(client, "ECONNRESET", time.monotonic())
            return
        client.buffer += chunk
        while client.sock is sock and len(client.buffer) >= 6:
            pdu_type, length = wire.HEADER.unpack_from(client.buffer)
            if len(client.buffer) < 6 + length:
                if length > MAX_PDU_BODY:
                    self._fail(client, "oversized PDU", time.monotonic())
                return
            body = client.buffer[6 : 6 + length]
            client.buffer = client.buffer[6 + length :]
            self._pdu(client, pdu_type, body)

    def _pdu(self, client: _Client, pdu_type: int, body: bytes) -> None:
        now = time.monotonic()
        try:
            if client.state == _WAIT_AC:
                wire.expect(pdu_type, wire.Pdu.ASSOCIATE_AC, body)
                wire.check_associate_ac(body)
                reply = self.echo
            elif client.state == _WAIT_RSP:
                wire.expect(pdu_type, wire.Pdu.P_DATA_TF, body)
                status = wire.echo_response(body)[1]
                if status != 0:
                    raise wire.WireError(f"C-ECHO status 0x{status:04X}")
                reply = wire.RELEASE_RQ
            elif client.state == _WAIT_RP:
                wire.expect(pdu_type, wire.Pdu.RELEASE_RP, body)
                self.latencies.append(now - client.started)
                self._close(client, abort=False)
                client.state, client.deadline = _IDLE, float("inf")
                if now < self.end:
                    self._start(client, now)
                return
            else:
                raise wire.WireError(f"PDU 0x{pdu_type:02X} before the A-ASSOCIATE-RQ went out")
        except wire.WireError as exc:
            self._fail(client, error_kind(exc), now)
            return
        client.state = _NEXT_STATE[client.state]
        client.deadline = now + self.timeout
        client.outgoing = reply
        self._flush(client)

    def _close(self, client: _Client, *, abort: bool) -> None:
        sock = client.sock
        if sock is None:
            return
        client.sock = None
        client.outgoing = b""
        self.by_fd.pop(sock.fileno(), None)
        if abort:
            _abort_quietly(sock)
        # Closing the only descriptor of a socket also takes it out of the epoll set.
        sock.close()

    def _fail(self, client: _Client, kind: str, now: float) -> None:
        self.errors[kind] += 1
        self._close(client, abort=client.state != _CONNECTING)
        client.state = _IDLE
        client.deadline = now + FAILURE_BACKOFF


def _worker(
    target: Target, clients: int, start_at: float, end: float, timeout: float, conn: Connection
) -> None:
    try:
        time.sleep(max(0.0, start_at - time.monotonic()))
        cpu_before = time.process_time()
        loop = _ConcurrentLoop(target, clients, end, timeout)
        loop.run()
        cpu = time.process_time() - cpu_before
        conn.send((loop.latencies.tobytes(), dict(loop.errors), loop.unfinished, loop.oldest_unfinished, cpu))
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()


def concurrent_associations(
    target: Target,
    *,
    clients: int,
    duration: float,
    timeout: float,
    processes: int,
    server_cpu: Callable[[], float] | None = None,
) -> RunResult:
    """``clients`` clients, each running associations back to back, for ``duration`` seconds.

    The clients are spread over ``processes`` forked workers that start
    together; associations unfinished when the window closes are not counted.
    """
    processes = max(1, min(processes, clients))
    context = multiprocessing.get_context("fork")
    start_at = time.monotonic() + 0.25  # lets every worker fork before the window opens
    end = start_at + duration
    workers: list[tuple[Any, Connection]] = []
    result = RunResult(generator_processes=processes)
    try:
        for index in range(processes):
            share = clients // processes + (1 if index < clients % processes else 0)
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_worker, args=(target, share, start_at, end, timeout, sender), daemon=True
            )
            process.start()
            sender.close()
            workers.append((process, receiver))
        time.sleep(max(0.0, start_at - time.monotonic()))
        cpu_before = server_cpu() if server_cpu else None
        time.sleep(max(0.0, end - time.monotonic()))
        if server_cpu and cpu_before is not None:
            result.server_cpu = server_cpu() - cpu_before
        result.elapsed = duration
        for _process, receiver in workers:
            # A worker ends at most one operation timeout after the window.
            if not receiver.poll(timeout + 5):
                result.errors["worker lost"] += 1
                continue
            try:
                raw, errors, unfinished, oldest, cpu = receiver.recv()
            except EOFError:
                result.errors["worker lost"] += 1
                continue
            latencies = array("d")
            latencies.frombytes(raw)
            result.latencies.extend(latencies)
            result.errors.update(errors)
            result.unfinished += unfinished
            result.oldest_unfinished = max(result.oldest_unfinished, oldest)
            result.generator_cpu += cpu
    finally:
        for process, receiver in workers:
            receiver.close()
            process.join(timeout=2)
            if process.is_alive():
                process.kill()
                process.join(timeout=2)
    result.ok = len(result.latencies)
    return result


# --------------------------------------------------------------------------
# Idle associations
# --------------------------------------------------------------------------


class IdleAssociations:
    """Established associations that carry no traffic, opened in batches.

    Each batch gets ``timeout`` seconds to be established. Once a whole batch
    fails (the server takes no more at once: DCMTK's storescp serves one
    association at a time, pynetdicom's echoscp ten) or a ``grow_to`` call has
    spent its ``budget``, further associations are not attempted and are
    counted as not opened. Use as a context manager: leaving it releases and
    closes every one, waiting at most ``RELEASE_WAIT`` for the answers.
    """

    def __init__(self, target: Target, *, timeout: float, budget: float, batch: int = IDLE_BATCH) -> None:
        self.target = target
        self.timeout = timeout  # for each batch to be established
        self.budget = budget  # for each grow_to call
        self.batch = batch
        self.request = associate_request(target)
        self.socks: list[socket.socket] = []
        self.errors: Counter[str] = Counter()
        self.not_attempted = 0
        self.saturated = False

    def __enter__(self) -> IdleAssociations:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def opened(self) -> int:
        return len(self.socks)

    def grow_to(self, count: int) -> None:
        """Open associations until ``count`` have been tried or the budget is spent."""
        wanted = count - self.opened - self.errors.total() - self.not_attempted
        give_up_at = time.monotonic() + self.budget
        for _ in range(count):
            if wanted <= 0:
                return
            if self.saturated or time.monotonic() >= give_up_at:
                self.not_attempted += wanted
                return
            size = min(self.batch, wanted)
            if self._open_batch(size, min(self.timeout, give_up_at - time.monotonic())) == 0:
                self.saturated = True
            wanted -= size

    def _open_batch(self, size: int, timeout: float) -> int:
        selector = selectors.DefaultSelector()
        pending: dict[socket.socket, bytes] = {}
        opened = 0
        deadline = time.monotonic() + timeout
        try:
            for _ in range(size):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                code = sock.connect_ex((self.target.host, self.target.port))
                if code not in (0, errno.EINPROGRESS):
                    self.errors[errno.errorcode.get(code, str(code))] += 1
                    sock.close()
                    continue
                pending[sock] = b""
                selector.register(sock, selectors.EVENT_WRITE)
            for _ in range(100_000):
                remaining = deadline - time.monotonic()
                if not pending or remaining <= 0:
                    break
                for key, mask in selector.select(remaining):
                    ready = key.fileobj
                    assert isinstance(ready, socket.socket)
                    kind = self._step(selector, ready, mask, pending)
                    if kind is None:
                        continue
                    selector.unregister(ready)
                    del pending[ready]
                    if kind == "":
                        self.socks.append(ready)
                        opened += 1
                    else:
                        self.errors[kind] += 1
                        _abort_quietly(ready)
                        ready.close()
        finally:
            for sock in pending:
                self.errors["timeout"] += 1
                _abort_quietly(sock)
                sock.close()
            selector.close()
        return opened

    def _step(
        self,
        selector: selectors.BaseSelector,
        sock: socket.socket,
        mask: int,
        pending: dict[socket.socket, bytes],
    ) -> str | None:
        """Advance one socket: None while in progress, "" once associated, else the failure."""
        try:
            if mask & selectors.EVENT_WRITE:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    return errno.errorcode.get(code, str(code))
                sock.sendall(self.request)  # about 200 bytes: fits any empty send buffer
                selector.modify(sock, selectors.EVENT_READ)
                return None
            chunk = sock.recv(65536)
        except OSError as exc:
            return error_kind(exc)
        if not chunk:
            return "ECONNRESET"
        buffer = pending[sock] + chunk
        pending[sock] = buffer
        if len(buffer) < 6:
            return None
        pdu_type, length = wire.HEADER.unpack_from(buffer)
        if len(buffer) < 6 + length:
            return None if length <= MAX_PDU_BODY else "oversized PDU"
        try:
            wire.expect(pdu_type, wire.Pdu.ASSOCIATE_AC, buffer[6 : 6 + length])
            wire.check_associate_ac(buffer[6 : 6 + length])
        except wire.WireError as exc:
            return error_kind(exc)
        sock.setblocking(True)
        return ""

    def close(self) -> None:
        """Release every open association, then close them all; what has not answered is cut off."""
        socks, self.socks = self.socks, []
        if not socks:
            return
        selector = selectors.DefaultSelector()
        try:
            for sock in socks:
                try:
                    sock.setblocking(False)
                    sock.send(wire.RELEASE_RQ)
                    selector.register(sock, selectors.EVENT_READ)
                except OSError:
                    continue
            deadline = time.monotonic() + min(self.timeout, RELEASE_WAIT)
            waiting = len(selector.get_map())
            for _ in range(100_000):
                remaining = deadline - time.monotonic()
                if waiting <= 0 or remaining <= 0:
                    break
                for key, _mask in selector.select(remaining):
                    # The A-RELEASE-RP, an A-ABORT or EOF: either way this one is done.
                    selector.unregister(key.fileobj)
                    waiting -= 1
        finally:
            selector.close()
            for sock in socks:
                sock.close()
