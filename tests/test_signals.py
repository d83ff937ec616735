"""Odd but common peer behaviour is counted and logged as what it is, with real DCMTK peers."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool, wait_for


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


@pytest.fixture
def mutual_tls(tls_files: dict[str, Path]) -> dict[str, Any]:
    return {
        "cert_file": str(tls_files["cert"]),
        "key_file": str(tls_files["key"]),
        "ca_file": str(tls_files["ca"]),
        "client_certificates": "required",
    }


def test_missing_client_certificate_is_a_certificate_failure(start_service, tls_files, mutual_tls) -> None:
    """DCMTK echoscu +tla (no client certificate) against a mutual-TLS listener is a certificate failure."""
    echoscu = require_tool("echoscu")
    running = start_service(listeners=[{"tls": mutual_tls}])
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
