"""The HTTP endpoint's access rules: basic authentication, TLS with client certificates, reload on or off.

Every test talks to a real endpoint on a loopback port 0 with the standard
library's HTTP client (and ``ssl`` for TLS); the last one runs a real
Prometheus scraping ``/metrics`` with basic authentication over TLS.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import socket
import ssl
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from prometheus_client import CollectorRegistry

from echo_scp.health import HEALTH_PATHS, METRICS_PATH, RELOAD_PATH, Access, start_http_server
from echo_scp.http_auth import BasicAuth
from tests.conftest import REPO, free_port, make_settings, require_tool, wait_for

PASSWORD = "correct horse"
CHALLENGE = 'Basic realm="echo-scp", charset="UTF-8"'
SECURED_PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.secured.yml"


def _hash(password: str, cost: int = 4) -> str:
    """A bcrypt hash; cost 4 (the minimum) keeps tests quick, the daemon accepts any cost."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


class Answer:
    """One HTTP response: status, headers (case-insensitive) and body."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = response.headers
        self.body = response.read().decode()


def _request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> Answer:
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        body = b"" if method == "POST" else None
        conn.request(method, path, body=body, headers=headers or {})
        return Answer(conn.getresponse())
    finally:
        conn.close()


def _client_context(files: dict[str, Path], cert: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(files["ca"]))
    if cert is not None:
        context.load_cert_chain(str(files[f"{cert}_cert"]), str(files[f"{cert}_key"]))
    return context


def _failures(running: Any, reason: str) -> float:
    return float(running.sample("echo_scp_http_auth_failures_total", reason=reason))


def _tls_failures(running: Any) -> float:
    reasons = ("timeout", "closed", "protocol", "certificate")
    return sum(running.sample("echo_scp_http_tls_handshake_failures_total", reason=r) for r in reasons)


def test_metrics_need_valid_credentials_when_users_are_configured(start_service):
    """Missing or wrong credentials get 401 with a challenge, counted and logged; the right ones get 200."""
    running = start_service(http={"basic_auth_users": {"prom": _hash(PASSWORD)}})
    port = running.http_port

    missing = _request(port, METRICS_PATH)
    assert (missing.status, missing.headers["WWW-Authenticate"]) == (401, CHALLENGE)
    wrong = _request(port, METRICS_PATH, headers=_basic("prom", "wrong"))
    assert (wrong.status, wrong.headers["WWW-Authenticate"]) == (401, CHALLENGE)
    stranger = _request(port, METRICS_PATH, headers=_basic("mallory", PASSWORD))
    assert stranger.status == 401
    garbled = _request(port, METRICS_PATH, headers={"Authorization": "Basic !!!"})
    assert garbled.status == 401

    ok = _request(port, METRICS_PATH, headers=_basic("prom", PASSWORD))
    assert ok.status == 200 and "echo_scp_build_info" in ok.body
    assert _failures(running, "missing") == 1
    assert _failures(running, "invalid") == 3
    lines = running.events("http_auth_failed")
    assert [(e["reason"], e["user"], e["path"], e["peer_host"]) for e in lines] == [
        ("missing", None, "/metrics", "127.0.0.1"),
        ("invalid", "prom", "/metrics", "127.0.0.1"),
        ("invalid", "mallory", "/metrics", "127.0.0.1"),
        ("invalid", None, "/metrics", "127.0.0.1"),
    ]
    assert PASSWORD not in json.dumps(list(running.capture.entries), default=str)


def test_health_paths_stay_open_unless_protected(start_service):
    """Probes need no credentials by default; with protect_health_paths they get 401 too."""
    users = {"prom": _hash(PASSWORD)}
    running = start_service(http={"basic_auth_users": users})
    running.wait_ready()
    for path in HEALTH_PATHS:
        assert _request(running.http_port, path).status == 200, path
    guarded = start_service(http={"basic_auth_users": users, "protect_health_paths": True})
    for path in HEALTH_PATHS:
        assert _request(guarded.http_port, path).status == 401, path
    assert _request(guarded.http_port, "/livez", headers=_basic("prom", PASSWORD)).status == 200


def test_every_other_path_is_protected(start_service):
    """POST /-/reload and any unknown path need credentials first (a route added later is covered too)."""
    loads: list[int] = []

    def reloader() -> Any:
        loads.append(1)
        return make_settings(http={"basic_auth_users": users})

    users = {"prom": _hash(PASSWORD)}
    running = start_service(make_settings(http={"basic_auth_users": users}), reloader=reloader)
    port = running.http_port
    assert _request(port, RELOAD_PATH, method="POST").status == 401
    assert loads == [], "an unauthenticated POST does not reload"
    assert _request(port, RELOAD_PATH, method="POST", headers=_basic("prom", PASSWORD)).status == 200
    assert loads == [1]
    assert _request(port, "/probe?target=x").status == 401
    assert _request(port, "/nope").status == 401
    assert _request(port, "/nope", headers=_basic("prom", PASSWORD)).status == 404


def test_probe_needs_credentials(start_service):
    """/probe, which makes the daemon connect out, is refused without credentials and probes with them."""
    running = start_service(
        http={"basic_auth_users": {"prom": _hash(PASSWORD)}}, probe={"allowed_targets": ["127.0.0.0/8"]}
    )
    running.wait_ready()
    path = f"/probe?target=ECHOSCP@127.0.0.1:{running.port()}"
    refused = _request(running.http_port, path)
    assert (refused.status, refused.headers["WWW-Authenticate"]) == (401, CHALLENGE)
    assert running.sample("echo_scp_probes_total", module="default", result="success") == 0, "nothing probed"
    ok = _request(running.http_port, path, headers=_basic("prom", PASSWORD))
    assert ok.status == 200 and "probe_success 1.0" in ok.body, ok.body
    assert running.sample("echo_scp_probes_total", module="default", result="success") == 1


def test_verified_credentials_are_cached(start_service):
    """Five scrapes with the right password cost one bcrypt check; every wrong password costs one."""
    running = start_service(http={"basic_auth_users": {"prom": _hash(PASSWORD)}})
    for _ in range(5):
        assert _request(running.http_port, METRICS_PATH, headers=_basic("prom", PASSWORD)).status == 200
    assert running.service.http is not None
    auth = running.service.http.access.basic_auth
    assert auth is not None and auth.bcrypt_checks == 1
    for attempt in range(3):
        assert _request(running.http_port, METRICS_PATH, headers=_basic("prom", f"no{attempt}")).status == 401
    assert auth.bcrypt_checks == 4


def test_concurrent_bcrypt_checks_are_bounded():
    """With one bcrypt check at a time wrong passwords in a burst get 429s; a cached scraper gets 200."""
    auth = BasicAuth({"prom": _hash(PASSWORD, cost=12)}, max_concurrent=1, wait=0.01)
    server = start_http_server(
        host="127.0.0.1",
        port=0,
        registry=CollectorRegistry(),
        liveness=lambda: (True, {}),
        readiness=lambda: (True, {}),
        access=Access(basic_auth=auth),
    )
    try:
        assert _request(server.port, METRICS_PATH, headers=_basic("prom", PASSWORD)).status == 200

        def burst() -> list[Answer]:
            """Six wrong passwords and the scraper's right one at once; the six answers."""
            start = threading.Barrier(7)
            answers: list[Answer] = []
            scraper: list[Answer] = []

            def attack(n: int) -> None:
                start.wait()
                answers.append(_request(server.port, METRICS_PATH, headers=_basic("prom", f"guess{n}")))

            def scrape() -> None:
                start.wait()
                scraper.append(_request(server.port, METRICS_PATH, headers=_basic("prom", PASSWORD)))

            threads = [threading.Thread(target=attack, args=(n,)) for n in range(6)]
            threads.append(threading.Thread(target=scrape))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
            assert {a.status for a in answers} <= {401, 429}
            assert [a.status for a in scraper] == [200], "the cached scraper never waits for a turn"
            return answers

        bursts: list[tuple[list[Answer], int]] = []

        def refused_some() -> bool:
            # One burst is enough unless a busy machine runs the six one after another.
            before = auth.bcrypt_checks
            answers = burst()
            bursts.append((answers, auth.bcrypt_checks - before))
            return any(a.status == 429 for a in answers)

        wait_for(refused_some, timeout=60)
        answers, checks = bursts[-1]
        busy = [a for a in answers if a.status == 429]
        assert all(a.headers["Retry-After"] == "1" for a in busy)
        assert checks == len(answers) - len(busy), "a refused request runs no bcrypt"
        assert _request(server.port, METRICS_PATH, headers=_basic("prom", PASSWORD)).status == 200
    finally:
        server.close()


def test_reload_over_http_is_off_unless_enabled(start_service):
    """With http.enable_reload off (the default) every method on /-/reload is 403 and nothing reloads."""
    from echo_scp.settings import HttpSettings

    assert HttpSettings.model_fields["enable_reload"].default is False
    loads: list[int] = []

    def reloader() -> Any:
        loads.append(1)
        return make_settings(http={"enable_reload": False})

    running = start_service(make_settings(http={"enable_reload": False}), reloader=reloader)
    for method in ("POST", "GET", "PUT"):
        answer = _request(running.http_port, RELOAD_PATH, method=method)
        assert answer.status == 403, method
        assert "http.enable_reload" in json.loads(answer.body)["error"]
    assert loads == []
    assert running.service.reload().ok, "SIGHUP's path still reloads"
    assert loads == [1]


def test_reload_over_http_when_enabled_is_post_only(start_service):
    """With http.enable_reload on, POST reloads and every other method gets 405 with Allow: POST."""
    running = start_service(make_settings(http={"enable_reload": True}), reloader=make_settings)
    assert _request(running.http_port, RELOAD_PATH, method="POST").status == 200
    for method in ("GET", "HEAD", "PUT", "DELETE", "PATCH"):
        answer = _request(running.http_port, RELOAD_PATH, method=method)
        assert (answer.status, answer.headers["Allow"]) == (405, "POST"), method


def _https(files: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return {"tls": {"cert_file": str(files["cert"]), "key_file": str(files["key"]), **extra}}


def test_https_serves_and_plain_http_is_refused(start_service, tls_files):
    """With http.tls the endpoint speaks HTTPS; a plain-HTTP client fails the handshake, which is counted."""
    running = start_service(http=_https(tls_files))
    port = running.http_port
    assert _request(port, "/livez", context=_client_context(tls_files)).status == 200
    with pytest.raises((http.client.HTTPException, OSError)):
        _request(port, "/livez")
    wait_for(lambda: running.sample("echo_scp_http_tls_handshake_failures_total", reason="protocol") == 1)
    (line,) = running.events("http_tls_handshake_failed")
    assert (line["reason"], line["peer_host"]) == ("protocol", "127.0.0.1")


def test_silent_tls_client_does_not_block_the_endpoint(start_service, tls_files):
    """A client that never handshakes holds only its own thread, and is cut off at the deadline."""
    running = start_service(http=_https(tls_files, handshake_timeout=0.5))
    port = running.http_port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as silent:
        assert _request(port, "/livez", context=_client_context(tls_files)).status == 200
        wait_for(lambda: running.sample("echo_scp_http_tls_handshake_failures_total", reason="timeout") == 1)
        silent.settimeout(5)
        assert silent.recv(1) == b"", "the daemon closed the silent connection"


def _http_threads() -> int:
    """Threads serving an HTTP connection now (socketserver names them after process_request_thread)."""
    return sum("process_request_thread" in thread.name for thread in threading.enumerate())


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the daemon closes ``sock`` within ``seconds`` (EOF or reset)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /metrics HTTP/1.1\r\nHost: x", b"POST /-/reload HTTP/1.1\r\nContent-Length: 100\r\n\r\nab"],
    ids=["nothing", "half_the_headers", "half_a_body"],
)
def test_a_slow_or_stalled_request_is_closed_after_request_timeout(start_service, sent):
    """A connection that stops before its request is whole is closed after http.request_timeout (0.5 s)."""
    running = start_service(http={"request_timeout": 0.5, "enable_reload": True})
    before = _http_threads()
    with socket.create_connection(("127.0.0.1", running.http_port), timeout=5) as stalled:
        stalled.sendall(sent)
        assert not _closed_within(stalled, 0.3), "open before the timeout"
        assert _closed_within(stalled, 3.0), "closed after it"
    wait_for(lambda: _http_threads() == before)
    assert not running.events("reload_succeeded"), "half a reload request reloads nothing"


def test_an_idle_keep_alive_connection_is_closed_after_request_timeout(start_service):
    """A kept-alive connection is served, then closed once it sits idle for http.request_timeout."""
    running = start_service(http={"request_timeout": 0.5})
    conn = http.client.HTTPConnection("127.0.0.1", running.http_port, timeout=5)
    try:
        conn.request("GET", "/livez")
        first = conn.getresponse()
        first.read()
        sock = conn.sock
        conn.request("GET", "/livez")
        second = conn.getresponse()
        assert (first.status, second.status) == (200, 200)
        second.read()
        assert sock is not None and conn.sock is sock, "one connection, kept alive"
        assert not _closed_within(sock, 0.2)
        assert _closed_within(sock, 3.0)
    finally:
        conn.close()


@contextlib.contextmanager
def _silent_clients(port: int, count: int) -> Iterator[int]:
    """``count`` connections that send nothing, open for the block; yields the HTTP threads there were before.

    On the way out they are closed, and the endpoint must be back to those threads.
    """
    before = _http_threads()
    silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
    try:
        yield before
    finally:
        for sock in silent:
            sock.close()
    wait_for(lambda: _http_threads() == before)


def test_connections_over_max_connections_get_503_at_once_and_are_counted(start_service):
    """With http.max_connections = 3 held by silent clients a fourth gets 503 at once; then all is served."""
    running = start_service(http={"max_connections": 3, "request_timeout": 30})
    port = running.http_port
    with _silent_clients(port, 3) as before:
        wait_for(lambda: _http_threads() == before + 3)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            extra.settimeout(5)
            answer = b""
            while chunk := extra.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(b"too many HTTP connections"), answer
        assert running.sample("echo_scp_http_connections_refused_total") == 1
        assert _http_threads() == before + 3, "the refused connection never had a thread"
    running.wait_ready()
    assert _request(port, "/readyz").status == 200
    assert _request(port, "/livez").status == 200


def test_many_silent_clients_cost_at_most_max_connections_threads(start_service):
    """Two hundred clients that connect and send nothing hold at most http.max_connections (8) threads."""
    running = start_service(http={"max_connections": 8, "request_timeout": 30})
    with _silent_clients(running.http_port, 200) as before:
        wait_for(lambda: running.sample("echo_scp_http_connections_refused_total") == 192)
        assert _http_threads() == before + 8
    assert _request(running.http_port, "/livez").status == 200


def test_https_connection_that_goes_quiet_after_the_handshake_is_closed(start_service, tls_files):
    """Over TLS, a client that handshakes and then sends nothing is closed after request_timeout."""
    running = start_service(http={**_https(tls_files), "request_timeout": 0.5})
    raw = socket.create_connection(("127.0.0.1", running.http_port), timeout=5)
    with _client_context(tls_files).wrap_socket(raw, server_hostname="localhost") as quiet:
        assert not _closed_within(quiet, 0.3)
        assert _closed_within(quiet, 3.0)


def test_required_client_certificate(start_service, tls_files):
    """RequireAndVerifyClientCert: a certificate from client_ca_file gets in, none or a stranger's not."""
    tls = _https(
        tls_files, client_ca_file=str(tls_files["ca"]), client_auth_type="RequireAndVerifyClientCert"
    )
    running = start_service(http=tls)
    port = running.http_port
    ok = _request(port, METRICS_PATH, context=_client_context(tls_files, cert="client"))
    assert ok.status == 200
    for cert in (None, "stranger"):
        with pytest.raises((ssl.SSLError, http.client.HTTPException, OSError)):
            _request(port, "/livez", context=_client_context(tls_files, cert=cert))
    wait_for(lambda: _tls_failures(running) == 2)
    assert running.sample("echo_scp_http_tls_handshake_failures_total", reason="certificate") >= 1


def test_client_certificate_if_given_protects_all_but_health(start_service, tls_files):
    """VerifyClientCertIfGiven: probes need no certificate, /metrics needs a verified one (403 without)."""
    tls = _https(tls_files, client_ca_file=str(tls_files["ca"]), client_auth_type="VerifyClientCertIfGiven")
    running = start_service(http=tls)
    running.wait_ready()
    port = running.http_port
    anonymous = _client_context(tls_files)
    assert _request(port, "/readyz", context=anonymous).status == 200
    refused = _request(port, METRICS_PATH, context=anonymous)
    assert refused.status == 403
    assert _failures(running, "no_client_certificate") == 1
    assert _request(port, METRICS_PATH, context=_client_context(tls_files, cert="client")).status == 200


def test_basic_auth_and_client_certificate_are_both_required(start_service, tls_files):
    """With both configured a protected path needs the certificate and the password."""
    tls = _https(tls_files, client_ca_file=str(tls_files["ca"]), client_auth_type="VerifyClientCertIfGiven")
    running = start_service(http={**tls, "basic_auth_users": {"prom": _hash(PASSWORD)}})
    port = running.http_port
    with_cert = _client_context(tls_files, cert="client")
    assert _request(port, METRICS_PATH, context=with_cert).status == 401
    assert (
        _request(
            port, METRICS_PATH, context=_client_context(tls_files), headers=_basic("prom", PASSWORD)
        ).status
        == 403
    )
    assert _request(port, METRICS_PATH, context=with_cert, headers=_basic("prom", PASSWORD)).status == 200


def test_users_file_in_htpasswd_format(start_service, tmp_path):
    """basic_auth_users_file holds USER:HASH lines (htpasswd -B's format) and adds to basic_auth_users."""
    users = tmp_path / "users"
    users.write_text(f"# scrapers\nprom:{_hash(PASSWORD)}\n\n")
    running = start_service(
        http={"basic_auth_users_file": str(users), "basic_auth_users": {"ops": _hash("other")}}
    )
    assert _request(running.http_port, METRICS_PATH, headers=_basic("prom", PASSWORD)).status == 200
    assert _request(running.http_port, METRICS_PATH, headers=_basic("ops", "other")).status == 200
    assert _request(running.http_port, METRICS_PATH).status == 401


def test_check_config_masks_password_hashes(tmp_path, capsys):
    """check-config prints basic_auth_users with the hashes masked."""
    from echo_scp import cli

    hashed = _hash(PASSWORD)
    config = tmp_path / "echo-scp.toml"
    config.write_text(f"[http]\nbasic_auth_users = {{ prom = '{hashed}' }}\n")
    assert cli.main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert hashed not in out
    assert json.loads(out)["http"]["basic_auth_users"] == {"prom": "**********"}


@pytest.mark.peer
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_prometheus_scrapes_metrics_with_basic_auth_over_tls(start_service, tls_files, tmp_path):
    """A real Prometheus with the secured job (basic auth, TLS) scrapes /metrics; a wrong password fails."""
    prometheus = require_tool("prometheus")
    running = start_service(
        http={**_https(tls_files), "basic_auth_users": {"prometheus": _hash(PASSWORD)}},
    )
    secured = yaml.safe_load(SECURED_PROMETHEUS.read_text())
    (job,) = [j for j in secured["scrape_configs"] if j["job_name"] == "echo-scp"]
    assert job["basic_auth"]["username"] == "prometheus" and "password_file" in job["basic_auth"]
    (tmp_path / "password").write_text(PASSWORD + "\n")
    (tmp_path / "wrong").write_text("not it\n")

    def scrape_job(name: str, password_file: Path) -> dict[str, Any]:
        return {
            **job,
            "job_name": name,
            "scheme": "https",
            "tls_config": {"ca_file": str(tls_files["ca"]), "server_name": "localhost"},
            "basic_auth": {**job["basic_auth"], "password_file": str(password_file)},
            "static_configs": [{"targets": [f"127.0.0.1:{running.http_port}"]}],
        }

    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            scrape_job("echo-scp", tmp_path / "password"),
            scrape_job("echo-scp-wrong-password", tmp_path / "wrong"),
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    web = free_port()
    with subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:

            def up(job_name: str) -> float | None:
                query = urllib.parse.urlencode({"query": f'up{{job="{job_name}"}}'})
                try:
                    answer = _request(web, f"/api/v1/query?{query}")
                except OSError:
                    return None
                result = json.loads(answer.body)["data"]["result"] if answer.status == 200 else []
                return float(result[0]["value"][1]) if result else None

            wait_for(lambda: up("echo-scp") == 1.0, timeout=60)
            wait_for(lambda: up("echo-scp-wrong-password") == 0.0, timeout=60)

            def scraped_build_info() -> bool:
                query = urllib.parse.urlencode({"query": 'echo_scp_build_info{job="echo-scp"}'})
                answer = _request(web, f"/api/v1/query?{query}")
                return bool(json.loads(answer.body)["data"]["result"])

            wait_for(scraped_build_info, timeout=30)
            assert _failures(running, "invalid") >= 1
            auth = running.service.http.access.basic_auth if running.service.http else None
            assert auth is not None
            assert auth.bcrypt_checks <= 1 + _failures(running, "invalid"), "the right password is cached"
        finally:
            proc.terminate()
            _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
