"""Hostile and broken peers: after each, a good peer is served promptly and nothing leaks.

Every attack targets a listener on 127.0.0.1 and is bounded in bytes, count and time.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from echo_scp import scu
from tests import wire
from tests.conftest import Running, wait_for

AET = "ECHOSCP"
RQ = wire.associate_rq(AET, "HOSTILE")
ECHO = wire.echo_request(1)
RELEASE = wire.RELEASE_RQ
ABORT = wire.ABORT


def _rq_with(*, version: int = 1, called: bytes = AET.encode(), calling: bytes = b"HOSTILE") -> bytes:
    return wire.associate_rq(called, calling, protocol_version=version)


def _malformed_command() -> bytes:
    # A Command Group Length of 0xFFFFFFFF, then 20 bytes of junk.
    garbage = b"\x00\x00\x00\x00\x04\x00\x00\x00\xff\xff\xff\xff" + b"\x13" * 20
    return wire.p_data(wire.pdv(garbage))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _good_echo(running: Running, within: float = 3.0) -> None:
    started = time.monotonic()
    result = scu.echo_association(
        "127.0.0.1",
        running.port(),
        called_aet=AET,
        acse_timeout=within,
        dimse_timeout=within,
        connect_timeout=within,
    )
    assert result.ok
    assert time.monotonic() - started < within


def _baseline(running: Running) -> tuple[int, int]:
    running.wait_ready()
    running.wait_idle()
    return threading.active_count(), _fds()


def _no_leaks(running: Running, baseline: tuple[int, int]) -> None:
    threads, fds = baseline
    running.wait_idle(timeout=15)
    # Self-checks come and go; wait until we are back at or below where we began.
    wait_for(lambda: threading.active_count() <= threads, timeout=15)
    wait_for(lambda: _fds() <= fds, timeout=15)


def _send(port: int, *chunks: bytes, rst: bool = False, read: bool = True) -> bytes:
    """Send chunks on a fresh connection, read what comes back (bounded), then close or reset."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break
        received = b""
        if read:
            sock.settimeout(0.5)
            try:
                while len(received) < 65536:
                    data = sock.recv(4096)
                    if not data:
                        break
                    received += data
            except OSError:
                pass
        if rst:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return received


ATTACKS: dict[str, Callable[[int], Any]] = {
    "garbage": lambda port: _send(port, bytes(range(256)) * 4),
    "unknown_pdu_type": lambda port: _send(port, wire.pdu(0x09, b"\x00" * 8)),
    "truncated_rq": lambda port: _send(port, RQ[: len(RQ) // 2]),
    "gigabyte_header": lambda port: _send(port, b"\x01\x00\xff\xff\xff\xf0" + b"\x00" * 64),
    "p_data_first": lambda port: _send(port, ECHO),
    "release_first": lambda port: _send(port, RELEASE),
    "abort_first": lambda port: _send(port, ABORT),
    "protocol_version_2": lambda port: _send(port, _rq_with(version=2)),
    "unknown_abstract_syntax_only": lambda port: _send(
        port, wire.associate_rq(AET, "HOSTILE", abstract_syntax="1.2.3.4.5.6.7.8.9.0.1.2.3"), RELEASE
    ),
    "control_chars_in_ae_titles": lambda port: _send(
        port, _rq_with(called=b"ECHO\x07SCP", calling=b"\x1b[2J")
    ),
    "malformed_command_set": lambda port: _send(port, RQ, _malformed_command()),
    "abort_after_rq": lambda port: _send(port, RQ, ABORT, read=False),
    "abort_after_echo": lambda port: _send(port, RQ, ECHO, ABORT),
    "rst_before_rq": lambda port: _send(port, rst=True, read=False),
    "rst_after_rq": lambda port: _send(port, RQ, rst=True, read=False),
    "rst_after_echo": lambda port: _send(port, RQ, ECHO, rst=True),
    "rst_mid_pdu": lambda port: _send(port, RQ, ECHO[:9], rst=True),
    "fin_mid_pdu": lambda port: _send(port, RQ, ECHO[:9]),
    "release_twice": lambda port: _send(port, RQ, RELEASE, RELEASE),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_leaves_service_answering(start_service, attack: str):
    """The attack does not stop a good peer's C-ECHO, and no thread or descriptor is left behind."""
    running = start_service(listeners=[{"acse_timeout": 2.0, "network_timeout": 2.0}])
    baseline = _baseline(running)
    ATTACKS[attack](running.port())
    _good_echo(running)
    _no_leaks(running, baseline)
    assert running.service.liveness()[0]


@pytest.mark.parametrize(
    "request_pdu",
    [_rq_with(called=b"ECHO\x07SCP"), _rq_with(calling=b"\x1b[2J"), _rq_with(version=2)],
    ids=["control_char_called", "control_char_calling", "protocol_version_2"],
)
def test_bad_requests_get_an_answer(start_service, request_pdu: bytes):
    """An invalid A-ASSOCIATE-RQ is answered with A-ASSOCIATE-RJ or A-ABORT, never silence or a hang."""
    running = start_service()
    answer = _send(running.port(), request_pdu)
    assert answer[:1] in (bytes([wire.Pdu.ASSOCIATE_RJ]), bytes([wire.Pdu.ABORT])), answer[:16]


def test_many_silent_connections_do_not_starve_real_peers(start_service):
    """Two hundred connections that never send an A-ASSOCIATE-RQ do not block C-ECHOs or readiness."""
    running = start_service(listeners=[{"acse_timeout": 5.0}])
    baseline = _baseline(running)
    silent = [socket.create_connection(("127.0.0.1", running.port())) for _ in range(200)]
    try:
        for _ in range(3):
            _good_echo(running, within=5.0)
        running.service.prober.check_now()
        running.wait_ready(timeout=10)
    finally:
        for sock in silent:
            sock.close()
    _no_leaks(running, baseline)


def test_trickling_peer_does_not_block_others(start_service):
    """A peer sending its A-ASSOCIATE-RQ a byte at a time does not delay another peer."""
    running = start_service(listeners=[{"acse_timeout": 5.0}])
    baseline = _baseline(running)
    with socket.create_connection(("127.0.0.1", running.port())) as slow:
        for byte in RQ[:40]:
            slow.sendall(bytes([byte]))
            _good_echo(running) if byte == RQ[20] else None
        _good_echo(running)
    _no_leaks(running, baseline)


def test_hostile_traffic_is_counted(start_service):
    """Connections that never associate are counted and logged as closed before any request."""
    running = start_service(listeners=[{"acse_timeout": 2.0}])
    running.wait_ready()
    _send(running.port(), b"garbage!" * 4)
    running.wait_idle()
    assert running.sample("echo_scp_connections_opened_total", listener="dicom") == 1
    ended = [e for e in running.events("association_ended") if not e.get("self_check")]
    assert [e["outcome"] for e in ended] == ["closed_before_request"]


def test_pending_connection_cap_evicts_the_oldest(start_service):
    """Past max_pending_connections the longest-waiting silent connection is closed; real peers get in."""
    running = start_service(listeners=[{"max_pending_connections": 5, "request_timeout": 30.0}])
    baseline = _baseline(running)
    silent = []
    try:
        for _ in range(20):
            silent.append(socket.create_connection(("127.0.0.1", running.port())))
        wait_for(
            lambda: (
                running.sample("echo_scp_connections_dropped_total", listener="dicom", reason="pending_limit")
                >= 15
            )
        )
        silent[0].settimeout(5)
        assert silent[0].recv(1) == b"", "the oldest silent connection was closed"
        _good_echo(running)
        running.service.prober.check_now()
        running.wait_ready()
    finally:
        for sock in silent:
            sock.close()
    _no_leaks(running, baseline)
    assert running.events("connection_evicted")[0]["max_pending"] == 5


def test_request_timeout_closes_silent_connections(start_service):
    """A connection that sends no A-ASSOCIATE-RQ within request_timeout is closed and counted."""
    running = start_service(listeners=[{"request_timeout": 0.5, "acse_timeout": 30.0}])
    running.wait_ready()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", running.port())) as sock:
        sock.settimeout(10)
        assert sock.recv(1) == b""
    assert time.monotonic() - started < 5
    wait_for(
        lambda: (
            running.sample("echo_scp_connections_dropped_total", listener="dicom", reason="no_request") == 1
        )
    )
    # The ACSE timeout is back to its own value once a request arrives.
    _good_echo(running)
