"""Structured logging: structlog events and pynetdicom's stdlib records, one format.

JSON lines on stdout when it is not a terminal (or when asked), a console
renderer on a terminal. pynetdicom logs through the standard library; its
records go through the same ``ProcessorFormatter``, so an operator sees one
stream in one format.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import IO, Any

import structlog

from echo_scp.settings import LogSettings

LOGGER_NAME = "echo_scp"
# How long stopping the writer may wait for a stuck consumer.
_CLOSE_WAIT = 2.0
_LEVELS = {"critical": 50, "error": 40, "warning": 30, "info": 20, "debug": 10}

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def _renderer(settings: LogSettings, stream: IO[str]) -> Any:
    use_console = settings.format == "console" or (
        settings.format == "auto" and hasattr(stream, "isatty") and stream.isatty()
    )
    if use_console:
        return structlog.dev.ConsoleRenderer(colors=stream.isatty())
    return structlog.processors.JSONRenderer()


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
        while True:
            line = self.lines.get()
            try:
                if line is None:
                    return
                with contextlib.suppress(OSError, ValueError):
                    self.stream.write(line + "\n")
                    self.stream.flush()
            finally:
                self.lines.task_done()
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


class LogControl:
    """Routes every stdlib record through structlog's formatter; re-applied on reload.

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
        formatter = structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_SHARED, _extra_fields],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _renderer(settings, stream),
            ],
        )
        if self._handler is None:
            self._handler = _QueueHandler(stream, settings.queue_size)
        # The formatter is swapped in place: lines already queued keep theirs.
        self._handler.setFormatter(formatter)
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
    """Route every stdlib record through structlog's formatter; returns an undo."""
    return LogControl(stream).install(settings).restore


class _LevelCheckedLogger(structlog.stdlib.BoundLogger):
    """structlog's stdlib BoundLogger that asks the level first.

    structlog only drops a filtered event in ``filter_by_level``, after
    binding and building it; the reporter logs several debug events per
    association that the usual level drops, so ``debug`` and ``info`` check
    the stdlib logger's (cached) level before anything else.
    """

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not self._logger.isEnabledFor(logging.DEBUG):
            return None
        return self._proxy_to_logger("debug", event, *args, **kw)

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not self._logger.isEnabledFor(logging.INFO):
            return None
        return self._proxy_to_logger("info", event, *args, **kw)


def make_logger(name: str = LOGGER_NAME) -> Any:
    """A structlog logger writing through the stdlib handler that install() set."""
    # Bound once: structlog.wrap_logger's lazy proxy builds a new logger at every call.
    return _LevelCheckedLogger(
        logging.getLogger(name),
        processors=[
            structlog.stdlib.filter_by_level,
            *_SHARED,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        context={},
    )
