"""Diagnostic logging through structlog, imported and configured on first use.

A normal build logs nothing (its output is progress events), and importing
structlog costs tens of milliseconds of every cached rebuild; so modules take a
lazy logger here and the CLI only records the wanted format.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

_settings: dict[str, Any] = {"format": "console", "debug": False, "info": False}
_configured = False
#: configure() was called since structlog was last set up by us
_asked = False


def configure(fmt: str = "console", debug: bool = False, *, info: bool = False) -> None:
    """Record the format (``console`` or ``json``) and level for when a log happens.

    The level is debug with ``debug``; otherwise info for json (whoever asks for
    machine-readable logs wants each build's summary) or when ``info`` is asked
    for (a daemon logs its life), else warning (a build's progress already says
    everything)."""
    global _configured, _asked
    _settings.update(format=fmt, debug=debug, info=info)
    _configured, _asked = False, True


def _ensure_configured() -> None:
    global _configured, _asked
    if _configured:
        return
    import structlog

    if structlog.is_configured() and not _asked:
        # Someone else set structlog up (an embedding program, or a test's
        # capture_logs): theirs wins unless configure() asked for ours since.
        _configured = True
        return

    # KeyValueRenderer rather than structlog.dev's ConsoleRenderer, which
    # imports rich when it is installed.
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if _settings["format"] == "json"
        else structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"])
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_level()),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured, _asked = True, False


def _level() -> int:
    if _settings["debug"]:
        return logging.DEBUG
    if _settings["format"] == "json" or _settings["info"]:
        return logging.INFO
    return logging.WARNING


def _drop(*_args: object, **_kw: object) -> None:
    pass


class _LazyLogger:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        # A call below the level is dropped here, so it never imports structlog
        # (whose import pulls in rich when it is installed).
        if attr == "debug" and _level() > logging.DEBUG:
            return _drop
        if attr == "info" and _level() > logging.INFO:
            return _drop
        _ensure_configured()
        import structlog

        return getattr(structlog.get_logger(self._name), attr)


def get_logger(name: str) -> FilteringBoundLogger:
    return cast("FilteringBoundLogger", _LazyLogger(name))
