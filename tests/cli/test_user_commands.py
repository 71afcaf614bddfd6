"""The user CLI (``lookout init/state/streams/results/shutdown``) against the API served over HTTP."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from core.settings import Settings
from tests.e2e.pipeline import served_api
from tests.participants import running_participants
from tests.running_services import isolated_settings, running_lifecycle, wait_for_state

pytestmark = pytest.mark.integration

LOOKOUT = str(Path(sys.executable).parent / "lookout")


async def lookout(api: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        LOOKOUT, *args, "--api", api, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_starts_lists_reads_and_stops_a_stream_without_showing_credentials(
    settings: Settings,
) -> None:
    isolated = await isolated_settings(settings)
    async with (
        running_participants(isolated),
        running_lifecycle(isolated) as stack,
        served_api(isolated) as api,
    ):
        code, out, err = await lookout(
            api, "init", "rtsp://viewer:hunter2@cam.example:8554/cli", "--fps", "2", "--classes", "person,car"
        )
        assert code == 0, err
        started = json.loads(out)
        stream_id = started["id"]
        assert started["state"] == "init_startup"
        assert "hunter2" not in out

        await wait_for_state(stack.api, stream_id, "ml_started")
        code, out, _ = await lookout(api, "state", stream_id)
        assert code == 0 and json.loads(out)["state"] == "ml_started"
        assert json.loads(out)["options"]["classes"] == ["person", "car"]

        code, out, _ = await lookout(api, "streams")
        line = next(row for row in out.splitlines() if row.startswith(stream_id))
        assert "ml_started" in line and "rtsp://***@cam.example:8554/cli" in line and "hunter2" not in out

        code, out, _ = await lookout(api, "results", stream_id, "--limit", "3")
        assert code == 0 and json.loads(out)["items"] == []

        code, out, _ = await lookout(api, "shutdown", stream_id)
        assert code == 0 and json.loads(out)["state"] == "init_shutdown"
        await wait_for_state(stack.api, stream_id, "inactive")


async def test_cli_reports_api_errors_with_their_reason_and_a_failing_exit_code(settings: Settings) -> None:
    async with served_api(settings) as api:
        code, _, err = await lookout(api, "init", "http://not-a-camera/x")
        assert code == 2 and "422" in err and "rtsp" in err
        code, _, err = await lookout(api, "state", "00000000-0000-4000-8000-000000000000")
        assert code == 2 and "404" in err
