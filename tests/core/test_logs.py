"""Log lines are JSON; a process serving one stream puts its stream id on every line."""

from __future__ import annotations

import json
import logging

from core.logs import JsonFormatter


def record(name: str, message: str, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord(name, logging.WARNING, __file__, 1, message, (), None)
    made.__dict__.update(extra)
    return made


def test_a_stream_process_names_its_stream_on_lines_that_do_not_name_it_themselves() -> None:
    formatter = JsonFormatter("runner", defaults={"stream_id": "s-1"})

    from_a_library = json.loads(formatter.format(record("aiokafka", "broker unreachable")))
    naming_another = json.loads(formatter.format(record("workers.x", "handed over", stream_id="s-2")))

    assert from_a_library["stream_id"] == "s-1" and from_a_library["service"] == "runner"
    assert naming_another["stream_id"] == "s-2"


def test_a_service_process_adds_no_stream_id_of_its_own() -> None:
    line = json.loads(JsonFormatter("ml").format(record("workers.ml.service", "ml service started")))

    assert "stream_id" not in line and line["event"] == "ml service started"
