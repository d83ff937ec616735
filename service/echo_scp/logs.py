"""Structured logging: structlog events and pynetdicom's stdlib records, one format.

JSON lines on stdout when it is not a terminal (or when asked), a console
renderer on a terminal. pynetdicom logs through the standard library; its
records go through the same ``ProcessorFormatter``, so an operator sees one
stream in one format.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import IO, Any

import structlog

from echo_scp.settings import LogSettings

LOGGER_NAME = "echo_scp"
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


class LogControl:
    """Routes every stdlib record through structlog's formatter; re-applied on reload.

    :meth:`install` takes over the root logger and remembers what it found;
    :meth:`apply` changes level and format in place (a reload); :meth:`restore`
    puts back what was there, including the ``pynetdicom`` logger's level.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream
        self._saved: tuple[list[logging.Handler], int, int] | None = None

    def install(self, settings: LogSettings) -> LogControl:
        root = logging.getLogger()
        if self._saved is None:
            self._saved = (root.handlers[:], root.level, logging.getLogger("pynetdicom").level)
        self.apply(settings)
        return self

    def apply(self, settings: LogSettings) -> None:
        stream = self._stream or sys.stdout
        handler = logging.StreamHandler(stream)
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=_SHARED,
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    _renderer(settings, stream),
                ],
            )
        )
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(_LEVELS[settings.level])
        # pynetdicom narrates every association at INFO; our canonical lines say
        # the same once, so its chatter only shows when debugging.
        logging.getLogger("pynetdicom").setLevel(
            logging.DEBUG if settings.level == "debug" else logging.WARNING
        )

    def restore(self) -> None:
        if self._saved is None:
            return
        handlers, level, pynetdicom_level = self._saved
        root = logging.getLogger()
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("pynetdicom").setLevel(pynetdicom_level)
        self._saved = None


def install(settings: LogSettings, stream: IO[str] | None = None) -> Callable[[], None]:
    """Route every stdlib record through structlog's formatter; returns an undo."""
    return LogControl(stream).install(settings).restore


def make_logger(name: str = LOGGER_NAME) -> Any:
    """A structlog logger writing through the stdlib handler that install() set."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=[
            structlog.stdlib.filter_by_level,
            *_SHARED,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
