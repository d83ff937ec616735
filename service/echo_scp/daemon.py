"""Process lifecycle: start every part in order, stop them in a fixed, bounded order.

Start: listeners (all or none), the HTTP endpoint, the readiness prober.
Stop: readiness turns 503, listeners stop accepting, established associations
get the grace period to finish, the rest are aborted with A-ABORT, then the
prober and the HTTP endpoint stop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from prometheus_client import CollectorRegistry

from echo_scp.health import HealthServer, start_http_server
from echo_scp.listener import Listener, ListenerStartError, format_address
from echo_scp.metrics import Metrics
from echo_scp.observer import Observer, SelfCheckPorts
from echo_scp.readiness import ReadinessProber
from echo_scp.settings import Settings

# How long aborted associations get to see their A-ABORT go out.
_ABORT_WAIT = 2.0
_SWEEP_INTERVAL = 1.0
# Exit status after a second SIGTERM/SIGINT cut the graceful shutdown short.
FORCED_EXIT = 130


class StartError(Exception):
    """The service could not start (a port in use, say); the message says where."""


class Service:
    """An echo-scp daemon: listeners, HTTP endpoint and self-check, as one unit."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        log: Any = None,
    ) -> None:
        from echo_scp.logs import make_logger

        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.log = log if log is not None else make_logger()
        self.metrics = Metrics(self.registry)
        self.ports = SelfCheckPorts()
        self.observer = Observer(self.metrics, self.log, self_check_ports=self.ports)
        debug = settings.log.level == "debug"
        self.listeners = [Listener(item, self.observer, debug=debug) for item in settings.listeners]
        self.prober = ReadinessProber(self.listeners, settings.readiness, self.metrics, self.ports, self.log)
        self.http: HealthServer | None = None
        self._stopped = threading.Event()
        self._stop_requested = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._started = False

    # -- start ----------------------------------------------------------------

    def start(self) -> None:
        """Bind everything; raises StartError (after undoing what started)."""
        try:
            for listener in self.listeners:
                self.observer.add_listener(listener.name, listener.settings.allowed_calling_ae_titles)
                listener.start()
                self.metrics.listener_up.labels(listener.name).set(1)
                host, port = listener.address
                self.log.info(
                    "listener_started",
                    listener=listener.name,
                    address=format_address(host, port),
                    ae_title=listener.settings.ae_title,
                    tls=listener.settings.tls is not None,
                )
            if self.settings.http.enabled:
                http = self.settings.http
                try:
                    self.http = start_http_server(
                        host=http.host,
                        port=http.port,
                        registry=self.registry,
                        liveness=self.liveness,
                        readiness=self.readiness,
                    )
                except OSError as exc:
                    where = format_address(http.host, http.port)
                    raise StartError(
                        f"HTTP endpoint cannot listen on {where}: {exc.strerror or exc}"
                    ) from exc
                self.log.info("http_started", address=format_address(http.host, self.http.port))
        except ListenerStartError as exc:
            self._close_all()
            raise StartError(str(exc)) from exc
        except StartError:
            self._close_all()
            raise
        self._started = True
        # Computed at scrape time so the gauge agrees with /readyz even when
        # nothing polls /readyz (a compose healthcheck, an exec probe).
        self.metrics.ready.set_function(lambda: 1.0 if self.prober.status()[0] else 0.0)
        self.prober.start()
        self._sweeper = threading.Thread(target=self._sweep, name="echo-scp-sweeper", daemon=True)
        self._sweeper.start()

    # -- health -----------------------------------------------------------------

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        dead = [listener.name for listener in self.listeners if not listener.accepting()]
        if dead and not self.prober.draining:
            return False, {"status": "dead", "listeners_not_accepting": dead}
        return True, {"status": "alive"}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return self.prober.status()

    # -- run and stop ---------------------------------------------------------

    def request_stop(self) -> None:
        """Ask ``serve_until_stopped`` to shut down (signal-handler safe)."""
        self._stop_requested.set()

    def serve_until_stopped(self) -> None:
        self._stop_requested.wait()
        self.stop()

    def stop(self) -> None:
        """Drain and stop; returns within the grace period plus a few seconds."""
        if self._stopped.is_set():
            return
        grace = self.settings.shutdown_grace_period
        self.prober.draining = True
        self.log.info("shutdown_started", grace_period_s=grace)
        for listener in self.listeners:
            listener.stop_accepting()
            self.metrics.listener_up.labels(listener.name).set(0)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._open_associations():
            time.sleep(0.05)
        remaining = self._open_associations()
        if remaining:
            self.log.warning("aborting_associations", count=len(remaining))
            self._abort(remaining)
        self.prober.stop()
        self._close_all()
        self._stopped.set()
        self.log.info("shutdown_complete", aborted=len(remaining))

    def _open_associations(self) -> list[Any]:
        return [a for listener in self.listeners for a in listener.open_associations() if a.is_alive()]

    def _abort(self, associations: list[Any]) -> None:
        # Abort in parallel: each abort waits for its peer, and one slow peer
        # must not hold the others past the deadline.
        threads = [
            threading.Thread(target=_abort_quietly, args=(assoc,), daemon=True) for assoc in associations
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + _ABORT_WAIT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _close_all(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None
        for listener in self.listeners:
            listener.stop_accepting()

    def _sweep(self) -> None:
        while not self._stopped.wait(_SWEEP_INTERVAL):
            self.observer.sweep(_association_finished)


def _association_finished(key: object) -> bool:
    """Whether an association thread ran and has ended (so no close event will come)."""
    if not isinstance(key, threading.Thread):
        return False
    return key.ident is not None and not key.is_alive()


def _abort_quietly(assoc: Any) -> None:
    with suppress(Exception):
        assoc.abort()


@contextmanager
def capture_signals(service: Service, log: Any) -> Iterator[None]:
    """SIGTERM/SIGINT stop the service; a second one exits at once. Restores the old handlers."""
    import os
    import signal

    received: list[int] = []

    def handle(signum: int, _frame: Any) -> None:
        received.append(signum)
        if len(received) > 1:
            log.error("forced_exit", signal=signal.Signals(signum).name)
            os._exit(FORCED_EXIT)
        log.info("signal_received", signal=signal.Signals(signum).name)
        service.request_stop()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def running(settings: Settings, **kwargs: Any) -> Iterator[Service]:
    """Start a Service for the duration of a ``with`` block (tests, embedding)."""
    service = Service(settings, **kwargs)
    service.start()
    try:
        yield service
    finally:
        service.stop()
