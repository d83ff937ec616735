"""Process lifecycle: start every part in order, stop them in a fixed, bounded order.

Start: listeners (all or none), the HTTP endpoint, the readiness prober.
Stop: the service turns ``draining`` (readiness 503), listeners stop
accepting, established associations get the grace period to finish, the rest
are aborted with A-ABORT, then the prober and the HTTP endpoint stop.
Reload (SIGHUP, or POST /-/reload when http.enable_reload is on; one at a time): the configuration is read and
validated, every listener's new runtime snapshot is built, new and re-bound
listeners start (all or none), and then each kept listener swaps its snapshot
in one assignment; logging is reconfigured. Settings that only a restart can
change are named in the result, the log line and the response, and leave
``echo_scp_config_last_reload_successful`` at 0. An invalid configuration
changes nothing.
Certificate rotation (the sweeper, every second; never during a reload): TLS
files replaced on disk, as cert-manager renews a mounted Secret, are loaded
again with the rest of the listener's settings as they are, and the listener
swaps its snapshot as a reload does; files that do not load leave the old
certificate serving, counted in ``echo_scp_tls_certificate_reloads_total``
and logged once. The HTTP endpoint's TLS files are watched the same way: its
new connections get the new context (``echo_scp_http_tls_certificate_*``).
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from echo_scp.certificates import FileWatch, format_time
from echo_scp.connections import ConnectionTable, SelfCheckPorts
from echo_scp.health import HealthServer, access_for, start_http_server
from echo_scp.listener import Listener, ListenerStartError, end_connection
from echo_scp.metrics import Metrics
from echo_scp.probe import Prober
from echo_scp.protocol import format_address
from echo_scp.readiness import ReadinessProber
from echo_scp.reporter import Reporter
from echo_scp.runtime import ListenerRuntime, build_runtime, with_tls
from echo_scp.settings import ConfigError, HttpSettings, HttpTlsSettings, LogSettings, Settings, TlsSettings

# The TLS settings whose files the daemon watches (see Service._load_replaced).
_Tls = TypeVar("_Tls", TlsSettings, HttpTlsSettings)
# How long aborted associations get to see their A-ABORT go out.
_ABORT_WAIT = 2.0
_SWEEP_INTERVAL = 1.0
# Longest delay before the main thread notices a signal (see serve_until_stopped).
_SIGNAL_POLL = 0.25
# Exit status after a second SIGTERM/SIGINT cut the graceful shutdown short.
FORCED_EXIT = 130


class StartError(Exception):
    """The service could not start (a port in use, say); the message says where."""


class State(enum.Enum):
    """Where the service is in its life; ``draining`` makes readiness 503."""

    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class LogControl(Protocol):
    """Re-applies log settings on a reload and counts dropped records (``logs.LogControl``)."""

    @property
    def dropped(self) -> int: ...

    def apply(self, settings: LogSettings) -> None: ...


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: problems (nothing changed) or restart-only settings left as they were."""

    problems: list[str] = field(default_factory=list)
    restart_required: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def complete(self) -> bool:
        """Everything in the new configuration is in effect."""
        return not self.problems and not self.restart_required

    def body(self) -> dict[str, Any]:
        if self.problems:
            return {"status": "failed", "problems": self.problems}
        if self.restart_required:
            return {"status": "restart_required", "restart_required": self.restart_required}
        return {"status": "reloaded"}


def _debug(settings: Settings) -> bool:
    return settings.log.level == "debug"


class Service:
    """An echo-scp daemon: listeners, HTTP endpoint and self-check, as one unit."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        log: Any = None,
        reloader: Callable[[], Settings] | None = None,
        log_control: LogControl | None = None,
    ) -> None:
        from echo_scp.logs import make_logger

        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.log = log if log is not None else make_logger()
        self.metrics = Metrics(self.registry)
        if log_control is not None:
            self.metrics.count_log_drops(lambda: log_control.dropped)
        self.ports = SelfCheckPorts()
        self.table = ConnectionTable(self_check_ports=self.ports)
        self.reporter = Reporter(self.metrics, self.log)
        self.listeners = [
            Listener(build_runtime(item, debug=_debug(settings)), self.table, self.reporter)
            for item in settings.listeners
        ]
        self.prober = ReadinessProber(self.listeners, settings.readiness, self.metrics, self.ports, self.log)
        # Reads self.settings on each request, so a reload applies to the next probe.
        self.probe = Prober(
            lambda: self.settings.probe, registry=self.registry, self_check_ports=self.ports, log=self.log
        )
        self.http: HealthServer | None = None
        # What the HTTP endpoint was started with: a reload cannot move it.
        self._http_settings: HttpSettings = settings.http
        self._reloader = reloader
        self._log_control = log_control
        self._reload_lock = threading.Lock()
        self._retired: list[Listener] = []
        self.state = State.STARTING
        self._stopped = threading.Event()
        # "stop" and "reload" requests from signal handlers: SimpleQueue.put is
        # safe to call from a handler, and the main thread does the work.
        self._requests: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._sweeper: threading.Thread | None = None
        # Per listener name: its TLS files as loaded, to notice them replaced on disk.
        self._watches: dict[str, FileWatch] = {}
        # The HTTP endpoint's TLS as it serves now (from the start, or files loaded since), and its
        # files; set once the endpoint serves TLS.
        self._http_tls: HttpTlsSettings | None = None
        self._http_watch: FileWatch | None = None

    # -- start ----------------------------------------------------------------

    def start(self) -> None:
        """Bind everything; raises StartError (after undoing what started)."""
        try:
            for listener in self.listeners:
                self._start_listener(listener)
            if self.settings.http.enabled:
                self._start_http(self.settings.http)
        except ListenerStartError as exc:
            self._close_all()
            raise StartError(str(exc)) from exc
        except StartError:
            self._close_all()
            raise
        self._label_engines()
        self._log_warnings(self.settings.warnings)
        self.metrics.reload_successful.set(1)
        self.metrics.reload_success_time.set_to_current_time()
        # Computed at scrape time so the gauge agrees with /readyz even when
        # nothing polls /readyz (a compose healthcheck, an exec probe).
        self.metrics.ready.set_function(lambda: 1.0 if self.readiness()[0] else 0.0)
        self.state = State.SERVING
        self.prober.start()
        self._sweeper = threading.Thread(target=self._sweep, name="echo-scp-sweeper", daemon=True)
        self._sweeper.start()

    def _start_http(self, http: HttpSettings) -> None:
        where = format_address(http.host, http.port)
        try:
            access = access_for(http)
        except ValueError as exc:
            raise StartError(f"HTTP endpoint on {where}: {exc}") from exc
        # Loaded once, when the settings were validated; again when its files are replaced on disk.
        context = http.tls.server_context if http.tls else None
        self.metrics.add_http(tls=context is not None)
        try:
            self.http = start_http_server(
                host=http.host,
                port=http.port,
                registry=self.registry,
                liveness=self.liveness,
                readiness=self.readiness,
                reload=self.reload_for_http if http.enable_reload else None,
                access=access,
                ssl_context=context,
                handshake_timeout=http.tls.handshake_timeout if http.tls else 10.0,
                on_auth_failure=self.reporter.http_auth_failed,
                on_tls_failure=self.reporter.http_tls_failed,
                probe=self.probe.handle,
                request_timeout=http.request_timeout,
                max_connections=http.max_connections,
                on_refused=self.reporter.http_connection_refused,
            )
        except OSError as exc:
            raise StartError(f"HTTP endpoint cannot listen on {where}: {exc.strerror or exc}") from exc
        if http.tls is not None:
            self._http_tls = http.tls
            self._http_watch = FileWatch(http.tls.files)
            self.metrics.set_http_certificates(http.tls.not_after())
        self.log.info(
            "http_started",
            address=format_address(http.host, self.http.port),
            tls=context is not None,
            basic_auth=access.basic_auth is not None,
            reload=http.enable_reload,
        )

    def _start_listener(self, listener: Listener) -> None:
        self._add_series(listener.runtime)
        listener.start()
        self.metrics.listener_up.labels(listener.name).set(1)
        host, port = listener.address
        self.log.info(
            "listener_started",
            listener=listener.name,
            address=format_address(host, port),
            ae_title=listener.settings.ae_title,
            tls=listener.settings.tls is not None,
            engine=listener.engine,
        )

    def _label_engines(self) -> None:
        self.metrics.set_engines(listener.engine for listener in self.listeners)

    def _add_series(self, runtime: ListenerRuntime) -> None:
        self.metrics.add_listener(
            runtime.name, sorted(runtime.calling_labels), tls=runtime.ssl_context is not None
        )
        tls = runtime.settings.tls
        self.metrics.set_certificates(runtime.name, tls.not_after() if tls is not None else None)

    def _log_warnings(self, lines: list[str]) -> None:
        for line in lines:
            self.log.warning("config_warning", warning=line)

    # -- health -----------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.state in (State.DRAINING, State.STOPPED)

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """Alive unless a listener stopped accepting or made no progress for ``liveness.stall_timeout``."""
        if self.draining:
            return True, {"status": "alive"}
        dead = [listener.name for listener in self.listeners if not listener.accepting()]
        if dead:
            return False, {"status": "dead", "listeners_not_accepting": dead}
        limit = self.settings.liveness.stall_timeout
        stalled: dict[str, str] = {}
        for listener in self.listeners:
            reasons = []
            if (waited := listener.stalled_for()) > limit:
                reasons.append(f"accept loop unanswered for {waited:.0f} s")
            if (quiet := self.prober.unanswered_for(listener.name)) > limit:
                reasons.append(f"no association handled for {quiet:.0f} s (self-check unanswered)")
            if reasons:
                stalled[listener.name] = "; ".join(reasons)
        if stalled:
            return False, {"status": "stalled", "stalled": stalled}
        return True, {"status": "alive"}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        if self.draining:
            return False, {"status": "draining"}
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
        result = self.reload()
        return result.ok, result.body()

    def reload(self) -> ReloadResult:
        """Read the configuration again and apply it; on any problem keep the old one."""
        with self._reload_lock:
            if self._reloader is None:
                return self._reload_done(ReloadResult(["this service has no configuration source to reload"]))
            if self._stopped.is_set() or self.draining:
                return self._reload_done(ReloadResult(["shutting down"]))
            try:
                new = self._reloader()
                runtimes = {item.name: build_runtime(item, debug=_debug(new)) for item in new.listeners}
            except ConfigError as exc:
                return self._reload_done(ReloadResult(exc.problems))
            try:
                self._apply(new, runtimes)
            except StartError as exc:
                return self._reload_done(ReloadResult([str(exc)]))
            self._log_warnings(new.warnings)
            return self._reload_done(ReloadResult(restart_required=self._apply_globals(new)))

    def _reload_done(self, result: ReloadResult) -> ReloadResult:
        if result.problems:
            self.metrics.reload_successful.set(0)
            self.log.error("reload_failed", problems=result.problems)
            return result
        self.metrics.reload_successful.set(1 if result.complete else 0)
        self.metrics.reload_success_time.set_to_current_time()
        names = [listener.name for listener in self.listeners]
        if result.restart_required:
            self.log.warning(
                "reload_needs_restart", restart_required=result.restart_required, listeners=names
            )
        else:
            self.log.info("reload_succeeded", listeners=names)
        return result

    def _apply(self, new: Settings, runtimes: dict[str, ListenerRuntime]) -> None:
        """Start, stop and update listeners to match ``new``; all-or-nothing for starts."""
        current = {listener.name: listener for listener in self.listeners}
        wanted = {item.name: item for item in new.listeners}
        # Listeners whose bound address or engine changes are replaced: the old
        # one stops first when the new one needs the very same port.
        replaced = [n for n in wanted if n in current and current[n].needs_restart(wanted[n])]
        removed = [n for n in current if n not in wanted]
        started: list[Listener] = []
        stopped_early: list[Listener] = []
        try:
            for name, item in wanted.items():
                if name in current and name not in replaced:
                    continue
                # A listener going away (replaced, removed or renamed) may hold
                # the very address this one needs.
                old = next(
                    (
                        current[n]
                        for n in [*replaced, *removed]
                        if current[n].address == (item.host, item.port) and current[n] not in stopped_early
                    ),
                    None,
                )
                if old is not None:
                    self._retire(old)
                    stopped_early.append(old)
                listener = Listener(runtimes[name], self.table, self.reporter)
                self._start_listener(listener)
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
        for name in wanted:
            if name in current and name not in replaced:
                listener = current[name]
                self._add_series(runtimes[name])
                listener.reconfigure(runtimes[name])
        for name in [*removed, *replaced]:
            if current[name] not in self._retired:
                self._retire(current[name])
        self.listeners = [fresh.get(name) or current[name] for name in wanted]
        self.metrics.set_engines(listener.engine for listener in self.listeners)
        self._label_engines()
        for listener in self.listeners:
            self.metrics.listener_up.labels(listener.name).set(1)
        for name in removed:
            self.metrics.listener_up.labels(name).set(0)
            self.metrics.set_certificates(name, None)
        self.prober.set_listeners(self.listeners, new.readiness)

    def _apply_globals(self, new: Settings) -> list[str]:
        """Take the new global settings; returns those that need a restart, by name."""
        restart = _changed("http", self._http_settings, new.http)
        if new.log.queue_size != self.settings.log.queue_size:
            # The writer's queue is made once; a smaller one could not hold what waits.
            restart.append("log.queue_size")
        if new.log != self.settings.log:
            if self._log_control is not None:
                self._log_control.apply(new.log)
            else:
                # Embedded (EchoServer, tests): the host application owns logging.
                restart.extend(
                    f"log.{name}"
                    for name in LogSettings.model_fields
                    if name != "queue_size" and getattr(new.log, name) != getattr(self.settings.log, name)
                )
        # Readiness settings went to the prober with the listeners; the grace
        # period is read when the shutdown starts.
        self.settings = new
        return restart

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
        self.state = State.DRAINING
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
        self.state = State.STOPPED
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
            for listener in self.listeners:
                listener.ping()
            for conn in self.table.finished(_association_finished):
                end_connection(conn, self.reporter, self.table.clock())
            try:
                self.rotate_certificates()
            except Exception:  # the sweeper must keep sweeping
                self.log.exception("certificate_check_failed")

    # -- certificate rotation ---------------------------------------------------

    def rotate_certificates(self) -> None:
        """Serve TLS files that were replaced on disk (a renewed certificate); the sweeper calls it.

        A look costs one ``stat`` per file. It never runs during a reload (which
        reads the files itself), so reloads and rotations never interleave.
        """
        if not self._reload_lock.acquire(blocking=False):
            return
        try:
            if self.draining:
                return
            tls_names = set()
            for index, listener in enumerate(self.listeners):
                tls = listener.settings.tls
                if tls is None:
                    continue
                tls_names.add(listener.name)
                watch = self._watches.get(listener.name)
                if watch is None or watch.state is not tls.files:
                    # New, or reloaded since: its files as that load saw them.
                    watch = self._watches[listener.name] = FileWatch(tls.files)
                if watch.replaced():
                    self._reload_certificates(index, listener)
            for name in set(self._watches) - tls_names:
                del self._watches[name]
            if self._http_watch is not None and self._http_watch.replaced():
                self._reload_http_certificates()
        finally:
            self._reload_lock.release()

    def _reload_http_certificates(self) -> None:
        """Load the HTTP endpoint's replaced TLS files for new connections; keep the old ones if they fail."""
        assert self.http is not None and self._http_tls is not None
        http = self.http

        def serve(tls: HttpTlsSettings) -> None:
            http.use_ssl_context(tls.server_context)
            self._http_tls = tls
            self._http_watch = FileWatch(tls.files)
            self.metrics.set_http_certificates(tls.not_after())

        self._load_replaced(self._http_tls, ("http", "tls"), None, serve)

    def _reload_certificates(self, index: int, listener: Listener) -> None:
        """Load a listener's replaced TLS files and swap its snapshot; keep the old one if they fail."""
        old = listener.runtime
        assert old.settings.tls is not None

        def serve(tls: TlsSettings) -> None:
            runtime = with_tls(old, tls)
            listener.reconfigure(runtime)
            self._add_series(runtime)

        self._load_replaced(old.settings.tls, ("listeners", index, "tls"), listener.name, serve)

    def _load_replaced(
        self,
        tls: _Tls,
        at: tuple[str | int, ...],
        listener: str | None,
        serve: Callable[[_Tls], None],
    ) -> None:
        """Validate replaced TLS files again and ``serve`` them, or keep serving the old ones.

        Counted and logged the same way for a listener and (``listener`` None)
        for the HTTP endpoint, whose lines say ``endpoint="http"``.
        """
        where = {"listener": listener} if listener is not None else {"endpoint": "http"}
        try:
            new = tls.reloaded(at)
        except ConfigError as exc:
            self.metrics.count_certificate_reload("failure", listener)
            self.log.error("certificate_reload_failed", **where, problems=exc.problems, kept="previous")
            return
        serve(new)
        self.metrics.count_certificate_reload("success", listener)
        self.log.info(
            "certificate_reloaded",
            **where,
            not_after={role: format_time(when) for role, when in new.not_after().items()},
        )
        self._log_warnings(new.warning_lines(at))


def _changed(prefix: str, old: BaseModel, new: BaseModel) -> list[str]:
    """Dotted names of the fields that differ, down to the leaves of nested models (http.tls.cert_file)."""
    names: list[str] = []
    for name in type(old).model_fields:
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if isinstance(before, BaseModel) and isinstance(after, BaseModel):
            names += _changed(f"{prefix}.{name}", before, after)
        else:
            names.append(f"{prefix}.{name}")
    return names


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
    from datetime import UTC, datetime

    received: list[int] = []

    # The handlers never log: a handler runs between two bytecodes of the main
    # thread, which may be inside a write to stdout, and logging from there
    # can deadlock on the stream's lock. They queue work or exit.
    def handle(signum: int, _frame: Any) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) > 1:
            line = json.dumps(
                {
                    "event": "forced_exit",
                    "signal": name,
                    "level": "error",
                    "logger": "echo_scp",
                    "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                }
            )
            # Never block on a stuck log consumer: this is the way out.
            with contextlib.suppress(OSError):
                os.set_blocking(1, False)
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
