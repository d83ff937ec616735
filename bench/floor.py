"""The codec floor: what pynetdicom's documented codec costs per association, in this process.

A server built on pynetdicom cannot do less, per association, than decode
the peer's A-ASSOCIATE-RQ, negotiate the presentation contexts and build and
encode its A-ASSOCIATE-AC. :func:`measure` times exactly that in a tight
loop, single-threaded, with pynetdicom's documented API only
(``pynetdicom.pdu.A_ASSOCIATE_RQ``/``A_ASSOCIATE_AC``,
``pynetdicom.pdu_primitives``, ``pynetdicom.presentation.negotiate_as_acceptor``)
on the generator's own A-ASSOCIATE-RQ (tests/wire.py) and echo-scp's default
transfer syntaxes. run.py measures it right before each server's sequential
run, so a server's CPU per association can be read as a multiple of the
floor measured on the same machine at the same moment.

The *exchange* floor adds the rest of an association's PDUs through the
same classes: decoding the P-DATA-TF carrying the C-ECHO-RQ and the
A-RELEASE-RQ, encoding the P-DATA-TF carrying the C-ECHO-RSP and the
A-RELEASE-RP (the command sets themselves are bytes from tests/wire.py: no
pydicom codec, no DIMSE layer).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import loadgen
from loadgen import wire

# echo-scp's defaults (transfer_syntax.DEFAULT_TRANSFER_SYNTAXES), by UID.
_SUPPORTED_SYNTAXES = (wire.IMPLICIT_LE, wire.EXPLICIT_LE, wire.DEFLATED_LE, wire.EXPLICIT_BE)
_OUR_CLASS_UID = "1.2.826.0.1.3680043.9.3811.3.0.4"
_OUR_VERSION_NAME = "ECHO_SCP"
_MAX_PDU = 16382


def _codec() -> tuple[Callable[[], bytes], Callable[[], bytes]]:
    """(negotiation, exchange) closures, each doing one association's codec work."""
    from pynetdicom import build_context
    from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, A_RELEASE_RP, A_RELEASE_RQ, P_DATA_TF
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        A_RELEASE,
        P_DATA,
        ImplementationClassUIDNotification,
        ImplementationVersionNameNotification,
        MaximumLengthNotification,
    )
    from pynetdicom.presentation import negotiate_as_acceptor

    request = loadgen.associate_request(loadgen.Target("127.0.0.1", 0, "ECHOSCP"))
    echo_request = wire.echo_request(1)
    echo_response = wire.c_echo_rsp(1, 0)
    supported = [build_context(wire.VERIFICATION, list(_SUPPORTED_SYNTAXES))]

    def negotiation() -> bytes:
        rq = A_ASSOCIATE_RQ()
        rq.decode(request)
        primitive = rq.to_primitive()
        results, _roles = negotiate_as_acceptor(primitive.presentation_context_definition_list, supported, {})
        accept = A_ASSOCIATE()
        accept.application_context_name = primitive.application_context_name
        accept.calling_ae_title = primitive.calling_ae_title
        accept.called_ae_title = primitive.called_ae_title
        accept.result = 0x00
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = _MAX_PDU
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = _OUR_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = _OUR_VERSION_NAME
        accept.user_information = [maximum, class_uid, version]
        accept.presentation_context_definition_results_list = results
        ac = A_ASSOCIATE_AC()
        ac.from_primitive(accept)
        return bytes(ac.encode())

    def exchange() -> bytes:
        negotiation()
        received = P_DATA_TF()
        received.decode(echo_request)
        received.to_primitive()
        answer = P_DATA()
        answer.presentation_data_value_list = [[1, bytes((wire.COMMAND | wire.LAST,)) + echo_response]]
        sent = P_DATA_TF()
        sent.from_primitive(answer)
        sent.encode()
        release = A_RELEASE_RQ()
        release.decode(wire.RELEASE_RQ)
        release.to_primitive()
        reply = A_RELEASE()
        reply.result = "affirmative"
        rp = A_RELEASE_RP()
        rp.from_primitive(reply)
        return bytes(rp.encode())

    return negotiation, exchange


def _per_call_us(work: Callable[[], Any], seconds: float, batches: int) -> float:
    """Median over ``batches`` of the process CPU time per call, in µs."""
    for _ in range(50):  # warm caches and the interpreter's specialisations
        work()
    per_batch = max(seconds / batches, 0.01)
    results = []
    for _ in range(batches):
        calls = 0
        began = time.process_time()
        while True:
            for _ in range(20):
                work()
            calls += 20
            spent = time.process_time() - began
            if spent >= per_batch:
                break
        results.append(spent / calls * 1e6)
    return statistics.median(results)


def measure(seconds: float = 0.4, batches: int = 5) -> dict[str, float]:
    """µs of CPU per association for the negotiation codec and for the whole exchange."""
    negotiation, exchange = _codec()
    return {
        "negotiation_us": _per_call_us(negotiation, seconds / 2, batches),
        "exchange_us": _per_call_us(exchange, seconds / 2, batches),
    }
