"""``lookout demo``, the README's main job, run as a user runs it: real stack, services, camera, model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import psycopg
import pytest

from deploy import servers

pytestmark = pytest.mark.e2e

LOOKOUT = str(Path(sys.executable).parent / "lookout")
PROGRESS = re.compile(r"state=(\w+)\s+frames processed=(\d+)\s+stored=(\d+)\s+objects=(\d+)")


def stored_rows(log_path: Path) -> int:
    found = PROGRESS.findall(log_path.read_text())
    return int(found[-1][2]) if found else 0


def wait_until(check, timeout_s: float, what: str, log_path: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}; demo output:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.5)


def kill_9_and_see_it_restarted(part: str, data_dir: Path, log_path: Path, env: dict[str, str]) -> None:
    """kill -9 one of the stack's servers; the demo restarts it and keeps storing rows."""
    pid = int((data_dir / "run" / f"{part}.pid").read_text())
    stored = stored_rows(log_path)
    os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: f"{part} had died and was restarted" in log_path.read_text(),
        120,
        f"{part} not restarted",
        log_path,
    )
    assert int((data_dir / "run" / f"{part}.pid").read_text()) != pid
    wait_until(
        lambda: stored_rows(log_path) >= stored + 5, 90, f"no new rows after {part} restarted", log_path
    )
    status = subprocess.run([LOOKOUT, "stack", "status"], env=env, capture_output=True, text=True, timeout=60)
    line = next(row for row in status.stdout.splitlines() if row.startswith(f"{part} "))
    assert "restarted 1 time(s)" in line, status.stdout


def test_demo_shows_detections_within_a_minute_rides_through_kill_9_of_each_stack_server_and_ctrl_c_stops_all(
    tmp_path: Path, pg_admin_url: str
) -> None:
    database = f"lookout_demo_{uuid.uuid4().hex[:8]}"
    ports = {name: str(servers.free_port()) for name in ("KAFKA", "TEMPORAL", "TEMPORAL_UI", "API", "CAM")}
    ports["S3"] = str(servers.free_s3_port())
    env = {
        **os.environ,
        "LOOKOUT_DATA_DIR": str(tmp_path / "lookout"),
        "LOOKOUT_DATABASE_URL": pg_admin_url.rsplit("/", 1)[0] + "/" + database,
        "LOOKOUT_STACK_PG_PORT": str(servers.free_port()),
        "LOOKOUT_STACK_S3_PORT": ports["S3"],
        "LOOKOUT_STACK_KAFKA_PORT": ports["KAFKA"],
        "LOOKOUT_STACK_TEMPORAL_PORT": ports["TEMPORAL"],
        "LOOKOUT_STACK_TEMPORAL_UI_PORT": ports["TEMPORAL_UI"],
        "LOOKOUT_API_PORT": ports["API"],
        "LOOKOUT_DEMO_CAMERA_PORT": ports["CAM"],
        # the metrics ports of the services: free ones, so a developer's running stack is no obstacle
        **{
            f"LOOKOUT_METRICS_PORT_{s}": str(servers.free_port())
            for s in ("RUNNER", "ML", "RELAY", "BRIDGE", "WORKER")
        },
    }
    log_path = tmp_path / "demo.out"
    with open(log_path, "wb") as out:
        demo = subprocess.Popen(
            [LOOKOUT, "demo"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path
        )
    descendants: set[int] = set()
    try:
        started = time.monotonic()
        stack_up_at: float | None = None
        first_rows_at: float | None = None
        stored = 0
        while time.monotonic() - started < 240 and stored < 5:
            assert demo.poll() is None, log_path.read_text()[-3000:]
            descendants |= {p.pid for p in psutil.Process(demo.pid).children(recursive=True)}
            text = log_path.read_text()
            if stack_up_at is None and "services running" in text:
                stack_up_at = time.monotonic()
            found = PROGRESS.findall(text)
            stored = int(found[-1][2]) if found else 0
            if stored and first_rows_at is None:
                first_rows_at = time.monotonic()
            time.sleep(0.5)
        text = log_path.read_text()
        assert stored >= 5, text[-3000:]
        last_processed, last_stored = int(PROGRESS.findall(text)[-1][1]), int(PROGRESS.findall(text)[-1][2])
        assert last_processed >= last_stored, "frames processed come from the ML service's metrics"
        assert stack_up_at is not None and first_rows_at is not None
        assert first_rows_at - stack_up_at < 60, "the main job must show detections within a minute"
        first_ml = text.index("state=ml_started")
        stack_ready = text.index("services running")
        assert first_ml > stack_ready
        assert f"http://127.0.0.1:{ports['API']}/docs" in text
        assert f"http://127.0.0.1:{ports['TEMPORAL_UI']}" in text
        for part in ("kafka", "s3", "temporal"):
            kill_9_and_see_it_restarted(part, tmp_path / "lookout", log_path, env)
            descendants |= {p.pid for p in psutil.Process(demo.pid).children(recursive=True)}
        assert PROGRESS.findall(log_path.read_text())[-1][0] == "ml_started", "the stream is still running"
    finally:
        demo.send_signal(signal.SIGINT)
        code = demo.wait(120)
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    assert re.search(r"stream [0-9a-f-]+: inactive\n", text), text[-3000:]
    assert "stopping what this run started: s3, kafka, temporal" in text
    leftovers = [p for p in descendants if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not leftovers, f"processes left behind: {leftovers}"
    with psycopg.connect(env["LOOKOUT_DATABASE_URL"]) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM detections, jsonb_array_elements(objects) o WHERE o->>'class' = 'person'"
        ).fetchone()
        assert rows is not None and rows[0] > 0
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
