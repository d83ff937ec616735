"""The runtime snapshot of one listener: everything the association path reads.

A :class:`ListenerRuntime` is built once from validated settings and never
changes: the association policy (with its table of known peers and their
networks, parsed once), the presentation contexts to negotiate, the TLS
contexts, the calling AE title label set, limits and timeouts. A reload
builds every new snapshot first and then swaps each listener's snapshot with
one assignment; a connection keeps the snapshot that was current when it
arrived (the engine hands it to the association before negotiation), so an
association in progress is never judged by two configurations.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pynetdicom import build_context
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from echo_scp.connections import OTHER_AE
from echo_scp.protocol import REJECT_CALLED_AE, REJECT_CALLING_AE, REJECT_LOCAL_LIMIT, Rejection
from echo_scp.settings import ListenerSettings, TlsSettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Refusal:
    """An A-ASSOCIATE-RJ to send and the rule behind it: ``cause`` and ``details`` go into the log line."""

    rejection: Rejection
    cause: str
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Peer:
    """A known calling AE title, its networks and its own association limit (None: none)."""

    ae_title: str
    networks: tuple[IPNetwork, ...]
    max_associations: int | None

    def allows(self, address: IPAddress | None) -> bool:
        # Comparing addresses of different versions is simply False.
        return address is not None and any(address in network for network in self.networks)


def source_address(host: str) -> IPAddress | None:
    """The peer's address as policy sees it: ``::ffff:10.1.2.3`` is 10.1.2.3.

    A listener bound to ``::`` (dual stack) sees IPv4 peers as IPv4-mapped
    IPv6 addresses, which no IPv4 network contains.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


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
    # Known peers by calling AE title, and the titles accepted from anywhere.
    peers: Mapping[str, Peer]
    anywhere: frozenset[str]
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

    def rejection(
        self, *, called_ae: str, calling_ae: str, peer_host: str, self_check: bool
    ) -> Refusal | None:
        """The A-ASSOCIATE-RJ to send for these AE titles from this address, or None to go on.

        Permanent problems are reported before the transient limits (the
        connection table's) so that a misconfigured peer learns what to fix.
        The self-check is exempt from the calling-AE policy; it always uses
        the right called AE title.
        """
        s = self.settings
        if s.require_called_ae_title and called_ae.strip() != s.ae_title:
            return Refusal(REJECT_CALLED_AE, "called_ae_title_mismatch", {"expected_called_ae": s.ae_title})
        if self_check or not (self.peers or self.anywhere):
            return None
        calling = calling_ae.strip()
        if calling in self.anywhere:
            return None
        peer = self.peers.get(calling)
        if peer is None:
            return Refusal(REJECT_CALLING_AE, "unknown_calling_ae_title")
        if not peer.allows(source_address(peer_host)):
            return Refusal(
                REJECT_CALLING_AE,
                "calling_ae_title_not_allowed_from_address",
                {"allowed_networks": [str(network) for network in peer.networks]},
            )
        return None

    def limit_refusal(self, refused_by: str, calling_ae: str) -> Refusal:
        """The 2/3/2 for a limit the connection table reached: "listener" or "peer"."""
        if refused_by == "peer":
            limit = self.peers[calling_ae].max_associations
            return Refusal(REJECT_LOCAL_LIMIT, "peer_limit", {"max_associations": limit})
        return Refusal(
            REJECT_LOCAL_LIMIT, "listener_limit", {"max_associations": self.settings.max_associations}
        )


def build_runtime(settings: ListenerSettings, *, debug: bool) -> ListenerRuntime:
    """The snapshot for validated ``settings`` (whose TLS contexts are already loaded)."""
    tls = settings.tls
    peers = {
        item.ae_title: Peer(
            ae_title=item.ae_title,
            networks=tuple(ipaddress.ip_network(network) for network in item.networks),
            max_associations=item.max_associations,
        )
        for item in settings.peers
    }
    anywhere = frozenset(settings.allowed_calling_ae_titles)
    return ListenerRuntime(
        settings=settings,
        contexts=(build_context(Verification, settings.transfer_syntaxes),),
        # Loaded once, when the settings were validated.
        ssl_context=tls.server_context if tls else None,
        self_check_ssl_context=tls.self_check_context if tls else None,
        # Configured titles only, so the label set stays bounded whoever calls.
        calling_labels=(anywhere | frozenset(peers)) - {OTHER_AE},
        peers=peers,
        anywhere=anywhere,
        pdu_logging=debug,
    )


def with_tls(runtime: ListenerRuntime, tls: TlsSettings) -> ListenerRuntime:
    """The same snapshot serving ``tls`` instead: how certificate files replaced on disk are taken up.

    Everything else stays as it was (the rest of the settings did not change),
    so a connection sees either the old snapshot or this one, as on a reload.
    """
    return replace(
        runtime,
        settings=runtime.settings.model_copy(update={"tls": tls}),
        ssl_context=tls.server_context,
        self_check_ssl_context=tls.self_check_context,
    )
