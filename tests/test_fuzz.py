"""Property-based fuzzing: mutated PDUs and command sets never take a listener down."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echo_scp import scu
from tests import wire
from tests.conftest import make_settings

AET = "ECHOSCP"
RQ = wire.associate_rq(AET, "FUZZER")
COMMAND = wire.c_echo_rq(1)
RELEASE = wire.RELEASE_RQ


def _p_data(command: bytes, control: int = wire.COMMAND | wire.LAST) -> bytes:
    return wire.p_data(wire.pdv(command, control))


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few byte flips, a cut, an insertion or a rewritten length field."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        if kind == "flip" and buf:
            index = draw(st.integers(0, len(buf) - 1))
            buf[index] = draw(st.integers(0, 255))
        elif kind == "cut" and buf:
            buf = buf[: draw(st.integers(0, len(buf) - 1))]
        elif kind == "insert":
            index = draw(st.integers(0, len(buf)))
            buf[index:index] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "length" and len(buf) >= 6:
            buf[2:6] = struct.pack(">I", draw(st.sampled_from([0, 1, 6, len(buf), 0x7FFFFFFF, 0xFFFFFFFF])))
    return bytes(buf)


def _conversation(port: int, chunks: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.settimeout(0.3)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
                sock.recv(65536)
            except OSError:
                return


@pytest.fixture(scope="module")
def fuzz_target():
    """One listener for every example: state must not carry harm from one example to the next."""
    import structlog
    from prometheus_client import CollectorRegistry
    from structlog.testing import LogCapture

    from echo_scp.daemon import Service

    service = Service(
        make_settings(listeners=[{"acse_timeout": 1.0, "network_timeout": 1.0, "dimse_timeout": 1.0}]),
        registry=CollectorRegistry(),
        log=structlog.wrap_logger(None, processors=[LogCapture()]),
    )
    service.start()
    yield service
    service.stop()


def _still_answers(service) -> None:  # type: ignore[no-untyped-def]
    result = scu.echo_association(
        "127.0.0.1", service.listeners[0].address[1], called_aet=AET, acse_timeout=5, dimse_timeout=5
    )
    assert result.ok
    assert service.liveness()[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rq=mutated(RQ))
def test_mutated_associate_requests(fuzz_target, rq: bytes):
    """Any mutation of an A-ASSOCIATE-RQ leaves the listener answering good peers."""
    _conversation(fuzz_target.listeners[0].address[1], [rq, RELEASE])
    _still_answers(fuzz_target)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=mutated(COMMAND), control=st.integers(0, 255), release=st.booleans())
def test_mutated_command_sets(fuzz_target, command: bytes, control: int, release: bool):
    """Any mutation of the C-ECHO-RQ command set, after a valid association, leaves the listener answering."""
    chunks = [RQ, _p_data(command, control)]
    if release:
        chunks.append(RELEASE)
    _conversation(fuzz_target.listeners[0].address[1], chunks)
    _still_answers(fuzz_target)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    stream=st.lists(st.sampled_from([RQ, _p_data(COMMAND), RELEASE, wire.ABORT, b"\x00" * 10]), max_size=6)
)
def test_pdu_sequences_in_any_order(fuzz_target, stream: list[bytes]):
    """Valid PDUs in any order (P-DATA before RQ, two RQs, release first) never break the listener."""
    _conversation(fuzz_target.listeners[0].address[1], stream)
    _still_answers(fuzz_target)
