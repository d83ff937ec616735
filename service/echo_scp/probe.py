"""``/probe``: C-ECHO another DICOM node and answer with Prometheus metrics for that probe alone.

In the manner of prometheus/blackbox_exporter: ``GET
/probe?target=[AET@]HOST[:PORT]&module=NAME`` runs one association (connect,
TLS when the module says so, A-ASSOCIATE, C-ECHO, A-RELEASE) with the client
``echo-scp echo`` uses (:func:`echo_scp.scu.echo_association`), and encodes
what happened from a registry made for this request only; the daemon's own
metrics stay on ``/metrics``, where ``echo_scp_probes_total`` counts the probes.
``debug=true`` returns the probe's log, its metrics and the module instead.

Safety: an HTTP port that anyone can reach must not become a way to make the
daemon connect anywhere. Probing is off until ``probe.allowed_targets`` is
set; a target is resolved first and every address checked, and only an
allowed address is ever connected to (403 otherwise, before any connection);
at most ``probe.max_concurrent`` probes run at once (429 beyond). A probe's
source address is registered as the self-check's is, so that a probe of this
daemon's own listener is not counted as peer traffic (and, like the
self-check, is exempt from the calling-AE allow-list and max_associations).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.exposition import choose_encoder, generate_latest

from echo_scp import scu
from echo_scp.certificates import der_validity
from echo_scp.connections import SelfCheckPorts
from echo_scp.metrics import PREFIX
from echo_scp.protocol import Rejection
from echo_scp.settings import ProbeModuleSettings, ProbeSettings

__all__ = [
    "FAILURE_REASONS",
    "PHASES",
    "RESULTS",
    "SCRAPE_TIMEOUT_HEADER",
    "TIMEOUT_MARGIN",
    "Prober",
    "certificate_not_after",
]

PHASES = ("resolve", "connect", "tls", "associate", "echo", "release")
# Why a probe failed; probe_dicom_failure_reason has one series for each.
FAILURE_REASONS = (
    "resolve",
    "connect_refused",
    "connect",
    "timeout",
    "tls",
    "rejected",
    "aborted",
    "no_accepted_context",
    "protocol",
    "status",
)
# echo_scp_probes_total{result}: ran and succeeded or failed, or was answered 403, 429 or 400.
RESULTS = ("success", "failure", "forbidden", "throttled", "invalid")
SCRAPE_TIMEOUT_HEADER = "x-prometheus-scrape-timeout-seconds"
# Left for encoding and sending the answer before Prometheus gives up, as
# blackbox_exporter's --timeout-offset.
TIMEOUT_MARGIN = 0.5
# The module label of a request naming no configured module: label values
# come from the configuration, never from the request.
OTHER_MODULE = "other"
_PARAMETERS = ("target", "module", "debug")
_TEXT = "text/plain; charset=utf-8"
_CONNECT_KINDS = {
    "resolve": "resolve",
    "refused": "connect_refused",
    "timeout": "timeout",
    "tls": "tls",
    "connect": "connect",
}
_TLS_VERSIONS = {"TLSv1.2": "TLS 1.2", "TLSv1.3": "TLS 1.3"}

Response = tuple[int, str, bytes]


class _Refusal(Exception):
    """The request is answered with an HTTP error before (or instead of) probing."""

    def __init__(self, status: int, result: str, message: str, module: str | None = None) -> None:
        self.status = status
        self.result = result
        self.module = module
        super().__init__(message)


@dataclass(frozen=True)
class _Request:
    target: str
    module_name: str
    module: ProbeModuleSettings
    called_aet: str
    host: str
    port: int
    debug: bool
    timeout: float
    accept: str


@dataclass
class _Outcome:
    """What one probe found, whichever way it ended."""

    trace: scu.EchoTrace = field(default_factory=scu.EchoTrace)
    success: bool = False
    reason: str | None = None
    error: str | None = None
    ip_protocol: int = 0
    accepted: bool = False
    rejection: tuple[int, int, int] | None = None
    abort: tuple[str, str] | None = None
    duration: float = 0.0


class _Trail:
    """The probe's log: kept for ``debug=true`` and passed on to the daemon's log at debug level."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self.lines: list[str] = []

    def __call__(self, event: str, **fields: Any) -> None:
        words = " ".join(f"{key}={_logfmt(value)}" for key, value in fields.items())
        self.lines.append(f"event={event} {words}".rstrip())
        self._log.debug(event, **fields)


def _logfmt(value: Any) -> str:
    """A logfmt value: lists joined with commas, quoted when it holds spaces, quotes or '='."""
    if isinstance(value, list | tuple):
        value = ",".join(str(item) for item in value)
    text = value if isinstance(value, str) else json.dumps(value)
    return json.dumps(text) if not text or any(ch in text for ch in ' "=') else text


class Prober:
    """Answers ``/probe`` requests; ``handle`` is what the HTTP endpoint calls."""

    def __init__(
        self,
        settings: Callable[[], ProbeSettings],
        *,
        registry: CollectorRegistry,
        self_check_ports: SelfCheckPorts,
        log: Any,
    ) -> None:
        self._settings = settings
        self._ports = self_check_ports
        self._log = log
        self._lock = threading.Lock()
        self._running = 0
        self.probes = Counter(
            f"{PREFIX}_probes_total",
            "Requests to /probe, by module and result (success, failure, or answered "
            "forbidden 403, throttled 429, invalid 400).",
            ["module", "result"],
            registry=registry,
        )
        for name in [*settings().modules, OTHER_MODULE]:
            for result in RESULTS:
                self.probes.labels(name, result)

    def handle(self, query: str, headers: Mapping[str, str]) -> Response:
        """Answer one request: (HTTP status, content type, body). ``headers`` has lower-case names."""
        started = time.monotonic()
        settings = self._settings()  # one snapshot for the whole request, as a reload swaps it
        module_label = OTHER_MODULE
        try:
            if not settings.allowed_targets:
                raise _Refusal(403, "forbidden", "probing is off: set probe.allowed_targets to allow targets")
            request = _parse(query, headers, settings)
            module_label = request.module_name
            with self._slot(settings.max_concurrent):
                response = self._probe(request, settings, started)
        except _Refusal as refusal:
            self.probes.labels(refusal.module or module_label, refusal.result).inc()
            if refusal.result == "invalid":
                self._log.info("probe_invalid", problem=str(refusal))
            else:
                self._log.warning(f"probe_{refusal.result}", problem=str(refusal))
            return refusal.status, _TEXT, f"{refusal}\n".encode()
        except Exception as exc:  # a bug here must not kill the HTTP thread silently
            self._log.exception("probe_crashed", module=module_label)
            return 500, _TEXT, f"probe crashed: {exc!r}\n".encode()
        return response

    @contextlib.contextmanager
    def _slot(self, limit: int) -> Iterator[None]:
        """Hold one of the ``limit`` places for a running probe, or refuse with 429."""
        with self._lock:
            if self._running >= limit:
                raise _Refusal(429, "throttled", f"too many probes at once (probe.max_concurrent is {limit})")
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1

    def _probe(self, request: _Request, settings: ProbeSettings, started: float) -> Response:
        trail = _Trail(self._log)
        module = request.module
        trail(
            "probe_started",
            target=request.target,
            module=request.module_name,
            called_ae=request.called_aet,
            calling_ae=module.calling_ae_title,
            timeout_s=round(request.timeout, 3),
            tls=module.tls is not None,
        )
        outcome = _Outcome()
        address = self._allowed_address(request, settings, outcome, trail)
        if address is not None:
            self._associate(request, address, started + request.timeout, outcome, trail)
        outcome.duration = time.monotonic() - started
        if outcome.success:
            trail("probe_succeeded", duration_s=round(outcome.duration, 6))
        else:
            trail("probe_failed", reason=outcome.reason, error=outcome.error)
        self.probes.labels(request.module_name, "success" if outcome.success else "failure").inc()
        registry = _registry(outcome)
        if request.debug:
            return 200, _TEXT, _debug_text(trail.lines, registry, request)
        encoder, content_type = choose_encoder(request.accept)
        return 200, content_type, encoder(registry)

    def _allowed_address(
        self, request: _Request, settings: ProbeSettings, outcome: _Outcome, trail: _Trail
    ) -> str | None:
        """Resolve the target and pick an address the allow-list permits; 403 when there is none."""
        host = request.host
        networks = [ipaddress.ip_network(item) for item in settings.allowed_targets if _is_network(item)]
        named = host.lower().removesuffix(".") in settings.allowed_targets
        literal = _ip(host)
        if literal is None and not named and not networks:
            # No network could admit it, so do not even look the name up.
            raise _Refusal(403, "forbidden", f"target host {host!r} is not in probe.allowed_targets")
        resolving = time.monotonic()
        try:
            infos = socket.getaddrinfo(host, request.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as exc:
            outcome.trace.phases["resolve"] = time.monotonic() - resolving
            outcome.reason = "resolve"
            outcome.error = f"cannot resolve host {host!r}: {getattr(exc, 'strerror', None) or exc}"
            return None
        outcome.trace.phases["resolve"] = time.monotonic() - resolving
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        allowed = addresses if named else [a for a in addresses if _permitted(a, networks)]
        trail("resolved", addresses=addresses, allowed=allowed)
        if not allowed:
            where = "" if literal is not None else f" (resolves to {', '.join(addresses)})"
            raise _Refusal(403, "forbidden", f"target {host!r}{where} is outside probe.allowed_targets")
        chosen = allowed[0]
        outcome.ip_protocol = 6 if ":" in chosen else 4
        return chosen

    def _associate(
        self, request: _Request, address: str, deadline: float, outcome: _Outcome, trail: _Trail
    ) -> None:
        module = request.module
        context = None
        if module.tls is not None:
            try:
                context = module.tls.client_context()
            except scu.TlsFileError as exc:
                outcome.reason, outcome.error = "tls", str(exc)
                return
        bound: list[tuple[str, int]] = []

        def register(local: tuple[str, int]) -> None:
            bound.append(local)
            self._ports.add(local)

        trace = outcome.trace
        try:
            result = scu.echo_association(
                address,
                request.port,
                called_aet=request.called_aet,
                calling_aet=module.calling_ae_title,
                repeat=module.echoes,
                acse_timeout=request.timeout,
                dimse_timeout=request.timeout,
                network_timeout=request.timeout,
                connect_timeout=request.timeout,
                transfer_syntaxes=module.transfer_syntaxes,
                ssl_context=context,
                # The name, not the address: it is what the certificate carries.
                server_hostname=(module.tls.server_name or request.host) if module.tls else None,
                source_address=_source_for(address, request.port),
                on_bound=register,
                deadline=deadline,
                trace=trace,
            )
        except scu.EchoError as exc:
            outcome.error = str(exc)
            outcome.reason = _failure_reason(exc)
            if isinstance(exc, scu.AssociationRejected):
                outcome.rejection = (exc.result, exc.source, exc.reason)
            elif isinstance(exc, scu.AssociationAborted):
                outcome.abort = (_words(exc.source_text), _words(exc.reason_text))
            result = None
        finally:
            # The listener classified the connection when it opened; the address can go.
            for local in bound:
                self._ports.discard(local)
        outcome.accepted = trace.accepted
        _trail_association(trail, trace, outcome)
        if result is not None:
            failed = [status for status in result.statuses if status != 0x0000]
            if failed:
                outcome.reason = "status"
                outcome.error = str(scu.EchoFailedStatus(failed[0]))
            else:
                outcome.success = True


def _parse(query: str, headers: Mapping[str, str], settings: ProbeSettings) -> _Request:
    """Check the query and the scrape-timeout header; 400 with the reason for anything wrong."""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=8)
    except ValueError as exc:
        raise _Refusal(400, "invalid", f"malformed query string: {exc}") from None
    unknown = sorted(set(params) - set(_PARAMETERS))
    if unknown:
        raise _Refusal(
            400, "invalid", f"unknown parameter {unknown[0]!r}; /probe takes target, module and debug"
        )
    for name, values in params.items():
        if len(values) > 1:
            raise _Refusal(400, "invalid", f"parameter {name!r} is given {len(values)} times")
    target = params.get("target", [""])[0].strip()
    if not target:
        raise _Refusal(400, "invalid", "missing parameter 'target' ([AET@]HOST[:PORT])")
    module_name = params.get("module", ["default"])[0]
    module = settings.modules.get(module_name)
    if module is None:
        known = ", ".join(sorted(settings.modules))
        raise _Refusal(400, "invalid", f"unknown module {module_name!r} (configured: {known})")
    debug_text = params.get("debug", ["false"])[0].lower()
    if debug_text not in ("true", "false"):
        raise _Refusal(400, "invalid", f"debug must be true or false, got {debug_text!r}", module_name)
    try:
        called, host, port = scu.parse_address(
            target, default_port=module.port, default_called_aet=module.called_ae_title
        )
    except ValueError as exc:
        raise _Refusal(400, "invalid", f"invalid target: {exc}", module_name) from None
    return _Request(
        target=target,
        module_name=module_name,
        module=module,
        called_aet=called,
        host=host,
        port=port,
        debug=debug_text == "true",
        timeout=_timeout(module.timeout, headers.get(SCRAPE_TIMEOUT_HEADER)),
        accept=headers.get("accept", ""),
    )


def _timeout(module_timeout: float, header: str | None) -> float:
    """The module's timeout, or less when Prometheus gives up sooner (minus a margin to answer in)."""
    if header is None:
        return module_timeout
    try:
        scrape = float(header)
    except ValueError:
        scrape = float("nan")
    if not 0 < scrape < float("inf"):
        raise _Refusal(400, "invalid", f"invalid {SCRAPE_TIMEOUT_HEADER} header {header!r}")
    # A scrape timeout below twice the margin keeps half of itself instead.
    budget = scrape - TIMEOUT_MARGIN if scrape > 2 * TIMEOUT_MARGIN else scrape / 2
    return min(module_timeout, budget)


def _is_network(item: str) -> bool:
    return "/" in item


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None


def _permitted(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    ip = _ip(address)
    if ip is None:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # ::ffff:10.0.0.5 reaches 10.0.0.5: judge it as that address.
        candidates = [ip.ipv4_mapped]
    return any(candidate in network for candidate in candidates for network in networks)


def _source_for(address: str, port: int) -> tuple[str, int] | None:
    """The local address the kernel will connect from, bound explicitly so it can be registered.

    A probe of this daemon's own listener must be recognised by the source
    address the listener sees; with a wildcard bind that address is only known
    after connecting, too late. Connecting a UDP socket sends nothing: it only
    asks the routing table.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.connect((address, port))
            return (str(udp.getsockname()[0]), 0)
    except OSError:
        return None


def _failure_reason(exc: scu.EchoError) -> str:
    if isinstance(exc, scu.ConnectFailed):
        return _CONNECT_KINDS.get(exc.kind, "connect")
    if isinstance(exc, scu.EchoTimeout):
        return "timeout"
    if isinstance(exc, scu.AssociationRejected):
        return "rejected"
    if isinstance(exc, scu.AssociationAborted):
        return "aborted"
    if isinstance(exc, scu.NoAcceptedContext):
        return "no_accepted_context"
    return "protocol"


def _words(text: str) -> str:
    """PS3.8's words as a label value: "service-provider" -> "service_provider"."""
    if text.startswith("unknown") or text == "Reserved":
        return "unknown"
    return "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_")


def _label(value: str | None) -> str:
    """A peer-supplied string made safe as a label value: printable ASCII, bounded."""
    if value is None:
        return ""
    return "".join(ch for ch in value if ch.isascii() and ch.isprintable())[:64]


def _trail_association(trail: _Trail, trace: scu.EchoTrace, outcome: _Outcome) -> None:
    """Log each phase that happened, from the trace."""
    phases = trace.phases
    if trace.peer_address is not None:
        host, port = trace.peer_address
        trail(
            "connected",
            peer=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            seconds=round(phases.get("connect", 0.0), 6),
        )
    if trace.tls_version is not None:
        expiry = certificate_not_after(trace.peer_certificate) if trace.peer_certificate else None
        trail(
            "tls_established",
            version=trace.tls_version,
            certificate_not_after=_iso(expiry),
            seconds=round(phases.get("tls", 0.0), 6),
        )
    if trace.accepted:
        trail(
            "association_accepted",
            implementation_class_uid=trace.implementation_class_uid,
            implementation_version_name=trace.implementation_version_name,
            seconds=round(phases.get("associate", 0.0), 6),
        )
    for message_id, status in enumerate(trace.statuses, start=1):
        trail("c_echo", message_id=message_id, status=f"0x{status:04X}")
    if outcome.error is None and "release" in phases:
        trail("association_released", seconds=round(phases["release"], 6))


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat().replace("+00:00", "Z")


def _registry(outcome: _Outcome) -> CollectorRegistry:
    """The metrics of one probe, in a registry of their own."""
    registry = CollectorRegistry()
    trace = outcome.trace
    Gauge("probe_success", "1 if the C-ECHO association succeeded, else 0.", registry=registry).set(
        1 if outcome.success else 0
    )
    Gauge("probe_duration_seconds", "How long the probe took.", registry=registry).set(outcome.duration)
    Gauge(
        "probe_ip_protocol", "IP version of the address probed (4 or 6), 0 if none.", registry=registry
    ).set(outcome.ip_protocol)
    phases = Gauge(
        "probe_dicom_phase_duration_seconds",
        "Seconds spent in each phase of the association (0 for phases not reached).",
        ["phase"],
        registry=registry,
    )
    for phase in PHASES:
        phases.labels(phase).set(trace.phases.get(phase, 0.0))
    reasons = Gauge(
        "probe_dicom_failure_reason",
        "1 for the reason the probe failed, 0 for the others (all 0 on success).",
        ["reason"],
        registry=registry,
    )
    for reason in FAILURE_REASONS:
        reasons.labels(reason).set(1 if outcome.reason == reason else 0)
    Gauge(
        "probe_dicom_association_accepted",
        "1 if the peer answered A-ASSOCIATE-AC, else 0.",
        registry=registry,
    ).set(1 if outcome.accepted else 0)
    rejected = Gauge(
        "probe_dicom_association_rejected",
        "1, with the A-ASSOCIATE-RJ result, source and reason as words, when the peer rejected.",
        ["result", "source", "reason"],
        registry=registry,
    )
    if outcome.rejection is not None:
        rejected.labels(*Rejection(*outcome.rejection).labels).set(1)
    aborted = Gauge(
        "probe_dicom_association_aborted",
        "1, with the A-ABORT source and reason as words, when the peer aborted.",
        ["source", "reason"],
        registry=registry,
    )
    if outcome.abort is not None:
        aborted.labels(*outcome.abort).set(1)
    if trace.statuses:
        failed = [status for status in trace.statuses if status != 0x0000]
        Gauge(
            "probe_dicom_echo_status",
            "DIMSE status of the C-ECHO-RSP (the first that was not Success, else 0); "
            "absent when no C-ECHO was answered.",
            registry=registry,
        ).set(failed[0] if failed else 0)
    if trace.accepted:
        Info(
            "probe_dicom_peer",
            "What the peer calls itself in its A-ASSOCIATE-AC.",
            registry=registry,
        ).info(
            {
                "implementation_class_uid": _label(trace.implementation_class_uid),
                "implementation_version_name": _label(trace.implementation_version_name),
            }
        )
    if trace.tls_version is not None:
        Gauge(
            "probe_tls_version_info", "The TLS version of the connection.", ["version"], registry=registry
        ).labels(_TLS_VERSIONS.get(trace.tls_version, trace.tls_version)).set(1)
        expiry = certificate_not_after(trace.peer_certificate) if trace.peer_certificate else None
        if expiry is not None:
            Gauge(
                "probe_ssl_earliest_cert_expiry",
                "Unix time at which the peer's certificate expires.",
                registry=registry,
            ).set(expiry)
    return registry


def _debug_text(lines: list[str], registry: CollectorRegistry, request: _Request) -> bytes:
    module = request.module.model_dump(mode="json")
    return (
        "Logs for the probe:\n"
        + "\n".join(lines)
        + "\n\nMetrics that would have been returned:\n"
        + generate_latest(registry).decode()
        + f"\nModule configuration ({request.module_name}):\n"
        + json.dumps(module, indent=2)
        + "\n"
    ).encode()


def certificate_not_after(der: bytes) -> float | None:
    """Unix time of a DER certificate's notAfter, or None if it cannot be read.

    ``ssl`` parses certificates only when it verified them, and a module may
    turn verification off; ``certificates.der_validity`` reads the field itself.
    """
    try:
        return der_validity(der).not_after
    except ValueError:
        return None
