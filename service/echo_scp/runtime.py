"""The runtime snapshot of one listener: everything the association path reads.

A :class:`ListenerRuntime` is built once from validated settings and never
changes: the association policy, the presentation contexts to negotiate, the
TLS contexts, the calling AE title label set, limits and timeouts. A reload
builds every new snapshot first and then swaps each listener's snapshot with
one assignment; a connection keeps the snapshot that was current when it
arrived (the engine hands it to the association before negotiation), so an
association in progress is never judged by two configurations.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from pynetdicom import build_context
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from echo_scp.connections import OTHER_AE
from echo_scp.protocol import REJECT_CALLED_AE, REJECT_CALLING_AE, Rejection
from echo_scp.settings import ListenerSettings


@dataclass(frozen=True, eq=False)
class ListenerRuntime:
    """One listener's configuration as the association path uses it; immutable."""

    settings: ListenerSettings
    # Read by negotiation (never modified: it builds new contexts for its answer).
    contexts: tuple[PresentationContext, ...]
    ssl_context: ssl.SSLContext | None
    self_check_ssl_context: ssl.SSLContext | None
    # Calling AE titles that get a label of their own; the rest are "other".
    calling_labels: frozenset[str]
    # Whether pynetdicom's per-PDU debug handlers run (log level debug).
    pdu_logging: bool

    @property
    def name(self) -> str:
        return self.settings.name

    # The engine's AcceptorProfile: what a new association is built from.
    @property
    def ae_title(self) -> str:
        return self.settings.ae_title

    @property
    def acse_timeout(self) -> float:
        return self.settings.acse_timeout

    @property
    def dimse_timeout(self) -> float:
        return self.settings.dimse_timeout

    @property
    def network_timeout(self) -> float:
        return self.settings.network_timeout

    @property
    def maximum_pdu_size(self) -> int:
        return self.settings.max_pdu_size

    @property
    def handshake_timeout(self) -> float:
        """How long a TLS handshake may take (0 for a listener without TLS)."""
        tls = self.settings.tls
        return tls.handshake_timeout if tls is not None else 0.0

    def rejection(self, *, called_ae: str, calling_ae: str, self_check: bool) -> Rejection | None:
        """The A-ASSOCIATE-RJ to send for these AE titles, or None to go on.

        Permanent problems are reported before the transient limit so that a
        misconfigured peer learns what to fix. The self-check is exempt from the
        calling-AE allow-list; it always uses the right called AE title.
        """
        s = self.settings
        if s.require_called_ae_title and called_ae.strip() != s.ae_title:
            return REJECT_CALLED_AE
        allowed = s.allowed_calling_ae_titles
        if allowed and not self_check and calling_ae.strip() not in allowed:
            return REJECT_CALLING_AE
        return None


def build_runtime(settings: ListenerSettings, *, debug: bool) -> ListenerRuntime:
    """The snapshot for validated ``settings`` (whose TLS contexts are already loaded)."""
    tls = settings.tls
    return ListenerRuntime(
        settings=settings,
        contexts=(build_context(Verification, settings.transfer_syntaxes),),
        # Loaded once, when the settings were validated.
        ssl_context=tls.server_context if tls else None,
        self_check_ssl_context=tls.self_check_context if tls else None,
        calling_labels=frozenset(settings.allowed_calling_ae_titles) - {OTHER_AE},
        pdu_logging=debug,
    )
