"""Known peers: calling AE titles bound to the networks they may connect from, with limits of their own.

Real peers only: pynetdicom's SCU (which can choose its source address, so
127.0.0.1, 127.0.0.2 and ::1 are three source networks on loopback) and DCMTK
``echoscu`` (IPv4 only in DCMTK 3.6.7, always from 127.0.0.1). Each case checks
the A-ASSOCIATE-RJ the peer receives, the exact ``association_rejected`` log
line and the metrics.
"""

from __future__ import annotations

import socket
import subprocess
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.conftest import make_settings, pynetdicom_associate, require_tool, skip_unless_ci, wait_for

CT1 = {"ae_title": "CT1", "networks": ["127.0.0.1/32"]}
NOT_RECOGNISED = {
    "listener": "dicom",
    "result": "permanent",
    "source": "service_user",
    "reason": "calling_ae_title_not_recognised",
}
LIMIT = {
    "listener": "dicom",
    "result": "transient",
    "source": "service_provider_presentation",
    "reason": "local_limit_exceeded",
}


def _ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        skip_unless_ci("no IPv6 loopback on this machine")


def _associate(host: str, port: int, calling: str, source: str | None = None) -> Any:
    """A pynetdicom association from ``source`` (default: the kernel's choice) to host:port."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    bind = (source, 0) if source is not None else None
    return pynetdicom_associate(ae, host, port, ae_title="ECHOSCP", bind_address=bind)


def _rj(assoc: Any) -> tuple[int, int, int]:
    rsp = assoc.acceptor.primitive
    return (rsp.result, rsp.result_source, rsp.diagnostic)


def _last_rejection(running: Any) -> dict[str, Any]:
    """The last association_rejected line without the fields that change from run to run."""
    wait_for(lambda: running.events("association_rejected"))
    line = dict(running.events("association_rejected")[-1])
    for volatile in ("assoc_id", "peer_port"):
        line.pop(volatile)
    return line


def _rejections(running: Any, words: dict[str, str]) -> float:
    return float(running.sample("echo_scp_association_rejections_total", **words))


def _echoscu(echoscu: str, port: int, calling: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [echoscu, "-aet", calling, "-aec", "ECHOSCP", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_known_peer_from_its_network_is_accepted(start_service):
    """CT1 from 127.0.0.1, inside its only network, is accepted and counted under its own title."""
    running = start_service(listeners=[{"peers": [CT1]}])
    assoc = _associate("127.0.0.1", running.port(), "CT1", source="127.0.0.1")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    running.wait_idle()
    (ended,) = [e for e in running.events("association_ended") if not e.get("self_check")]
    assert (ended["calling_ae"], ended["peer_host"], ended["outcome"]) == ("CT1", "127.0.0.1", "released")
    labels = {"listener": "dicom", "calling_ae": "CT1"}
    assert running.sample("echo_scp_echo_requests_total", status="success", **labels) == 1
    assert running.sample("echo_scp_associations_total", outcome="accepted", **labels) == 1


def test_known_peer_from_another_network_is_rejected_1_1_3(start_service):
    """CT1 (allowed on 127.0.0.1/32 only) from ::1 and from 127.0.0.2 gets 1/1/3, logged with the address."""
    _ipv6_loopback()
    running = start_service(listeners=[{"peers": [CT1]}, {"name": "v6", "host": "::1", "peers": [CT1]}])
    v4, v6 = running.port(0), running.port(1)

    from_v6 = _associate("::1", v6, "CT1")
    assert from_v6.is_rejected and _rj(from_v6) == (1, 1, 3)
    assert _last_rejection(running) == {
        "event": "association_rejected",
        "log_level": "info",
        "listener": "v6",
        "result": "permanent",
        "source": "service_user",
        "reason": "calling_ae_title_not_recognised",
        "code": "1/1/3",
        "cause": "calling_ae_title_not_allowed_from_address",
        "allowed_networks": ["127.0.0.1/32"],
        "peer_host": "::1",
        "calling_ae": "CT1",
        "called_ae": "ECHOSCP",
    }
    assert _rejections(running, {**NOT_RECOGNISED, "listener": "v6"}) == 1

    from_other_v4 = _associate("127.0.0.1", v4, "CT1", source="127.0.0.2")
    assert from_other_v4.is_rejected and _rj(from_other_v4) == (1, 1, 3)
    line = _last_rejection(running)
    assert (line["cause"], line["peer_host"], line["listener"]) == (
        "calling_ae_title_not_allowed_from_address",
        "127.0.0.2",
        "dicom",
    )
    assert _rejections(running, NOT_RECOGNISED) == 1
    rejected = {"listener": "dicom", "calling_ae": "CT1", "outcome": "rejected"}
    assert running.sample("echo_scp_associations_total", **rejected) == 1, "labelled by its configured title"

    ok = _associate("127.0.0.1", v4, "CT1", source="127.0.0.1")
    assert ok.is_established, "the same title from its own network still works"
    ok.release()


def test_ipv4_mapped_address_matches_an_ipv4_network():
    """An IPv4 peer seen on an IPv6 socket (::ffff:127.0.0.1, as on a "::" listener) matches 127.0.0.1/32.

    pynetdicom binds an IPv4 socket for ``::ffff:127.0.0.1``, and a ``::``
    listener would listen beyond loopback, so the mapped address comes from a
    real IPv6 socket of the test's own and goes to the listener's policy.
    """
    from echo_scp.runtime import build_runtime

    with socket.socket(socket.AF_INET6) as server:
        server.bind(("::ffff:127.0.0.1", 0))
        server.listen()
        with socket.create_connection(("127.0.0.1", server.getsockname()[1]), timeout=5):
            accepted, address = server.accept()
            accepted.close()
    assert address[0] == "::ffff:127.0.0.1"
    runtime = build_runtime(make_settings(listeners=[{"peers": [CT1]}]).listeners[0], debug=False)
    assert (
        runtime.rejection(called_ae="ECHOSCP", calling_ae="CT1", peer_host=address[0], self_check=False)
        is None
    )
    refused = runtime.rejection(called_ae="ECHOSCP", calling_ae="CT1", peer_host="::1", self_check=False)
    assert refused is not None and refused.rejection == (1, 1, 3)


def test_unknown_title_is_rejected_1_1_3_when_peers_are_configured(start_service):
    """With peers configured, a title that is neither a peer nor on the allow-list gets 1/1/3."""
    running = start_service(listeners=[{"peers": [CT1]}])
    assoc = _associate("127.0.0.1", running.port(), "STRANGER")
    assert assoc.is_rejected and _rj(assoc) == (1, 1, 3)
    assert _last_rejection(running) == {
        "event": "association_rejected",
        "log_level": "info",
        "listener": "dicom",
        "result": "permanent",
        "source": "service_user",
        "reason": "calling_ae_title_not_recognised",
        "code": "1/1/3",
        "cause": "unknown_calling_ae_title",
        "peer_host": "127.0.0.1",
        "calling_ae": "STRANGER",
        "called_ae": "ECHOSCP",
    }
    assert _rejections(running, NOT_RECOGNISED) == 1
    other = {"listener": "dicom", "calling_ae": "other", "outcome": "rejected"}
    assert running.sample("echo_scp_associations_total", **other) == 1, "an unknown title is not a label"


def test_allow_list_titles_come_from_any_network_next_to_peers(start_service):
    """allowed_calling_ae_titles (the short form) accepts its titles from anywhere, beside peers' networks."""
    _ipv6_loopback()
    running = start_service(
        listeners=[{"host": "::1", "peers": [CT1], "allowed_calling_ae_titles": ["ANYWHERE"]}]
    )
    ok = _associate("::1", running.port(), "ANYWHERE")
    assert ok.is_established
    ok.release()
    assert _associate("::1", running.port(), "CT1").is_rejected


def test_peer_over_its_limit_is_rejected_2_3_2(start_service):
    """CT1 with max_associations 1 gets 2/3/2 for a second association; others get in; the slot comes back."""
    running = start_service(
        listeners=[{"peers": [{**CT1, "max_associations": 1}], "allowed_calling_ae_titles": ["OTHER"]}]
    )
    port = running.port()
    held = _associate("127.0.0.1", port, "CT1")
    assert held.is_established
    extra = _associate("127.0.0.1", port, "CT1")
    assert extra.is_rejected and _rj(extra) == (2, 3, 2)
    assert _last_rejection(running) == {
        "event": "association_rejected",
        "log_level": "info",
        "listener": "dicom",
        "result": "transient",
        "source": "service_provider_presentation",
        "reason": "local_limit_exceeded",
        "code": "2/3/2",
        "cause": "peer_limit",
        "max_associations": 1,
        "peer_host": "127.0.0.1",
        "calling_ae": "CT1",
        "called_ae": "ECHOSCP",
    }
    assert _rejections(running, LIMIT) == 1
    other = _associate("127.0.0.1", port, "OTHER")
    assert other.is_established, "the listener's own limit is not reached"
    other.release()
    held.release()
    running.wait_idle()
    again = _associate("127.0.0.1", port, "CT1")
    assert again.is_established, "the peer's slot is given back when its association ends"
    again.release()


def test_listener_limit_still_applies_to_peers(start_service):
    """A peer without a limit of its own is held to the listener's max_associations (2/3/2, listener)."""
    running = start_service(listeners=[{"max_associations": 1, "peers": [CT1]}])
    held = _associate("127.0.0.1", running.port(), "CT1")
    assert held.is_established
    extra = _associate("127.0.0.1", running.port(), "CT1")
    assert extra.is_rejected and _rj(extra) == (2, 3, 2)
    line = _last_rejection(running)
    assert (line["cause"], line["max_associations"]) == ("listener_limit", 1)
    held.release()


def test_self_check_works_whatever_peers_are_configured(start_service):
    """The readiness self-check passes although no peer may connect from loopback."""
    running = start_service(
        listeners=[{"peers": [{"ae_title": "CT1", "networks": ["10.1.2.0/24"], "max_associations": 1}]}]
    )
    running.wait_ready()
    assert _associate("127.0.0.1", running.port(), "CT1").is_rejected


def test_peer_titles_have_metric_series_from_the_start(start_service):
    """Configured peer titles get calling_ae series at 0 before any traffic (bounded by configuration)."""
    running = start_service(listeners=[{"peers": [CT1], "allowed_calling_ae_titles": ["OTHER"]}])
    for title in ("CT1", "OTHER", "other"):
        labels = {"listener": "dicom", "calling_ae": title, "outcome": "accepted"}
        assert running.service.registry.get_sample_value("echo_scp_associations_total", labels) == 0


def test_peers_from_the_environment_match_the_toml_form(tmp_path):
    """ECHO_SCP_LISTENERS with peers and the [[listeners.peers]] tables give the same settings."""
    from echo_scp.settings import load_settings

    env = {
        "ECHO_SCP_LISTENERS": '[{"name": "dicom", "port": 11112, "ae_title": "PACS", "peers": '
        '[{"ae_title": "CT1", "networks": ["10.1.2.0/24"], "max_associations": 2}]}]'
    }
    toml = tmp_path / "echo-scp.toml"
    toml.write_text(
        '[[listeners]]\nname = "dicom"\nport = 11112\nae_title = "PACS"\n'
        '[[listeners.peers]]\nae_title = "CT1"\nnetworks = ["10.1.2.0/24"]\nmax_associations = 2\n'
    )
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    from_env = load_settings(empty, environ=env)
    from_file = load_settings(toml, environ={})
    assert from_env.redacted() == from_file.redacted()
    (peer,) = from_file.listeners[0].peers
    assert (peer.ae_title, peer.networks, peer.max_associations) == ("CT1", ["10.1.2.0/24"], 2)


@pytest.mark.parametrize(
    ("peers", "problem"),
    [
        (
            [{"ae_title": "CT1", "networks": ["10.1.2.5/24"]}],
            "listeners[0].peers[0].networks[0]: '10.1.2.5/24' has host bits set: "
            "write '10.1.2.0/24' for the network or '10.1.2.5' for the one host",
        ),
        (
            [{"ae_title": "CT1", "networks": ["10.1.2.0/33"]}],
            "listeners[0].peers[0].networks[0]: must be a network in CIDR notation "
            "(10.1.2.0/24, fd00::/64) or an IP address, got '10.1.2.0/33'",
        ),
        (
            [{"ae_title": "CT1", "networks": []}],
            "listeners[0].peers[0].networks: must not be empty",
        ),
        (
            [{"ae_title": "CT1", "networks": ["::1"]}, {"ae_title": "CT1", "networks": ["fd00::/8"]}],
            "listeners[0].peers[1].ae_title: 'CT1' is already used by peers[0]",
        ),
        (
            [{"ae_title": "CT1", "networks": ["::1"], "max_associations": 65}],
            "listeners[0].peers[0].max_associations: 65 is above the listener's max_associations (64)",
        ),
        (
            [{"ae_title": "ONLY", "networks": ["::1"]}],
            "listeners[0].peers[0].ae_title: 'ONLY' is also in allowed_calling_ae_titles (any network); "
            "list it in one place",
        ),
    ],
    ids=[
        "host_bits",
        "prefix_too_long",
        "no_networks",
        "duplicate_title",
        "limit_above_listener",
        "both_lists",
    ],
)
def test_invalid_peers_are_named(peers: list[dict[str, Any]], problem: str) -> None:
    """Malformed networks, repeated titles, limits over the listener's, doubly listed titles are refused."""
    from echo_scp.settings import ConfigError

    with pytest.raises(ConfigError) as caught:
        make_settings(listeners=[{"peers": peers, "allowed_calling_ae_titles": ["ONLY"]}])
    assert caught.value.problems == [problem]


def test_dcmtk_echoscu_as_known_unknown_and_misplaced_peer(start_service):
    """DCMTK echoscu: accepted as CT1 from its network; 1/1/3 as a peer from elsewhere and as a stranger."""
    echoscu = require_tool("echoscu")
    running = start_service(
        listeners=[{"peers": [CT1, {"ae_title": "V6ONLY", "networks": ["::1/128"]}]}],
    )
    port = running.port()
    ok = _echoscu(echoscu, port, "CT1")
    assert ok.returncode == 0, ok.stderr

    misplaced = _echoscu(echoscu, port, "V6ONLY")
    assert misplaced.returncode != 0
    assert "Rejected Permanent" in misplaced.stderr, misplaced.stderr
    assert "Calling AE Title Not Recognized" in misplaced.stderr, misplaced.stderr
    line = _last_rejection(running)
    assert (line["cause"], line["calling_ae"], line["peer_host"], line["allowed_networks"]) == (
        "calling_ae_title_not_allowed_from_address",
        "V6ONLY",
        "127.0.0.1",
        ["::1/128"],
    )

    stranger = _echoscu(echoscu, port, "STRANGER")
    assert stranger.returncode != 0 and "Calling AE Title Not Recognized" in stranger.stderr, stranger.stderr
    line = _last_rejection(running)
    assert (line["cause"], line["calling_ae"], line["code"]) == (
        "unknown_calling_ae_title",
        "STRANGER",
        "1/1/3",
    )
    assert _rejections(running, NOT_RECOGNISED) == 2
    running.wait_idle()
    success = {"listener": "dicom", "calling_ae": "CT1", "status": "success"}
    assert running.sample("echo_scp_echo_requests_total", **success) == 1


def test_dcmtk_echoscu_over_the_peer_limit(start_service):
    """DCMTK echoscu as CT1 while CT1's only slot is held gets 2/3/2 (local limit exceeded)."""
    echoscu = require_tool("echoscu")
    running = start_service(listeners=[{"peers": [{**CT1, "max_associations": 1}]}])
    held = _associate("127.0.0.1", running.port(), "CT1")
    assert held.is_established
    try:
        over = _echoscu(echoscu, running.port(), "CT1")
    finally:
        held.release()
    assert over.returncode != 0
    assert "Rejected Transient" in over.stderr and "Local Limit Exceeded" in over.stderr, over.stderr
    line = _last_rejection(running)
    assert (line["cause"], line["code"], line["max_associations"], line["calling_ae"]) == (
        "peer_limit",
        "2/3/2",
        1,
        "CT1",
    )
    assert _rejections(running, LIMIT) == 1
