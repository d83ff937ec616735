"""The pynetdicom contract (seam.py): it holds on the installed pynetdicom, each check can fail, and a failure
makes a listener run the stock engine."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from pynetdicom import ae as pynetdicom_ae
from pynetdicom import association, dimse, dimse_messages, fsm, pdu, timer, transport
from pynetdicom.transport import ThreadedAssociationServer
from structlog.testing import LogCapture

from echo_scp import seam
from tests.conftest import associate

_SENTINEL = object()


def _failing(name: str) -> list[str]:
    """The problems reported for the check called ``name`` (it must exist)."""
    assert name in {check.name for check in seam.CHECKS}, name
    return [problem for problem in seam.check_contract() if problem.startswith(f"{name}: ")]


def _owner(name: str) -> tuple[Any, str]:
    owner, _, attr = name.rpartition(".")
    return seam.resolve(owner), attr


def _checks(kind: str, *, defined_on_owner: bool = False) -> list[Any]:
    """Checks of one kind as test parameters; ``defined_on_owner``: only names the owner itself defines."""
    chosen = []
    for check in seam.CHECKS:
        if check.kind != kind:
            continue
        if defined_on_owner:
            # Only where deleting leaves nothing inherited to find instead.
            owner, attr = _owner(check.name)
            if attr not in vars(owner) or any(
                attr in vars(base) for base in getattr(owner, "__mro__", ())[1:]
            ):
                continue
        chosen.append(pytest.param(check, id=check.name))
    return chosen


def test_contract_holds_on_the_installed_pynetdicom():
    """Every check passes on the pynetdicom this environment installed."""
    assert seam.check_contract() == [], f"pynetdicom {seam.pynetdicom_version()}"


def test_checks_are_named_once_with_a_reason():
    """Each check has a unique name and a one-line reason."""
    names = [check.name for check in seam.CHECKS]
    assert len(names) == len(set(names))
    for check in seam.CHECKS:
        assert check.why.strip() and "\n" not in check.why, check.name
        assert check.kind in ("class", "instance", "behaviour"), check.name


@pytest.mark.parametrize("check", _checks("class"))
def test_a_class_check_fails_when_its_name_changes(check, monkeypatch):
    """Replacing the name with a plain object (no function, property or expected value) fails its check."""
    owner, attr = _owner(check.name)
    monkeypatch.setattr(owner, attr, _SENTINEL)
    assert _failing(check.name)


@pytest.mark.parametrize("check", _checks("class", defined_on_owner=True))
def test_a_class_check_fails_when_its_name_is_gone(check, monkeypatch):
    """Deleting the name where it is defined fails its check with "has no attribute" or "is missing"."""
    owner, attr = _owner(check.name)
    monkeypatch.delattr(owner, attr)
    (problem,) = _failing(check.name)
    assert "has no attribute" in problem or "is missing" in problem


@pytest.mark.parametrize("check", _checks("instance"))
def test_an_instance_check_fails_when_the_constructor_stops_setting_it(check, monkeypatch):
    """A constructor that no longer sets the attribute fails its check."""
    owner, attr = _owner(check.name)
    original = owner.__init__

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        vars(self).pop(attr, None)

    monkeypatch.setattr(owner, "__init__", init)
    assert _failing(check.name)


def test_an_overridden_method_must_keep_its_exact_parameters(monkeypatch):
    """A new optional parameter on a method the engine overrides fails its check: pynetdicom may pass it."""

    def receive_pdu(self: Any, wait: bool = False, timeout: float | None = None, peek: bool = False) -> None:
        """pynetdicom's receive_pdu, grown a parameter."""

    monkeypatch.setattr(transport.AssociationSocket, "recv", lambda self, nr_bytes, flags=0: b"")
    monkeypatch.setattr(association.Association, "_serve_request", lambda self, msg: None)
    from pynetdicom import dul

    monkeypatch.setattr(dul.DULServiceProvider, "receive_pdu", receive_pdu)
    problems = seam.check_contract()
    assert any(p.startswith(f"{seam._DUL}receive_pdu: takes (wait, timeout, peek)") for p in problems)
    assert any(p.startswith(f"{seam._SOCK}recv: takes (nr_bytes, flags)") for p in problems)
    assert any(p.startswith(f"{seam._ASSOC}_serve_request: takes (msg)") for p in problems)


def test_a_called_method_must_not_require_more(monkeypatch):
    """A method the engine calls that gains a required parameter fails its check; an optional one is fine."""
    monkeypatch.setattr(
        dimse.DIMSEServiceProvider, "get_msg", lambda self, block=False, extra=None: (None, None)
    )
    assert not _failing(f"{seam._DIMSE}get_msg")
    monkeypatch.setattr(dimse.DIMSEServiceProvider, "get_msg", lambda self, block, *, extra: (None, None))
    (problem,) = _failing(f"{seam._DIMSE}get_msg")
    assert problem.endswith("also requires extra")


# -- each behaviour check, broken the way a pynetdicom release could break it ---------------


def _wrap(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, after: Callable[..., Any]) -> None:
    """Make ``owner.name`` call the original, then ``after(self, result, *args)``, returning its result."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        return after(self, original(self, *args, **kwargs), *args)

    monkeypatch.setattr(owner, name, wrapped)


def _break_engine_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "echo_scp.engine", None)


def _break_event_association(monkeypatch: pytest.MonkeyPatch) -> None:
    # A network_timeout that no longer reaches the DUL's idle timer.
    monkeypatch.setattr(
        association.Association,
        "network_timeout",
        property(
            lambda self: self._network_timeout, lambda self, value: setattr(self, "_network_timeout", value)
        ),
    )


def _break_constructors(monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom.dul import DULServiceProvider

    def more(self: Any, _result: Any, *args: Any) -> None:
        self._send_lock = object()  # as if a new release gave the DUL another attribute

    _wrap(monkeypatch, DULServiceProvider, "__init__", more)


def _break_peek(monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom.dul import DULServiceProvider

    # As if pynetdicom took the primitive off the queue when it raises the event.
    _wrap(
        monkeypatch,
        DULServiceProvider,
        "_process_recv_primitive",
        lambda s, r: r and s.to_provider_queue.get(),
    )


def _break_transition_table(monkeypatch: pytest.MonkeyPatch) -> None:
    rekeyed = {f"{event}/{state}": action for (event, state), action in fsm.TRANSITION_TABLE.items()}
    monkeypatch.setattr(fsm, "TRANSITION_TABLE", rekeyed)


def _break_timer_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timer.Timer, "start", lambda self: setattr(self, "_started_at", time.time()))


def _break_timeout_setter(monkeypatch: pytest.MonkeyPatch) -> None:
    # An acse_timeout that no longer reaches the DUL's ARTIM timer.
    monkeypatch.setattr(
        association.Association,
        "acse_timeout",
        property(lambda self: self._acse_timeout, lambda self, value: setattr(self, "_acse_timeout", value)),
    )


def _break_bind_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    def reset(self: Any, _result: Any, *args: Any) -> None:
        self._handlers = {}  # as if __init__ made _handlers after _bind_defaults()

    _wrap(monkeypatch, association.Association, "__init__", reset)


def _break_handler_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    def bind(self: Any, event: Any, handler: Any, args: Any = None) -> None:
        self._handlers.setdefault(event, []).append((handler, args))  # every event as a list

    monkeypatch.setattr(association.Association, "bind", bind)


def _break_run_reactor(monkeypatch: pytest.MonkeyPatch) -> None:
    def run_reactor(self: Any) -> None:
        """A reactor that reads the A-ASSOCIATE-RQ, and negotiates, some other way."""
        self.dul.receive_pdu(wait=False)

    monkeypatch.setattr(association.Association, "run_reactor", run_reactor)


def _break_acceptor_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    def _run_reactor(self: Any) -> None:
        """An acceptor loop that also answers something new before the release."""
        self.dimse.get_msg(block=False)
        self.acse.is_release_requested()

    monkeypatch.setattr(association.Association, "_run_reactor", _run_reactor)


def _break_validators(monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom import utils

    def set_uid(value: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        """A set_uid that validates some other way than through _config.VALIDATORS."""
        return value

    monkeypatch.setattr(utils, "set_uid", set_uid)


def _break_service_user(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Any, value: Any) -> None:
        raise AttributeError("read-only")

    monkeypatch.setattr(association.ServiceUser, "supported_contexts", property(lambda self: [], refuse))


def _break_get_msg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dimse.DIMSEServiceProvider, "get_msg", lambda self, block=False: None)


def _break_message_attributes(monkeypatch: pytest.MonkeyPatch) -> None:
    _wrap(monkeypatch, dimse_messages.DIMSEMessage, "__init__", lambda s, r: setattr(s, "_priority", None))


def _break_message_to_primitive(monkeypatch: pytest.MonkeyPatch) -> None:
    def more(self: Any, primitive: Any) -> Any:
        primitive._encoded_length = 0
        return primitive

    _wrap(monkeypatch, dimse_messages.DIMSEMessage, "message_to_primitive", more)


def _break_response_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom.pdu_primitives import P_DATA

    def refragment(self: Any, pdatas: Any, *args: Any) -> Iterator[Any]:
        # As if pynetdicom framed the command set differently (two fragments).
        for original in pdatas:
            for context_id, data in original.presentation_data_value_list:
                for part in (b"\x01" + data[1:2], data[:1] + data[2:]):
                    pdata = P_DATA()
                    pdata.presentation_data_value_list.append((context_id, part))
                    yield pdata

    _wrap(monkeypatch, dimse_messages.DIMSEMessage, "encode_msg", refragment)


def _break_abort_pdu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pdu.A_ABORT_RQ, "encode", lambda self: b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")


def _break_evt5(monkeypatch: pytest.MonkeyPatch) -> None:
    def drain(self: Any, _result: Any, *args: Any) -> None:
        while not self.event_queue.empty():
            self.event_queue.get()

    _wrap(monkeypatch, transport.AssociationSocket, "__init__", drain)


def _break_make_server(monkeypatch: pytest.MonkeyPatch) -> None:
    original = pynetdicom_ae.ApplicationEntity.make_server

    def make_server(self: Any, address: Any, *args: Any, server_class: Any = None, **kwargs: Any) -> Any:
        kwargs.pop("request_handler", None)  # extra keyword arguments no longer reach the class
        return original(self, address, *args, server_class=server_class, **kwargs)

    monkeypatch.setattr(pynetdicom_ae.ApplicationEntity, "make_server", make_server)


def _break_backlog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport.AssociationServer, "server_activate", lambda self: self.socket.listen(5))


def _break_start_server_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def start_server(self: Any, address: Any, block: bool = True, **kwargs: Any) -> None:
        """Names its thread something else."""

    monkeypatch.setattr(pynetdicom_ae.ApplicationEntity, "start_server", start_server)


BREAKERS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "echo_scp.engine": _break_engine_import,
    "echo_scp.engine.EventAssociation": _break_event_association,
    "echo_scp.engine.EventAssociation(attributes)": _break_constructors,
    seam._DUL + "_process_recv_primitive(peeks)": _break_peek,
    seam._P + "fsm.TRANSITION_TABLE": _break_transition_table,
    seam._TIMER + "_start_time/_end_time": _break_timer_fields,
    seam._ASSOC + "__init__(timers)": _break_timeout_setter,
    seam._ASSOC + "_bind_defaults": _break_bind_defaults,
    seam._ASSOC + "_handlers": _break_handler_layout,
    seam._ASSOC + "run_reactor(acceptor steps)": _break_run_reactor,
    seam._ASSOC + "_run_reactor(steps)": _break_acceptor_loop,
    seam._USER + "(acceptor setup)": _break_service_user,
    seam._DIMSE + "get_msg(empty)": _break_get_msg,
    seam._P + "dimse_messages.DIMSEMessage(attributes)": _break_message_attributes,
    seam._P + "dimse_messages.DIMSEMessage.message_to_primitive": _break_message_to_primitive,
    seam._P + "dimse_messages.C_ECHO_RSP(encoding)": _break_response_encoding,
    seam._P + "pdu.A_ABORT_RQ": _break_abort_pdu,
    seam._SOCK + "__init__(Evt5)": _break_evt5,
    seam._AE + "make_server(forwards)": _break_make_server,
    seam._SERVER + "request_queue_size": _break_backlog,
    seam._P + "_config.VALIDATORS": _break_validators,
    seam._AE + "start_server(thread name)": _break_start_server_name,
}


@pytest.mark.parametrize("check", _checks("behaviour"))
def test_a_behaviour_check_fails_when_pynetdicom_behaves_otherwise(check, monkeypatch):
    """Each behaviour check has a way to break it, and that breaks it."""
    assert check.name in BREAKERS, f"add a breaker for {check.name}"
    BREAKERS[check.name](monkeypatch)
    assert _failing(check.name)


# -- what a failing contract changes ------------------------------------------------------


def _log() -> tuple[Any, LogCapture]:
    capture = LogCapture()
    return structlog.wrap_logger(None, processors=[capture]), capture


def test_choose_engine_keeps_the_configured_engine_when_the_contract_holds():
    """With every check passing, both engines run as configured and nothing is logged."""
    log, capture = _log()
    assert seam.choose_engine("event", log, listener="dicom") == "event"
    assert seam.choose_engine("pynetdicom", log, listener="dicom") == "pynetdicom"
    assert capture.entries == []


def test_choose_engine_falls_back_in_one_warning(monkeypatch):
    """A failing event-engine check turns "event" into "pynetdicom", said in one warning with the problems."""
    monkeypatch.delattr(transport.AssociationServer, "get_handlers")
    log, capture = _log()
    assert seam.choose_engine("event", log, listener="dicom") == "pynetdicom"
    (entry,) = capture.entries
    assert entry["log_level"] == "warning" and entry["event"] == "pynetdicom_contract_failed"
    assert (entry["listener"], entry["configured_engine"], entry["engine"]) == (
        "dicom",
        "event",
        "pynetdicom",
    )
    assert entry["pynetdicom_version"] == seam.pynetdicom_version()
    assert (
        f"{seam._SERVER}get_handlers: {seam._SERVER[:-1]} has no attribute 'get_handlers'"
        in entry["problems"]
    )


def test_a_listener_check_failing_changes_no_engine(monkeypatch):
    """A check that listener.py needs for either engine is reported, but the engine stays as configured."""

    def forget(self: Any, _result: Any, *args: Any) -> None:
        del self._sent_abort

    _wrap(monkeypatch, association.Association, "__init__", forget)
    log, capture = _log()
    assert seam.choose_engine("event", log, listener="dicom") == "event"
    (entry,) = capture.entries
    assert entry["engine"] == "event"
    assert [p.split(":")[0] for p in entry["problems"]] == [f"{seam._ASSOC}_sent_abort"]


def test_the_daemon_serves_on_the_stock_engine_when_the_contract_fails(start_service, monkeypatch):
    """With the contract failing, the daemon warns once, runs start_server's engine, answers a real C-ECHO and
    says engine="pynetdicom" in build_info."""
    monkeypatch.delattr(transport.AssociationServer, "get_handlers")
    running = start_service()
    (warning,) = running.events("pynetdicom_contract_failed")
    assert warning["engine"] == "pynetdicom" and any("get_handlers" in p for p in warning["problems"])
    listener = running.service.listeners[0]
    assert listener.engine == "pynetdicom"
    assert type(listener.server) is ThreadedAssociationServer  # start_server's, not the event engine's
    (started,) = running.events("listener_started")
    assert started["engine"] == "pynetdicom"
    running.wait_ready()
    assoc = associate(running.port())
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    running.wait_idle()
    assert (
        running.sample("echo_scp_echo_requests_total", listener="dicom", calling_ae="other", status="success")
        == 1
    )
    (build,) = [s for s in running.service.metrics.build_info.collect()[0].samples]
    assert build.labels["engine"] == "pynetdicom"
    assert build.labels["pynetdicom_version"] == seam.pynetdicom_version()


def test_resolve_reports_the_missing_part():
    """A dotted name that does not resolve says which module lacks which attribute."""
    from pynetdicom.dul import DULServiceProvider

    with pytest.raises(seam.Broken, match=r"pynetdicom\.dul has no attribute 'Nothing'"):
        seam.resolve("pynetdicom.dul.Nothing.here")
    assert seam.resolve("pynetdicom.dul.DULServiceProvider.run_reactor") is DULServiceProvider.run_reactor


def test_the_stock_engine_ignores_what_only_the_event_engine_needs(monkeypatch):
    """A listener configured for the stock engine is not warned about names only the event engine uses."""
    monkeypatch.delattr(transport.AssociationServer, "get_handlers")
    log, capture = _log()
    assert seam.choose_engine("pynetdicom", log, listener="dicom") == "pynetdicom"
    assert capture.entries == []
