"""The pynetdicom seam: what echo-scp needs from pynetdicom, one check per name.

``engine.py`` subclasses pynetdicom's DUL service provider, association
socket, association, DIMSE provider, request handler and association server;
``listener.py`` reads a few of their attributes. Both lean on names and
behaviour that pynetdicom does not promise to keep within a release series.
Each such name is one :class:`Check` in :data:`CHECKS`, with the reason it is
needed. :func:`check_contract` runs them against the installed pynetdicom:
signatures through ``inspect.signature``, instance attributes and behaviour
on real objects (an ``Association`` that is never started, an
``AssociationSocket`` on a ``socket.socketpair()``, a server bound to
loopback port 0 that never accepts). Nothing is sent or accepted.

A listener runs the checks when it starts (:func:`choose_engine`): if one
that the event engine needs fails, a listener configured with ``engine =
"event"`` runs pynetdicom's stock ``start_server`` engine instead and says so
in one warning line. A failing check that listener.py needs whichever engine
runs is reported in the same line and changes nothing.

Left out of the contract by using documented API instead:

* ``pynetdicom._globals.MODE_ACCEPTOR``: the documented mode string ``"acceptor"``.
* ``AssociationServer._handlers``: ``get_events()`` and ``get_handlers()``.
* ``RequestHandler._create_association``: the engine's request handler builds
  its association in a method of its own, which pynetdicom never calls.
* The DUL's and the association's threads (``run_reactor``, ``Thread.run``):
  neither is started; the engine overrides ``start``, ``run``, ``is_alive``
  and ``join`` of both, and its reactor takes their steps.
* ``_read_pdu_data``: only pynetdicom's own ``_is_transport_event`` calls it.
* Replacing pynetdicom's validators: ``_config.VALIDATORS`` is its documented
  hook, and the engine wraps whatever is installed (answers unchanged).
"""

from __future__ import annotations

import importlib
import inspect
import queue
import socket
import socketserver
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from importlib import metadata
from typing import Any

_VERIFICATION = "1.2.840.10008.1.1"


class Broken(Exception):
    """A check found the installed pynetdicom different from what echo-scp relies on."""


@dataclass(frozen=True)
class Check:
    """One name (or behaviour) echo-scp relies on, why, and how to verify it.

    ``kind`` says how the name is looked at: ``class`` (an attribute of a
    module or class), ``instance`` (an attribute a real object gets from its
    constructor) or ``behaviour``. ``engine_only`` is False for what
    listener.py needs whichever engine runs.
    """

    name: str
    why: str
    kind: str
    probe: Callable[[Specimens], None]
    engine_only: bool = True


def pynetdicom_version() -> str:
    """The installed pynetdicom's version, from its package metadata.

    pynetdicom 3.0.0's ``__version__`` says ``3.0.0.dev0``.
    """
    try:
        return metadata.version("pynetdicom")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        import pynetdicom

        return str(pynetdicom.__version__)


def check_contract() -> list[str]:
    """Every check that fails on the installed pynetdicom, one line each; empty when all pass."""
    return [problem for _check, problem in _failures(CHECKS)]


def effective_engine(configured: str) -> tuple[str, list[str]]:
    """The engine to run for a listener configured with ``configured``, and the problems that concern it.

    ``event`` becomes ``pynetdicom`` when a check the event engine needs fails;
    for ``pynetdicom`` only the checks listener.py needs for both engines count.
    """
    failures = _failures(CHECKS)
    if configured != "event":
        failures = [(check, problem) for check, problem in failures if not check.engine_only]
    engine = configured
    if any(check.engine_only for check, _ in failures):
        engine = "pynetdicom"
    return engine, [problem for _check, problem in failures]


def choose_engine(configured: str, log: Any, *, listener: str) -> str:
    """:func:`effective_engine`, logging one ``pynetdicom_contract_failed`` warning if a check fails."""
    engine, problems = effective_engine(configured)
    if problems:
        log.warning(
            "pynetdicom_contract_failed",
            listener=listener,
            pynetdicom_version=pynetdicom_version(),
            configured_engine=configured,
            engine=engine,
            problems=problems,
        )
    return engine


def _failures(checks: Sequence[Check]) -> list[tuple[Check, str]]:
    failures = []
    with Specimens() as specimens:
        for check in checks:
            try:
                check.probe(specimens)
            except Broken as exc:
                failures.append((check, f"{check.name}: {exc}"))
            except Exception as exc:
                failures.append((check, f"{check.name}: {type(exc).__name__}: {exc}"))
    return failures


# -- real objects to look at ------------------------------------------------------


class Specimens:
    """Real pynetdicom objects for the checks, made on demand and cleaned up on exit."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._server: Any = None
        self._listening: list[socket.socket] = []
        self._pristine: dict[str, Any] = {}

    def __enter__(self) -> Specimens:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        # Closed here too: a check (or a test) that broke the server may have broken server_close().
        for sock in self._listening:
            sock.close()

    def ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title="ECHOSCP")
        # Distinct values, so a check can tell which timer got which.
        ae.acse_timeout = 7
        ae.network_timeout = 9
        return ae

    def association(self, ae: Any = None) -> Any:
        """A fresh acceptor Association, never started."""
        from pynetdicom.association import Association

        return Association(ae if ae is not None else self.ae(), "acceptor")

    def pristine(self, kind: str) -> Any:
        """One Association (``kind`` "association") or AssociationSocket ("socket") for the checks that
        only read what a constructor set; made once per run of the checks."""
        found = self._pristine.get(kind)
        if found is None:
            found = self.association() if kind == "association" else self.association_socket()
            self._pristine[kind] = found
        return found

    def socketpair(self) -> tuple[socket.socket, socket.socket]:
        pair = socket.socketpair()
        for sock in pair:
            self._stack.callback(_quietly, sock.close)
        return pair

    def association_socket(self, assoc: Any = None) -> Any:
        """An AssociationSocket wrapping one end of a socket pair (so it queues Evt5)."""
        from pynetdicom.transport import AssociationSocket

        assoc = assoc if assoc is not None else self.association()
        return AssociationSocket(assoc, client_socket=self.socketpair()[0])

    def server(self) -> Any:
        """A stock ThreadedAssociationServer (subclassed only to note its socket) from ``make_server``,
        on loopback port 0; it never accepts."""
        if self._server is None:
            from pynetdicom import build_context, evt
            from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

            listening = self._listening

            class Handler(RequestHandler):  # type: ignore[misc]
                """Marks the request handler class make_server was given."""

            class Server(ThreadedAssociationServer):  # type: ignore[misc]
                """pynetdicom's server, keeping hold of its listening socket for the cleanup."""

                def server_bind(self) -> None:
                    if self.socket is not None:
                        listening.append(self.socket)
                    super().server_bind()

            def make(host: str) -> Any:
                return self.ae().make_server(
                    (host, 0),
                    ae_title="ECHOSCP",
                    contexts=[build_context(_VERIFICATION)],
                    evt_handlers=[(evt.EVT_C_ECHO, _handler), (evt.EVT_CONN_OPEN, _handler)],
                    server_class=Server,
                    request_handler=Handler,
                )

            try:
                server = make("127.0.0.1")
            except OSError:  # pragma: no cover - a host without IPv4 loopback
                server = make("::1")
            server.marker_handler_class = Handler
            self._stack.callback(_quietly, server.server_close)
            self._server = server
        return self._server


def _handler(event: Any) -> int:
    return 0


def _quietly(cleanup: Callable[[], object]) -> None:
    # A check that broke pynetdicom on purpose (a test) may break its cleanup too.
    with suppress(Exception):
        cleanup()


# -- how names are looked at --------------------------------------------------------


def resolve(name: str) -> Any:
    """The object a dotted name stands for: the longest importable module, then attributes."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for depth in range(split, len(parts)):
            if not hasattr(target, parts[depth]):
                raise Broken(f"{'.'.join(parts[:depth])} has no attribute {parts[depth]!r}")
            target = getattr(target, parts[depth])
        return target
    raise Broken(f"cannot import {parts[0]}")


def _expect(condition: object, problem: str) -> None:
    if not condition:
        raise Broken(problem)


def _check_parameters(target: Any, params: Sequence[str], exact: bool, kwargs: bool) -> None:
    _expect(callable(target), "is not callable")
    parameters = list(inspect.signature(target).parameters.values())
    if parameters and parameters[0].name in ("self", "cls"):
        parameters = parameters[1:]
    names = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    shown = f"({', '.join(names)})"
    if exact:
        # Overridden: pynetdicom calls ours, so it must not pass anything new.
        _expect(names == list(params), f"takes {shown}, expected ({', '.join(params)})")
    else:
        _expect(names[: len(params)] == list(params), f"takes {shown}, expected ({', '.join(params)}, ...)")
        extra = [
            p.name
            for p in parameters[len(params) :]
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        _expect(not extra, f"also requires {', '.join(extra)}")
    if kwargs:
        _expect(any(p.kind is p.VAR_KEYWORD for p in parameters), "does not pass on extra keyword arguments")


def method(
    name: str,
    why: str,
    params: Sequence[str] = (),
    *,
    exact: bool = False,
    kwargs: bool = False,
    engine_only: bool = True,
) -> Check:
    """A function or method, callable with ``params`` (``exact``: with exactly these, as we override it)."""

    def probe(_specimens: Specimens) -> None:
        _check_parameters(resolve(name), params, exact, kwargs)

    return Check(name, why, "class", probe, engine_only)


def prop(name: str, why: str, *, settable: bool = False, engine_only: bool = True) -> Check:
    """A property of a class (with a setter when ``settable``)."""

    def probe(_specimens: Specimens) -> None:
        owner, _, attr = name.rpartition(".")
        found = inspect.getattr_static(resolve(owner), attr, None)
        _expect(isinstance(found, property), "is not a property" if found is not None else "is missing")
        _expect(not settable or found.fset is not None, "has no setter")

    return Check(name, why, "class", probe, engine_only)


def attribute(
    name: str, why: str, test: Callable[[Any], object] | None = None, *, engine_only: bool = True
) -> Check:
    """An attribute of a module or class, optionally satisfying ``test``."""

    def probe(_specimens: Specimens) -> None:
        value = resolve(name)
        _expect(test is None or test(value), f"is {value!r}, not as expected")

    return Check(name, why, "class", probe, engine_only)


def instance(
    name: str,
    why: str,
    make: Callable[[Specimens], Any],
    test: Callable[[Any], object] | None = None,
    *,
    engine_only: bool = True,
) -> Check:
    """An attribute that the constructor of ``name``'s class gives a real object (from ``make``)."""
    attr = name.rpartition(".")[2]

    def probe(specimens: Specimens) -> None:
        obj = make(specimens)
        _expect(attr in vars(obj), "is not set by the constructor")
        value = vars(obj)[attr]
        _expect(test is None or test(value), f"is {value!r}, not as expected")

    return Check(name, why, "instance", probe, engine_only)


def behaviour(name: str, why: str, probe: Callable[[Specimens], None], *, engine_only: bool = True) -> Check:
    """Something pynetdicom does that the engine depends on, tried on real objects."""
    return Check(name, why, "behaviour", probe, engine_only)


def _plain_queue(value: Any) -> bool:
    # Exactly queue.Queue: the engine turns it into a subclass in place.
    return type(value) is queue.Queue


def _source(name: str) -> str:
    """The source of a function: its lines in its file, up to the first line indented no deeper.

    Not ``inspect.getsource``: it finds the function's module by walking every
    module loaded (caching a path for each), keeps every line of the file in
    linecache and tokenizes. The file is read a line at a time, each dropped
    unless it is the function's: thousands of strings built and freed at
    start would leave the heap larger for the life of the daemon.
    """
    target = inspect.unwrap(resolve(name))
    code = getattr(target, "__code__", None)
    if code is None:
        return inspect.getsource(target)

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    block: list[str] = []
    def_indent = -1  # the def line's, once found
    depth = 0
    body = False
    with open(code.co_filename, encoding="utf-8") as source:
        for number, line in enumerate(source, start=1):
            if number < code.co_firstlineno:
                continue
            if not body:
                # Decorators, then the signature, which ends where its brackets close.
                block.append(line)
                if def_indent < 0 and line.lstrip().startswith(("def ", "async def ")):
                    def_indent = indent(line)
                if def_indent >= 0:
                    depth += line.count("(") - line.count(")")
                    body = depth <= 0
                continue
            if line.strip() and indent(line) <= def_indent:
                break
            block.append(line)
    return "".join(block)


# -- behaviour checks ----------------------------------------------------------------


def _timers_follow_timeouts(specimens: Specimens) -> None:
    assoc = specimens.association()
    dul = assoc.dul
    _expect(
        (dul.artim_timer.timeout, dul._idle_timer.timeout) == (7, 9),
        "Association() does not give its DUL's ARTIM and idle timers the AE's ACSE and network timeouts",
    )
    assoc.acse_timeout = 3
    assoc.network_timeout = 4
    _expect(
        (dul.artim_timer.timeout, dul._idle_timer.timeout) == (3, 4),
        "setting acse_timeout/network_timeout does not set the DUL's timers",
    )


def _bind_defaults_after_handlers(specimens: Specimens) -> None:
    from pynetdicom.association import Association

    marker: dict[Any, Any] = {}

    class Probe(Association):  # type: ignore[misc]
        def _bind_defaults(self) -> None:
            self._handlers = marker

    _expect(
        Probe(specimens.ae(), "acceptor")._handlers is marker,
        "Association.__init__ does not call _bind_defaults() after creating _handlers",
    )


def _handler_table_layout(specimens: Specimens) -> None:
    from echo_scp.engine import handler_table

    server = specimens.server()
    assoc = specimens.association()
    # What pynetdicom's RequestHandler does, one bind() per handler.
    for event in server.get_events():
        bound = server.get_handlers(event)
        if event.is_intervention:
            if bound:
                assoc.bind(event, *bound)
        else:
            for handler, args in bound:
                assoc.bind(event, handler, args)
    table = handler_table(server)
    _expect(
        {e: assoc._handlers.get(e) for e in table} == table and set(assoc._handlers) <= set(table),
        "binding the server's handlers one by one gives a different Association._handlers",
    )


def _make_server_forwards(specimens: Specimens) -> None:
    server = specimens.server()
    _expect(
        server.RequestHandlerClass is server.marker_handler_class,
        "make_server(request_handler=...) does not reach the server class",
    )
    _expect(isinstance(server.socket, socket.socket), "the server has no listening socket")
    _expect(server.server_address[1] != 0, "server_address is not the bound address")
    _expect(server.ae_title == "ECHOSCP", "the server does not keep ae_title")
    _expect(len(server.contexts) == 1, "the server does not keep contexts")
    _expect(server.ssl_context is None, "the server does not keep ssl_context")


def _backlog_is_request_queue_size(_specimens: Specimens) -> None:
    from pynetdicom.transport import ThreadedAssociationServer

    _expect(
        ThreadedAssociationServer.server_activate is socketserver.TCPServer.server_activate
        and "request_queue_size" in _source("socketserver.TCPServer.server_activate"),
        "server_activate no longer listens with request_queue_size",
    )


def _socket_queues_evt5(specimens: Specimens) -> None:
    assoc = specimens.association()
    sock = specimens.association_socket(assoc)
    _expect(sock._is_connected is True, "AssociationSocket(client_socket=...) is not _is_connected")
    _expect(sock.event_queue is assoc.dul.event_queue, "event_queue is not the DUL's")
    _expect(
        assoc.dul.event_queue.get_nowait() == "Evt5",
        "AssociationSocket(client_socket=...) does not queue Evt5",
    )
    sock.close()
    _expect(sock.socket is None and not sock._is_connected, "close() does not drop the socket")
    _expect(assoc.dul.event_queue.get_nowait() == "Evt17", "close() does not queue Evt17")


def _local_primitives_peeked(specimens: Specimens) -> None:
    from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT, A_RELEASE, P_DATA

    from echo_scp.engine import LOCAL_PRIMITIVE_EVENTS

    def made(cls: Any, result: Any = None) -> Any:
        primitive = cls()
        if result is not None:
            primitive.result = result
        return primitive

    expected = [
        (made(A_ASSOCIATE), "Evt1"),
        (made(A_ASSOCIATE, 0), "Evt7"),
        (made(A_ASSOCIATE, 1), "Evt8"),
        (made(P_DATA), "Evt9"),
        (made(A_RELEASE), "Evt11"),
        (made(A_RELEASE, "affirmative"), "Evt14"),
        (made(A_ABORT), "Evt15"),
        (made(A_P_ABORT), "Evt15"),
    ]
    _expect(
        {event for _, event in expected} == LOCAL_PRIMITIVE_EVENTS,
        "engine.LOCAL_PRIMITIVE_EVENTS is not the events of the local primitives",
    )
    dul = specimens.association().dul
    for primitive, event in expected:
        dul.to_provider_queue.put(primitive)
        _expect(dul._process_recv_primitive() is True, f"{type(primitive).__name__} is not processed")
        raised = dul.event_queue.get_nowait()
        _expect(raised == event, f"{type(primitive).__name__} raises {raised}, expected {event}")
        # Left at the head: the state machine's action takes it off.
        _expect(dul.to_provider_queue.get_nowait() is primitive, "the primitive is taken off the queue")
        _expect(dul.to_provider_queue.empty(), "the queue holds more than the primitive")


def _transition_table(_specimens: Specimens) -> None:
    from pynetdicom.fsm import TRANSITION_TABLE

    _expect(isinstance(TRANSITION_TABLE, dict), "is not a dict")
    _expect(
        ("Evt9", "Sta6") in TRANSITION_TABLE and ("Evt15", "Sta2") not in TRANSITION_TABLE,
        "is not keyed by (event, state) as PS3.8 9.2 defines them",
    )


def _timer_private_fields(_specimens: Specimens) -> None:
    from pynetdicom.timer import Timer

    timer = Timer(5)
    _expect(timer._start_time is None and timer._end_time is None, "a new Timer has a start or end time")
    timer.start()
    _expect(
        isinstance(timer._start_time, float) and timer._end_time is None, "start() does not set _start_time"
    )
    timer.stop()
    _expect(isinstance(timer._end_time, float), "stop() does not set _end_time")


def _steps_in(function: str, steps: Sequence[str], what: str) -> None:
    source = _source(function)
    for step in steps:
        _expect(step in source, f"{what} no longer has {step!r}, which the engine's steps repeat")


def _run_reactor_steps(_specimens: Specimens) -> None:
    _steps_in(
        "pynetdicom.association.Association.run_reactor",
        (
            "self.requestor.primitive = ",
            "evt.EVT_REQUESTED",
            "if not self.is_aborted and not self.is_rejected:",
            "self.acse.negotiate_association()",
            "self._run_reactor()",
        ),
        "the acceptor side",
    )


def _run_reactor_loop_steps(_specimens: Specimens) -> None:
    _steps_in(
        "pynetdicom.association.Association._run_reactor",
        (
            "self.dimse.get_msg(block=False)",
            "self._serve_request(",
            "self.acse.is_release_requested()",
            "self.acse.send_release(is_response=True)",
            "evt.EVT_RELEASED",
            "self.acse.is_aborted()",
            "evt.EVT_ABORTED",
            "self.dul.idle_timer_expired()",
        ),
        "the acceptor loop",
    )


def _validators_memoized(_specimens: Specimens) -> None:
    from pynetdicom import _config
    from pynetdicom._validators import validate_ae, validate_ui

    from echo_scp.engine import MemoizedValidator

    _expect(
        '_config.VALIDATORS["UI"]' in _source("pynetdicom.utils.set_uid")
        and '_config.VALIDATORS["AE"]' in _source("pynetdicom.utils.set_ae"),
        "set_uid() and set_ae() no longer validate through _config.VALIDATORS",
    )
    _expect(
        isinstance(_config.ENFORCE_UID_CONFORMANCE, bool), "_config.ENFORCE_UID_CONFORMANCE is not a bool"
    )
    samples: dict[Callable[[Any], tuple[bool, str]], list[str]] = {
        # (Values pydicom also accepts: its own check of a UID would warn.)
        validate_ui: ["1.2.840.10008.1.1", "", "1.2.840.10008.1.2.1.99", "2.25.1"],
        validate_ae: ["ECHOSCP", "ECHO\\SCP", "\x07BELL", "A" * 17, " PADDED  "],
    }
    for validate, values in samples.items():
        memoized = MemoizedValidator(validate, uid=validate is validate_ui)
        for value in values * 2:
            _expect(memoized(value) == validate(value), f"a remembered answer for {value!r} differs")


def _start_server_thread_name(_specimens: Specimens) -> None:
    source = _source("pynetdicom.ae.ApplicationEntity.start_server")
    _expect(
        '"AcceptorServer@' in source or "'AcceptorServer@" in source or "AcceptorServer@{" in source,
        "start_server no longer names its thread AcceptorServer@...",
    )


def _empty_get_msg(specimens: Specimens) -> None:
    _expect(
        specimens.association().dimse.get_msg(block=False) == (None, None),
        "get_msg(block=False) on an empty queue is not (None, None)",
    )


def _service_user_setters(specimens: Specimens) -> None:
    from pynetdicom import build_context
    from pynetdicom.transport import AddressInformation

    assoc = specimens.association()
    acceptor = assoc.acceptor
    acceptor.maximum_length = 16382
    acceptor.ae_title = "ECHOSCP"
    acceptor.address_info = AddressInformation.from_tuple(("127.0.0.1", 11112))
    acceptor.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.4"
    acceptor.implementation_version_name = "ECHO_SCP"
    contexts = [build_context(_VERIFICATION)]
    acceptor.supported_contexts = contexts
    assoc.requestor.address_info = AddressInformation.from_tuple(("::1", 104, 0, 0))
    _expect(acceptor.supported_contexts == contexts, "supported_contexts does not read back")
    _expect(acceptor.maximum_length == 16382 and acceptor.ae_title == "ECHOSCP", "setters do not read back")
    _expect(assoc.requestor.address_info.address == "::1", "from_tuple does not take a 4-tuple")


def _echo_request_shortcut(_specimens: Specimens) -> None:
    from pynetdicom.dimse_messages import C_ECHO_RQ, DIMSEMessage
    from pynetdicom.dimse_primitives import C_ECHO

    from echo_scp.engine import echo_request_primitive

    request = C_ECHO()
    request.MessageID = 7
    request.AffectedSOPClassUID = _VERIFICATION
    message = C_ECHO_RQ()
    message.primitive_to_message(request)
    received = DIMSEMessage()
    done = [received.decode_msg(pdata) for pdata in message.encode_msg(3, 16382)]
    _expect(done and done[-1], "a C-ECHO-RQ does not decode from the P-DATA it encodes to")
    decoded = vars(received.message_to_primitive())
    ours = vars(echo_request_primitive(7, _VERIFICATION, 3))
    _expect(
        decoded == ours,
        f"message_to_primitive gives a C-ECHO with {sorted(set(decoded) ^ set(ours)) or decoded}, "
        "unlike the engine's shortcut",
    )


def _echo_response_template(_specimens: Specimens) -> None:
    from pynetdicom.dimse_messages import C_ECHO_RSP
    from pynetdicom.dimse_primitives import C_ECHO

    from echo_scp.engine import EchoTemplates, TemplateEchoResponse

    templates = EchoTemplates()
    for message_id in (1, 513):
        response = C_ECHO()
        response.MessageIDBeingRespondedTo = message_id
        response.AffectedSOPClassUID = _VERIFICATION
        response.Status = 0
        message = C_ECHO_RSP()
        message.primitive_to_message(response)
        stock = [p.presentation_data_value_list for p in message.encode_msg(3, 16382)]
        encoded = templates.encode(response)
        _expect(encoded is not None, "the engine cannot make a C-ECHO-RSP template")
        assert encoded is not None
        ours = [p.presentation_data_value_list for p in TemplateEchoResponse(encoded, 3).encode_msg(3, 16382)]
        _expect(ours == stock, "a templated C-ECHO-RSP differs from pynetdicom's encoding")


def _message_attributes(_specimens: Specimens) -> None:
    from pynetdicom.dimse_messages import C_ECHO_RQ, C_ECHO_RSP

    from echo_scp.engine import TemplateEchoRequest

    lazy = set(vars(TemplateEchoRequest(b"", 1))) | {"command_set"}
    for cls in (C_ECHO_RQ, C_ECHO_RSP):
        missing = set(vars(cls())) - lazy
        _expect(not missing, f"{cls.__name__}() has {sorted(missing)}, which the engine's messages lack")


def _attributes_match(ours: Any, theirs: Any, what: str) -> None:
    mine = vars(ours)
    missing = sorted(name for name in vars(theirs) if name not in mine)
    _expect(not missing, f"{what} lacks {missing}, which pynetdicom's constructor sets")
    wrong = sorted(
        name
        for name, value in vars(theirs).items()
        if value is not None and not isinstance(mine[name], type(value))
    )
    _expect(not wrong, f"{what} sets {wrong} to other types than pynetdicom's constructor does")


def _constructors_replicated(specimens: Specimens) -> None:
    from pynetdicom.association import Association
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.dul import DULServiceProvider

    from echo_scp.engine import EventAssociation, EventDIMSEServiceProvider, EventDULServiceProvider

    ae = specimens.ae()
    ours, theirs = EventAssociation(ae, "acceptor"), Association(ae, "acceptor")
    _attributes_match(ours, theirs, "EventAssociation()")
    _attributes_match(EventDULServiceProvider(ours), DULServiceProvider(theirs), "EventDULServiceProvider()")
    _attributes_match(
        EventDIMSEServiceProvider(ours, None), DIMSEServiceProvider(theirs), "EventDIMSEServiceProvider()"
    )
    for name in ("_ae", "mode", "_kill", "_started_dul", "_is_paused", "network_timeout_response"):
        _expect(getattr(ours, name) == getattr(theirs, name), f"EventAssociation() sets {name} otherwise")
    _expect(ours._reactor_checkpoint.is_set(), "EventAssociation() leaves the reactor checkpoint clear")


def _event_association(specimens: Specimens) -> None:
    from echo_scp.engine import (
        EchoTemplates,
        EventAssociation,
        EventAssociationSocket,
        EventDIMSEServiceProvider,
        EventDULServiceProvider,
    )

    assoc = EventAssociation(specimens.ae(), "acceptor", echo_templates=EchoTemplates())
    dul = assoc.dul
    _expect(
        isinstance(dul, EventDULServiceProvider) and isinstance(assoc.dimse, EventDIMSEServiceProvider),
        "the DUL and DIMSE provider Association() built are not adopted",
    )
    _expect(
        (dul.artim_timer.timeout, dul._idle_timer.timeout) == (7, 9),
        "the adopted DUL lost the AE's timeouts",
    )
    ours, peer = specimens.socketpair()
    ours.setblocking(False)
    sock = EventAssociationSocket(assoc, client_socket=ours)
    assoc.set_socket(sock)
    _expect(dul.event_queue.get_nowait() == "Evt5", "the engine's socket does not queue Evt5")
    _expect(not sock.fill() and not sock.ready, "an idle socket is ready")
    # A Unix socket pair: the bytes are readable as soon as sendall() returns.
    abort = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    peer.sendall(abort[:8])
    sock.fill()
    _expect(not sock.ready, "a socket holding part of a PDU is ready")
    peer.sendall(abort[8:])
    sock.fill()
    _expect(sock.ready, "a socket holding a whole PDU is not ready")
    _expect(sock.recv(6) == bytearray(abort[:6]), "recv() does not return what was sent")
    _expect(sock.recv(4) == bytearray(abort[6:]), "recv() does not return the rest")
    sock.send(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    _expect(peer.recv(16) == b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00", "send() does not send")
    peer.close()
    sock.fill()
    _expect(sock.ready and sock.recv(6) == bytearray(), "end of file does not make the socket ready")


# -- the contract ----------------------------------------------------------------------

_P = "pynetdicom."
_DUL = _P + "dul.DULServiceProvider."
_ASSOC = _P + "association.Association."
_USER = _P + "association.ServiceUser."
_ACSE = _P + "acse.ACSE."
_DIMSE = _P + "dimse.DIMSEServiceProvider."
_SOCK = _P + "transport.AssociationSocket."
_HANDLER = _P + "transport.RequestHandler."
_SERVER = _P + "transport.ThreadedAssociationServer."
_AE = _P + "ae.ApplicationEntity."
_TIMER = _P + "timer.Timer."


# The instance checks only read what a constructor set: they share one object.
def _dul(specimens: Specimens) -> Any:
    return specimens.pristine("association").dul


def _assoc(specimens: Specimens) -> Any:
    return specimens.pristine("association")


def _requestor(specimens: Specimens) -> Any:
    return specimens.pristine("association").requestor


def _dimse(specimens: Specimens) -> Any:
    return specimens.pristine("association").dimse


def _socket(specimens: Specimens) -> Any:
    return specimens.pristine("socket")


def _server(specimens: Specimens) -> Any:
    return specimens.server()


def _ae(specimens: Specimens) -> Any:
    return specimens.ae()


def _is_timer(value: Any) -> bool:
    from pynetdicom.timer import Timer

    return isinstance(value, Timer)


def _is_event(value: Any) -> bool:
    return isinstance(value, threading.Event)


def _notification(value: Any) -> bool:
    from pynetdicom import evt

    return isinstance(value, evt.NotificationEvent)


def _import_engine(_specimens: Specimens) -> None:
    importlib.import_module("echo_scp.engine")


def _abort_pdu(_specimens: Specimens) -> None:
    from pynetdicom.pdu import A_ABORT_RQ

    pdu = A_ABORT_RQ()
    pdu.source = 0x02
    pdu.reason_diagnostic = 0x00
    # PS3.8 9.3.8: type 7, length 4, two reserved bytes, source, reason.
    _expect(pdu.encode() == bytes([7, 0, 0, 0, 0, 4, 0, 0, 2, 0]), "does not encode an A-ABORT from source 2")


CHECKS: tuple[Check, ...] = (
    behaviour(
        "echo_scp.engine",
        "the event engine's module imports (it subclasses pynetdicom at import)",
        _import_engine,
    ),
    behaviour(
        "echo_scp.engine.EventAssociation",
        "the engine's association, DUL, DIMSE provider and socket build on the installed pynetdicom",
        _event_association,
    ),
    behaviour(
        "echo_scp.engine.EventAssociation(attributes)",
        "the engine builds its association, DUL and DIMSE provider itself: every attribute pynetdicom's "
        "constructors set, of the same types",
        _constructors_replicated,
    ),
    # The DUL service provider: no thread, the reactor takes its turns.
    method(_DUL + "__init__", "the engine's DUL subclass passes the association", ("assoc",)),
    instance(
        _DUL + "event_queue",
        "served in place without locks (its deque); a put from another thread wakes the reactor",
        _dul,
        _plain_queue,
    ),
    instance(
        _DUL + "to_provider_queue",
        "likewise: a primitive from another thread (an abort at shutdown) wakes the reactor",
        _dul,
        _plain_queue,
    ),
    instance(
        _DUL + "to_user_queue",
        "served in place without locks; another thread's blocking get waits on the association's signal",
        _dul,
        _plain_queue,
    ),
    instance(_DUL + "_recv_pdu", "private: served in place without locks", _dul, _plain_queue),
    instance(_DUL + "artim_timer", "its deadline is one of the reactor's timers", _dul, _is_timer),
    instance(
        _DUL + "_idle_timer",
        "private: the network timeout's deadline is one of the reactor's timers",
        _dul,
        _is_timer,
    ),
    instance(
        _DUL + "state_machine",
        "current_state and do_action(event): one PS3.8 transition per step, as in pynetdicom's loop",
        _dul,
        lambda m: m.current_state == "Sta1" and callable(m.do_action),
    ),
    instance(
        _DUL + "socket",
        "the AssociationSocket the reactor reads (listener.py reads .socket on it)",
        _dul,
        lambda s: s is None,
        engine_only=False,
    ),
    instance(
        _DUL + "_kill_thread",
        "private: the DUL's stop flag, which pynetdicom's kill_dul() and state machine set",
        _dul,
        lambda v: v is False,
    ),
    method(
        _DUL + "_process_recv_primitive",
        "private: pynetdicom's step that turns a local primitive into an event",
    ),
    behaviour(
        _DUL + "_process_recv_primitive(peeks)",
        "the engine drops a stale local primitive itself, so pynetdicom must leave it at the queue's head",
        _local_primitives_peeked,
    ),
    method(
        _DUL + "_is_transport_event", "private: pynetdicom's step that reads one PDU (and closes in Sta13)"
    ),
    method(
        _DUL + "kill_dul",
        "replaced (also wakes the reactor); pynetdicom's ACSE and state machine call it",
        exact=True,
    ),
    method(
        _DUL + "stop_dul",
        "replaced (waits without polling); pynetdicom's Association.kill() calls it",
        exact=True,
    ),
    method(_DUL + "receive_pdu", "extended: a wait ends when the DUL does", ("wait", "timeout"), exact=True),
    method(_DUL + "send_pdu", "a templated C-ECHO-RSP goes out through it", ("primitive",)),
    method(
        _DUL + "peek_next_pdu",
        "listener.py tells a peer's A-ABORT from a dropped connection",
        engine_only=False,
    ),
    method(_DUL + "idle_timer_expired", "the acceptor loop's network timeout test"),
    prop(_DUL + "assoc", "the DUL's association"),
    behaviour(
        _P + "fsm.TRANSITION_TABLE",
        "tells a local primitive the state machine has moved past (PS3.8 defines no transition for it)",
        _transition_table,
    ),
    # Timers.
    prop(_TIMER + "expired", "a DUL step queues Evt18 when the ARTIM timer has expired"),
    prop(_TIMER + "remaining", "the deadlines of the reactor's timers"),
    prop(_TIMER + "timeout", "no timeout (None) means no deadline"),
    method(_TIMER + "start", "the reactor starts the idle timer, as pynetdicom's DUL does"),
    method(_TIMER + "restart", "a PDU received restarts the idle timer, as in pynetdicom"),
    method(_TIMER + "stop", "an ARTIM expiry the state machine has moved past is stopped"),
    behaviour(
        _TIMER + "_start_time/_end_time",
        "private: whether a timer runs (remaining cannot tell stopped or unstarted from running)",
        _timer_private_fields,
    ),
    # The association: the reactor runs its acceptor steps.
    method(
        _ASSOC + "__init__", "the engine's Association subclass passes (ae, mode)", ("ae", "mode"), exact=True
    ),
    behaviour(
        _ASSOC + "__init__(timers)",
        "the DUL the engine adopts keeps the timeouts, and listener.py shortens acse_timeout per connection",
        _timers_follow_timeouts,
        engine_only=False,
    ),
    behaviour(
        _ASSOC + "_bind_defaults",
        "private, replaced: installs the server's handler table at once, after __init__ made _handlers",
        _bind_defaults_after_handlers,
    ),
    behaviour(
        _ASSOC + "_handlers",
        "private: set to a copy of the server's table, in the layout bind() gives (no public bulk bind)",
        _handler_table_layout,
    ),
    behaviour(
        _ASSOC + "run_reactor(acceptor steps)",
        "the engine's steps are run_reactor's for an acceptor: A-ASSOCIATE-RQ, EVT_REQUESTED, negotiation",
        _run_reactor_steps,
    ),
    behaviour(
        _ASSOC + "_run_reactor(steps)",
        "the engine's steps are the acceptor loop's: requests, release, abort, network timeout",
        _run_reactor_loop_steps,
    ),
    method(
        _ASSOC + "kill",
        "replaced (the reactor carries on with the DUL); listener.py calls it after a rejection",
        exact=True,
    ),
    method(
        _ASSOC + "abort",
        "extended: never blocks on the reactor's thread; the daemon aborts what outlives the grace period",
        ("block",),
        exact=True,
        engine_only=False,
    ),
    method(
        _ASSOC + "_abort_blocking",
        "private, extended: pynetdicom sets the instance's abort to it; it must not block the reactor",
        ("block",),
        exact=True,
    ),
    instance(
        _ASSOC + "_kill",
        "private: the acceptor loop's stop flag, which the DUL sets after a failed read",
        _assoc,
        lambda v: v is False,
    ),
    instance(
        _ASSOC + "_started_dul",
        "private: set, so that nothing starts the DUL's thread",
        _assoc,
        lambda v: v is False,
    ),
    instance(
        _ASSOC + "_reactor_checkpoint",
        "private: the Event release() and send_*() clear to pause the loop",
        _assoc,
        _is_event,
    ),
    instance(
        _ASSOC + "_is_paused",
        "private: what release() waits for before it sends",
        _assoc,
        lambda v: v is False,
    ),
    instance(
        _ASSOC + "_server",
        "private: the engine's start() finds its server (and reactor) through it",
        _assoc,
        lambda v: v is None,
    ),
    method(
        _ASSOC + "_serve_request",
        "private: pynetdicom's dispatch of a DIMSE request (EVT_C_ECHO)",
        ("msg", "context_id"),
    ),
    instance(
        _ASSOC + "_sent_abort",
        "private: tells our own A-ABORT from a peer's in listener.py (no public flag)",
        _assoc,
        lambda v: v is False,
        engine_only=False,
    ),
    prop(_ASSOC + "network_timeout", "None: no idle deadline", settable=True),
    prop(
        _ASSOC + "acse_timeout",
        "listener.py shortens it until the A-ASSOCIATE-RQ arrives",
        settable=True,
        engine_only=False,
    ),
    prop(_ASSOC + "accepted_contexts", "listener.py logs the negotiated transfer syntax", engine_only=False),
    prop(
        _ASSOC + "rejected_contexts",
        "listener.py names the SOP classes of an association with no accepted context",
        engine_only=False,
    ),
    prop(_ASSOC + "dimse_timeout", "the engine sets the listener snapshot's DIMSE timeout", settable=True),
    method(
        _ASSOC + "unbind",
        "listener.py unbinds the stock engine's per-PDU debug handlers",
        ("event", "handler"),
        engine_only=False,
    ),
    method(_ASSOC + "set_socket", "the engine's request handler hands over its socket", ("socket",)),
    instance(
        _ASSOC + "is_established",
        "the acceptor loop's state, as pynetdicom keeps it",
        _assoc,
        lambda v: v is False,
    ),
    instance(
        _ASSOC + "is_rejected", "set by send_reject(); no negotiation follows", _assoc, lambda v: v is False
    ),
    instance(_ASSOC + "is_released", "set on release, as pynetdicom does", _assoc, lambda v: v is False),
    instance(_ASSOC + "is_aborted", "set on abort, as pynetdicom does", _assoc, lambda v: v is False),
    # ACSE and the service users.
    method(_ACSE + "negotiate_association", "the acceptor's negotiation, after EVT_REQUESTED"),
    method(_ACSE + "is_release_requested", "the acceptor loop answers a peer's A-RELEASE-RQ"),
    method(_ACSE + "send_release", "the A-RELEASE-RP", ("is_response",)),
    method(_ACSE + "is_aborted", "the acceptor loop ends on A-ABORT or A-P-ABORT", ("abort_type",)),
    method(
        _ACSE + "send_reject",
        "listener.py's association policy",
        ("result", "source", "diagnostic"),
        engine_only=False,
    ),
    instance(
        _USER + "primitive",
        "the engine sets the A-ASSOCIATE-RQ on it; listener.py reads its AE titles",
        _requestor,
        lambda v: v is None,
        engine_only=False,
    ),
    instance(
        _USER + "address_info",
        "set from the peer's address, as pynetdicom's request handler does",
        _requestor,
        lambda v: v is None,
    ),
    prop(_USER + "maximum_length", "the acceptor's maximum PDU size", settable=True),
    prop(_USER + "ae_title", "the acceptor's AE title", settable=True),
    prop(_USER + "implementation_class_uid", "the acceptor's implementation class UID", settable=True),
    prop(_USER + "implementation_version_name", "the acceptor's implementation version name", settable=True),
    prop(
        _USER + "supported_contexts", "the server's contexts, shared rather than deep-copied", settable=True
    ),
    behaviour(
        _USER + "(acceptor setup)",
        "the engine sets up each acceptor as pynetdicom's request handler does",
        _service_user_setters,
    ),
    method(
        _P + "transport.AddressInformation.from_tuple",
        "the local and peer addresses, IPv4 or IPv6",
        ("address_info",),
    ),
    # The DIMSE provider and C-ECHO messages.
    method(_DIMSE + "__init__", "the engine's DIMSE subclass passes the association", ("assoc",)),
    instance(
        _DIMSE + "msg_queue",
        "served in place without locks (the reactor alone puts and gets)",
        _dimse,
        _plain_queue,
    ),
    instance(
        _DIMSE + "message",
        "None between messages: only then may a C-ECHO-RQ take the template path",
        _dimse,
        lambda v: v is None,
    ),
    method(
        _DIMSE + "receive_primitive", "extended: a known C-ECHO-RQ skips pydicom", ("primitive",), exact=True
    ),
    method(
        _DIMSE + "send_msg",
        "extended: a C-ECHO-RSP is sent from a template",
        ("primitive", "context_id"),
        exact=True,
    ),
    method(_DIMSE + "get_msg", "the acceptor loop takes requests without blocking", ("block",)),
    behaviour(_DIMSE + "get_msg(empty)", "an empty queue gives (None, None)", _empty_get_msg),
    prop(_DIMSE + "maximum_pdu_size", "the peer's maximum PDU size for the templated response"),
    prop(_DIMSE + "dul", "the templated response goes to the DUL"),
    behaviour(
        _P + "dimse_messages.DIMSEMessage(attributes)",
        "the templated messages skip DIMSEMessage.__init__ and set what it sets themselves",
        _message_attributes,
    ),
    method(
        _P + "dimse_messages.DIMSEMessage.primitive_to_message",
        "a response template starts as pynetdicom's own message",
        ("primitive",),
    ),
    method(
        _P + "dimse_messages.DIMSEMessage.encode_msg",
        "extended: a templated response is one P-DATA",
        ("context_id", "max_pdu_length"),
        exact=True,
    ),
    behaviour(
        _P + "dimse_messages.DIMSEMessage.message_to_primitive",
        "a known C-ECHO-RQ becomes the C-ECHO primitive pynetdicom's decoder would make",
        _echo_request_shortcut,
    ),
    behaviour(
        _P + "dimse_messages.C_ECHO_RSP(encoding)",
        "a templated C-ECHO-RSP is pynetdicom's encoding with its message ID patched",
        _echo_response_template,
    ),
    method(
        _P + "dsutils.decode",
        "command sets are decoded as pynetdicom decodes them",
        ("bytestring", "is_implicit_vr", "is_little_endian"),
    ),
    method(
        _P + "dsutils.encode",
        "response templates are encoded as pynetdicom encodes them",
        ("ds", "is_implicit_vr", "is_little_endian"),
    ),
    prop(_P + "pdu_primitives.P_DATA.presentation_data_value_list", "a templated response is one PDV"),
    behaviour(
        _P + "pdu.A_ABORT_RQ", "the DUL sends one itself after an error, as pynetdicom's does", _abort_pdu
    ),
    # The association socket.
    method(
        _SOCK + "__init__",
        "the engine's socket subclass passes (assoc, client_socket)",
        ("assoc", "client_socket"),
    ),
    behaviour(
        _SOCK + "__init__(Evt5)",
        "a wrapped accepted socket queues Evt5 and close() queues Evt17",
        _socket_queues_evt5,
    ),
    prop(_SOCK + "ready", "replaced: a whole PDU is buffered (reading it cannot wait)"),
    method(_SOCK + "recv", "replaced: from what the reactor has read", ("nr_bytes",), exact=True),
    method(
        _SOCK + "send",
        "replaced: what the kernel does not take waits for the socket to be writable",
        ("bytestream",),
        exact=True,
    ),
    method(
        _SOCK + "_shutdown_socket",
        "private, replaced: closes once all queued is sent (pynetdicom skips close() if shutdown() raises)",
        exact=True,
    ),
    instance(
        _SOCK + "socket",
        "the connection",
        _socket,
        lambda v: isinstance(v, socket.socket),
        engine_only=False,
    ),
    instance(
        _SOCK + "_is_connected",
        "private: whether pynetdicom still considers the connection open (no public flag)",
        _socket,
        lambda v: v is True,
    ),
    prop(_SOCK + "event_queue", "a failed send queues Evt17, as pynetdicom's does"),
    prop(_SOCK + "assoc", "the socket's association (its reactor)"),
    method(_SOCK + "close", "closing in Sta2 on an early abort, and when an association is over"),
    # The request handler and the server.
    method(
        _HANDLER + "__init__",
        "the reactor builds one per connection (socketserver's finish_request)",
        ("request", "client_address", "server"),
    ),
    method(_HANDLER + "handle", "replaced: builds an EventAssociation", exact=True),
    prop(_HANDLER + "ae", "the server's AE, for the acceptor's settings"),
    method(
        _SERVER + "__init__",
        "the engine's server subclass passes these",
        ("ae", "address", "ae_title", "contexts", "ssl_context", "evt_handlers", "request_handler"),
    ),
    method(
        _AE + "make_server",
        "builds the engine's server class with its keyword arguments",
        ("address", "ae_title", "contexts", "ssl_context", "evt_handlers", "server_class"),
        kwargs=True,
    ),
    behaviour(
        _AE + "make_server(forwards)",
        "request_handler and request_queue_size reach the server class",
        _make_server_forwards,
    ),
    behaviour(
        _SERVER + "request_queue_size",
        "the listen backlog: server_activate listens with it, before our constructor returns",
        _backlog_is_request_queue_size,
    ),
    method(_SERVER + "get_events", "the engine copies the server's handler table"),
    method(_SERVER + "get_handlers", "likewise", ("event",)),
    method(
        _SERVER + "bind",
        "extended: a change drops the engine's copy of the table",
        ("event", "handler", "args"),
    ),
    method(_SERVER + "unbind", "likewise", ("event", "handler")),
    method(_SERVER + "server_close", "extended: also closes the reactor's wake-up channel", exact=True),
    method(
        _SERVER + "shutdown",
        "replaced: stops accepting and aborts the associations; ae.shutdown() calls it",
        exact=True,
    ),
    prop(_SERVER + "active_associations", "replaced: the reactor's associations (they are not threads)"),
    instance(
        _SERVER + "socket",
        "listener.py and the accept loop use the listening socket",
        _server,
        lambda v: isinstance(v, socket.socket),
        engine_only=False,
    ),
    instance(
        _SERVER + "ae_title",
        "a reload writes it; read for each new association",
        _server,
        lambda v: v == "ECHOSCP",
        engine_only=False,
    ),
    instance(
        _SERVER + "contexts",
        "a reload writes it; read for each new association",
        _server,
        lambda v: len(v) == 1,
        engine_only=False,
    ),
    prop(
        _SERVER + "ssl_context",
        "a reload writes it; read for each new connection",
        settable=True,
        engine_only=False,
    ),
    method(
        "socketserver.BaseServer.finish_request",
        "(stdlib) the reactor builds the request handler for each connection it accepts",
        ("request", "client_address"),
    ),
    method(
        "socketserver.TCPServer.shutdown_request",
        "(stdlib) closes a connection no association could be started for",
        ("request",),
    ),
    # The AE.
    instance(
        _AE + "_servers",
        "private: what ae.shutdown() stops; listener.py adds the event engine's server as start_server does",
        _ae,
        lambda v: v == [],
        engine_only=False,
    ),
    prop(_AE + "maximum_pdu_size", "the acceptor's maximum PDU size"),
    prop(_AE + "implementation_class_uid", "the acceptor's implementation class UID"),
    prop(_AE + "implementation_version_name", "the acceptor's implementation version name"),
    method(
        _AE + "start_server",
        "the stock engine, and the fallback",
        ("address", "block", "ssl_context", "evt_handlers", "ae_title", "contexts"),
        engine_only=False,
    ),
    behaviour(
        _AE + "start_server(thread name)",
        "listener.py finds the stock engine's accept thread by its name, AcceptorServer@...",
        _start_server_thread_name,
        engine_only=False,
    ),
    # Events and configuration.
    method(
        _P + "evt.trigger", "the engine fires the events of the code it replaces", ("assoc", "event", "attrs")
    ),
    attribute(
        _P + "evt.EVT_CONN_OPEN", "fired by the engine as the reactor takes a connection", _notification
    ),
    attribute(_P + "evt.EVT_REQUESTED", "fired by the engine's acceptor steps", _notification),
    attribute(
        _P + "evt.EVT_DATA_SENT", "fired by the engine's socket, as pynetdicom's send() does", _notification
    ),
    attribute(_P + "evt.EVT_DIMSE_RECV", "fired for a templated C-ECHO-RQ", _notification),
    attribute(_P + "evt.EVT_DIMSE_SENT", "fired for a templated C-ECHO-RSP", _notification),
    attribute(_P + "evt.EVT_RELEASED", "fired by the acceptor loop", _notification),
    attribute(_P + "evt.EVT_ABORTED", "fired by the acceptor loop", _notification),
    behaviour(
        _P + "_config.VALIDATORS",
        "the documented validator hook the engine memoizes: set_uid/set_ae use it, answers are unchanged",
        _validators_memoized,
    ),
    *(
        method(
            _P + f"_handlers.standard_{name}_handler",
            "private: the per-PDU debug handlers pynetdicom binds at its (process-wide) default log "
            "handler level; left out of every association unless debugging, instead of changing _config",
            ("event",),
            engine_only=False,
        )
        for name in ("pdu_recv", "pdu_sent", "dimse_recv", "dimse_sent")
    ),
    method(
        _SERVER + "get_request",
        "replaced: the engine reads the listener's runtime snapshot once per accepted connection",
        (),
    ),
)
