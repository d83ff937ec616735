"""Shared fixtures: a running daemon on free ports, test-time certificates, peer tools."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry
from structlog.testing import LogCapture

from echo_scp.daemon import Service
from echo_scp.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"


def skip_unless_ci(reason: str) -> None:
    """Skip locally; under CI=true a missing prerequisite is a failure, not a skip."""
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Path of an external tool; skip locally when missing, fail under CI=true."""
    path = shutil.which(name)
    if path is None:
        skip_unless_ci(f"{name} is not installed (apt-get install it in .ci/run)")
    assert path is not None
    return path


def venv_tool(name: str) -> str:
    """A console script installed next to this interpreter (pip-installed peers)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    return require_tool(name)


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll until ``condition()`` is truthy; fail the test with a message if it never is."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s: {condition}")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode(), dict(exc.headers)


def http_post_json(port: int, path: str = "/-/reload") -> tuple[int, dict[str, Any]]:
    """POST an empty body to 127.0.0.1:port; (status, decoded JSON answer)."""
    import json

    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def http_ready(port: int) -> bool:
    """Whether /readyz on this HTTP port answers 200 (False while nothing listens)."""
    try:
        return http_get(port, "/readyz")[0] == 200
    except OSError:
        return False


def associate(port: int, calling: str = "ECHOSCU", called: str = "ECHOSCP", **kwargs: Any) -> Any:
    """A pynetdicom SCU association with Verification to 127.0.0.1:port (the tutorial's way)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    return pynetdicom_associate(ae, "127.0.0.1", port, ae_title=called, **kwargs)


def pynetdicom_associate(ae: Any, host: str, port: int, **kwargs: Any) -> Any:
    """``ae.associate(host, port, **kwargs)``, with pynetdicom's requestor race after a rejection settled.

    pynetdicom's requestor (``ACSE.negotiate_association``) looks at whether
    its socket is still connected only after sending the A-ASSOCIATE-RQ. When
    the A-ASSOCIATE-RJ arrives first and its DUL closes the connection (AE-4)
    before that look, it aborts an association the peer in fact rejected
    (about once in a thousand against a fast acceptor). The RJ PDU was
    received (EVT_PDU_RECV saw it), so the outcome is set as pynetdicom sets it
    when the race goes the other way: rejected, with the RJ as the acceptor's
    primitive.
    """
    from pynetdicom import evt
    from pynetdicom.pdu import A_ASSOCIATE_RJ

    rejections: list[Any] = []

    def on_pdu(event: Any) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejections.append(event.pdu)

    handlers = [*(kwargs.pop("evt_handlers", None) or []), (evt.EVT_PDU_RECV, on_pdu)]
    assoc = ae.associate(host, port, evt_handlers=handlers, **kwargs)
    if rejections and not assoc.is_rejected and not assoc.is_established:
        assoc.acceptor.primitive = rejections[0].to_primitive()
        assoc.is_aborted = False
        assoc.is_rejected = True
    return assoc


def mutual_tls(tls_files: dict[str, Path]) -> dict[str, Any]:
    """A listener's ``tls`` table: client certificates required, the self-check presenting one."""
    return {
        "cert_file": str(tls_files["cert"]),
        "key_file": str(tls_files["key"]),
        "ca_file": str(tls_files["ca"]),
        "client_certificates": "required",
        "self_check_cert_file": str(tls_files["client_cert"]),
        "self_check_key_file": str(tls_files["client_key"]),
    }


def make_settings(listeners: list[dict[str, Any]] | None = None, **top: Any) -> Settings:
    """Settings for tests: loopback, port 0, quick self-checks, POST /-/reload on, no config file.

    An ``http`` mapping is laid over those HTTP defaults rather than replacing them.
    """
    base = {"name": "dicom", "host": "127.0.0.1", "port": 0, "ae_title": "ECHOSCP"}
    items = [{**base, **item} for item in (listeners or [{}])]
    overrides: dict[str, Any] = {
        "listeners": items,
        "http": {"host": "127.0.0.1", "port": 0, "enable_reload": True, **top.pop("http", {})},
        "readiness": {"interval": 0.2, "timeout": 2.0, "max_age": 5.0},
        "shutdown_grace_period": 2.0,
    }
    overrides.update(top)
    return load_settings(REPO / "tests" / "empty.toml", environ={}, overrides=overrides)


class Running:
    """A started Service with its captured log events."""

    def __init__(self, service: Service, capture: LogCapture) -> None:
        self.service = service
        self.capture = capture

    @property
    def http_port(self) -> int:
        assert self.service.http is not None
        return self.service.http.port

    def port(self, index: int = 0) -> int:
        return self.service.listeners[index].address[1]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in list(self.capture.entries) if e.get("event") == name]

    def sample(self, name: str, **labels: str) -> float:
        value = self.service.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def wait_ready(self, timeout: float = 10.0) -> None:
        self.service.prober.check_now()
        wait_for(lambda: self.service.readiness()[0], timeout)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until every peer connection has been finalised."""
        wait_for(
            lambda: all(not self.service.table.open_keys(lst.name) for lst in self.service.listeners),
            timeout,
        )


@pytest.fixture(autouse=True)
def _close_pynetdicom_client_sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close the sockets pynetdicom's SCU opened in this test.

    pynetdicom's AssociationSocket._shutdown_socket skips close() when
    shutdown() raises (the peer closed first), so its client sockets reach the
    garbage collector open and a ResourceWarning fails some later, innocent
    test. Only client sockets made by pynetdicom are tracked; the daemon's
    accepted sockets are not, so its own leaks still fail the suite.
    """
    from pynetdicom.transport import AssociationSocket

    created: list[socket.socket] = []
    original = AssociationSocket._create_socket

    def create(self: AssociationSocket, address: Any) -> socket.socket:
        sock = original(self, address)
        created.append(sock)
        return sock

    monkeypatch.setattr(AssociationSocket, "_create_socket", create)
    yield
    for sock in created:
        sock.close()


@pytest.fixture
def start_service() -> Iterator[Callable[..., Running]]:
    """Start services on free ports; every one is stopped at the end of the test."""
    started: list[Service] = []

    def start(
        settings: Settings | None = None, *, reloader: Callable[[], Settings] | None = None, **kwargs: Any
    ) -> Running:
        capture = LogCapture()
        log = structlog.wrap_logger(None, processors=[capture])
        service = Service(
            settings or make_settings(**kwargs), registry=CollectorRegistry(), log=log, reloader=reloader
        )
        service.start()
        started.append(service)
        return Running(service, capture)

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="session")
def ca() -> Any:
    import trustme

    return trustme.CA()


# Extended key usages by name, for issue_certificate.
USAGES = ("serverAuth", "clientAuth")


def issue_certificate(
    ca: Any,
    folder: Path,
    name: str,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    usages: tuple[str, ...] = USAGES,
) -> tuple[Path, Path]:
    """A certificate for localhost/127.0.0.1/::1 signed by trustme ``ca``, as (cert, key) PEM files.

    Built with cryptography's x509 builder for what trustme cannot make: a
    chosen validity period (expired, not yet valid) and chosen extended key
    usages (trustme's certificates allow serverAuth and clientAuth).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    issuer_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    assert isinstance(issuer_key, ec.EllipticCurvePrivateKey)  # trustme's default key type
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    oids = {"serverAuth": ExtendedKeyUsageOID.SERVER_AUTH, "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH}
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(hours=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([oids[usage] for usage in usages]), critical=False)
    )
    certificate = builder.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="session")
def tls_files(ca: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1/::1 and a client certificate, as PEM files."""
    folder = tmp_path_factory.mktemp("tls")
    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    client = ca.issue_cert("echo-client.example")
    other_ca = __import__("trustme").CA()
    stranger = other_ca.issue_cert("stranger.example")
    files = {
        "ca": folder / "ca.pem",
        "cert": folder / "server.pem",
        "key": folder / "server.key",
        "client_cert": folder / "client.pem",
        "client_key": folder / "client.key",
        "stranger_cert": folder / "stranger.pem",
        "stranger_key": folder / "stranger.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    files["cert"].write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    files["client_cert"].write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))
    stranger.private_key_pem.write_to_path(str(files["stranger_key"]))
    files["stranger_cert"].write_bytes(b"".join(blob.bytes() for blob in stranger.cert_chain_pems))
    # An ordinary server certificate: serverAuth only, as most CAs issue them.
    files["server_only_cert"], files["server_only_key"] = issue_certificate(
        ca, folder, "server-only", usages=("serverAuth",)
    )
    return files


def dcmtk_storescp() -> str:
    """Path of DCMTK's storescp; skip when missing, but fail under CI=true.

    pynetdicom installs a different program with the same name into the venv,
    so each candidate on PATH must identify itself as DCMTK.
    """
    for directory in os.get_exec_path():
        path = shutil.which("storescp", path=directory)
        if path is None:
            continue
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
        if "dcmtk" in (version.stdout + version.stderr).lower():
            return path
    skip_unless_ci("DCMTK storescp not found on PATH (Debian package 'dcmtk')")
    raise AssertionError("unreachable")


@pytest.fixture
def start_storescp(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """Start DCMTK storescp on a free port and wait until it accepts connections."""
    program = dcmtk_storescp()
    processes: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> int:
        port = free_port()
        log = tmp_path / f"storescp-{port}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [program, "--output-directory", str(tmp_path), *options, str(port)],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        processes.append(process)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                pass
            try:
                # Doubles as the retry pause: returns at once if storescp died.
                process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    pytest.fail(f"storescp did not listen on {port} within 10 s: {log.read_text()}")
            else:
                pytest.fail(f"storescp exited with {process.returncode}: {log.read_text()}")

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)
