"""Prometheus metrics of the daemon, registered on an injected registry.

Label values are bounded: listeners come from the configuration, calling AE
titles only from a listener's allow-list (anything else is ``other``), and
rejection reasons, abort sources and TLS failure kinds from fixed sets. The
peer's address is never a label.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from typing import Any

import pydicom
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.registry import Collector

from echo_scp import __version__
from echo_scp.connections import OTHER_AE
from echo_scp.protocol import REJECT_CALLED_AE, REJECT_CALLING_AE, REJECT_CONGESTION, REJECT_LOCAL_LIMIT
from echo_scp.seam import pynetdicom_version

PREFIX = "echo_scp"
# no_accepted_context: answered with an A-ASSOCIATE-AC that rejects every
# presentation context (the peer asked for another service, e.g. storage).
ASSOCIATION_OUTCOMES = ("accepted", "rejected", "no_accepted_context", "released", "aborted")
ABORT_SOURCES = ("peer", "provider", "local")
TLS_FAILURES = ("timeout", "closed", "protocol", "certificate")
# Why a connection ended without an association: evicted because too many
# connections were waiting to send their A-ASSOCIATE-RQ, it closed (or timed
# out) before sending one, or what it sent was not one we could read.
DROP_REASONS = ("pending_limit", "no_request", "protocol_error")
ECHO_STATUSES = ("success", "failure")
# Why an HTTP request was refused (health.py's Access); never the client's address or user name.
HTTP_AUTH_FAILURES = ("missing", "invalid", "busy", "no_client_certificate")
SELF_CHECK_RESULTS = ("success", "failure")
# A TLS listener's certificate files, by role: server (cert_file), ca
# (ca_file), self_check (self_check_cert_file); see settings.TlsSettings.ROLES.
CERTIFICATE_ROLES = ("server", "ca", "self_check")
CERTIFICATE_RELOAD_RESULTS = ("success", "failure")
# The HTTP endpoint's certificate files, by role: server (cert_file), ca
# (client_ca_file); see settings.HttpTlsSettings.ROLES.
HTTP_CERTIFICATE_ROLES = ("server", "ca")
# The rejections a listener sends, whose series exist from the start; the
# label values are protocol.py's words for them.
LISTENER_REJECTIONS = (REJECT_CALLING_AE, REJECT_CALLED_AE, REJECT_LOCAL_LIMIT, REJECT_CONGESTION)


class Metrics:
    """Every metric the daemon exports, created up front on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        p = PREFIX
        self.build_info = Info(f"{p}_build", "Versions of echo-scp and what it runs on.", registry=registry)
        self._build = {
            "version": __version__,
            "pynetdicom_version": pynetdicom_version(),
            "pydicom_version": pydicom.__version__,
            "python_version": platform.python_version(),
            "engine": "",  # set_engines() fills it in once the listeners run
        }
        self.build_info.info(self._build)
        self.listener_up = Gauge(
            f"{p}_listener_up", "1 while the listener accepts connections.", ["listener"], registry=registry
        )
        self.ready = Gauge(f"{p}_ready", "1 while /readyz answers 200.", registry=registry)
        self.connections_opened = Counter(
            f"{p}_connections_opened_total",
            "TCP connections accepted from peers.",
            ["listener"],
            registry=registry,
        )
        self.connections_open = Gauge(
            f"{p}_connections_open", "Peer TCP connections open now.", ["listener"], registry=registry
        )
        self.connections_dropped = Counter(
            f"{p}_connections_dropped_total",
            "Peer connections that ended without an A-ASSOCIATE-RQ, by reason.",
            ["listener", "reason"],
            registry=registry,
        )
        self.associations = Counter(
            f"{p}_associations_total",
            "Association events by outcome (an association is counted once as accepted "
            "and once as released or aborted).",
            ["listener", "calling_ae", "outcome"],
            registry=registry,
        )
        self.rejections = Counter(
            f"{p}_association_rejections_total",
            "A-ASSOCIATE-RJ sent, by result, source and reason.",
            ["listener", "result", "source", "reason"],
            registry=registry,
        )
        self.aborts = Counter(
            f"{p}_association_aborts_total",
            "Aborted associations by who aborted: peer (A-ABORT), provider (A-P-ABORT) or local.",
            ["listener", "source"],
            registry=registry,
        )
        self.associations_active = Gauge(
            f"{p}_associations_active", "Established associations now.", ["listener"], registry=registry
        )
        self.association_duration = Histogram(
            f"{p}_association_duration_seconds",
            "Time from connection to the end of an accepted association.",
            ["listener"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self.echo_requests = Counter(
            f"{p}_echo_requests_total",
            "C-ECHO requests answered, by response status.",
            ["listener", "calling_ae", "status"],
            registry=registry,
        )
        self.echo_duration = Histogram(
            f"{p}_echo_duration_seconds",
            "Time from a decoded C-ECHO-RQ to its C-ECHO-RSP being sent.",
            ["listener"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=registry,
        )
        self.tls_handshake_failures = Counter(
            f"{p}_tls_handshake_failures_total",
            "TLS handshakes that failed, by kind.",
            ["listener", "reason"],
            registry=registry,
        )
        self.self_checks = Counter(
            f"{p}_self_checks_total",
            "Loopback C-ECHO readiness self-checks (not counted as peer traffic).",
            ["listener", "result"],
            registry=registry,
        )
        self.reload_successful = Gauge(
            f"{p}_config_last_reload_successful",
            "1 if the last configuration reload succeeded (or none was tried), else 0.",
            registry=registry,
        )
        self.reload_success_time = Gauge(
            f"{p}_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load.",
            registry=registry,
        )
        self.http_auth_failures = Counter(
            f"{p}_http_auth_failures_total",
            "HTTP requests to protected paths refused: credentials missing or invalid, bcrypt "
            "checks busy, or no verified client certificate.",
            ["reason"],
            registry=registry,
        )
        self.http_connections_refused = Counter(
            f"{p}_http_connections_refused_total",
            "HTTP connections closed at once because http.max_connections were being served.",
            registry=registry,
        )
        self.http_tls_handshake_failures = Counter(
            f"{p}_http_tls_handshake_failures_total",
            "TLS handshakes on the HTTP endpoint that failed, by kind.",
            ["reason"],
            registry=registry,
        )
        self.http_certificate_not_after = Gauge(
            f"{p}_http_tls_certificate_not_after_timestamp_seconds",
            "Unix time when the first certificate of the HTTP endpoint's file expires, by role: "
            "server (cert_file), ca (client_ca_file).",
            ["role"],
            registry=registry,
        )
        self.http_certificate_reloads = Counter(
            f"{p}_http_tls_certificate_reloads_total",
            "The HTTP endpoint's TLS files replaced on disk and loaded without a restart, by result.",
            ["result"],
            registry=registry,
        )
        # Registered by add_http() only with TLS: without labels it would read 0 ("failed") on plain HTTP.
        self.http_certificate_reload_successful = Gauge(
            f"{p}_http_tls_certificate_last_reload_successful",
            "0 when the HTTP endpoint's last TLS files replaced on disk did not load (the old ones "
            "serve), else 1.",
            registry=None,
        )
        self._log_drops: Callable[[], float] = lambda: 0.0
        registry.register(_CallbackCollector(self._collect_log_drops))
        self.self_check_last_success = Gauge(
            f"{p}_self_check_last_success_timestamp_seconds",
            "Unix time of the last successful readiness self-check.",
            ["listener"],
            registry=registry,
        )
        self.certificate_not_after = Gauge(
            f"{p}_tls_certificate_not_after_timestamp_seconds",
            "Unix time when the first certificate of a TLS listener's file expires, by role: "
            "server (cert_file), ca (ca_file), self_check (self_check_cert_file).",
            ["listener", "role"],
            registry=registry,
        )
        self.certificate_reloads = Counter(
            f"{p}_tls_certificate_reloads_total",
            "TLS files replaced on disk and loaded without a configuration reload, by result.",
            ["listener", "result"],
            registry=registry,
        )
        self.certificate_reload_successful = Gauge(
            f"{p}_tls_certificate_last_reload_successful",
            "0 when the last TLS files replaced on disk did not load (the old ones serve), else 1.",
            ["listener"],
            registry=registry,
        )

    def add_http(self, *, tls: bool) -> None:
        """Create the HTTP endpoint's label sets so they exist at 0 from the start (TLS ones with TLS).

        Called once, when the endpoint starts (HTTP settings change only with a restart).
        """
        for reason in HTTP_AUTH_FAILURES:
            self.http_auth_failures.labels(reason)
        if tls:
            for reason in TLS_FAILURES:
                self.http_tls_handshake_failures.labels(reason)
            for result in CERTIFICATE_RELOAD_RESULTS:
                self.http_certificate_reloads.labels(result)
            self.registry.register(self.http_certificate_reload_successful)

    def count_certificate_reload(self, result: str, listener: str | None) -> None:
        """Count a load of TLS files replaced on disk: a listener's, or (None) the HTTP endpoint's.

        A failure also sets that last-load gauge to 0; a success's 1 comes with
        the new expiry (set_certificates, set_http_certificates).
        """
        if listener is None:
            self.http_certificate_reloads.labels(result).inc()
            if result == "failure":
                self.http_certificate_reload_successful.set(0)
        else:
            self.certificate_reloads.labels(listener, result).inc()
            if result == "failure":
                self.certificate_reload_successful.labels(listener).set(0)

    def set_http_certificates(self, not_after: Mapping[str, float]) -> None:
        """The HTTP endpoint's certificate expiry per role, as loaded now (at start or from disk)."""
        for role in HTTP_CERTIFICATE_ROLES:
            if role in not_after:
                self.http_certificate_not_after.labels(role).set(not_after[role])
            else:
                with suppress(KeyError):
                    self.http_certificate_not_after.remove(role)
        self.http_certificate_reload_successful.set(1)

    def set_engines(self, engines: Iterable[str]) -> None:
        """Label build_info with the association engines the listeners run ("event", "pynetdicom")."""
        self.build_info.info({**self._build, "engine": ",".join(sorted(set(engines)))})

    def count_log_drops(self, dropped: Callable[[], float]) -> None:
        """Export ``dropped()`` as the log records lost to a stuck consumer (read at scrape time)."""
        self._log_drops = dropped

    def _collect_log_drops(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily(
            f"{PREFIX}_log_records_dropped",
            "Log records dropped because the log consumer (stdout) did not keep up.",
        )
        family.add_metric([], float(self._log_drops()))
        yield family

    def set_certificates(self, name: str, not_after: Mapping[str, float] | None) -> None:
        """A listener's certificate expiry per role (None: no TLS), replacing what was exported.

        Only roles with a file get a series: a 0 would read as long expired.
        """
        for role in CERTIFICATE_ROLES:
            if not_after is not None and role in not_after:
                self.certificate_not_after.labels(name, role).set(not_after[role])
            else:
                with suppress(KeyError):
                    self.certificate_not_after.remove(name, role)
        if not_after is None:
            with suppress(KeyError):
                self.certificate_reload_successful.remove(name)
        else:
            # Loaded now, by a start, a reload or a replacement on disk.
            self.certificate_reload_successful.labels(name).set(1)

    def add_listener(self, name: str, calling_aes: Iterable[str], *, tls: bool) -> None:
        """Create a listener's label sets so its series exist at 0 from the start (TLS ones if it has TLS)."""
        for ae in [*calling_aes, OTHER_AE]:
            for outcome in ASSOCIATION_OUTCOMES:
                self.associations.labels(name, ae, outcome)
            for status in ECHO_STATUSES:
                self.echo_requests.labels(name, ae, status)
        for rejection in LISTENER_REJECTIONS:
            self.rejections.labels(name, *rejection.labels)
        for source in ABORT_SOURCES:
            self.aborts.labels(name, source)
        for reason in TLS_FAILURES if tls else ():
            self.tls_handshake_failures.labels(name, reason)
        for result in CERTIFICATE_RELOAD_RESULTS if tls else ():
            self.certificate_reloads.labels(name, result)
        for reason in DROP_REASONS:
            self.connections_dropped.labels(name, reason)
        for result in SELF_CHECK_RESULTS:
            self.self_checks.labels(name, result)
        for metric in (
            self.listener_up,
            self.connections_opened,
            self.connections_open,
            self.associations_active,
            self.association_duration,
            self.echo_duration,
            self.self_check_last_success,
        ):
            metric.labels(name)


class _CallbackCollector(Collector):
    """A collector whose samples a callable yields at scrape time."""

    def __init__(self, collect: Callable[[], Iterable[CounterMetricFamily]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[CounterMetricFamily]:
        return self._collect()


class WithoutCreated:
    """A view of a registry for exposition without the ``_created`` samples.

    Counters and histograms carry a ``_created`` series that doubles the series
    count for no use to alerting (Prometheus users switch it off); prometheus-
    client's own switch is process-wide, which an embedding host may not want.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Any]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
