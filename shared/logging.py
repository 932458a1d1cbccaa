"""structlog set-up, called once by the command (docs/architecture.md §10): JSON lines when stderr is not a
TTY, the console renderer when it is; context variables merged first."""

from __future__ import annotations

import logging
import sys
from typing import Any

import msgspec
import structlog

__all__ = ["configure_logging", "get_logger", "plain_json", "set_level"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _plain(obj: object) -> object:
    """Fallback for a value msgspec cannot encode natively (a path, an exception, an object):
    its ``str()``, never its Python ``repr()``."""
    return str(obj)


def plain_json(event_dict: Any, **_: Any) -> str:
    """Serialise one log event as plain JSON values: datetimes as ISO 8601 strings, enums as
    their values, Structs/dataclasses as objects, tuples and sets as arrays, anything else as
    its ``str()`` (structlog's default JSON fallback writes ``repr()``, e.g.
    ``"datetime.datetime(2026, ...)"``). Used as the ``JSONRenderer`` serializer."""
    try:
        return msgspec.json.encode(event_dict, enc_hook=_plain).decode()
    except (TypeError, msgspec.EncodeError):
        # e.g. a dict with non-string keys: fall back to builtins with string keys.
        plain = msgspec.to_builtins(event_dict, enc_hook=_plain, str_keys=True)
        return msgspec.json.encode(plain, enc_hook=_plain).decode()


class _DropTlsEofNotice(logging.Filter):
    """Drop asyncio's "returning true from eof_received() has no effect when using ssl".

    nats-py upgrades a plain connection to TLS with ``loop.start_tls`` after the server's INFO,
    so asyncio's stream protocol still believes it is not over TLS and returns true from
    ``eof_received``; asyncio then logs this notice (through the stdlib ``asyncio`` logger,
    i.e. ``logging.lastResort`` on stderr) each time the server closes a TLS connection. It is
    harmless and said nothing to a user except noise before our own error line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog for the process. ``json=None`` picks by whether stderr is a TTY."""
    if level.lower() not in _LEVELS:
        raise ValueError(f"log level {level!r} is not one of {sorted(_LEVELS)}")
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropTlsEofNotice) for f in asyncio_log.filters):
        asyncio_log.addFilter(_DropTlsEofNotice())
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer: structlog.typing.Processor
    if use_json:
        renderer = structlog.processors.JSONRenderer(serializer=plain_json)
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if use_json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level.lower()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def set_level(level: str) -> None:
    """Change the level of every logger made from now on (and of unbound module loggers);
    the rest of the configuration stays. Raises ``ValueError`` for an unknown level."""
    if str(level).lower() not in _LEVELS:
        raise ValueError(f"log level {level!r} is not one of {sorted(_LEVELS)}")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level.lower()]))


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
