"""Stream rows written straight into Postgres, for tests of listing and paging (no pipeline)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from core.db import create_pool
from core.settings import Settings

LONG_URL = "rtsp://camera.local/" + "very-long-path-" * 132  # 2,000 characters


async def add_streams(settings: Settings, count: int, running: int) -> list[str]:
    """``count`` stream rows, oldest first, one a minute apart, the newest ``running`` of them running;
    the newest has a 2,000-character URL and every other ended one a long error; their ids."""
    ids = []
    pool = await create_pool(settings)
    try:
        start = datetime.now(UTC) - timedelta(minutes=count)
        for i in range(count):
            stream_id = uuid.uuid4()
            is_running = i >= count - running
            url = LONG_URL if i == count - 1 else f"rtsp://camera.local/site-{i:03d}/live"
            reason = (
                None if is_running or i % 2 else "camera unreachable for 600s: " + "no route to host; " * 60
            )
            await pool.execute(
                "INSERT INTO streams (id, url_redacted, url_full, state, error_reason, created_at, updated_at)"
                " VALUES ($1, $2, 'sealed', $3, $4, $5, $5)",
                stream_id, url, "ml_started" if is_running else ("inactive" if reason is None else "inactive_error"),
                reason, start + timedelta(minutes=i),
            )  # fmt: skip
            ids.append(str(stream_id))
    finally:
        await pool.close()
    return ids
