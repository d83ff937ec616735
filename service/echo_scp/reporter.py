"""The one place where connection, association and HTTP access events become metrics and log events.

``listener.py`` binds pynetdicom's event handlers and calls the methods here
with the connection's record from ``connections.py``; this module neither talks
to pynetdicom nor holds admission state. Each method writes the record's part
of the story (its outcome, echoes, who aborted) and reports it; :meth:`ended`
writes the canonical ``association_ended`` line, once per connection.

Connections of the daemon's own self-check are kept out of the peer metrics
and logged at debug level only.
"""

from __future__ import annotations

from typing import Any

from echo_scp.connections import OTHER_AE, Connection
from echo_scp.metrics import Metrics
from echo_scp.protocol import Rejection
from echo_scp.transfer_syntax import transfer_syntax_name

# Outcomes after which nothing changes what the association was.
_FINAL = frozenset({"released", "aborted", "no_accepted_context"})
# How many rejected abstract syntaxes the log line names (a peer may propose 128).
_NAMED_SYNTAXES = 8


class Reporter:
    """Turns connection and association events into metrics and log events.

    Methods are called from pynetdicom's threads; they are safe to call
    concurrently for different connections and never raise on their own
    account (``listener.py`` guards each call too).
    """

    def __init__(self, metrics: Metrics, log: Any) -> None:
        self.metrics = metrics
        self.log = log
        # Each label set's child, looked up once: prometheus_client's labels()
        # checks and converts its arguments under a lock at every call.
        # metrics.py never removes a label set, so a child stays the registry's.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def opened(self, conn: Connection) -> None:
        """A peer connected (before any TLS handshake)."""
        if not conn.self_check:
            self._child(self.metrics.connections_opened, conn.listener).inc()
            self._child(self.metrics.connections_open, conn.listener).inc()
        self.log.debug("connection_opened", **conn.fields())

    def evicted(self, conn: Connection, limit: int) -> None:
        if not conn.self_check:
            self._child(self.metrics.connections_dropped, conn.listener, "pending_limit").inc()
        self.log.warning("connection_evicted", reason="pending_limit", max_pending=limit, **conn.fields())

    def tls_failed(self, conn: Connection, reason: str, detail: str) -> None:
        conn.tls_failure = reason
        conn.outcome = "tls_failed"
        if not conn.self_check:
            self._child(self.metrics.tls_handshake_failures, conn.listener, reason).inc()
        self.log.warning("tls_handshake_failed", reason=reason, detail=detail, **conn.fields())

    def requested(self, conn: Connection, calling_ae: str, called_ae: str) -> None:
        conn.calling_ae, conn.called_ae = calling_ae, called_ae
        conn.calling_label = calling_ae if calling_ae in conn.runtime.calling_labels else OTHER_AE
        conn.outcome = "requested"
        self.log.debug("association_requested", **conn.fields())

    def rejected(self, conn: Connection, rejection: Rejection, *, cause: str, **details: Any) -> None:
        """An A-ASSOCIATE-RJ is sent; ``cause`` says which rule refused (the DICOM reason is coarser)."""
        conn.rejection = rejection
        conn.outcome = "rejected"
        words = rejection.labels
        if not conn.self_check:
            self._child(self.metrics.associations, conn.listener, conn.calling_label, "rejected").inc()
            self._child(self.metrics.rejections, conn.listener, *words).inc()
        self.log.info(
            "association_rejected",
            result=words[0],
            source=words[1],
            reason=words[2],
            code=rejection.code,
            cause=cause,
            **details,
            **conn.fields(),
        )

    def refused(self, listener: str, rejection: Rejection, count: int) -> None:
        """A-ASSOCIATE-RJs the engine sent before any association existed (overload, shutdown)."""
        words = rejection.labels
        self.metrics.rejections.labels(listener, *words).inc(count)
        self.log.info(
            "connections_refused",
            listener=listener,
            count=count,
            result=words[0],
            source=words[1],
            reason=words[2],
            code=rejection.code,
        )

    def accepted(self, conn: Connection, transfer_syntax: str | None) -> None:
        conn.accepted = True
        conn.outcome = "accepted"
        conn.transfer_syntax = transfer_syntax
        if not conn.self_check:
            self._child(self.metrics.associations, conn.listener, conn.calling_label, "accepted").inc()
            self._child(self.metrics.associations_active, conn.listener).inc()
        self.log.debug(
            "association_accepted",
            transfer_syntax=transfer_syntax_name(transfer_syntax) if transfer_syntax else None,
            **conn.fields(),
        )

    def no_accepted_context(self, conn: Connection, abstract_syntaxes: list[str]) -> None:
        """Every proposed presentation context was rejected: the peer wanted another service."""
        conn.outcome = "no_accepted_context"
        conn.rejected_abstract_syntaxes = abstract_syntaxes
        if not conn.self_check:
            outcome = "no_accepted_context"
            self._child(self.metrics.associations, conn.listener, conn.calling_label, outcome).inc()

    def dimse_received(self, conn: Connection, now: float) -> None:
        conn.dimse_received_at = now

    def echo(self, conn: Connection, message_id: int | None, status: int) -> None:
        """A C-ECHO-RQ is being answered with ``status``."""
        conn.echoes += 1
        if not conn.self_check:
            label = "success" if status == 0 else "failure"
            self._child(self.metrics.echo_requests, conn.listener, conn.calling_label, label).inc()
        self.log.debug("c_echo", message_id=message_id, status=f"0x{status:04X}", **conn.fields())

    def echo_response_sent(self, conn: Connection, now: float) -> None:
        started, conn.dimse_received_at = conn.dimse_received_at, None
        if started is not None and not conn.self_check:
            self._child(self.metrics.echo_duration, conn.listener).observe(now - started)

    def released(self, conn: Connection) -> None:
        if conn.outcome in _FINAL:
            return
        conn.outcome = "released"
        if not conn.self_check:
            self._child(self.metrics.associations, conn.listener, conn.calling_label, "released").inc()
        self.log.debug("association_released", **conn.fields())

    def release_requested(self, conn: Connection) -> None:
        """The peer sent A-RELEASE-RQ (seen ahead of pynetdicom's EVT_RELEASED)."""
        conn.release_requested = True

    def abort_received(self, conn: Connection, source: str) -> None:
        """Remember who aborted, ahead of pynetdicom's EVT_ABORTED."""
        conn.abort_source = source

    def aborted(self, conn: Connection, local: bool) -> None:
        if conn.outcome in _FINAL:
            conn.abort_source = conn.abort_source or ("local" if local else "peer")
            return
        conn.outcome = "aborted"
        source = "local" if local else (conn.abort_source or "peer")
        conn.abort_source = source
        if not conn.self_check:
            self._child(self.metrics.associations, conn.listener, conn.calling_label, "aborted").inc()
            self._child(self.metrics.aborts, conn.listener, source).inc()
        self.log.info("association_aborted", abort_source=source, **conn.fields())

    def ended(self, conn: Connection, now: float) -> None:
        """The connection is gone (its record finished): settle its outcome and write its line."""
        duration = now - conn.opened
        if conn.outcome == "closed_before_request" and conn.problems:
            # It sent something, and that was not an A-ASSOCIATE-RQ we could read.
            conn.outcome = "protocol_error"
        if not conn.self_check:
            self._child(self.metrics.connections_open, conn.listener).dec()
            if conn.outcome == "closed_before_request" and not conn.evicted:
                self._child(self.metrics.connections_dropped, conn.listener, "no_request").inc()
            elif conn.outcome == "protocol_error":
                self._child(self.metrics.connections_dropped, conn.listener, "protocol_error").inc()
            if conn.accepted:
                self._child(self.metrics.associations_active, conn.listener).dec()
                self._child(self.metrics.association_duration, conn.listener).observe(duration)
        if conn.accepted and conn.outcome == "accepted":
            # pynetdicom can report the close before the association thread
            # reports the release or abort that caused it.
            if conn.release_requested and conn.abort_source is None:
                self.released(conn)
            else:
                conn.abort_source = conn.abort_source or "provider"
                self.aborted(conn, local=False)
        fields: dict[str, Any] = {
            **conn.fields(),
            "outcome": conn.outcome,
            "echoes": conn.echoes,
            "duration_s": round(duration, 6),
        }
        if conn.transfer_syntax:
            fields["transfer_syntax"] = transfer_syntax_name(conn.transfer_syntax)
        if conn.rejection:
            fields["rejection"] = conn.rejection.code
        if conn.abort_source:
            fields["abort_source"] = conn.abort_source
        if conn.tls_failure:
            fields["tls_failure"] = conn.tls_failure
        if conn.outcome == "no_accepted_context":
            # transfer_syntax_name looks up any UID: SOP classes have names too.
            # One context per transfer syntax is common: name each class once.
            names = list(dict.fromkeys(map(transfer_syntax_name, conn.rejected_abstract_syntaxes)))
            fields["rejected_abstract_syntaxes"] = names[:_NAMED_SYNTAXES]
            if len(names) > _NAMED_SYNTAXES:
                fields["rejected_abstract_syntaxes_more"] = len(names) - _NAMED_SYNTAXES
        if conn.problems:
            fields["problem"] = conn.problems[0]
            if conn.problem_count > 1:
                fields["problems"] = conn.problem_count
        if conn.self_check:
            self.log.debug("association_ended", self_check=True, **fields)
        elif conn.outcome == "no_accepted_context" or conn.problems:
            # A misrouted modality, or a peer that does not speak DICOM
            # properly: worth an operator's attention, once per connection.
            self.log.warning("association_ended", **fields)
        else:
            self.log.info("association_ended", **fields)

    # -- the HTTP endpoint ------------------------------------------------------

    def http_auth_failed(self, reason: str, path: str, user: str | None, client: str) -> None:
        """A request to a protected HTTP path was refused (the claimed user is logged, never counted)."""
        self.metrics.http_auth_failures.labels(reason).inc()
        # Both come from the client: cut them short.
        self.log.info(
            "http_auth_failed",
            reason=reason,
            path=path[:200],
            user=user[:64] if user is not None else None,
            peer_host=client,
        )

    def http_connection_refused(self) -> None:
        """An HTTP connection was closed at once: http.max_connections were being served (no line each)."""
        self.metrics.http_connections_refused.inc()

    def http_tls_failed(self, reason: str, detail: str, client: str) -> None:
        self.metrics.http_tls_handshake_failures.labels(reason).inc()
        self.log.info("http_tls_handshake_failed", reason=reason, detail=detail, peer_host=client)
