"""Every setting, reloaded: applied to new associations, or reported by name as needing a restart.

Each row starts a daemon with one value, observes a behaviour with a real peer
(pynetdicom's SCU or a raw socket), reloads with the other value through
``POST /-/reload``, and observes again: the observation must change from
``before`` to ``after``. A row whose setting only a restart can change checks
that the reload names it and leaves ``echo_scp_config_last_reload_successful``
at 0. ``test_every_setting_has_a_row`` keeps the table complete when a setting
is added.
"""

from __future__ import annotations

import datetime
import io
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import bcrypt
import pytest
import trustme
from pydantic import BaseModel

from echo_scp.settings import (
    ListenerSettings,
    Settings,
)
from tests.conftest import (
    associate,
    free_port,
    http_get,
    http_post_json,
    issue_certificate,
    make_settings,
    require_tool,
    wait_for,
)

IVLE, EVLE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
# A bcrypt hash of "s3cret" (cost 4: quick to make).
HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()


# -- observations with a real peer --------------------------------------------


def _established(port: int, host: str = "127.0.0.1", **kwargs: Any) -> bool:
    """Whether pynetdicom's SCU gets an association (released again at once)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=kwargs.pop("calling", "ECHOSCU"))
    ae.add_requested_context(Verification, kwargs.pop("syntaxes", [IVLE]))
    ae.acse_timeout = 5
    tls_args = kwargs.get("tls_args")
    try:
        assoc = ae.associate(host, port, ae_title=kwargs.pop("called", "ECHOSCP"), **kwargs)
        if not assoc.is_established:
            return False
        ok = bool(assoc.send_c_echo().Status == 0)
        assoc.release()
        return ok
    finally:
        for sock in tls_args[0].opened if tls_args else []:
            sock.close()


def _closed_by_server_within(port: int, seconds: float) -> bool:
    """Whether a connection that never speaks is closed (or answered) by the daemon within ``seconds``."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(seconds)
        try:
            sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            pass
        return True


class _TrackingContext(ssl.SSLContext):
    """A client context that remembers its sockets: pynetdicom leaves a failed TLS socket unclosed."""

    opened: list[ssl.SSLSocket]

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        self.opened.append(sock)
        return sock


def _tls_args(
    files: dict[str, Path], *, ca: Path | None = None, client: tuple[Path, Path] | None = None, **options: Any
) -> tuple[ssl.SSLContext, str]:
    context = _TrackingContext(ssl.PROTOCOL_TLS_CLIENT)
    context.opened = []
    context.load_verify_locations(cafile=str(ca or files["ca"]))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    if "max_version" in options:
        context.maximum_version = options["max_version"]
    return context, "localhost"


@dataclass
class World:
    """What a row's observation can use: the running daemon and the test's files."""

    running: Any
    files: dict[str, Path]

    @property
    def port(self) -> int:
        return int(self.running.port())

    def sample(self, name: str, **labels: str) -> float:
        return float(self.running.sample(name, **labels))


@dataclass
class Row:
    """One setting: listener or top-level overrides before and after, and what a peer sees."""

    setting: str
    before: dict[str, Any]
    after: dict[str, Any]
    observe: Callable[[World], Any] | None
    expect: tuple[Any, Any] = (False, True)
    restart_only: bool = False
    top_before: dict[str, Any] = field(default_factory=dict)
    top_after: dict[str, Any] = field(default_factory=dict)


def _hold_one_then_try(w: World) -> bool:
    """With one association held open, whether a second one is established."""
    held = associate(w.port)
    assert held.is_established
    try:
        return _established(w.port)
    finally:
        held.release()


def _idle_association_aborted_within(seconds: float) -> Callable[[World], bool]:
    def observe(w: World) -> bool:
        assoc = associate(w.port)
        assert assoc.is_established
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and assoc.is_established:
            time.sleep(0.05)
        aborted = not assoc.is_established
        if not aborted:
            assoc.release()
        return aborted

    return observe


def _server_side_dimse_timeout(w: World) -> float:
    """The DIMSE timeout of the daemon's side of an association a real peer holds open."""
    assoc = associate(w.port)
    assert assoc.is_established
    try:
        keys = wait_for(lambda: w.running.service.table.open_keys("dicom"))
        return float(keys[0].dimse_timeout)
    finally:
        assoc.release()


def _first_of_two_silent_evicted(w: World) -> bool:
    with socket.create_connection(("127.0.0.1", w.port), timeout=5) as first:
        wait_for(lambda: len(w.running.service.table.open_keys("dicom")) == 1)
        with socket.create_connection(("127.0.0.1", w.port), timeout=5):
            first.settimeout(1.5)
            try:
                return first.recv(1) == b""
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True


def _backlog(w: World) -> int:
    """The listening socket's accept backlog as the kernel reports it (ss's Send-Q)."""
    out = subprocess.run(
        [require_tool("ss"), "-ltnH", f"sport = :{w.port}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.split()
    return int(out[2])


def _max_pdu_offered(w: World) -> int:
    assoc = associate(w.port)
    assert assoc.is_established
    try:
        return int(assoc.acceptor.maximum_length)
    finally:
        assoc.release()


def _new_calling_title_counted(w: World) -> tuple[bool, float]:
    ok = _established(w.port, calling="NEWCOMER")
    return ok, w.sample(
        "echo_scp_echo_requests_total", listener="dicom", calling_ae="NEWCOMER", status="success"
    )


def _engine(w: World) -> tuple[bool, str]:
    return _established(w.port), type(w.running.service.listeners[0].server).__name__


def _self_check_passes(w: World) -> bool:
    """One loopback self-check of the listener, run now (not the cached /readyz answer)."""
    service = w.running.service
    return bool(service.prober.check(service.listeners[0]))


def _self_checks_within(seconds: float, at_least: int) -> Callable[[World], bool]:
    def observe(w: World) -> bool:
        def count() -> float:
            return w.sample("echo_scp_self_checks_total", listener="dicom", result="success")

        start = count()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if count() - start >= at_least:
                return True
            time.sleep(0.05)
        return False

    return observe


LONG_STALL = {"stall_timeout": 60}
SLOW = {"default": {"timeout": 1.5}}


def _probe_self(w: World, *, with_title: bool = True) -> tuple[int, float]:
    """/probe of the daemon's own listener: (HTTP status, probe_success or -1)."""
    from prometheus_client.parser import text_string_to_metric_families

    target = f"{'ECHOSCP@' if with_title else ''}127.0.0.1:{w.port}"
    status, body, _ = http_get(w.running.http_port, f"/probe?target={target}")
    if status != 200:
        return status, -1.0
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "probe_success":
                return status, float(sample.value)
    raise AssertionError("no probe_success in the answer")


def _second_probe_status_while_one_hangs(w: World) -> int:
    """With one probe held by a port that accepts and never answers, the status of a second probe."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        first: list[int] = []
        thread = threading.Thread(
            target=lambda: first.append(http_get(w.running.http_port, f"/probe?target=127.0.0.1:{port}")[0])
        )
        thread.start()
        silent.settimeout(5)
        accepted, _ = silent.accept()
        with accepted:
            status = http_get(w.running.http_port, f"/probe?target=ECHOSCP@127.0.0.1:{w.port}")[0]
            thread.join(10)
        assert first == [200]
        return status


def _stalled_handling_turns_liveness_off_within(seconds: float) -> Callable[[World], bool]:
    """Whether /livez turns 503 within ``seconds`` while association handling is held up."""

    def observe(w: World) -> bool:
        service = w.running.service
        release = threading.Event()
        original = service.table.open

        def stuck(*args: Any, **kwargs: Any) -> Any:
            release.wait(30)
            return original(*args, **kwargs)

        service.table.open = stuck
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if not service.liveness()[0]:
                    return True
                time.sleep(0.1)
            return False
        finally:
            service.table.open = original
            release.set()

    return observe


def _tls(files: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return {"tls": {"cert_file": str(files["cert"]), "key_file": str(files["key"]), **extra}}


def _rows(files: dict[str, Path], spare: dict[str, Path]) -> list[Row]:
    """The table; ``spare`` holds a second CA's files (``ca``, ``cert``, ``key``, encrypted ``enc_key``)."""
    tls = _tls(files)
    mutual = _tls(files, ca_file=str(files["ca"]), client_certificates="required")
    client = (files["client_cert"], files["client_key"])
    return [
        Row("ae_title", {}, {"ae_title": "NEWAE"}, lambda w: _established(w.port, called="NEWAE")),
        Row(
            "transfer_syntaxes",
            {"transfer_syntaxes": [IVLE]},
            {"transfer_syntaxes": [IVLE, EVLE]},
            lambda w: (_established(w.port, syntaxes=[EVLE]), _self_check_passes(w)),
            expect=((False, True), (True, True)),
        ),
        Row(
            "require_called_ae_title",
            {"require_called_ae_title": True},
            {"require_called_ae_title": False},
            lambda w: _established(w.port, called="WHATEVER"),
        ),
        Row(
            "allowed_calling_ae_titles",
            {"allowed_calling_ae_titles": ["ECHOSCU"]},
            {"allowed_calling_ae_titles": ["ECHOSCU", "NEWCOMER"]},
            _new_calling_title_counted,
            expect=((False, 0.0), (True, 1.0)),
        ),
        Row(
            "max_associations",
            {"max_associations": 2},
            {"max_associations": 1},
            _hold_one_then_try,
            (True, False),
        ),
        Row(
            "acse_timeout",
            {"acse_timeout": 30, "request_timeout": 30},
            {"acse_timeout": 0.3, "request_timeout": 30},
            lambda w: _closed_by_server_within(w.port, 2.0),
        ),
        Row(
            "request_timeout",
            {"request_timeout": 30},
            {"request_timeout": 0.3},
            lambda w: _closed_by_server_within(w.port, 2.0),
        ),
        Row(
            "network_timeout",
            {"network_timeout": 30},
            {"network_timeout": 0.5},
            _idle_association_aborted_within(3.0),
        ),
        Row(
            "dimse_timeout", {"dimse_timeout": 30}, {"dimse_timeout": 7}, _server_side_dimse_timeout, (30, 7)
        ),
        Row(
            "max_pdu_size", {"max_pdu_size": 16382}, {"max_pdu_size": 32768}, _max_pdu_offered, (16382, 32768)
        ),
        Row("listen_backlog", {"listen_backlog": 128}, {"listen_backlog": 37}, _backlog, (128, 37)),
        Row(
            "max_pending_connections",
            {"max_pending_connections": 256},
            {"max_pending_connections": 1},
            _first_of_two_silent_evicted,
        ),
        Row(
            "engine",
            {"engine": "event"},
            {"engine": "pynetdicom"},
            _engine,
            expect=((True, "EventAssociationServer"), (True, "ThreadedAssociationServer")),
        ),
        Row(
            "name",
            {},
            {"name": "renamed"},
            lambda w: (w.running.service.listeners[0].name, _established(w.running.port())),
            expect=(("dicom", True), ("renamed", True)),
        ),
        Row(
            "host",
            {"host": "127.0.0.1"},
            {"host": "127.0.0.2"},
            lambda w: _established(w.running.port(), host="127.0.0.2"),
        ),
        Row("port", {}, {"port": "FREE"}, lambda w: w.running.port() == w.running.wanted_port),
        Row(
            "peers.ae_title",
            {"peers": [{"ae_title": "OTHER", "networks": ["127.0.0.0/8"]}]},
            {"peers": [{"ae_title": "ECHOSCU", "networks": ["127.0.0.0/8"]}]},
            lambda w: _established(w.port),
        ),
        Row(
            "peers.networks",
            {"peers": [{"ae_title": "ECHOSCU", "networks": ["10.0.0.0/8", "::1/128"]}]},
            {"peers": [{"ae_title": "ECHOSCU", "networks": ["127.0.0.1/32"]}]},
            lambda w: _established(w.port),
        ),
        Row(
            "peers.max_associations",
            {"peers": [{"ae_title": "ECHOSCU", "networks": ["127.0.0.0/8"], "max_associations": 2}]},
            {"peers": [{"ae_title": "ECHOSCU", "networks": ["127.0.0.0/8"], "max_associations": 1}]},
            _hold_one_then_try,
            (True, False),
        ),
        Row("tls", {}, tls, lambda w: _established(w.port, tls_args=_tls_args(files))),
        Row(
            "tls.client_certificates",
            tls,
            mutual,
            lambda w: (
                _established(w.port, tls_args=_tls_args(files)),
                _established(w.port, tls_args=_tls_args(files, client=client)),
            ),
            expect=((True, True), (False, True)),
        ),
        Row(
            "tls.ca_file",
            mutual,
            # With a self-check certificate from that CA: the listener would
            # refuse the server certificate, which is a configuration error.
            _tls(
                files,
                ca_file=str(spare["ca"]),
                client_certificates="required",
                self_check_cert_file=str(spare["cert"]),
                self_check_key_file=str(spare["key"]),
            ),
            lambda w: _established(w.port, tls_args=_tls_args(files, client=(spare["cert"], spare["key"]))),
        ),
        Row(
            "tls.min_version",
            _tls(files, min_version="1.2"),
            _tls(files, min_version="1.3"),
            lambda w: _established(w.port, tls_args=_tls_args(files, max_version=ssl.TLSVersion.TLSv1_2)),
            expect=(True, False),
        ),
        Row(
            "tls.handshake_timeout",
            _tls(files, handshake_timeout=30),
            _tls(files, handshake_timeout=0.3),
            lambda w: _closed_by_server_within(w.port, 2.0),
        ),
        Row(
            "tls.cert_file, tls.key_file, tls.key_password",
            tls,
            {
                "tls": {
                    "cert_file": str(spare["cert"]),
                    "key_file": str(spare["enc_key"]),
                    "key_password": "s3cret",
                }
            },
            lambda w: _established(w.port, tls_args=_tls_args(files, ca=spare["ca"])),
        ),
        Row(
            "tls.self_check_cert_file, tls.self_check_key_file",
            mutual,
            # An expired certificate from the trusted CA: it loads (with a
            # warning), and the self-check presenting it fails. One from an
            # untrusted CA would be refused as a configuration error.
            _tls(
                files,
                ca_file=str(files["ca"]),
                client_certificates="required",
                self_check_cert_file=str(spare["expired_cert"]),
                self_check_key_file=str(spare["expired_key"]),
            ),
            _self_check_passes,
            expect=(True, False),
        ),
        Row(
            "readiness.interval",
            {},
            {},
            _self_checks_within(1.5, 4),
            top_before={"readiness": {"interval": 30, "timeout": 2, "max_age": 60}, "liveness": LONG_STALL},
            top_after={"readiness": {"interval": 0.1, "timeout": 2, "max_age": 60}, "liveness": LONG_STALL},
        ),
        Row(
            "readiness.timeout, readiness.max_age",
            {},
            {},
            lambda w: (w.running.service.prober.settings.timeout, w.running.service.prober.settings.max_age),
            expect=((2.0, 60.0), (1.0, 45.0)),
            top_before={"readiness": {"interval": 0.2, "timeout": 2, "max_age": 60}},
            top_after={"readiness": {"interval": 0.2, "timeout": 1, "max_age": 45}},
        ),
        Row(
            "liveness.stall_timeout",
            {},
            {},
            _stalled_handling_turns_liveness_off_within(6.0),
            top_before={"liveness": {"stall_timeout": 60}},
            top_after={"liveness": {"stall_timeout": 3}},
        ),
        Row(
            "log.queue_size",
            {},
            {},
            None,
            restart_only=True,
            top_after={"log": {"queue_size": 5}},
        ),
        Row(
            "probe.allowed_targets",
            {},
            {},
            lambda w: _probe_self(w)[0],
            expect=(403, 200),
            top_before={"probe": {"allowed_targets": []}},
            top_after={"probe": {"allowed_targets": ["127.0.0.0/8"]}},
        ),
        Row(
            "probe.modules (every module setting is read per probe)",
            {},
            {},
            lambda w: _probe_self(w, with_title=False)[1],
            expect=(0.0, 1.0),
            top_before={
                "probe": {
                    "allowed_targets": ["127.0.0.0/8"],
                    "modules": {"default": {"called_ae_title": "WRONG"}},
                }
            },
            top_after={
                "probe": {
                    "allowed_targets": ["127.0.0.0/8"],
                    "modules": {"default": {"called_ae_title": "ECHOSCP"}},
                }
            },
        ),
        Row(
            "probe.max_concurrent",
            {},
            {},
            _second_probe_status_while_one_hangs,
            expect=(200, 429),
            top_before={
                "probe": {"allowed_targets": ["127.0.0.0/8"], "max_concurrent": 4, "modules": SLOW},
            },
            top_after={"probe": {"allowed_targets": ["127.0.0.0/8"], "max_concurrent": 1, "modules": SLOW}},
        ),
        Row(
            "http.port",
            {},
            {},
            None,
            restart_only=True,
            top_after={"http": {"host": "127.0.0.1", "port": "FREE"}},
        ),
        Row(
            "http.host",
            {},
            {},
            None,
            restart_only=True,
            top_after={"http": {"host": "127.0.0.2", "port": 0}},
        ),
        Row(
            "http.enabled",
            {},
            {},
            None,
            restart_only=True,
            top_after={"http": {"enabled": False, "host": "127.0.0.1", "port": 0}},
        ),
        Row(
            "http.enable_reload",
            {},
            {},
            None,
            restart_only=True,
            top_after={"http": {"enable_reload": False}},
        ),
        Row(
            "http.basic_auth_users",
            {},
            {},
            None,
            restart_only=True,
            top_after={"http": {"basic_auth_users": {"prom": HASH}}},
        ),
        Row(
            "http.basic_auth_users_file",
            {},
            {},
            None,
            restart_only=True,
            top_after={"http": {"basic_auth_users_file": str(spare["users"])}},
        ),
        Row(
            "http.protect_health_paths",
            {},
            {},
            None,
            restart_only=True,
            top_after={"http": {"protect_health_paths": True}},
        ),
        Row(
            "http.request_timeout",
            {},
            {},
            None,
            restart_only=True,
            top_after={"http": {"request_timeout": 3.0}},
        ),
        Row(
            "http.max_connections",
            {},
            {},
            None,
            restart_only=True,
            top_after={"http": {"max_connections": 5}},
        ),
        Row(
            "http.tls (every key of the table; reported as one)",
            {},
            {},
            None,
            restart_only=True,
            top_after={"http": {"tls": {"cert_file": str(files["cert"]), "key_file": str(files["key"])}}},
        ),
        Row(
            "log.level (embedded: the host application owns logging)",
            {},
            {},
            None,
            restart_only=True,
            top_after={"log": {"level": "debug"}},
        ),
    ]


# Settings covered elsewhere, with the test that covers them.
COVERED_ELSEWHERE = {
    "log.level": "test_log_settings_are_applied_by_a_reload",
    "log.format": "test_log_settings_are_applied_by_a_reload",
    "shutdown_grace_period": "test_shutdown_grace_period_is_applied_by_a_reload",
}


@pytest.fixture(scope="module")
def spare(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> dict[str, Path]:
    """A second CA with a certificate, its key, the key encrypted with 's3cret', a users file; and
    an expired certificate from the first CA (``ca``, which issued tls_files)."""
    from cryptography.hazmat.primitives import serialization

    folder = tmp_path_factory.mktemp("spare")
    expired = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    expired_files = issue_certificate(
        ca, folder, "expired", not_before=expired - datetime.timedelta(days=30), not_after=expired
    )
    other = trustme.CA()
    cert = other.issue_cert("localhost", "127.0.0.1")
    names = {"ca": "ca.pem", "cert": "c.pem", "key": "c.key", "enc_key": "e.key", "users": "users"}
    files = {k: folder / v for k, v in names.items()}
    files["users"].write_text(f"prom:{HASH}\n")
    files["expired_cert"], files["expired_key"] = expired_files
    other.cert_pem.write_to_path(str(files["ca"]))
    files["cert"].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(files["key"]))
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    files["enc_key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    return files


def _resolve(value: Any, port: int) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, port) for k, v in value.items()}
    return port if value == "FREE" else value


def _row_ids() -> list[str]:
    return [row.setting for row in _rows({k: Path() for k in _FILE_KEYS}, {k: Path() for k in _SPARE_KEYS})]


_FILE_KEYS = ("ca", "cert", "key", "client_cert", "client_key", "stranger_cert", "stranger_key")
_SPARE_KEYS = ("ca", "cert", "key", "enc_key", "users", "expired_cert", "expired_key")


@pytest.mark.parametrize("index", range(len(_row_ids())), ids=_row_ids())
def test_reload_row(index: int, start_service, tls_files, spare) -> None:
    """The row's setting changes what a real peer sees, or the reload names it as needing a restart."""
    row = _rows(tls_files, spare)[index]
    new_port = free_port()
    state: dict[str, Any] = {"listener": row.before, "top": row.top_before}

    def load() -> Settings:
        return make_settings(
            listeners=[_resolve(state["listener"], new_port)], **_resolve(state["top"], new_port)
        )

    running = start_service(load(), reloader=load)
    running.wanted_port = new_port
    world = World(running, tls_files)
    if row.observe is not None:
        assert row.observe(world) == row.expect[0], f"{row.setting}: before the reload"
    state["listener"] = {"port": running.port(), **row.after} if "port" not in row.after else row.after
    state["top"] = row.top_after
    http_port = running.http_port
    status, body = http_post_json(http_port)
    if row.restart_only:
        names = [part.strip().split(" ")[0] for part in row.setting.split(",")]
        assert (status, body) == (200, {"status": "restart_required", "restart_required": names})
        assert running.sample("echo_scp_config_last_reload_successful") == 0
        assert running.events("reload_needs_restart")[-1]["restart_required"] == names
        assert running.service.http is not None and running.service.http.port == http_port, "HTTP stays put"
        return
    assert (status, body) == (200, {"status": "reloaded"}), row.setting
    assert running.sample("echo_scp_config_last_reload_successful") == 1
    assert row.observe is not None
    assert row.observe(world) == row.expect[1], f"{row.setting}: after the reload"


# Tables a reload reports as one name (restart-only as a whole).
WHOLE_TABLES = {"http.tls"}


def _leaf_settings(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted names of a model's settings, nested sections (``tls``, ``http``...) expanded."""
    names: set[str] = set()
    for name, info in model.model_fields.items():
        if name == "listeners":
            continue  # the listener settings are listed on their own
        nested = [t for t in (info.annotation, *get_args(info.annotation)) if _is_model(t)]
        if nested and prefix + name not in WHOLE_TABLES:
            names |= _leaf_settings(nested[0], f"{prefix}{name}.")
        else:
            names.add(prefix + name)
    return names


def _is_model(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def test_every_setting_has_a_row() -> None:
    """Each listener and global setting appears in the reload table or names the test that covers it."""
    covered: set[str] = set(COVERED_ELSEWHERE)
    for setting in _row_ids():
        covered |= {part.strip().split(" ")[0] for part in setting.split(",")}
    wanted = _leaf_settings(ListenerSettings) | _leaf_settings(Settings)
    # A row for a section ("probe.modules") covers every setting in it.
    missing = {name for name in wanted - covered if not any(name.startswith(f"{c}.") for c in covered)}
    assert missing == set(), "settings with no reload row"


def test_log_settings_are_applied_by_a_reload(tls_files) -> None:
    """A reload from info to debug and from JSON to console changes what the daemon writes, at once."""
    from echo_scp.daemon import Service
    from echo_scp.logs import LogControl, make_logger

    stream = io.StringIO()
    state = {"log": {"level": "info", "format": "json"}}

    def load() -> Settings:
        return make_settings(log=state["log"])

    control = LogControl(stream).install(load().log)
    service = Service(load(), log=make_logger(), reloader=load, log_control=control)
    try:
        service.start()
        port = service.listeners[0].address[1]
        assert _established(port)
        assert control.flush()
        before = stream.getvalue()
        assert '"event": "association_ended"' in before and "association_requested" not in before
        state["log"] = {"level": "debug", "format": "console"}
        result = service.reload()
        assert result.complete, result
        mark = len(stream.getvalue())
        assert _established(port)
        assert control.flush()
        after = stream.getvalue()[mark:]
        assert "association_requested" in after, "debug events appear"
        assert '"event":' not in after, "the console renderer replaced JSON"
    finally:
        service.stop()
        control.restore()


def test_shutdown_grace_period_is_applied_by_a_reload(start_service) -> None:
    """After a reload shortens the grace period, a stop aborts a held association after the new period."""
    state = {"grace": 30.0}

    def load() -> Settings:
        return make_settings(shutdown_grace_period=state["grace"])

    running = start_service(load(), reloader=load)
    held = associate(running.port())
    assert held.is_established
    state["grace"] = 0.5
    assert running.service.reload().complete
    started = time.monotonic()
    running.service.stop()
    assert time.monotonic() - started < 10, "the old 30 s grace period would still be running"
    assert running.events("aborting_associations")[0]["count"] == 1
    wait_for(lambda: not held.is_established)


def test_listeners_leave_pynetdicoms_process_wide_log_level_alone(start_service) -> None:
    """Starting listeners leaves pynetdicom's process-wide LOG_HANDLER_LEVEL as the host set it."""
    from pynetdicom import _config

    assert _config.LOG_HANDLER_LEVEL == "standard"
    running = start_service(make_settings())
    assert _established(running.port())
    assert _config.LOG_HANDLER_LEVEL == "standard"
