"""Replays the recorded histories of tests/workflows/histories/ against today's StreamLifecycle.

A change that makes the workflow issue different commands for an old history (non-determinism)
fails here: running workflows would fail on the next worker deploy. Version such a change with
``workflow.patched`` instead, then re-record: ``LOOKOUT_RECORD_HISTORIES=1 pytest tests/workflows``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from core.temporal import DATA_CONVERTER
from workflows.stream_lifecycle import StreamLifecycle

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_histories_cover_every_recorded_path() -> None:
    names = {path.stem for path in HISTORIES}
    assert {
        "happy_path",
        "startup_deadline",
        "ack_deadline_silent_ml",
        "service_error",
        "ml_never_started",
        "cancelled",
        "late_event_after_end",
        "continue_as_new",
        # recorded with the self-healing lifecycle (the ones above replay the runs made before it)
        "heartbeats_healthy",
        "silent_service_restarts_then_gives_up",
        "process_error_restarts",
        "camera_gone_for_good",
        "fatal_error_while_running",
    } <= names


@pytest.mark.parametrize("path", HISTORIES, ids=[path.stem for path in HISTORIES])
async def test_recorded_history_replays_without_nondeterminism(path: Path) -> None:
    history = WorkflowHistory.from_json(f"replay-{path.stem}", await asyncio.to_thread(path.read_text))
    replayer = Replayer(workflows=[StreamLifecycle], data_converter=DATA_CONVERTER)
    await replayer.replay_workflow(history)
