"""The association engines on real sockets: protocol paths, misbehaving peers, limits and leaks.

Every test runs against the event engine (``engine = "event"``, engine.py);
those that are cheap and describe behaviour both engines share are also run
against pynetdicom's stock engine. Peers are pynetdicom's SCU or raw sockets
speaking just enough of PS3.8 to misbehave on purpose.
"""

from __future__ import annotations

import contextlib
import os
import resource
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from echo_scp import protocol
from echo_scp.engine import EventAssociation, EventAssociationServer
from tests import wire
from tests.conftest import Running, pynetdicom_associate, skip_unless_ci, wait_for

AET = "ECHOSCP"
BOTH = pytest.mark.parametrize("engine", ["event", "pynetdicom"])
REQUEST = wire.associate_rq(AET, "RAWPEER")


# -- a raw peer -----------------------------------------------------------------


class RawPeer:
    """A blocking client socket that sends whole byte strings and reads whole PDUs."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_pdu(self) -> tuple[int, bytes] | None:
        """The next (type, body), or None once the server has closed the connection."""
        while True:
            split = wire.split_pdu(self._buffer)
            if split is not None:
                pdu_type, body, self._buffer = split
                return pdu_type, body
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self._buffer += chunk

    def establish(self) -> None:
        self.send(REQUEST)
        answer = self.read_pdu()
        assert answer is not None and answer[0] == wire.Pdu.ASSOCIATE_AC, answer

    def echo(self, message_id: int = 1) -> int:
        """Send a C-ECHO-RQ; the status of the C-ECHO-RSP."""
        self.send(wire.echo_request(message_id))
        answer = self.read_pdu()
        assert answer is not None and answer[0] == wire.Pdu.P_DATA_TF, answer
        responded_to, status = wire.echo_response(answer[1])
        assert responded_to == message_id
        return status

    def reset(self) -> None:
        """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


# -- fixtures and helpers -----------------------------------------------------------


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """After the test (and its services' stop), no thread and no descriptor is left behind."""
    threads = set(threading.enumerate())
    fds = _fd_count()
    yield
    wait_for(lambda: set(threading.enumerate()) <= threads, timeout=15)
    wait_for(lambda: _fd_count() <= fds, timeout=15)


@pytest.fixture
def peers() -> Iterator[list[RawPeer]]:
    """Raw peers made by the test, closed at its end (before the leak check)."""
    made: list[RawPeer] = []
    yield made
    for peer in made:
        peer.close()


def _start(
    start_service: Callable[..., Running],
    engine: str = "event",
    *,
    grace: float = 2.0,
    **listener: Any,
) -> Running:
    # Self-checks only when asked for (wait_ready asks), so they stay out of the measurements.
    running = start_service(
        listeners=[{"engine": engine, **listener}],
        readiness={"interval": 60.0, "timeout": 5.0, "max_age": 120.0},
        liveness={"stall_timeout": 300.0},
        shutdown_grace_period=grace,
    )
    running.wait_ready()
    running.wait_idle()
    return running


def _scu() -> AE:
    ae = AE(ae_title="ENGINETEST")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    return ae


def _peer_associations(running: Running) -> list[Any]:
    """The first listener's open associations with peers (the readiness self-check's left out)."""
    table = running.service.table
    return [
        assoc
        for assoc in running.service.listeners[0].open_associations()
        if (conn := table.get(assoc)) is not None and not conn.self_check
    ]


def _ended(running: Running, **fields: Any) -> list[dict[str, Any]]:
    return [
        entry
        for entry in running.events("association_ended")
        if not entry.get("self_check") and all(entry.get(k) == v for k, v in fields.items())
    ]


def _closed_within(peer: RawPeer, low: float, high: float) -> tuple[list[int], float]:
    """PDU types the server sent until it closed, and after how long; fails outside [low, high]."""
    peer.sock.settimeout(high + 1)
    started = time.monotonic()
    types = []
    while (answer := peer.read_pdu()) is not None:
        types.append(answer[0])
    elapsed = time.monotonic() - started
    assert low <= elapsed <= high, f"closed after {elapsed:.2f} s, expected {low}-{high} s"
    return types, elapsed


# -- the normal paths -----------------------------------------------------------------


def test_default_engine_is_event_and_stock_engine_is_pynetdicoms(
    start_service: Callable[..., Running],
) -> None:
    """engine = "event" (the default) serves through EventAssociationServer; "pynetdicom" does not."""
    running = start_service(listeners=[{}, {"name": "stock", "engine": "pynetdicom"}])
    event, stock = running.service.listeners
    assert isinstance(event.server, EventAssociationServer)
    assert not isinstance(stock.server, EventAssociationServer)
    assert event.accepting() and stock.accepting()


@BOTH
def test_accept_echo_release(start_service: Callable[..., Running], engine: str) -> None:
    """A pynetdicom SCU is accepted, gets Success for a C-ECHO and releases; every handler reports it."""
    running = _start(start_service, engine)
    assoc = _scu().associate("127.0.0.1", running.port(), ae_title=AET)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert assoc.is_released
    running.wait_idle()
    (ended,) = _ended(running)
    assert (ended["outcome"], ended["echoes"], ended["calling_ae"]) == ("released", 1, "ENGINETEST")
    assert running.sample(
        "echo_scp_echo_requests_total", listener="dicom", calling_ae="other", status="success"
    )


@BOTH
def test_wrong_called_ae_title_is_rejected_1_1_7(start_service: Callable[..., Running], engine: str) -> None:
    """A-ASSOCIATE-RJ 1/1/7 (called AE title not recognised) reaches the SCU."""
    running = _start(start_service, engine)
    assoc = pynetdicom_associate(_scu(), "127.0.0.1", running.port(), ae_title="SOMEONE")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 7)
    running.wait_idle()
    assert _ended(running, outcome="rejected", rejection="1/1/7")


@BOTH
def test_accept_names_echo_scp_and_the_context(start_service: Callable[..., Running], engine: str) -> None:
    """The A-ASSOCIATE-AC, decoded by tests/wire.py, accepts context 1 and names echo-scp's implementation."""
    running = _start(start_service, engine)
    peer = RawPeer(running.port())
    try:
        peer.send(REQUEST)
        answer = peer.read_pdu()
        assert answer is not None and answer[0] == wire.Pdu.ASSOCIATE_AC, answer
        peer.send(wire.RELEASE_RQ)
        assert peer.read_pdu() == (wire.Pdu.RELEASE_RP, bytes(4))
    finally:
        peer.close()
    accepted = wire.parse_associate_ac(answer[1])
    assert (accepted.called, accepted.calling) == (AET, "RAWPEER")
    assert accepted.application_context == wire.APPLICATION_CONTEXT
    assert accepted.contexts == {1: (0, wire.IMPLICIT_LE)}
    assert accepted.class_uid == protocol.IMPLEMENTATION_CLASS_UID
    assert accepted.version_name == protocol.IMPLEMENTATION_VERSION_NAME
    running.wait_idle()


@BOTH
def test_wrong_called_ae_title_gets_rj_bytes(start_service: Callable[..., Running], engine: str) -> None:
    """A raw A-ASSOCIATE-RQ to a wrong called AE title gets exactly A-ASSOCIATE-RJ 1/1/7, then EOF."""
    running = _start(start_service, engine)
    peer = RawPeer(running.port())
    try:
        peer.send(wire.associate_rq("SOMEONE", "RAWPEER"))
        answer = peer.read_pdu()
        assert answer is not None and wire.pdu(*answer) == wire.associate_rj(1, 1, 7), answer
        assert peer.read_pdu() is None
    finally:
        peer.close()
    running.wait_idle()


@BOTH
def test_many_echoes_in_one_association(start_service: Callable[..., Running], engine: str) -> None:
    """Two hundred C-ECHOs with distinct message IDs on one association all get Success for their own ID."""
    running = _start(start_service, engine)
    peer = RawPeer(running.port())
    try:
        peer.establish()
        for message_id in range(1, 201):
            assert peer.echo(message_id) == 0
        _release(peer)
    finally:
        peer.close()
    _assert_released_after(running, 200)


def test_pipelined_echoes_are_all_answered_in_order(start_service: Callable[..., Running]) -> None:
    """Ten thousand C-ECHO-RQs sent before any answer is read (more than the engine reads ahead or queues
    for a peer) each get their Success, in order, and the release still works."""
    running = _start(start_service)
    peer = RawPeer(running.port())
    count = 10_000
    try:
        peer.establish()
        burst = b"".join(wire.echo_request(message_id) for message_id in range(1, count + 1))
        sender = threading.Thread(target=peer.send, args=(burst,))
        sender.start()
        for message_id in range(1, count + 1):
            answer = peer.read_pdu()
            assert answer is not None and answer[0] == wire.Pdu.P_DATA_TF, answer
            assert wire.echo_response(answer[1]) == (message_id, 0)
        sender.join(10)
        _release(peer)
    finally:
        peer.close()
    _assert_released_after(running, count)


def _release(peer: RawPeer) -> None:
    peer.send(wire.RELEASE_RQ)
    assert peer.read_pdu() == (wire.Pdu.RELEASE_RP, bytes(4))


def _assert_released_after(running: Running, echoes: int) -> None:
    running.wait_idle()
    (ended,) = _ended(running)
    assert (ended["outcome"], ended["echoes"]) == ("released", echoes)


@BOTH
def test_peer_abort_is_reported(start_service: Callable[..., Running], engine: str) -> None:
    """An A-ABORT from the peer ends the association as aborted by the peer."""
    running = _start(start_service, engine)
    assoc = _scu().associate("127.0.0.1", running.port(), ae_title=AET)
    assert assoc.send_c_echo().Status == 0
    assoc.abort()
    running.wait_idle()
    (ended,) = _ended(running)
    assert (ended["outcome"], ended["abort_source"]) == ("aborted", "peer")


# -- peers that go away ---------------------------------------------------------------


def test_fin_before_request_ends_the_association_thread_at_once(
    start_service: Callable[..., Running],
) -> None:
    """A peer that closes without sending an A-ASSOCIATE-RQ frees its threads long before acse_timeout."""
    running = _start(start_service, acse_timeout=30.0)
    peer = RawPeer(running.port())
    (assoc,) = wait_for(lambda: _peer_associations(running), timeout=5)
    # EVT_CONN_OPEN, which registers the connection, fires just before the DUL thread starts.
    wait_for(lambda: assoc.is_alive() and assoc.dul.is_alive(), timeout=5)
    peer.close()
    started = time.monotonic()
    wait_for(lambda: not assoc.is_alive() and not assoc.dul.is_alive(), timeout=5)
    assert time.monotonic() - started < 2.0
    running.wait_idle()
    assert _ended(running, outcome="closed_before_request")


STAGES = ["connected", "requested", "established", "after_echo", "releasing"]


@pytest.mark.parametrize("stage", STAGES)
def test_reset_at_each_stage(start_service: Callable[..., Running], stage: str) -> None:
    """A TCP RST (SO_LINGER 0) at any stage is cleaned up and the next peer is served."""
    running = _start(start_service)
    peer = RawPeer(running.port())
    if stage != "connected":
        peer.send(REQUEST)
    if stage in ("established", "after_echo", "releasing"):
        assert peer.read_pdu() is not None
    if stage == "after_echo":
        assert peer.echo(1) == 0
    if stage == "releasing":
        peer.send(wire.RELEASE_RQ)
    peer.reset()
    running.wait_idle(timeout=5)
    follower = RawPeer(running.port())
    try:
        follower.establish()
        assert follower.echo(7) == 0
    finally:
        follower.close()


@BOTH
def test_a_c_echo_on_an_unknown_context_is_aborted(
    start_service: Callable[..., Running], engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C-ECHO-RQ on a presentation context never accepted (after a good one) gets A-ABORT, then EOF,
    and the event engine's thread, which serves every association, never sleeps in the abort."""
    sleeping: list[str] = []
    sleep = time.sleep

    def spy(seconds: float) -> None:
        sleeping.append(threading.current_thread().name)
        sleep(seconds)

    monkeypatch.setattr(time, "sleep", spy)
    running = _start(start_service, engine)
    peer = RawPeer(running.port())
    try:
        peer.establish()
        assert peer.echo(1) == 0
        peer.send(wire.p_data(wire.pdv(wire.c_echo_rq(2), context_id=3)))
        types, _ = _closed_within(peer, 0.0, 3.0)
    finally:
        peer.close()
    assert types == [wire.Pdu.ABORT]
    running.wait_idle()
    (ended,) = _ended(running)
    assert (ended["outcome"], ended["abort_source"], ended["echoes"]) == ("aborted", "local", 1)
    if engine == "event":
        assert not [name for name in sleeping if name.startswith("AcceptorServer")]


def test_close_in_the_middle_of_a_pdu(start_service: Callable[..., Running]) -> None:
    """Half a P-DATA-TF and then FIN ends the association at once, not after network_timeout."""
    running = _start(start_service, network_timeout=30.0)
    peer = RawPeer(running.port())
    peer.establish()
    echo = wire.echo_request(1)
    peer.send(echo[: len(echo) // 2])
    peer.sock.shutdown(socket.SHUT_WR)
    _, elapsed = _closed_within(peer, 0.0, 5.0)
    peer.close()
    running.wait_idle(timeout=5)
    assert elapsed < 5.0
    (ended,) = _ended(running)
    assert ended["outcome"] == "aborted"


# -- timers ------------------------------------------------------------------------------


@BOTH
def test_artim_closes_a_silent_connection_after_acse_timeout(
    start_service: Callable[..., Running], engine: str
) -> None:
    """A peer that connects and sends nothing is disconnected once acse_timeout (0.5 s) runs out."""
    running = _start(start_service, engine, acse_timeout=0.5)
    peer = RawPeer(running.port())
    try:
        types, _ = _closed_within(peer, 0.4, 3.0)
    finally:
        peer.close()
    assert types == []
    running.wait_idle()


@BOTH
def test_idle_association_is_aborted_after_network_timeout(
    start_service: Callable[..., Running], engine: str
) -> None:
    """An established association left silent gets an A-ABORT after network_timeout (0.5 s)."""
    running = _start(start_service, engine, network_timeout=0.5)
    peer = RawPeer(running.port())
    try:
        peer.establish()
        types, _ = _closed_within(peer, 0.4, 3.0)
    finally:
        peer.close()
    assert types == [wire.Pdu.ABORT]
    running.wait_idle()
    (ended,) = _ended(running)
    assert (ended["outcome"], ended["abort_source"]) == ("aborted", "local")


# -- shutdown ------------------------------------------------------------------------------


def test_shutdown_sends_every_open_association_an_abort(
    start_service: Callable[..., Running], peers: list[RawPeer]
) -> None:
    """Stopping the service with associations open aborts each: every peer reads an A-ABORT, then EOF."""
    # Event engine only: pynetdicom's association thread can close the socket
    # before its DUL thread has sent the A-ABORT (the peer then sees only EOF).
    running = _start(start_service, grace=0.1)
    for _ in range(5):
        peer = RawPeer(running.port())
        peers.append(peer)
        peer.establish()
    wait_for(lambda: len(_peer_associations(running)) == 5)
    stopper = threading.Thread(target=running.service.stop)
    stopper.start()
    try:
        for peer in peers:
            peer.sock.settimeout(10)
            assert peer.read_pdu() == (wire.Pdu.ABORT, bytes(4))
            assert peer.read_pdu() is None
    finally:
        stopper.join(15)
    assert not stopper.is_alive()


def test_shutdown_closes_a_connection_that_never_sent_a_request(
    start_service: Callable[..., Running], peers: list[RawPeer]
) -> None:
    """Stopping the service closes a silent connection at once instead of leaving it to acse_timeout."""
    running = _start(start_service, grace=0.1, acse_timeout=30.0)
    peer = RawPeer(running.port())
    peers.append(peer)
    wait_for(lambda: len(_peer_associations(running)) == 1)
    started = time.monotonic()
    running.service.stop()
    types, _ = _closed_within(peer, 0.0, 3.0)
    assert types == []
    assert time.monotonic() - started < 5.0


def test_ae_shutdown_aborts_before_it_closes(
    start_service: Callable[..., Running], peers: list[RawPeer]
) -> None:
    """AE.shutdown() on the event engine sends each association's A-ABORT before closing its socket."""
    running = _start(start_service)
    listener = running.service.listeners[0]
    for _ in range(3):
        peer = RawPeer(running.port())
        peers.append(peer)
        peer.establish()
    wait_for(lambda: len(_peer_associations(running)) == 3)
    listener.ae.shutdown()
    for peer in peers:
        assert peer.read_pdu() == (wire.Pdu.ABORT, bytes(4))
        assert peer.read_pdu() is None
    assert not listener.accepting()


def test_stop_accepting_closes_the_listening_socket_promptly(start_service: Callable[..., Running]) -> None:
    """stop_accepting() ends the accept loop thread and closes the socket within a fraction of a second."""
    running = _start(start_service)
    listener = running.service.listeners[0]
    port = running.port()
    started = time.monotonic()
    listener.stop_accepting()
    assert time.monotonic() - started < 0.5
    assert not listener.accepting()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# -- many connections ---------------------------------------------------------------


def test_a_connection_that_gets_no_thread_is_rejected_2_3_2(
    start_service: Callable[..., Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When no association thread can be started the peer reads A-ASSOCIATE-RJ 2/3/2, not silence."""
    running = _start(start_service)

    def no_thread(self: EventAssociation) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(EventAssociation, "start", no_thread)
    peer = RawPeer(running.port())
    try:
        peer.send(REQUEST)
        assert peer.read_pdu() == (wire.Pdu.ASSOCIATE_RJ, bytes([0, 2, 3, 2]))
        assert peer.read_pdu() is None
    finally:
        peer.close()


@contextlib.contextmanager
def _open_files(wanted: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        skip_unless_ci(f"RLIMIT_NOFILE hard limit {hard} is below the {wanted} descriptors this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
def test_more_than_1024_connections_are_each_answered(start_service: Callable[..., Running]) -> None:
    """1,100 simultaneous peers (descriptors past 1,024) each get A-ASSOCIATE-AC or RJ 2/3/2, none silence."""
    count, limit = 1100, 700
    with _open_files(4 * count + 512):
        running = _start(start_service, max_associations=limit, listen_backlog=2048, acse_timeout=30.0)
        selector = selectors.DefaultSelector()
        answers: dict[socket.socket, bytes] = {}
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", running.port()), timeout=10)
                sock.sendall(REQUEST)
                sock.setblocking(False)
                answers[sock] = b""
                selector.register(sock, selectors.EVENT_READ)
            assert max(s.fileno() for s in answers) > 1024
            deadline = time.monotonic() + 60
            pending = set(answers)
            while pending and time.monotonic() < deadline:
                for key, _ in selector.select(1.0):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    chunk = sock.recv(4096)
                    answers[sock] += chunk
                    if not chunk or len(answers[sock]) >= 10:
                        pending.discard(sock)
                        selector.unregister(sock)
            kinds = [data[0] if data else None for data in answers.values()]
            assert kinds.count(wire.Pdu.ASSOCIATE_AC) == limit
            rejections = [
                data[7:10] for data in answers.values() if data[:1] == bytes([wire.Pdu.ASSOCIATE_RJ])
            ]
            assert rejections == [bytes([2, 3, 2])] * (count - limit)
        finally:
            selector.close()
            for sock in answers:
                with contextlib.suppress(OSError):
                    sock.setblocking(True)
                    sock.sendall(wire.ABORT)
                sock.close()
        running.wait_idle(timeout=60)
        running.service.stop()
