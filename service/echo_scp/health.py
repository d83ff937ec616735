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
  ``MAX_BODY`` gets 413.
* ``/probe?target=...&module=...``: C-ECHO another DICOM node, answered as
  Prometheus metrics (see ``probe.py``), when the daemon passes a handler.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

LIVENESS_PATHS = ("/livez", "/-/healthy")
READINESS_PATHS = ("/readyz", "/-/ready")
METRICS_PATH = "/metrics"
RELOAD_PATH = "/-/reload"
PROBE_PATH = "/probe"

# Bodies are read and dropped (none of the endpoints takes one), up to this size.
MAX_BODY = 1 << 20

Check = Callable[[], tuple[bool, dict[str, Any]]]
# (query string, request headers with lower-case names) -> (status, content type, body)
ProbeHandler = Callable[[str, Mapping[str, str]], tuple[int, str, bytes]]


class HealthServer:
    """A running HTTP endpoint; ``close()`` stops it."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

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
    probe: ProbeHandler | None = None,
) -> HealthServer:
    """Bind and serve in a daemon thread; raises OSError if the port is taken."""

    from echo_scp.metrics import WithoutCreated

    exposed: Any = WithoutCreated(registry)

    class Handler(BaseHTTPRequestHandler):
        server_version = "echo-scp"
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._respond(head=False)

        def do_HEAD(self) -> None:
            self._respond(head=True)

        def do_POST(self) -> None:
            if not self._discard_body():
                return
            path = self.path.split("?", 1)[0]
            if path == RELOAD_PATH and reload is not None:
                ok, body = reload()
                self._json(200 if ok else 500, body, False)
            else:
                self._not_allowed()

        def do_PUT(self) -> None:
            if self._discard_body():
                self._not_allowed()

        do_DELETE = do_PATCH = do_PUT

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
            if path == RELOAD_PATH and reload is not None:
                self._json(405, {"error": "method not allowed"}, head, allow="POST")
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

        def _not_allowed(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == RELOAD_PATH and reload is not None:
                self._json(405, {"error": "method not allowed"}, False, allow="POST")
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
                self.send_header(name.capitalize(), value)
            self.end_headers()
            if not head:
                # The prober may go away before reading the answer.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds would drown the association log

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = _family(host)

        def handle_error(self, request: Any, client_address: Any) -> None:
            # socketserver prints a traceback to stderr for any client that
            # misbehaves; a probe hanging up early is not worth one.
            pass

    httpd = Server((host, port), Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="echo-scp-http", daemon=True)
    thread.start()
    return HealthServer(httpd, thread)


def _family(host: str) -> Any:
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET
