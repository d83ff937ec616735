"""The HTTP endpoint: liveness, readiness and Prometheus metrics.

Paths (kept here, and imported by the deployment tests, so manifests and code
cannot drift apart):

* ``/livez`` and ``/-/healthy``: 200 while every listener's accept loop runs;
* ``/readyz`` and ``/-/ready``: 200 once every listener answered a loopback
  C-ECHO recently, 503 with a JSON body naming the failing listeners otherwise
  and while draining;
* ``/metrics``: Prometheus text format, or OpenMetrics when ``Accept`` asks;
* ``POST /-/reload``: re-read the configuration (200, or 500 with the problems);
  other methods get 405. A request body is read and ignored; one over
  ``MAX_BODY`` gets 413. Without a reload callback (``http.enable_reload``
  off) every method gets 403.
* ``/probe?target=...&module=...``: C-ECHO another DICOM node, answered as
  Prometheus metrics (see ``probe.py``), when the daemon passes a handler.

Access (:class:`Access`), in the conventions of the Prometheus
exporter-toolkit: optional TLS, with client certificates verified if given or
required, and optional basic authentication against bcrypt hashes
(``http_auth.py``). When either authenticates, every path is protected except
the health paths (unless ``protect_health_paths``): ``/metrics``, ``/probe``,
``/-/reload`` and any route added later, without asking. Each configured
method is required on a protected path; failures get 401 with
``WWW-Authenticate`` (429 when bcrypt checks are busy; 403 when a path needs a
client certificate and the connection has none). The TLS handshake runs on
the request's own thread with a deadline, so a client that connects and sends
nothing cannot stall the accept loop.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from echo_scp.http_auth import REALM, BasicAuth, Verdict

if TYPE_CHECKING:
    from echo_scp.settings import HttpSettings

LIVENESS_PATHS = ("/livez", "/-/healthy")
READINESS_PATHS = ("/readyz", "/-/ready")
HEALTH_PATHS = (*LIVENESS_PATHS, *READINESS_PATHS)
METRICS_PATH = "/metrics"
RELOAD_PATH = "/-/reload"
PROBE_PATH = "/probe"
# Header names that str.capitalize() would misspell.
_HEADER_NAMES = {"www_authenticate": "WWW-Authenticate", "retry_after": "Retry-After"}

# Bodies are read and dropped (none of the endpoints takes one), up to this size.
MAX_BODY = 1 << 20
# The whole answer to a connection over http.max_connections, sent without reading its request.
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 25\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n\r\ntoo many HTTP connections"
)

Check = Callable[[], tuple[bool, dict[str, Any]]]
# (query string, request headers with lower-case names) -> (status, content type, body)
ProbeHandler = Callable[[str, Mapping[str, str]], tuple[int, str, bytes]]
# (reason, path, claimed user or None, client address)
AuthFailed = Callable[[str, str, str | None, str], None]
# (reason: timeout|closed|protocol|certificate, detail, client address)
TlsFailed = Callable[[str, str, str], None]


@dataclass(frozen=True)
class Access:
    """Who may use which path; the default lets everyone use everything (no authentication configured)."""

    basic_auth: BasicAuth | None = None
    # Protected paths need a verified client certificate (VerifyClientCertIfGiven;
    # RequireAndVerifyClientCert needs none of this: the handshake demands one).
    client_certificate: bool = False
    protect_health_paths: bool = False

    @property
    def authenticates(self) -> bool:
        return self.basic_auth is not None or self.client_certificate

    def protects(self, path: str) -> bool:
        """Whether ``path`` needs authentication: all but the health paths, or all of them."""
        return self.authenticates and (self.protect_health_paths or path not in HEALTH_PATHS)

    def check(
        self, path: str, authorization: str | None, peer_certificate: bool
    ) -> tuple[Verdict, str | None]:
        """The verdict on a request to ``path`` and why it failed (a ``metrics.HTTP_AUTH_FAILURES`` value)."""
        if not self.protects(path):
            return Verdict.OK, None
        if self.client_certificate and not peer_certificate:
            return Verdict.INVALID, "no_client_certificate"
        if self.basic_auth is not None:
            verdict = self.basic_auth.check(authorization)
            if verdict is not Verdict.OK:
                return verdict, verdict.value
        return Verdict.OK, None


def access_for(settings: HttpSettings) -> Access:
    """The access rules of these HTTP settings; reads basic_auth_users_file (ValueError if it is bad)."""
    users = settings.users()
    tls = settings.tls
    return Access(
        basic_auth=BasicAuth(users) if users else None,
        client_certificate=tls is not None and tls.client_auth_type == "VerifyClientCertIfGiven",
        protect_health_paths=settings.protect_health_paths,
    )


class _Server(ThreadingHTTPServer):
    # The TLS context each new connection is wrapped with (None: plain HTTP); swapped whole, never edited.
    ssl_context: ssl.SSLContext | None = None


class HealthServer:
    """A running HTTP endpoint; ``close()`` stops it."""

    def __init__(self, httpd: _Server, thread: threading.Thread, access: Access) -> None:
        self._httpd = httpd
        self._thread = thread
        self.access = access

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def use_ssl_context(self, context: ssl.SSLContext) -> None:
        """Hand connections accepted from now on ``context`` (renewed certificates); open ones keep theirs.

        Raises ValueError on an endpoint started without TLS: that takes a restart.
        """
        if self._httpd.ssl_context is None:
            raise ValueError("the HTTP endpoint serves plain HTTP; TLS needs a restart")
        self._httpd.ssl_context = context

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=1.0)


def start_http_server(
    *,
    host: str,
    port: int,
    registry: CollectorRegistry,
    liveness: Check,
    readiness: Check,
    reload: Check | None = None,
    access: Access | None = None,
    ssl_context: ssl.SSLContext | None = None,
    handshake_timeout: float = 10.0,
    on_auth_failure: AuthFailed | None = None,
    on_tls_failure: TlsFailed | None = None,
    probe: ProbeHandler | None = None,
    request_timeout: float = 10.0,
    max_connections: int = 64,
    on_refused: Callable[[], None] | None = None,
) -> HealthServer:
    """Bind and serve in a daemon thread; raises OSError if the port is taken.

    ``reload`` None means reloading over HTTP is off (403). With
    ``ssl_context`` every connection is TLS, handshaken on its own thread
    within ``handshake_timeout`` seconds. Each connection has a thread of its
    own, at most ``max_connections`` at once: one more is answered 503 without
    being read (closed, with TLS) and ``on_refused`` is told. A connection
    gets ``request_timeout`` seconds for each read and write, so one that
    sends a request slowly, stops half-way or sits idle between requests is
    closed instead of holding its thread.
    """
    rules = access or Access()

    from echo_scp.metrics import WithoutCreated

    exposed: Any = WithoutCreated(registry)

    class Handler(BaseHTTPRequestHandler):
        server_version = "echo-scp"
        protocol_version = "HTTP/1.1"
        # StreamRequestHandler gives the connection this timeout (after any TLS handshake).
        timeout = request_timeout

        def do_GET(self) -> None:
            if self.authorized():
                self._respond(head=False)

        def do_HEAD(self) -> None:
            if self.authorized():
                self._respond(head=True)

        def do_POST(self) -> None:
            if not self.authorized() or not self._discard_body():
                return
            path = self.path.split("?", 1)[0]
            if path == RELOAD_PATH and reload is not None:
                ok, body = reload()
                self._json(200 if ok else 500, body, False)
            else:
                self._not_allowed()

        def do_PUT(self) -> None:
            if self.authorized() and self._discard_body():
                self._not_allowed()

        do_DELETE = do_PATCH = do_PUT

        def authorized(self) -> bool:
            """Apply the access rules to this request; False after answering 401 (or 429).

            Every ``do_*`` method calls it first, so any path, including one
            added later, is protected unless it is a health path.
            """
            path = self.path.split("?", 1)[0]
            authorization = self.headers.get("Authorization")
            certificate = isinstance(self.connection, ssl.SSLSocket) and bool(self.connection.getpeercert())
            verdict, reason = rules.check(path, authorization, certificate)
            if verdict is Verdict.OK:
                return True
            if on_auth_failure is not None and reason is not None:
                credentials = parse_user(authorization)
                with contextlib.suppress(Exception):
                    on_auth_failure(reason, path, credentials, str(self.client_address[0]))
            # A body we will not read would be taken for the next request.
            if self.headers.get("Content-Length", "0").strip() not in ("", "0") or self.headers.get(
                "Transfer-Encoding"
            ):
                self.close_connection = True
            closing = {"connection": "close"} if self.close_connection else {}
            head = self.command == "HEAD"
            if verdict is Verdict.BUSY:
                self._json(429, {"error": "too many authentication checks at once"}, head, retry_after="1")
            elif reason == "no_client_certificate":
                # Not 401: that promises a WWW-Authenticate challenge the client could answer.
                self._json(403, {"error": "a verified client certificate is required"}, head, **closing)
            else:
                challenge = f'Basic realm="{REALM}", charset="UTF-8"'
                self._json(401, {"error": "unauthorized"}, head, www_authenticate=challenge, **closing)
            return False

        def _discard_body(self) -> bool:
            """Read (and ignore) the request body so a keep-alive connection stays in step.

            Returns False after answering when the body cannot be read: too
            large (413), chunked (411: no endpoint here takes a body), or a
            malformed length (400); the connection is then closed.
            """
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                return self._refuse(411, "a body must come with Content-Length")
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                return self._refuse(400, "malformed Content-Length")
            if length > MAX_BODY:
                return self._refuse(413, f"request body over {MAX_BODY} bytes")
            while length > 0:
                chunk = self.rfile.read(min(length, 65536))
                if not chunk:
                    break
                length -= len(chunk)
            return True

        def _refuse(self, code: int, error: str) -> bool:
            self.close_connection = True
            self._json(code, {"error": error}, False, connection="close")
            return False

        def _respond(self, *, head: bool) -> None:
            path = self.path.split("?", 1)[0]
            if path == RELOAD_PATH:
                self._reload_refused(head)
            elif path in LIVENESS_PATHS:
                ok, body = liveness()
                self._json(200 if ok else 503, body, head)
            elif path in READINESS_PATHS:
                ok, body = readiness()
                self._json(200 if ok else 503, body, head)
            elif path == METRICS_PATH:
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(200, content_type, encoder(exposed), head)
            elif path == PROBE_PATH and probe is not None:
                query = self.path.partition("?")[2]
                headers = {name.lower(): value for name, value in self.headers.items()}
                self._send(*probe(query, headers), head)
            else:
                self._json(404, {"error": "not found"}, head)

        def _reload_refused(self, head: bool) -> None:
            if reload is None:
                error = "reload over HTTP is off (http.enable_reload); SIGHUP reloads"
                self._json(403, {"error": error}, head)
            else:
                self._json(405, {"error": "method not allowed"}, head, allow="POST")

        def _not_allowed(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == RELOAD_PATH:
                self._reload_refused(False)
            elif path in (*LIVENESS_PATHS, *READINESS_PATHS, METRICS_PATH) or (
                path == PROBE_PATH and probe is not None
            ):
                self._json(405, {"error": "method not allowed"}, False, allow="GET, HEAD")
            else:
                self._json(404, {"error": "not found"}, False)

        def _json(self, code: int, body: dict[str, Any], head: bool, **headers: str) -> None:
            self._send(code, "application/json", json.dumps(body).encode() + b"\n", head, **headers)

        def _send(self, code: int, content_type: str, data: bytes, head: bool, **headers: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            for name, value in headers.items():
                self.send_header(_HEADER_NAMES.get(name) or name.capitalize(), value)
            self.end_headers()
            if not head:
                # The prober may go away before reading the answer.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds would drown the association log

    slots = threading.BoundedSemaphore(max_connections)

    class Server(_Server):
        daemon_threads = True
        address_family = _family(host)
        # Connections arriving while all slots are busy wait in the backlog
        # only as long as the accept loop takes to refuse them.
        request_queue_size = 128

        def process_request(self, request: Any, client_address: Any) -> None:
            # On the accept loop: a thread only for a connection with a slot.
            if not slots.acquire(blocking=False):
                # Counted first: once the peer reads the answer, the count shows it.
                if on_refused is not None:
                    with contextlib.suppress(Exception):
                        on_refused()
                if self.ssl_context is None:
                    with contextlib.suppress(OSError):
                        request.send(_BUSY, socket.MSG_DONTWAIT)
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                slots.release()
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                slots.release()

        def finish_request(self, request: Any, client_address: Any) -> None:
            # Runs on the request's own thread (ThreadingMixIn), so a slow or
            # silent TLS client holds only its own thread, never the accept loop.
            # Read once: a renewal swapping the context meanwhile changes the next connection's.
            context = self.ssl_context
            if context is None:
                super().finish_request(request, client_address)
                return
            tls = _handshake(context, request, handshake_timeout, str(client_address[0]), on_tls_failure)
            if tls is None:
                return
            try:
                super().finish_request(tls, client_address)
            finally:
                with contextlib.suppress(OSError):
                    tls.close()

        def handle_error(self, request: Any, client_address: Any) -> None:
            # socketserver prints a traceback to stderr for any client that
            # misbehaves; a probe hanging up early is not worth one.
            pass

    httpd = Server((host, port), Handler)
    httpd.ssl_context = ssl_context
    thread = threading.Thread(target=httpd.serve_forever, name="echo-scp-http", daemon=True)
    thread.start()
    return HealthServer(httpd, thread, rules)


def _family(host: str) -> Any:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def parse_user(authorization: str | None) -> str | None:
    """The user name a basic ``Authorization`` header claims, for the log line (never the password)."""
    from echo_scp.http_auth import parse_basic

    credentials = parse_basic(authorization)
    return credentials[0] if credentials else None


def _handshake(
    context: ssl.SSLContext, sock: socket.socket, timeout: float, client: str, on_failure: TlsFailed | None
) -> ssl.SSLSocket | None:
    """Wrap and handshake an accepted socket within ``timeout``; None (socket closed) if it fails."""
    try:
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except OSError:
        sock.close()
        return None
    tls.settimeout(timeout)
    try:
        tls.do_handshake()
        # As a plain connection: the request handler reads without a deadline.
        tls.settimeout(None)
        return tls
    except TimeoutError:
        reason, detail = "timeout", f"no handshake within {timeout:g} s"
    except ssl.SSLCertVerificationError as exc:
        reason, detail = "certificate", exc.verify_message or str(exc)
    except ssl.SSLError as exc:
        reason, detail = "protocol", exc.reason or str(exc)
    except OSError as exc:
        reason, detail = "closed", exc.strerror or str(exc)
    if on_failure is not None:
        with contextlib.suppress(Exception):
            on_failure(reason, detail, client)
    with contextlib.suppress(OSError):
        tls.close()
    return None
