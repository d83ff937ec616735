"""Structured logging: our events and pynetdicom's stdlib records, one format.

JSON lines on stdout when it is not a terminal (or when asked), a console
renderer on a terminal. Events are written structlog's way,
``log.info("association_ended", outcome=...)``, by :class:`EventLogger`, and
pynetdicom logs through the standard library; both go through the same
formatter, so an operator sees one stream in one format.

The JSON lines are structlog's (``ProcessorFormatter`` with
``JSONRenderer``: the event's fields, ``event``, ``level``, ``logger``,
``timestamp``, then ``exception``), rendered here without structlog, which the
daemon then need not import (it pulls in asyncio: together some 3 MiB, and
the per-event cost of its processor chain). On a terminal the lines are
structlog's ``ConsoleRenderer``'s, imported only then.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, MutableMapping
from typing import IO, Any

from echo_scp.settings import LogSettings

LOGGER_NAME = "echo_scp"
# How long stopping the writer may wait for a stuck consumer (twice: to queue
# the stop, and for the writer to finish); part of the shutdown budget that
# must fit docker's and podman's 10 s stop timeout.
_CLOSE_WAIT = 0.5
# How long the writer lets lines gather after the first of a burst.
_GATHER = 0.02
_LEVELS = {"critical": 50, "error": 40, "warning": 30, "info": 20, "debug": 10}
# Attributes a record made by EventLogger carries (as structlog's wrap_for_formatter does).
_FROM_EVENT_LOGGER = "_name"
# Fields passed with ``extra=`` on a stdlib record that the lines carry (the writer's own summary).
_EXTRA_FIELDS = ("dropped", "dropped_total")
_UTC = datetime.UTC


def _timestamp() -> str:
    """structlog's ``TimeStamper(fmt="iso", utc=True)``."""
    return datetime.datetime.now(tz=_UTC).isoformat().replace("+00:00", "Z")


def _use_console(settings: LogSettings, stream: IO[str]) -> bool:
    return settings.format == "console" or (
        settings.format == "auto" and hasattr(stream, "isatty") and stream.isatty()
    )


def _exception_text(exc_info: Any) -> str | None:
    """structlog's ``format_exc_info``: the traceback of ``exc_info`` (an exception, a tuple or True)."""
    if isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    elif not isinstance(exc_info, tuple):
        exc_info = sys.exc_info() if exc_info else None
    if not exc_info:
        return None
    text = "".join(traceback.format_exception(exc_info[0], exc_info[1], exc_info[2]))
    return text[:-1] if text.endswith("\n") else text


def _json_default(value: Any) -> Any:
    # structlog's JSONRenderer fallback: __structlog__(), else repr().
    structlog_value = getattr(value, "__structlog__", None)
    return structlog_value() if callable(structlog_value) else repr(value)


class JsonFormatter(logging.Formatter):
    """One JSON line per record, as structlog's ProcessorFormatter with JSONRenderer writes it."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, _FROM_EVENT_LOGGER, None) is not None and isinstance(record.msg, dict):
            # An EventLogger record: its fields, event, level, logger and timestamp are set.
            event = dict(record.msg)
        else:
            event = {
                "event": record.getMessage(),
                "level": record.levelname.lower(),
                "logger": record.name,
                "timestamp": _timestamp(),
            }
            for key in _EXTRA_FIELDS:
                if hasattr(record, key):
                    event[key] = getattr(record, key)
            if record.exc_info:
                event["exc_info"] = record.exc_info
            if record.stack_info:
                event["stack_info"] = record.stack_info
        if "exc_info" in event:
            text = _exception_text(event.pop("exc_info"))
            if text is not None:
                event["exception"] = text
        return json.dumps(event, default=_json_default)


def _console_formatter(stream: IO[str]) -> logging.Formatter:
    """structlog's console rendering, for people at a terminal (structlog is imported only for it)."""
    import structlog

    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _extra_fields,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer(colors=stream.isatty()),
        ],
    )


class _QueueHandler(logging.Handler):
    """Formats on the caller's thread, hands the line to a writer thread, never blocks.

    A stuck log consumer (a pipe nobody reads, a blocked container log driver)
    fills the queue; records are then dropped and counted instead of stopping
    the thread that logged, which may be serving a peer.
    """

    def __init__(self, stream: IO[str], capacity: int) -> None:
        super().__init__()
        self.stream = stream
        self.lines: queue.Queue[str | None] = queue.Queue(maxsize=capacity)
        self.dropped = 0
        self._unreported = 0
        self._count_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write, name="echo-scp-log-writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        try:
            self.lines.put_nowait(line)
        except queue.Full:
            with self._count_lock:
                self.dropped += 1
                self._unreported += 1

    def _write(self) -> None:
        lines = self.lines
        while True:
            batch = [lines.get()]
            if batch[0] is not None:
                # Let a burst gather: one write, and one wake-up of this thread
                # (which takes the GIL from the one serving peers), for many lines.
                time.sleep(_GATHER)
                while batch[-1] is not None:
                    try:
                        batch.append(lines.get_nowait())
                    except queue.Empty:
                        break
            text = "".join(line + "\n" for line in batch if line is not None)
            try:
                if text:
                    with contextlib.suppress(OSError, ValueError):
                        self.stream.write(text)
                        self.stream.flush()
            finally:
                for _ in batch:
                    lines.task_done()
            if batch[-1] is None:
                return
            if self._unreported:
                with self._count_lock:
                    count, self._unreported = self._unreported, 0
                # Writing works again: say once what was lost meanwhile.
                logging.getLogger(LOGGER_NAME).warning(
                    "log_records_dropped", extra={"dropped": count, "dropped_total": self.dropped}
                )

    def flush_lines(self, timeout: float) -> bool:
        """Wait until every queued line is written; False if that takes longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.lines.all_tasks_done:
            while self.lines.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.lines.all_tasks_done.wait(remaining)
        return True

    def close(self) -> None:
        """Write what is queued (bounded), then stop the writer."""
        with contextlib.suppress(queue.Full):
            self.lines.put(None, timeout=_CLOSE_WAIT)
        self._writer.join(_CLOSE_WAIT)
        super().close()


class _PeerRecords(logging.Filter):
    """pynetdicom's warnings and errors about one peer's connection go into that connection's line.

    A port scanner or a broken device makes pynetdicom log an ERROR per bad PDU
    (thousands for a stream of garbage), often with a traceback, and without
    the listener or the peer. Records logged on a thread that serves a
    connection (the association's thread or its DUL's) are handed to the
    connection's ``log_sink`` instead, and the connection's one
    ``association_ended`` line names the problem; they are still written at
    level debug. ERROR stays for the daemon's own faults.
    """

    def __init__(self, *, keep: bool) -> None:
        super().__init__()
        self.keep = keep

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith("pynetdicom"):
            return True
        thread = threading.current_thread()
        sink = getattr(thread, "log_sink", None) or getattr(getattr(thread, "assoc", None), "log_sink", None)
        if sink is None:
            return True
        with contextlib.suppress(Exception):
            sink(record.getMessage())
        return self.keep


class LogControl:
    """Routes every stdlib record through one formatter (JSON or console); re-applied on reload.

    :meth:`install` takes over the root logger and remembers what it found;
    :meth:`apply` changes level and format in place (a reload); :meth:`restore`
    puts back what was there, including the ``pynetdicom`` logger's level.
    Lines are written by a thread of their own (see :class:`_QueueHandler`);
    ``dropped`` counts those lost to a stuck consumer.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream
        self._saved: tuple[list[logging.Handler], int, int] | None = None
        self._handler: _QueueHandler | None = None
        self._dropped_before = 0

    @property
    def dropped(self) -> int:
        """Records dropped since install because the log consumer did not keep up."""
        return self._dropped_before + (self._handler.dropped if self._handler else 0)

    def install(self, settings: LogSettings) -> LogControl:
        root = logging.getLogger()
        if self._saved is None:
            self._saved = (root.handlers[:], root.level, logging.getLogger("pynetdicom").level)
        self.apply(settings)
        return self

    def apply(self, settings: LogSettings) -> None:
        stream = self._stream or sys.stdout
        formatter = _console_formatter(stream) if _use_console(settings, stream) else JsonFormatter()
        if self._handler is None:
            self._handler = _QueueHandler(stream, settings.queue_size)
        # The formatter is swapped in place: lines already queued keep theirs.
        self._handler.setFormatter(formatter)
        self._handler.filters[:] = [_PeerRecords(keep=settings.level == "debug")]
        root = logging.getLogger()
        root.handlers[:] = [self._handler]
        root.setLevel(_LEVELS[settings.level])
        # pynetdicom narrates every association at INFO; our canonical lines say
        # the same once, so its chatter only shows when debugging.
        pynetdicom_level = logging.DEBUG if settings.level == "debug" else logging.WARNING
        logging.getLogger("pynetdicom").setLevel(pynetdicom_level)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every line logged so far is written (tests, shutdown)."""
        return self._handler is None or self._handler.flush_lines(timeout)

    def restore(self) -> None:
        if self._saved is None:
            return
        handlers, level, pynetdicom_level = self._saved
        root = logging.getLogger()
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("pynetdicom").setLevel(pynetdicom_level)
        self._saved = None
        if self._handler is not None:
            self._dropped_before += self._handler.dropped
            self._handler.close()
            self._handler = None


def _extra_fields(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Fields passed with ``extra=`` on a stdlib record (the writer's own summary line)."""
    record = event_dict.get("_record")
    for key in ("dropped", "dropped_total"):
        if record is not None and hasattr(record, key):
            event_dict[key] = getattr(record, key)
    return event_dict


def install(settings: LogSettings, stream: IO[str] | None = None) -> Callable[[], None]:
    """Route every stdlib record through the formatter the settings choose; returns an undo."""
    return LogControl(stream).install(settings).restore


class EventLogger:
    """structlog's way of logging, ``log.info("event", key=value)``, onto a stdlib logger.

    The level is asked first (dropped events cost almost nothing), and the
    record carries the event's fields with ``event``, ``level``, ``logger``
    and ``timestamp`` added as structlog's processors add them; the
    formatters render it (``JsonFormatter``, or structlog's own on a terminal:
    the record has the attributes of structlog's ``wrap_for_formatter``).
    """

    __slots__ = ("_context", "_logger")

    def __init__(self, logger: logging.Logger, context: dict[str, Any] | None = None) -> None:
        self._logger = logger
        self._context = context or {}

    def bind(self, **fields: Any) -> EventLogger:
        """A logger adding ``fields`` to every event."""
        return EventLogger(self._logger, {**self._context, **fields})

    def debug(self, event: str | None = None, *args: Any, **fields: Any) -> None:
        self._emit(logging.DEBUG, "debug", event, fields)

    def info(self, event: str | None = None, *args: Any, **fields: Any) -> None:
        self._emit(logging.INFO, "info", event, fields)

    def warning(self, event: str | None = None, *args: Any, **fields: Any) -> None:
        self._emit(logging.WARNING, "warning", event, fields)

    warn = warning

    def error(self, event: str | None = None, *args: Any, **fields: Any) -> None:
        self._emit(logging.ERROR, "error", event, fields)

    def critical(self, event: str | None = None, *args: Any, **fields: Any) -> None:
        self._emit(logging.CRITICAL, "critical", event, fields)

    def exception(self, event: str | None = None, *args: Any, **fields: Any) -> None:
        fields.setdefault("exc_info", True)
        self._emit(logging.ERROR, "error", event, fields)

    def _emit(self, level: int, level_name: str, event: str | None, fields: dict[str, Any]) -> None:
        logger = self._logger
        if not logger.isEnabledFor(level):
            return
        event_dict = {**self._context, **fields} if self._context else fields
        if event_dict.get("exc_info") is True:
            # Resolved now, in the handler that caught it.
            event_dict["exc_info"] = sys.exc_info()
        if event is not None:
            event_dict["event"] = event
        event_dict["level"] = level_name
        event_dict["logger"] = logger.name
        event_dict["timestamp"] = _timestamp()
        # makeRecord and handle, not Logger.log: no walk up the stack for a
        # file name and line that no line shows.
        record = logger.makeRecord(
            logger.name,
            level,
            "(unknown file)",
            0,
            event_dict,
            (),
            None,
            extra={"_logger": None, _FROM_EVENT_LOGGER: level_name},
        )
        logger.handle(record)


def make_logger(name: str = LOGGER_NAME) -> EventLogger:
    """A logger writing through the stdlib handler that install() set."""
    return EventLogger(logging.getLogger(name))
