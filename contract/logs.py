"""JSON log lines, one per request, in the API and in the workers (joined by `request_id`).

Stdlib only and torch-free, so both processes use it: workers may not import `api`.
"""

import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

REQUEST_LOGGER = "abl.requests"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"), ensure_ascii=False)


def request_logger() -> logging.Logger:
    """`abl.requests`: JSON lines on stdout, whatever format the other loggers use.

    Call it at startup: the handler keeps the stdout of that moment, before Celery replaces
    sys.stdout with its logging proxy (which would wrap each line in a second log record).
    """
    logger = logging.getLogger(REQUEST_LOGGER)
    if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def log_request(fields: Mapping[str, Any]) -> None:
    """One `request` line carrying `fields` (request_id, model, status, tokens, ...)."""
    logging.getLogger(REQUEST_LOGGER).info("request", extra={"fields": dict(fields)})
