"""Structured logs: one JSON object per line, with the service and, where known, the stream id.

Usage: ``log = logging.getLogger(__name__)``; ``log.info("frame published", extra={"stream_id": sid})``.
Every key passed in ``extra`` lands in the JSON line.
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

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

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
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(service: str, level: str | None = None) -> None:
    """Send every log record of this process to stderr as JSON lines (``LOOKOUT_LOG_LEVEL``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("LOOKOUT_LOG_LEVEL", "INFO"))
    for noisy in ("aiokafka", "temporalio.activity", "temporalio.workflow", "uvicorn.access", "minio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
