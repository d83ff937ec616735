"""The daemon's own certificates: validity exported and checked, rotation on disk, set-up traps.

Certificates are made at test time: trustme for ordinary ones, cryptography's
x509 builder (tests.conftest.issue_certificate) for expired, not yet valid and
serverAuth-only ones.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509

from echo_scp import certificates, cli, metrics, scu
from echo_scp.settings import ConfigError, HttpTlsSettings, TlsSettings, load_settings
from tests.conftest import (
    free_port,
    http_get,
    issue_certificate,
    make_settings,
    mutual_tls,
    require_tool,
    wait_for,
)

UTC = datetime.UTC


def _not_after(path: Path) -> float:
    """The first certificate's notAfter in a PEM file, as cryptography reads it (the oracle)."""
    return x509.load_pem_x509_certificates(path.read_bytes())[0].not_valid_after_utc.timestamp()


def _client(ca_file: Path) -> ssl.SSLContext:
    """A TLS client context that trusts only ``ca_file``."""
    return scu.client_ssl_context(ca_file=str(ca_file))


def _echo_ok(port: int, context: ssl.SSLContext) -> bool:
    """Whether a C-ECHO over TLS to 127.0.0.1:port (for localhost) succeeds."""
    try:
        return scu.echo_association(
            "127.0.0.1",
            port,
            called_aet="ECHOSCP",
            ssl_context=context,
            server_hostname="localhost",
            acse_timeout=5,
            dimse_timeout=5,
            network_timeout=5,
        ).ok
    except scu.EchoError:
        return False


def _echo_error(port: int, context: ssl.SSLContext) -> str:
    """The client's error for a C-ECHO that must fail."""
    with pytest.raises(scu.EchoError) as caught:
        _echo_ok_or_raise(port, context)
    return str(caught.value)


def _echo_ok_or_raise(port: int, context: ssl.SSLContext) -> None:
    scu.echo_association(
        "127.0.0.1", port, called_aet="ECHOSCP", ssl_context=context, server_hostname="localhost"
    )


class CertificateSet:
    """A CA, a server certificate and key signed by it, in one folder."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        leaf = self.ca.issue_cert("localhost", "127.0.0.1")
        self.ca_file = folder / "ca.crt"
        self.cert_file = folder / "tls.crt"
        self.key_file = folder / "tls.key"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(self.key_file))

    def payload(self) -> dict[str, bytes]:
        """The keys of a Kubernetes TLS Secret with this set's files."""
        return {
            "tls.crt": self.cert_file.read_bytes(),
            "tls.key": self.key_file.read_bytes(),
            "ca.crt": self.ca_file.read_bytes(),
        }


class SecretVolume:
    """A folder laid out as the kubelet mounts a Secret, and updated the way it updates one.

    Each key is a symlink to ``..data/<key>``; ``..data`` is a symlink to a
    timestamped folder holding the files. An update writes a new folder and
    renames a new ``..data`` symlink over the old one: one atomic swap.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.versions = 0
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key

    def publish(self, payload: dict[str, bytes]) -> None:
        self.versions += 1
        version = self.root / f"..2026_01_01_00_00_{self.versions:02d}.{os.getpid()}"
        version.mkdir()
        for key, content in payload.items():
            (version / key).write_bytes(content)
        staged = self.root / "..data_tmp"
        os.symlink(version.name, staged)
        os.replace(staged, self.root / "..data")
        for key in payload:
            link = self.root / key
            if not link.is_symlink():
                os.symlink(f"..data/{key}", link)


def _tls(volume: SecretVolume, **extra: Any) -> dict[str, Any]:
    return {
        "tls": {
            "cert_file": str(volume.path("tls.crt")),
            "key_file": str(volume.path("tls.key")),
            "ca_file": str(volume.path("ca.crt")),
            **extra,
        }
    }


# ---------------------------------------------------------------------------
# Reading validity with the standard library


def test_validity_is_read_as_cryptography_reads_it(tls_files, tmp_path):
    """certificates.validities gives cryptography's dates for a leaf, a CA, and a date past 2049."""
    far, _key = issue_certificate(
        trustme.CA(),
        tmp_path,
        "far",
        not_before=datetime.datetime(2049, 12, 31, 23, 0, tzinfo=UTC),
        not_after=datetime.datetime(2050, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    for path in (tls_files["cert"], tls_files["ca"], tls_files["server_only_cert"], far):
        expected = [
            (c.not_valid_before_utc.timestamp(), c.not_valid_after_utc.timestamp())
            for c in x509.load_pem_x509_certificates(path.read_bytes())
        ]
        found = [(v.not_before, v.not_after) for v in certificates.validities(path.read_bytes())]
        assert found == expected, path.name
    # The standard library's own reading, for a CA certificate (the only kind it shows).
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.load_verify_locations(cafile=str(tls_files["ca"]))
    (ca_cert,) = probe.get_ca_certs()
    (ca_validity,) = certificates.validities(tls_files["ca"].read_bytes())
    assert ca_validity.not_after == ssl.cert_time_to_seconds(str(ca_cert["notAfter"]))


def test_a_key_beside_the_certificate_is_skipped(tls_files):
    """A PEM file holding a key and a certificate yields the certificate's dates only."""
    combined = tls_files["key"].read_bytes() + tls_files["cert"].read_bytes()
    (validity,) = certificates.validities(combined)
    assert validity.not_after == _not_after(tls_files["cert"])


@pytest.mark.parametrize(
    ("model", "exported"),
    [(TlsSettings, metrics.CERTIFICATE_ROLES), (HttpTlsSettings, metrics.HTTP_CERTIFICATE_ROLES)],
    ids=["listener", "http"],
)
def test_certificate_roles_agree_between_settings_and_metrics(model, exported):
    """The roles metrics.py exports are the settings' roles; each role's field has a warning to give."""
    assert tuple(model.ROLES) == exported
    assert set(model.ROLES.values()) == set(model.CONSEQUENCES) <= set(model.model_fields)


def test_metrics_show_not_after_per_role(start_service, tls_files):
    """/metrics has each TLS listener's not_after per role (server, ca, self_check), none for plain ones."""
    tls = mutual_tls(tls_files)
    running = start_service(listeners=[{}, {"name": "secure", "tls": tls}])
    running.wait_ready()
    name = "echo_scp_tls_certificate_not_after_timestamp_seconds"
    for role, path in (("server", "cert"), ("ca", "ca"), ("self_check", "client_cert")):
        assert running.sample(name, listener="secure", role=role) == _not_after(tls_files[path]), role
    _status, text, _headers = http_get(running.http_port, "/metrics")
    series = [line for line in text.splitlines() if line.startswith(name + "{")]
    assert len(series) == 3 and all('listener="secure"' in line for line in series)
    assert running.sample("echo_scp_tls_certificate_last_reload_successful", listener="secure") == 1


# ---------------------------------------------------------------------------
# Rotation: files replaced on disk are served without a signal


@pytest.fixture
def volume(tmp_path: Path) -> tuple[SecretVolume, CertificateSet]:
    """A Secret volume holding a first certificate set."""
    first = CertificateSet(tmp_path / "first")
    secret = SecretVolume(tmp_path / "secret")
    secret.publish(first.payload())
    return secret, first


def test_replaced_certificate_is_served_without_a_signal(start_service, volume, tmp_path):
    """After the Secret's ..data swap, clients trusting only the new CA connect, the old CA's fail."""
    secret, first = volume
    running = start_service(listeners=[_tls(secret)])
    running.wait_ready()
    assert _echo_ok(running.port(), _client(first.ca_file))
    second = CertificateSet(tmp_path / "second")
    secret.publish(second.payload())
    wait_for(lambda: _echo_ok(running.port(), _client(second.ca_file)), timeout=15)
    assert "TLS handshake failed" in _echo_error(running.port(), _client(first.ca_file))
    assert running.sample("echo_scp_tls_certificate_reloads_total", listener="dicom", result="success") == 1
    not_after = "echo_scp_tls_certificate_not_after_timestamp_seconds"
    assert running.sample(not_after, listener="dicom", role="server") == _not_after(second.cert_file)
    assert running.sample(not_after, listener="dicom", role="ca") == _not_after(second.ca_file)
    (event,) = running.events("certificate_reloaded")
    assert event["listener"] == "dicom"
    assert event["not_after"]["server"] == certificates.format_time(_not_after(second.cert_file))
    assert not running.events("reload_succeeded"), "no configuration reload took place"
    running.wait_ready()  # the self-check trusts the new certificate too


def test_broken_replacement_keeps_the_old_certificate(start_service, volume, tmp_path):
    """A replacement whose key does not match is counted and logged once; the old certificate serves on."""
    secret, first = volume
    running = start_service(listeners=[_tls(secret)])
    running.wait_ready()
    second = CertificateSet(tmp_path / "second")
    broken = {**second.payload(), "tls.key": first.key_file.read_bytes()}
    secret.publish(broken)
    failures = {"listener": "dicom", "result": "failure"}
    wait_for(lambda: running.sample("echo_scp_tls_certificate_reloads_total", **failures) == 1, timeout=15)
    assert running.sample("echo_scp_tls_certificate_last_reload_successful", listener="dicom") == 0
    (event,) = running.events("certificate_reload_failed")
    assert event["problems"] == ["listeners[0].tls: key_file does not match cert_file"]
    assert _echo_ok(running.port(), _client(first.ca_file)), "the old certificate still serves"
    assert not _echo_ok(running.port(), _client(second.ca_file))
    for _ in range(3):  # further looks at the same files: no retry, no new line
        running.service.rotate_certificates()
    assert len(running.events("certificate_reload_failed")) == 1
    assert running.sample("echo_scp_tls_certificate_reloads_total", **failures) == 1
    running.wait_ready()
    secret.publish(second.payload())  # the fixed Secret
    wait_for(lambda: _echo_ok(running.port(), _client(second.ca_file)), timeout=15)
    assert running.sample("echo_scp_tls_certificate_last_reload_successful", listener="dicom") == 1


def test_touched_files_are_not_reloaded(start_service, volume):
    """Files whose times change but whose content does not (chmod, touch) are not loaded again."""
    secret, _first = volume
    running = start_service(listeners=[_tls(secret)])
    running.wait_ready()
    os.utime(secret.path("tls.crt"))
    for _ in range(3):  # a change is acted on at the second look that sees it
        running.service.rotate_certificates()
    assert not running.events("certificate_reloaded")
    assert not running.events("certificate_reload_failed")


def test_replaced_certificate_served_by_a_process_without_sighup(volume, tmp_path):
    """`echo-scp serve` takes up a swapped Secret by itself: a client trusting only the new CA connects."""
    secret, first = volume
    port, http_port = free_port(), free_port()
    config = tmp_path / "echo-scp.toml"
    config.write_text(
        f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n'
        "[readiness]\ninterval = 0.5\ntimeout = 2.0\nmax_age = 5.0\n"
        f'[[listeners]]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[listeners.tls]\ncert_file = "{secret.path("tls.crt")}"\nkey_file = "{secret.path("tls.key")}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_SCP_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "echo_scp.cli", "serve", "--config", str(config), "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for(lambda: _echo_ok(port, _client(first.ca_file)), timeout=30)
        second = CertificateSet(tmp_path / "second")
        secret.publish(second.payload())
        wait_for(lambda: _echo_ok(port, _client(second.ca_file)), timeout=15)
        assert not _echo_ok(port, _client(first.ca_file))
        wait_for(lambda: http_get(http_port, "/readyz")[0] == 200)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert "certificate_reloaded" in events
    assert "signal_received" not in events[: events.index("certificate_reloaded")], "no SIGHUP was needed"


# ---------------------------------------------------------------------------
# The HTTP endpoint's certificate: rotated the same way


def _http_tls(volume: SecretVolume) -> dict[str, Any]:
    return {"tls": {"cert_file": str(volume.path("tls.crt")), "key_file": str(volume.path("tls.key"))}}


def _https_ok(port: int, ca_file: Path, client: CertificateSet | None = None) -> bool:
    """Whether GET /livez over HTTPS answers 200 to a client trusting only ``ca_file``, showing ``client``."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if client is not None:
        context.load_cert_chain(client.cert_file, client.key_file)
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/livez", timeout=5, context=context) as answer:
            return bool(answer.status == 200)
    except OSError:  # URLError and SSLError among them
        return False


HTTP_NOT_AFTER = "echo_scp_http_tls_certificate_not_after_timestamp_seconds"
HTTP_RELOADS = "echo_scp_http_tls_certificate_reloads_total"
HTTP_RELOADED = "echo_scp_http_tls_certificate_last_reload_successful"


def test_http_endpoint_serves_a_replaced_certificate_without_a_restart(start_service, volume, tmp_path):
    """After the Secret's ..data swap, HTTPS clients trusting only the new CA connect, the old CA's fail."""
    secret, first = volume
    running = start_service(http=_http_tls(secret))
    port = running.http_port
    assert _https_ok(port, first.ca_file)
    assert running.sample(HTTP_NOT_AFTER, role="server") == _not_after(first.cert_file)
    assert running.sample(HTTP_RELOADED) == 1 and running.sample(HTTP_RELOADS, result="success") == 0
    second = CertificateSet(tmp_path / "second")
    secret.publish(second.payload())
    wait_for(lambda: _https_ok(port, second.ca_file), timeout=15)
    assert not _https_ok(port, first.ca_file)
    assert running.sample(HTTP_RELOADS, result="success") == 1
    assert running.sample(HTTP_NOT_AFTER, role="server") == _not_after(second.cert_file)
    (event,) = running.events("certificate_reloaded")
    assert event["endpoint"] == "http" and "listener" not in event
    assert event["not_after"] == {"server": certificates.format_time(_not_after(second.cert_file))}
    assert not running.events("reload_succeeded"), "no configuration reload took place"


def test_http_endpoint_keeps_its_certificate_when_the_replacement_is_broken(start_service, volume, tmp_path):
    """A replacement whose key does not match is counted and logged once; the old certificate serves on."""
    secret, first = volume
    running = start_service(http=_http_tls(secret))
    port = running.http_port
    second = CertificateSet(tmp_path / "second")
    secret.publish({**second.payload(), "tls.key": first.key_file.read_bytes()})
    wait_for(lambda: running.sample(HTTP_RELOADS, result="failure") == 1, timeout=15)
    assert running.sample(HTTP_RELOADED) == 0
    (event,) = running.events("certificate_reload_failed")
    assert event["endpoint"] == "http"
    assert event["problems"] == ["http.tls: key_file does not match cert_file"]
    assert _https_ok(port, first.ca_file), "the old certificate still serves"
    assert not _https_ok(port, second.ca_file)
    for _ in range(3):  # further looks at the same files: no retry, no new line
        running.service.rotate_certificates()
    assert len(running.events("certificate_reload_failed")) == 1
    secret.publish(second.payload())  # the fixed Secret
    wait_for(lambda: _https_ok(port, second.ca_file), timeout=15)
    assert running.sample(HTTP_RELOADED) == 1
    assert running.sample(HTTP_RELOADS, result="success") == 1


def test_http_client_ca_replaced_on_disk_decides_who_gets_in(start_service, volume, tmp_path):
    """Under mutual TLS a replaced client_ca_file is used for new connections: the new CA's clients get in."""
    secret, first = volume
    clients = {
        "old": CertificateSet(tmp_path / "old-clients"),
        "new": CertificateSet(tmp_path / "new-clients"),
    }
    secret.publish({**first.payload(), "clients.crt": clients["old"].ca_file.read_bytes()})
    http = _http_tls(secret)
    http["tls"].update(
        client_ca_file=str(secret.path("clients.crt")), client_auth_type="RequireAndVerifyClientCert"
    )
    running = start_service(http=http)

    def admitted(client: CertificateSet) -> bool:
        return _https_ok(running.http_port, first.ca_file, client)

    assert admitted(clients["old"]) and not admitted(clients["new"])
    assert running.sample(HTTP_NOT_AFTER, role="ca") == _not_after(clients["old"].ca_file)
    secret.publish({**first.payload(), "clients.crt": clients["new"].ca_file.read_bytes()})
    wait_for(lambda: admitted(clients["new"]), timeout=15)
    assert not admitted(clients["old"])
    assert running.sample(HTTP_NOT_AFTER, role="ca") == _not_after(clients["new"].ca_file)


def test_check_config_warns_about_an_expired_http_certificate(expired, tmp_path, capsys):
    """An expired certificate on the HTTP endpoint is a warning naming http.tls.cert_file and its date."""
    cert, key = expired
    config = tmp_path / "echo-scp.toml"
    config.write_text(f'[http.tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n')
    assert cli.main(["check-config", "--config", str(config)]) == 0
    assert capsys.readouterr().err.splitlines()[1:] == [
        "echo-scp: warning: http.tls.cert_file: certificate expired on 2025-01-02 03:04:05 UTC; "
        f"HTTPS clients (Prometheus, kubelet probes) refuse it (from {config})"
    ]


# ---------------------------------------------------------------------------
# Expired and not yet valid certificates


def _config(folder: Path, cert: Path, key: Path, extra: str = "") -> Path:
    path = folder / "echo-scp.toml"
    path.write_text(
        f'[[listeners]]\nport = 2762\n[listeners.tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n{extra}'
    )
    return path


@pytest.fixture
def expired(ca, tmp_path) -> tuple[Path, Path]:
    """A server certificate from the tls_files CA that expired on 2025-01-02 03:04:05 UTC."""
    return issue_certificate(
        ca,
        tmp_path,
        "expired",
        not_before=datetime.datetime(2024, 1, 1, tzinfo=UTC),
        not_after=datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
    )


def test_check_config_warns_about_an_expired_certificate(expired, tmp_path, capsys):
    """check-config exits 0 and warns, naming the field, the date and the file that set it."""
    config = _config(tmp_path, *expired)
    assert cli.main(["check-config", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[1:] == [
        "echo-scp: warning: listeners[0].tls.cert_file: certificate expired on 2025-01-02 03:04:05 UTC; "
        f"TLS clients refuse it and /readyz fails (from {config})"
    ]


def test_check_config_warns_about_a_certificate_not_yet_valid(ca, tmp_path, capsys):
    """A certificate valid only from a future date is a warning naming that date."""
    cert, key = issue_certificate(
        ca,
        tmp_path,
        "future",
        not_before=datetime.datetime(2099, 5, 6, 7, 8, 9, tzinfo=UTC),
        not_after=datetime.datetime(2100, 1, 1, tzinfo=UTC),
    )
    config = _config(tmp_path, cert, key)
    assert cli.main(["check-config", "--config", str(config)]) == 0
    assert capsys.readouterr().err.splitlines()[1:] == [
        "echo-scp: warning: listeners[0].tls.cert_file: certificate is not valid until "
        f"2099-05-06 07:08:09 UTC; TLS clients refuse it and /readyz fails (from {config})"
    ]


def test_valid_certificates_give_no_warning(tls_files, tmp_path, capsys):
    """check-config prints no warning for certificates within their validity period."""
    config = _config(tmp_path, tls_files["cert"], tls_files["key"], f'ca_file = "{tls_files["ca"]}"\n')
    assert cli.main(["check-config", "--config", str(config)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_expired_server_certificate_makes_the_listener_unready(start_service, tls_files, expired):
    """An expired certificate: a logged warning, /readyz 503 naming the expiry; a valid one stays ready."""
    cert, key = expired
    running = start_service(
        listeners=[
            {"name": "stale", "tls": {"cert_file": str(cert), "key_file": str(key)}},
            {
                "name": "fresh",
                "tls": {"cert_file": str(tls_files["cert"]), "key_file": str(tls_files["key"])},
            },
        ]
    )
    running.service.prober.check_now()
    wait_for(lambda: running.sample("echo_scp_self_checks_total", listener="stale", result="failure") >= 1)
    wait_for(lambda: running.sample("echo_scp_self_checks_total", listener="fresh", result="success") >= 1)
    status, body, _headers = http_get(running.http_port, "/readyz")
    assert status == 503
    failing = json.loads(body)["failing"]
    assert set(failing) == {"stale"}, "the listener with a valid certificate is ready"
    assert "certificate has expired" in failing["stale"]
    assert "cert_file: certificate expired on 2025-01-02 03:04:05 UTC" in failing["stale"]
    (warning,) = running.events("config_warning")
    assert warning["warning"].startswith("listeners[0].tls.cert_file: certificate expired on 2025-01-02")
    # A real client fails the same way.
    assert "certificate has expired" in _echo_error(running.port(0), _client(tls_files["ca"]))
    assert _echo_ok(running.port(1), _client(tls_files["ca"]))


def test_dcmtk_echoscu_fails_on_the_expired_certificate(start_service, tls_files, expired):
    """DCMTK echoscu +tla refuses the expired certificate, as the self-check does; a valid one works."""
    echoscu = require_tool("echoscu")
    cert, key = expired
    running = start_service(
        listeners=[
            {"name": "stale", "tls": {"cert_file": str(cert), "key_file": str(key)}},
            {
                "name": "fresh",
                "tls": {"cert_file": str(tls_files["cert"]), "key_file": str(tls_files["key"])},
            },
        ]
    )

    def echoscu_run(port: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [echoscu, "+tla", "+cf", str(tls_files["ca"]), "-aec", "ECHOSCP", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )

    stale = echoscu_run(running.port(0))
    assert stale.returncode != 0
    assert "certificate verify failed" in stale.stderr, stale.stdout + stale.stderr
    # DCMTK says only "verify failed"; the alert it sends says why.
    failures = "echo_scp_tls_handshake_failures_total"
    wait_for(lambda: running.sample(failures, listener="stale", reason="certificate") == 1)
    details = [e["detail"] for e in running.events("tls_handshake_failed") if e["listener"] == "stale"]
    assert details and all(detail == "SSLV3_ALERT_CERTIFICATE_EXPIRED" for detail in details), details
    fresh = echoscu_run(running.port(1))
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    running.service.prober.check_now()
    wait_for(lambda: "certificate has expired" in running.service.readiness()[1]["failing"].get("stale", ""))


# ---------------------------------------------------------------------------
# Mutual TLS: the self-check's client certificate


def _mutual(tls_files: dict[str, Path], cert: str, key: str, **extra: Any) -> dict[str, Any]:
    return {
        "cert_file": str(tls_files[cert]),
        "key_file": str(tls_files[key]),
        "ca_file": str(tls_files["ca"]),
        "client_certificates": "required",
        **extra,
    }


@pytest.mark.parametrize("client_certificates", ["required", "optional"])
def test_server_only_certificate_without_self_check_certificate_is_an_error(
    tls_files, tmp_path, capsys, client_certificates
):
    """check-config exits 2 naming self_check_cert_file when the server certificate lacks clientAuth."""
    config = _config(
        tmp_path,
        tls_files["server_only_cert"],
        tls_files["server_only_key"],
        f'ca_file = "{tls_files["ca"]}"\nclient_certificates = "{client_certificates}"\n',
    )
    assert cli.main(["check-config", "--config", str(config)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "echo-scp: invalid configuration:",
        "  listeners[0].tls.self_check_cert_file: not set, so the readiness self-check presents cert_file "
        "as its client certificate, and this listener refuses it: its extended key usage does not "
        "include clientAuth; set self_check_cert_file and self_check_key_file to a client certificate "
        f"that ca_file trusts (from {config})",
    ]


def test_the_listener_really_refuses_a_server_only_client_certificate(start_service, tls_files):
    """What check-config predicts is what happens: presented to the listener, the certificate is refused."""
    tls = _mutual(
        tls_files,
        "server_only_cert",
        "server_only_key",
        self_check_cert_file=str(tls_files["client_cert"]),
        self_check_key_file=str(tls_files["client_key"]),
    )
    running = start_service(listeners=[{"tls": tls}])
    running.wait_ready()  # with a clientAuth self-check certificate, the same listener is ready
    presenting = scu.client_ssl_context(
        ca_file=str(tls_files["ca"]),
        cert_file=str(tls_files["server_only_cert"]),
        key_file=str(tls_files["server_only_key"]),
    )
    assert not _echo_ok(running.port(), presenting)
    wait_for(
        lambda: (
            running.sample("echo_scp_tls_handshake_failures_total", listener="dicom", reason="certificate")
            == 1
        )
    )


def test_plain_tls_with_a_server_only_certificate_is_fine(start_service, tls_files):
    """Without client certificates the self-check presents none, so a serverAuth-only certificate is ready."""
    tls = {"cert_file": str(tls_files["server_only_cert"]), "key_file": str(tls_files["server_only_key"])}
    running = start_service(listeners=[{"tls": tls}])
    running.wait_ready()


def test_untrusted_self_check_certificate_is_an_error(tls_files):
    """A self-check certificate that does not chain to ca_file is an error at self_check_cert_file."""
    tls = _mutual(
        tls_files,
        "cert",
        "key",
        self_check_cert_file=str(tls_files["stranger_cert"]),
        self_check_key_file=str(tls_files["stranger_key"]),
    )
    with pytest.raises(ConfigError) as caught:
        make_settings(listeners=[{"tls": tls}])
    assert caught.value.problems == [
        "listeners[0].tls.self_check_cert_file: this listener refuses it as the readiness self-check's "
        "client certificate: unable to get local issuer certificate; it must chain to ca_file and allow "
        "clientAuth"
    ]


def test_expired_self_check_certificate_is_a_warning(ca, tls_files, tmp_path):
    """An expired self-check certificate loads with a warning at its field (and fails the self-check)."""
    cert, key = issue_certificate(
        ca,
        tmp_path,
        "old-client",
        not_before=datetime.datetime(2024, 1, 1, tzinfo=UTC),
        not_after=datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    tls = _mutual(tls_files, "cert", "key", self_check_cert_file=str(cert), self_check_key_file=str(key))
    settings = load_settings(None, environ={}, first_listener={"port": 0, "tls": tls})
    assert settings.warnings == [
        "listeners[0].tls.self_check_cert_file: certificate expired on 2025-01-02 03:04:05 UTC; "
        "the listener refuses it and /readyz fails"
    ]
