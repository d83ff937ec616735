"""The readiness self-check: a loopback C-ECHO through every listener.

A background thread checks each listener every ``readiness.interval`` seconds
with the same AE titles and TLS a peer would use, and caches the result;
``/readyz`` only reads the cache, so probes cost nothing and cannot be used to
make the daemon generate traffic. The self-check's source port is registered
before it connects so that the listener recognises it and keeps it out of the
peer metrics.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from echo_scp import scu
from echo_scp.connections import SelfCheckPorts
from echo_scp.listener import Listener
from echo_scp.metrics import Metrics
from echo_scp.settings import ReadinessSettings, TlsSettings

SELF_CHECK_AE = "ECHO_SCP_READY"


@dataclass
class CheckState:
    """The cached outcome of a listener's self-checks."""

    last_success: float | None = None  # monotonic
    last_error: str | None = "not checked yet"
    # When a self-check last got any answer (success, rejection, TLS alert...),
    # as opposed to timing out: the heartbeat of association handling. Starts
    # at the listener's first appearance, so a new listener gets a full period.
    last_answered: float = 0.0


def loopback_for(host: str) -> str:
    """Where to reach a listener bound to ``host`` from this machine."""
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return host


class ReadinessProber:
    """Runs the self-checks and answers whether every listener is ready."""

    def __init__(
        self,
        listeners: Sequence[Listener],
        settings: ReadinessSettings,
        metrics: Metrics,
        ports: SelfCheckPorts,
        log: Any,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.listeners = list(listeners)
        self.settings = settings
        self.metrics = metrics
        self.ports = ports
        self.log = log
        self._clock = clock
        self._states = {listener.name: CheckState(last_answered=clock()) for listener in self.listeners}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def set_listeners(self, listeners: Sequence[Listener], settings: ReadinessSettings) -> None:
        """Check a new set of listeners from now on (after a reload)."""
        with self._lock:
            self._states = {
                listener.name: self._states.get(listener.name) or CheckState(last_answered=self._clock())
                for listener in listeners
            }
            self.listeners = list(listeners)
            self.settings = settings
        self.check_now()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="echo-scp-readiness", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            # Bounded below the self-check's own timeout: the thread is a daemon
            # thread, and shutdown must fit the engines' 10 s stop timeout.
            self._thread.join(timeout=1.0)

    def check_now(self) -> None:
        """Run a round of self-checks soon (used after start and in tests)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            for listener in list(self.listeners):
                if self._stop.is_set():
                    return
                self.check(listener)
            self._wake.wait(self.settings.interval)
            self._wake.clear()

    def check(self, listener: Listener) -> bool:
        """One self-check of one listener; updates the cache and metrics."""
        error, answered = self._echo(listener)
        with self._lock:
            state = self._states.get(listener.name)
            if state is None:  # removed by a reload while being checked
                return error is None
            now = self._clock()
            if answered:
                state.last_answered = now
            if error is None:
                state.last_success, state.last_error = now, None
            else:
                state.last_error = error
        self.metrics.self_checks.labels(listener.name, "success" if error is None else "failure").inc()
        if error is None:
            self.metrics.self_check_last_success.labels(listener.name).set(time.time())
        else:
            self.log.warning("self_check_failed", listener=listener.name, error=error)
        return error is None

    def _echo(self, listener: Listener) -> tuple[str | None, bool]:
        """(problem or None, whether the listener answered at all)."""
        if not listener.accepting():
            return "listener is not accepting connections", False
        host, port = listener.address
        runtime = listener.runtime
        s = runtime.settings
        context = runtime.self_check_ssl_context
        bound: list[tuple[str, int]] = []

        def register(address: tuple[str, int]) -> None:
            bound.append(address)
            self.ports.add(address)

        try:
            target = loopback_for(host)
            result = scu.echo_association(
                target,
                port,
                called_aet=s.ae_title,
                calling_aet=SELF_CHECK_AE,
                acse_timeout=self.settings.timeout,
                dimse_timeout=self.settings.timeout,
                network_timeout=self.settings.timeout,
                connect_timeout=self.settings.timeout,
                transfer_syntaxes=s.transfer_syntaxes,
                ssl_context=context,
                # Bind the source explicitly so the registered address is the
                # one the listener will see, also for non-loopback binds.
                source_address=(target, 0),
                on_bound=register,
            )
        except scu.EchoTimeout as exc:
            return str(exc), False
        except scu.ConnectFailed as exc:  # TLS handshake failures among them
            return _with_certificate_dates(str(exc), s.tls), True
        except scu.EchoError as exc:
            return str(exc), True
        except Exception as exc:  # never let the prober thread die
            return f"self-check crashed: {exc!r}", True
        finally:
            # The listener classifies a connection when it opens, which is
            # before any answer could reach us, so the address can go now.
            for address in bound:
                self.ports.discard(address)
        if not result.ok:
            return f"C-ECHO status 0x{result.statuses[0]:04X}", True
        return None, True

    def unanswered_for(self, name: str) -> float:
        """Seconds since the listener's self-check last got an answer (or the listener appeared)."""
        with self._lock:
            state = self._states.get(name)
            last = state.last_answered if state is not None else self._clock()
        return max(0.0, self._clock() - last)

    def status(self) -> tuple[bool, dict[str, Any]]:
        """(ready, body) for /readyz."""
        now = self._clock()
        failing: dict[str, str] = {}
        with self._lock:
            for listener in self.listeners:
                state = self._states[listener.name]
                if not listener.accepting():
                    failing[listener.name] = "listener is not accepting connections"
                elif state.last_success is None:
                    failing[listener.name] = state.last_error or "not checked yet"
                elif now - state.last_success > self.settings.max_age:
                    failing[listener.name] = (
                        f"last successful self-check {now - state.last_success:.1f} s ago"
                        + (f": {state.last_error}" if state.last_error else "")
                    )
        if failing:
            return False, {"status": "not ready", "failing": failing}
        return True, {"status": "ready"}


def _with_certificate_dates(error: str, tls: TlsSettings | None) -> str:
    """The self-check's error, and which of the listener's certificates is out of date, if any.

    OpenSSL says "certificate has expired" but neither which certificate nor
    since when; the operator reading /readyz needs both.
    """
    problems = tls.validity_problems() if tls is not None else []
    if not problems:
        return error
    return f"{error} ({'; '.join(f'{field}: {problem}' for field, problem in problems)})"
