"""Odd but common peer behaviour is counted and logged as what it is, with real DCMTK peers."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests import wire
from tests.conftest import make_settings, mutual_tls, require_tool, wait_for


def _ct_image(path: Path) -> Path:
    """A minimal CT image file, written with pydicom (what a modality would send)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = "Test^Patient", "42", "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\0" * 8
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_storescu_sending_an_image_is_no_accepted_context(start_service, tmp_path: Path) -> None:
    """DCMTK storescu sending a CT image is counted and logged as no_accepted_context, not as an abort."""
    storescu = require_tool("storescu")
    running = start_service()
    image = _ct_image(tmp_path / "ct.dcm")
    result = subprocess.run(
        [storescu, "--required", "-aec", "ECHOSCP", "127.0.0.1", str(running.port()), str(image)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0, "storescu cannot store to a Verification SCP"
    running.wait_idle()
    ended = [e for e in running.events("association_ended") if not e.get("self_check")]
    assert len(ended) == 1
    line = ended[0]
    assert line["outcome"] == "no_accepted_context"
    assert line["rejected_abstract_syntaxes"] == ["CT Image Storage"]
    assert line["log_level"] == "warning"
    calls = {"listener": "dicom", "calling_ae": "other"}
    assert running.sample("echo_scp_associations_total", **calls, outcome="no_accepted_context") == 1
    for outcome in ("accepted", "aborted", "released"):
        assert running.sample("echo_scp_associations_total", **calls, outcome=outcome) == 0, outcome
    for source in ("peer", "provider", "local"):
        assert running.sample("echo_scp_association_aborts_total", listener="dicom", source=source) == 0
    assert running.sample("echo_scp_associations_active", listener="dicom") == 0


def test_many_rejected_syntaxes_are_named_boundedly(start_service) -> None:
    """A peer proposing twenty storage classes is logged with eight names and a count of the rest."""
    from pynetdicom import AE, StoragePresentationContexts

    running = start_service()
    ae = AE(ae_title="MODALITY")
    ae.requested_contexts = StoragePresentationContexts[:20]
    # pynetdicom's requestor aborts when nothing was accepted.
    assoc = ae.associate("127.0.0.1", running.port(), ae_title="ECHOSCP")
    assert not assoc.accepted_contexts
    running.wait_idle()
    line = next(e for e in running.events("association_ended") if not e.get("self_check"))
    assert line["outcome"] == "no_accepted_context"
    assert len(line["rejected_abstract_syntaxes"]) == 8 and line["rejected_abstract_syntaxes_more"] == 12


def test_missing_client_certificate_is_a_certificate_failure(start_service, tls_files) -> None:
    """DCMTK echoscu +tla (no client certificate) against a mutual-TLS listener is a certificate failure."""
    echoscu = require_tool("echoscu")
    running = start_service(listeners=[{"tls": mutual_tls(tls_files)}])
    result = subprocess.run(
        [echoscu, "+tla", "+cf", str(tls_files["ca"]), "-aec", "ECHOSCP", "127.0.0.1", str(running.port())],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    failures = "echo_scp_tls_handshake_failures_total"
    wait_for(lambda: running.sample(failures, listener="dicom", reason="certificate") == 1)
    for reason in ("protocol", "closed", "timeout"):
        assert running.sample(failures, listener="dicom", reason=reason) == 0, reason


HOSTILE = {
    "garbage": b"\x47" * 256,
    "http": b"GET / HTTP/1.1\r\nHost: dicom\r\n\r\n",
    "truncated_rq": wire.associate_rq()[:40],
    "unknown_pdu": bytes([0x09, 0, 0, 0, 0, 4, 0, 0, 0, 0]),
    "non_ascii_calling_ae": wire.associate_rq(calling=b"CT\xc3\xa9".ljust(16)),
    "garbage_60k": b"\x47\x00\x00\x00\x00\x00" * 10_000,
}


@pytest.fixture
def logged_service() -> Any:
    """A daemon logging JSON through LogControl into a buffer, as `serve` does to stdout."""
    import io

    from echo_scp.daemon import Service
    from echo_scp.logs import LogControl, make_logger

    stream = io.StringIO()
    settings = make_settings(log={"level": "info", "format": "json"})
    control = LogControl(stream).install(settings.log)
    service = Service(settings, log=make_logger(), log_control=control)
    service.start()
    # Start-up's lines are written by the log writer in their own time: out
    # of the way before a test marks where its own lines begin.
    assert control.flush()
    try:
        yield service, control, stream
    finally:
        service.stop()
        control.restore()


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_connection_costs_one_warning_line(logged_service, kind: str) -> None:
    """Each hostile connection writes one warning line, with the peer and the problem, and no traceback."""
    service, control, stream = logged_service
    port = service.listeners[0].address[1]
    mark = len(stream.getvalue())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as peer:
        local_port = peer.getsockname()[1]
        with contextlib.suppress(OSError):
            peer.sendall(HOSTILE[kind])
            peer.settimeout(5)
            while peer.recv(65536):
                pass
    wait_for(lambda: not service.table.open_keys("dicom"))
    assert control.flush()
    records = [json.loads(line) for line in stream.getvalue()[mark:].splitlines() if line.strip()]
    assert [(r["level"], r["event"]) for r in records] == [("warning", "association_ended")], records
    (line,) = records
    assert (
        line["peer_host"] == "127.0.0.1" and line["peer_port"] == local_port and line["listener"] == "dicom"
    )
    assert line["outcome"] == "protocol_error" and line["problem"]
    assert "exception" not in line
    labels = {"listener": "dicom", "reason": "protocol_error"}
    assert service.registry.get_sample_value("echo_scp_connections_dropped_total", labels) == 1
    assert (
        service.registry.get_sample_value(
            "echo_scp_connections_dropped_total", {**labels, "reason": "no_request"}
        )
        == 0
    )


def test_reset_in_mid_pdu_logs_no_traceback(logged_service) -> None:
    """A peer that resets the connection in the middle of a PDU after an association costs no ERROR line."""
    service, control, stream = logged_service
    port = service.listeners[0].address[1]
    mark = len(stream.getvalue())
    peer = socket.create_connection(("127.0.0.1", port), timeout=5)
    peer.sendall(wire.associate_rq())
    assert wire.recv_pdu(peer)[0] == wire.Pdu.ASSOCIATE_AC
    peer.sendall(wire.echo_request(1)[:9])
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    wait_for(lambda: not service.table.open_keys("dicom"))
    assert control.flush()
    records = [json.loads(line) for line in stream.getvalue()[mark:].splitlines() if line.strip()]
    assert [r["level"] for r in records if r["level"] in ("error", "critical")] == []
    assert all("exception" not in r for r in records)
    ended = [r for r in records if r["event"] == "association_ended"]
    assert len(ended) == 1 and ended[0]["outcome"] == "aborted"


def test_two_c_echo_requests_in_one_p_data_get_two_responses(start_service) -> None:
    """A P-DATA-TF carrying two whole C-ECHO-RQs (PS3.8 9.3.5) gets a C-ECHO-RSP for each, in order."""
    running = start_service()
    with socket.create_connection(("127.0.0.1", running.port()), timeout=5) as peer:
        peer.sendall(wire.associate_rq())
        assert wire.recv_pdu(peer)[0] == wire.Pdu.ASSOCIATE_AC
        peer.sendall(wire.p_data(wire.pdv(wire.c_echo_rq(1)), wire.pdv(wire.c_echo_rq(2))))
        answered = []
        for _ in range(2):
            pdu_type, body = wire.recv_pdu(peer)
            assert pdu_type == wire.Pdu.P_DATA_TF
            answered.append(wire.echo_response(body))
        peer.sendall(wire.RELEASE_RQ)
        assert wire.recv_pdu(peer)[0] == wire.Pdu.RELEASE_RP
    assert answered == [(1, 0), (2, 0)]
    running.wait_idle()
    ended = [e for e in running.events("association_ended") if not e.get("self_check")]
    assert ended[0]["echoes"] == 2 and ended[0]["outcome"] == "released"


def test_backlog_refused_at_shutdown_is_counted(start_service) -> None:
    """Connections still in the listen backlog at shutdown get A-ASSOCIATE-RJ 2/3/1, and each is counted."""
    running = start_service()
    listener = running.service.listeners[0]
    server = listener.server
    release = threading.Event()
    original = server._profile

    def held() -> Any:
        release.wait(10)
        return original()

    # The accept loop reads the snapshot before it accepts: hold it so that connections queue.
    server._profile = held
    peers = [socket.create_connection(("127.0.0.1", running.port()), timeout=5) for _ in range(3)]
    stopper = threading.Thread(target=listener.stop_accepting)
    stopper.start()
    release.set()
    stopper.join(10)
    answers = []
    for peer in peers:
        with peer, contextlib.suppress(OSError):
            answers.append(wire.recv_pdu(peer))
    rejected = [body for pdu_type, body in answers if pdu_type == wire.Pdu.ASSOCIATE_RJ]
    # The accept loop may take one more connection on its way out; the rest wait in the backlog.
    assert len(rejected) >= 2, answers
    assert all(body[1:4] == bytes((2, 3, 1)) for body in rejected)
    labels = {"listener": "dicom", "result": "transient", "source": "service_provider_presentation"}
    count = running.sample("echo_scp_association_rejections_total", **labels, reason="temporary_congestion")
    assert count == len(rejected)
    (line,) = running.events("connections_refused")
    assert (line["count"], line["code"]) == (len(rejected), "2/3/1")


def test_association_that_cannot_start_is_rejected_and_counted(start_service, monkeypatch) -> None:
    """When an association thread cannot start, the peer gets A-ASSOCIATE-RJ 2/3/2 and it is counted."""
    from echo_scp.engine import EventAssociation

    running = start_service()

    def no_thread(self: Any) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(EventAssociation, "start", no_thread)
    with socket.create_connection(("127.0.0.1", running.port()), timeout=5) as peer:
        peer.sendall(wire.associate_rq())
        pdu_type, body = wire.recv_pdu(peer)
    assert pdu_type == wire.Pdu.ASSOCIATE_RJ and body[1:4] == bytes((2, 3, 2))
    labels = {"listener": "dicom", "result": "transient", "source": "service_provider_presentation"}
    wait_for(lambda: running.events("connections_refused"))
    limited = running.sample("echo_scp_association_rejections_total", **labels, reason="local_limit_exceeded")
    assert limited == 1
