"""Structured logs: the events and fields of an association, and one format for every record."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from echo_scp import logs
from echo_scp.settings import LogSettings
from tests.conftest import associate as _associate

ASSOCIATION_FIELDS = {"listener", "assoc_id", "peer_host", "peer_port", "calling_ae", "called_ae"}


def _peer_events(running: Any, name: str) -> list[dict[str, Any]]:
    return [
        e for e in running.events(name) if not e.get("self_check") and e.get("calling_ae") != "ECHO_SCP_READY"
    ]


def test_one_canonical_line_per_association(start_service):
    """A released association ends with one association_ended line carrying every identifying field."""
    running = start_service()
    assoc = _associate(running.port())
    assert assoc.send_c_echo(msg_id=42).Status == 0
    assoc.release()
    running.wait_idle()
    (ended,) = _peer_events(running, "association_ended")
    assert set(ended) >= ASSOCIATION_FIELDS
    assert ended["calling_ae"] == "ECHOSCU" and ended["called_ae"] == "ECHOSCP"
    assert ended["peer_host"] == "127.0.0.1" and isinstance(ended["peer_port"], int)
    assert ended["outcome"] == "released" and ended["echoes"] == 1
    assert ended["transfer_syntax"] == "Implicit VR Little Endian"
    assert ended["duration_s"] > 0
    assert ended["log_level"] == "info"
    (echo,) = _peer_events(running, "c_echo")
    assert echo["message_id"] == 42 and echo["status"] == "0x0000"
    assert echo["assoc_id"] == ended["assoc_id"]


def test_rejection_and_abort_fields(start_service):
    """Rejections log result/source/reason in words, aborts log who aborted."""
    running = start_service()
    assert _associate(running.port(), called="WRONG").is_rejected
    aborted = _associate(running.port())
    aborted.abort()
    running.wait_idle()
    (rejected,) = _peer_events(running, "association_rejected")
    assert (rejected["result"], rejected["source"], rejected["reason"], rejected["code"]) == (
        "permanent",
        "service_user",
        "called_ae_title_not_recognised",
        "1/1/7",
    )
    assert set(rejected) >= ASSOCIATION_FIELDS
    (abort,) = _peer_events(running, "association_aborted")
    assert abort["abort_source"] == "peer"
    outcomes = sorted(
        (e["outcome"], e.get("rejection"), e.get("abort_source"))
        for e in _peer_events(running, "association_ended")
    )
    assert outcomes == [("aborted", None, "peer"), ("rejected", "1/1/7", None)]


def test_json_lines_for_structlog_and_pynetdicom_records():
    """Not on a TTY, our events and pynetdicom's stdlib records are both JSON lines with level and logger."""
    stream = io.StringIO()
    undo = logs.install(LogSettings(level="info", format="auto"), stream)
    try:
        logs.make_logger().info("listener_started", listener="dicom", port=104)
        logging.getLogger("pynetdicom.acse").warning("Association Aborted")
    finally:
        undo()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "listener_started" and first["listener"] == "dicom" and first["level"] == "info"
    assert first["logger"] == "echo_scp" and first["timestamp"].endswith("Z")
    assert second["event"] == "Association Aborted" and second["logger"] == "pynetdicom.acse"
    assert second["level"] == "warning"


def test_console_rendering_on_a_tty():
    """On a TTY (format auto) logs are rendered for people, not as JSON."""

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    undo = logs.install(LogSettings(level="info", format="auto"), stream)
    try:
        logs.make_logger().info("listener_started", listener="dicom")
    finally:
        undo()
    text = stream.getvalue()
    assert "listener_started" in text and "listener" in text
    assert not text.lstrip().startswith("{")


def test_level_filters_and_pynetdicom_info_is_quiet():
    """At level warning our info events are dropped, and pynetdicom's INFO chatter is off unless debugging."""
    stream = io.StringIO()
    undo = logs.install(LogSettings(level="warning", format="json"), stream)
    try:
        logs.make_logger().info("association_ended")
        logs.make_logger().warning("self_check_failed", listener="dicom")
        logging.getLogger("pynetdicom.assoc").info("Accepting Association")
    finally:
        undo()
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events == ["self_check_failed"]


def _structlog_line(record: logging.LogRecord) -> dict[str, Any]:
    """``record`` rendered by structlog's own ProcessorFormatter and JSONRenderer, as the daemon once did."""
    import structlog

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )
    return dict(json.loads(formatter.format(record)))


def test_json_lines_are_those_structlog_renders():
    """Our JSON formatter writes, field for field and in order, what structlog's JSONRenderer writes."""

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    handler = Records()
    logger = logging.getLogger("echo_scp.structlog_parity")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        events = logs.EventLogger(logger).bind(listener="dicom")
        events.info("association_ended", outcome="released", echoes=1, peer_port=5104, value=Opaque())
        try:
            raise ValueError("bad PDU")
        except ValueError:
            events.exception("handler_failed", handler="EVT_C_ECHO")
        logging.getLogger("echo_scp.structlog_parity").warning("Association Aborted (%s)", "peer")
    finally:
        logger.removeHandler(handler)
    assert len(handler.records) == 3
    ours = logs.JsonFormatter()
    for record in handler.records:
        expected, line = _structlog_line(record), json.loads(ours.format(record))
        assert abs(_seconds(line.pop("timestamp")) - _seconds(expected.pop("timestamp"))) < 5
        assert list(line.items()) == list(expected.items())
    assert "ValueError: bad PDU" in json.loads(ours.format(handler.records[1]))["exception"]


def _seconds(timestamp: str) -> float:
    import datetime

    assert timestamp.endswith("Z")
    return datetime.datetime.fromisoformat(timestamp[:-1] + "+00:00").timestamp()
