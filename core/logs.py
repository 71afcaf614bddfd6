"""Structured logs: one JSON object per line, with the service and, where known, the stream id.

Usage: ``log = logging.getLogger(__name__)``; ``log.info("frame published", extra={"stream_id": sid})``.
Every key passed in ``extra`` lands in the JSON line. A process that serves one stream (the runner's
capture process, ML's detection process) passes its stream id to ``configure_logging``, so that every
line it writes carries it, libraries' lines included.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, service, logger, event and the extras."""

    def __init__(self, service: str, *, defaults: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.service = service
        self.defaults = defaults or {}

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        for key, value in self.defaults.items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(service: str, level: str | None = None, *, stream_id: str | None = None) -> None:
    """Send every log record of this process to stderr as JSON lines (``LOOKOUT_LOG_LEVEL``).

    ``stream_id``: the stream this whole process serves; it goes on every line that names no other.
    """
    handler = logging.StreamHandler(sys.stderr)
    defaults = {"stream_id": stream_id} if stream_id is not None else None
    handler.setFormatter(JsonFormatter(service, defaults=defaults))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("LOOKOUT_LOG_LEVEL", "INFO"))
    for noisy in (
        "aiokafka",
        "temporalio.activity",
        "temporalio.workflow",
        "uvicorn.access",
        "minio",
        "httpx",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
