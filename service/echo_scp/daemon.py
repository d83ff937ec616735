"""Process lifecycle: start every part in order, stop them in a fixed, bounded order.

Start: listeners (all or none), the HTTP endpoint, the readiness prober.
Stop: readiness turns 503, listeners stop accepting, established associations
get the grace period to finish, the rest are aborted with A-ABORT, then the
prober and the HTTP endpoint stop.
Reload (SIGHUP, POST /-/reload): the configuration is read again; listeners
whose address is unchanged take the new settings for new associations,
others are started or stopped; an invalid configuration changes nothing.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from prometheus_client import CollectorRegistry

from echo_scp.health import HealthServer, start_http_server
from echo_scp.listener import Listener, ListenerStartError, format_address
from echo_scp.metrics import Metrics
from echo_scp.observer import Observer, SelfCheckPorts
from echo_scp.probe import Prober
from echo_scp.readiness import ReadinessProber
from echo_scp.settings import ConfigError, Settings

# How long aborted associations get to see their A-ABORT go out.
_ABORT_WAIT = 2.0
_SWEEP_INTERVAL = 1.0
# Longest delay before the main thread notices a signal (see serve_until_stopped).
_SIGNAL_POLL = 0.25
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
        reloader: Callable[[], Settings] | None = None,
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
        # Reads self.settings on each request, so a reload applies to the next probe.
        self.probe = Prober(
            lambda: self.settings.probe, registry=self.registry, self_check_ports=self.ports, log=self.log
        )
        self.http: HealthServer | None = None
        self._reloader = reloader
        self._reload_lock = threading.Lock()
        self._retired: list[Listener] = []
        self._stopped = threading.Event()
        # "stop" and "reload" requests from signal handlers: SimpleQueue.put is
        # safe to call from a handler, and the main thread does the work.
        self._requests: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._sweeper: threading.Thread | None = None

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
                        reload=self.reload_for_http,
                        probe=self.probe.handle,
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
        self.metrics.reload_successful.set(1)
        self.metrics.reload_success_time.set_to_current_time()
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

    def request_stop(self, why: str = "") -> None:
        """Ask ``serve_until_stopped`` to shut down (signal-handler safe: it only queues)."""
        self._requests.put(("stop", why))

    def request_reload(self, why: str = "") -> None:
        """Ask ``serve_until_stopped`` to reload the configuration (signal-handler safe)."""
        self._requests.put(("reload", why))

    def serve_until_stopped(self) -> None:
        while True:
            try:
                # A timeout, not a plain blocking get: the kernel may deliver a
                # signal to any thread, and Python runs the handler only when
                # the main thread next executes bytecode.
                kind, why = self._requests.get(timeout=_SIGNAL_POLL)
            except queue.Empty:
                continue
            if why:
                self.log.info("signal_received", signal=why)
            if kind == "stop":
                break
            self.reload()
        self.stop()

    # -- reload -----------------------------------------------------------------

    def reload_for_http(self) -> tuple[bool, dict[str, Any]]:
        ok, problems = self.reload()
        return ok, {"status": "reloaded"} if ok else {"status": "failed", "problems": problems}

    def reload(self) -> tuple[bool, list[str]]:
        """Read the configuration again and apply it; on any problem keep the old one."""
        with self._reload_lock:
            if self._reloader is None:
                return self._reload_done(["this service has no configuration source to reload"])
            if self._stopped.is_set() or self.prober.draining:
                return self._reload_done(["shutting down"])
            try:
                new = self._reloader()
            except ConfigError as exc:
                return self._reload_done(exc.problems)
            try:
                self._apply(new)
            except StartError as exc:
                return self._reload_done([str(exc)])
            return self._reload_done([])

    def _reload_done(self, problems: list[str]) -> tuple[bool, list[str]]:
        if problems:
            self.metrics.reload_successful.set(0)
            self.log.error("reload_failed", problems=problems)
            return False, problems
        self.metrics.reload_successful.set(1)
        self.metrics.reload_success_time.set_to_current_time()
        self.log.info("reload_succeeded", listeners=[listener.name for listener in self.listeners])
        return True, []

    def _apply(self, new: Settings) -> None:
        """Start, stop and update listeners to match ``new``; all-or-nothing for starts."""
        current = {listener.name: listener for listener in self.listeners}
        wanted = {item.name: item for item in new.listeners}
        debug = new.log.level == "debug"
        # Listeners whose bound address changes are replaced: the old one stops
        # first when the new one needs the very same port.
        replaced = [n for n in wanted if n in current and current[n].needs_restart(wanted[n])]
        removed = [n for n in current if n not in wanted]
        started: list[Listener] = []
        stopped_early: list[Listener] = []
        try:
            for name, item in wanted.items():
                if name in current and name not in replaced:
                    continue
                old = current.get(name)
                if old is not None and old.address == (item.host, item.port):
                    self._retire(old)
                    stopped_early.append(old)
                listener = Listener(item, self.observer, debug=debug)
                self.observer.add_listener(name, item.allowed_calling_ae_titles)
                listener.start()
                started.append(listener)
        except ListenerStartError as exc:
            for listener in started:
                listener.stop_accepting()
            for old in stopped_early:  # best effort: put back what we took down
                with suppress(ListenerStartError):
                    old.start()
                    self._retired.remove(old)
            raise StartError(str(exc)) from exc
        fresh = {listener.name: listener for listener in started}
        for name, item in wanted.items():
            if name in current and name not in replaced:
                current[name].reconfigure(item)
        for name in [*removed, *replaced]:
            if current[name] not in self._retired:
                self._retire(current[name])
        self.listeners = [fresh.get(name) or current[name] for name in wanted]
        for listener in self.listeners:
            self.metrics.listener_up.labels(listener.name).set(1)
        for name in removed:
            self.metrics.listener_up.labels(name).set(0)
        if new.http != self.settings.http:
            self.log.warning("http_change_needs_restart", current=self.settings.http.model_dump())
        self.settings = new
        self.prober.set_listeners(self.listeners, new.readiness)

    def _retire(self, listener: Listener) -> None:
        """Stop accepting on a listener; its associations finish in their own time."""
        listener.stop_accepting()
        self._retired.append(listener)
        self.log.info("listener_stopped", listener=listener.name)

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
        everyone = [*self.listeners, *self._retired]
        return [a for listener in everyone for a in listener.open_associations() if a.is_alive()]

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
    """SIGTERM/SIGINT stop the service (a second one exits at once); SIGHUP reloads.

    Restores the previous handlers on exit.
    """
    import contextlib
    import json
    import os
    import signal

    received: list[int] = []

    # The handlers never log: a handler runs between two bytecodes of the main
    # thread, which may be inside a write to stdout, and logging from there
    # can deadlock on the stream's lock. They queue work or exit.
    def handle(signum: int, _frame: Any) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) > 1:
            line = json.dumps(
                {"event": "forced_exit", "signal": name, "level": "error", "logger": "echo_scp"}
            )
            with contextlib.suppress(OSError):
                os.write(1, line.encode() + b"\n")
            os._exit(FORCED_EXIT)
        service.request_stop(name)

    def reload(signum: int, _frame: Any) -> None:
        service.request_reload(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
