"""The user CLI (``lookout init/state/streams/results/shutdown``) against the API served over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.settings import Settings
from core.timeouts import within
from tests.conftest import make_settings
from tests.e2e.pipeline import served_api
from tests.participants import running_participants
from tests.running_services import isolated_settings, new_api_key, running_lifecycle, wait_for_state
from tests.stream_rows import add_streams

pytestmark = pytest.mark.integration

LOOKOUT = str(Path(sys.executable).parent / "lookout")
TOKENS: dict[str, str] = {}  # base URL of a served API -> an admin key for it


@contextlib.asynccontextmanager
async def served_with_a_key(settings: Settings) -> AsyncIterator[str]:
    """The API over HTTP; the CLI calls it with a new admin key."""
    token = await new_api_key(settings)
    async with served_api(settings) as api:
        TOKENS[api] = token
        yield api


async def lookout(api: str, *args: str, key: str | None = None) -> tuple[int, str, str]:
    env = {**os.environ, "LOOKOUT_API_KEY": key or TOKENS[api]}
    proc = await asyncio.create_subprocess_exec(
        LOOKOUT, *args, "--api", api, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await within(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_starts_lists_reads_and_stops_a_stream_without_showing_credentials(
    settings: Settings,
) -> None:
    isolated = await isolated_settings(settings)
    async with (
        running_participants(isolated),
        running_lifecycle(isolated) as stack,
        served_with_a_key(isolated) as api,
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

        code, out, _ = await lookout(api, "live", stream_id)
        assert code == 0 and out.strip().startswith(f"{api}/streams/{stream_id}/live.mjpeg?ticket=")

        code, out, _ = await lookout(api, "results", stream_id, "--limit", "3")
        assert code == 0 and json.loads(out)["items"] == []

        code, out, _ = await lookout(api, "shutdown", stream_id)
        assert code == 0 and json.loads(out)["state"] == "init_shutdown"
        await wait_for_state(stack.api, stream_id, "inactive")


async def test_cli_reports_api_errors_with_their_reason_and_a_failing_exit_code(settings: Settings) -> None:
    async with served_with_a_key(settings) as api:
        code, _, err = await lookout(api, "init", "http://not-a-camera/x")
        assert code == 2 and "422" in err and "rtsp" in err
        code, _, err = await lookout(api, "init", "rtsp://camera.test/x", "--model", "cats")
        assert code == 2 and "422" in err and "'cats' is not registered" in err
        code, _, err = await lookout(api, "state", "00000000-0000-4000-8000-000000000000")
        assert code == 2 and "404" in err
        code, _, err = await lookout(api, "live", "00000000-0000-4000-8000-000000000000")
        assert code == 2 and "404" in err


async def test_cli_creates_lists_and_revokes_api_keys_and_a_revoked_key_is_refused(
    settings: Settings,
) -> None:
    async with served_with_a_key(settings) as api:
        code, out, err = await lookout(api, "keys", "create", "--name", "wall display", "--scope", "read")
        assert code == 0, err
        created = json.loads(out)
        assert created["scope"] == "read" and created["token"].startswith("lk_")

        code, out, _ = await lookout(api, "streams", key=created["token"])
        assert code == 0, "a read key lists streams"
        code, _, err = await lookout(api, "init", "rtsp://camera.test/x", key=created["token"])
        assert code == 2 and "403" in err and "needs admin" in err

        code, out, _ = await lookout(api, "keys", "list")
        assert code == 0 and "wall display" in out and created["token"] not in out
        code, out, _ = await lookout(api, "keys", "revoke", created["id"])
        assert code == 0 and json.loads(out)["revoked_at"]
        code, _, err = await lookout(api, "streams", key=created["token"])
        assert code == 2 and "401" in err and "revoked" in err


async def test_keys_bootstrap_makes_a_first_admin_key_straight_in_the_database(settings: Settings) -> None:
    env = {**os.environ, "LOOKOUT_DATABASE_URL": settings.database_url.get_secret_value()}
    proc = await asyncio.create_subprocess_exec(
        LOOKOUT, "keys", "bootstrap", "--name", "first", stdout=asyncio.subprocess.PIPE, env=env
    )
    out, _ = await within(proc.communicate(), 60)
    token = out.decode().strip()
    assert proc.returncode == 0 and token.startswith("lk_")
    async with served_api(settings) as api:
        code, out, err = await lookout(api, "keys", "list", key=token)
    assert code == 0 and "first" in out, err


async def test_cli_lists_streams_a_page_at_a_time_with_filters(private_database: str) -> None:
    settings = make_settings(database_url=private_database)
    ids = await add_streams(settings, count=60, running=5)
    async with served_with_a_key(settings) as api:

        def listed(out: str) -> list[str]:
            return [row.split()[0] for row in out.splitlines() if row[:36] in ids]

        code, out, err = await lookout(api, "streams", "--limit", "20")
        assert code == 0, err
        assert listed(out) == ids[-5:][::-1] + ids[-6:-21:-1], "running first, then newest first"
        assert "--all for every page" in out
        code, out, _ = await lookout(api, "streams", "--limit", "20", "--all")
        assert sorted(listed(out)) == sorted(ids) and "--all for every page" not in out
        code, out, _ = await lookout(api, "streams", "--running")
        assert listed(out) == ids[-5:][::-1]
        code, out, _ = await lookout(api, "streams", "--ended", "--state", "inactive_error", "--limit", "100")
        assert len(listed(out)) == 28 and "ml_started" not in out  # the even ones of 55 ended
        code, out, _ = await lookout(api, "streams", "--search", "site-007")
        assert listed(out) == [ids[7]]
