"""``lookout demo``, the README's main job, run as a user runs it: real stack, services, camera, model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import psycopg
import pytest

from core.lifetime import terminate_with_parent
from tests.e2e.lookout_command import LOOKOUT, database_of, stack_env

pytestmark = pytest.mark.e2e

# a progress line: "12:03:04  ml_started   stored 105   4.8 fps   newest 0.6 s old   3 person ..."
PROGRESS = re.compile(r"^\d\d:\d\d:\d\d  (\w+) +stored (\d+|-)", re.M)


def newest_frames(text: str) -> list[int]:
    """The frames ML stored, as every progress line that shows a count says, in order."""
    return [int(stored) for _, stored in PROGRESS.findall(text) if stored != "-"]


def wait_until(check, timeout_s: float, what: str, log_path: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}; demo output:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.5)


def kill_9_and_see_it_restarted(part: str, data_dir: Path, log_path: Path, env: dict[str, str]) -> None:
    """kill -9 one of the stack's servers; the demo restarts it and keeps storing rows."""
    pid = int((data_dir / "run" / f"{part}.pid").read_text())
    before = max(newest_frames(log_path.read_text()), default=0)
    os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: f"{part} had died and was restarted" in log_path.read_text(),
        120,
        f"{part} not restarted",
        log_path,
    )
    assert int((data_dir / "run" / f"{part}.pid").read_text()) != pid
    # rows keep being stored: the count ML reports moves on, poll after poll
    wait_until(
        lambda: len({f for f in newest_frames(log_path.read_text()) if f > before}) >= 2,
        90,
        f"no new rows after {part} restarted",
        log_path,
    )
    status = subprocess.run([LOOKOUT, "stack", "status"], env=env, capture_output=True, text=True, timeout=60)
    line = next(row for row in status.stdout.splitlines() if row.startswith(f"{part} "))
    assert "restarted 1 time(s)" in line, status.stdout


def test_demo_shows_detections_within_a_minute_rides_through_kill_9_of_each_stack_server_and_ctrl_c_stops_all(
    tmp_path: Path, pg_admin_url: str
) -> None:
    env = stack_env(tmp_path / "lookout", pg_admin_url)
    api_port, ui_port = env["LOOKOUT_API_PORT"], env["LOOKOUT_STACK_TEMPORAL_UI_PORT"]
    log_path = tmp_path / "demo.out"
    with open(log_path, "wb") as out:
        demo = subprocess.Popen(
            [LOOKOUT, "demo"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            preexec_fn=terminate_with_parent,  # a killed test run leaves no demo behind
        )
    descendants: set[int] = set()
    try:
        started = time.monotonic()
        stack_up_at: float | None = None
        first_rows_at: float | None = None
        frames: list[int] = []
        # rows keep being stored: five polls that each saw a newer stored frame than the one before
        while time.monotonic() - started < 240 and len(set(frames)) < 5:
            assert demo.poll() is None, log_path.read_text()[-3000:]
            descendants |= {p.pid for p in psutil.Process(demo.pid).children(recursive=True)}
            text = log_path.read_text()
            if stack_up_at is None and "services running" in text:
                stack_up_at = time.monotonic()
            frames = newest_frames(text)
            if frames and first_rows_at is None:
                first_rows_at = time.monotonic()
            time.sleep(0.5)
        text = log_path.read_text()
        assert len(set(frames)) >= 5, text[-3000:]
        assert frames == sorted(frames) and frames[-1] > frames[0], "the stored count grows"
        assert stack_up_at is not None and first_rows_at is not None
        assert first_rows_at - stack_up_at < 60, "the main job must show detections within a minute"
        first_ml = next(m.start() for m in PROGRESS.finditer(text) if m.group(1) == "ml_started")
        stack_ready = text.index("services running")
        assert first_ml > stack_ready
        assert f"http://127.0.0.1:{api_port}/docs" in text
        assert f"http://127.0.0.1:{ui_port}" in text
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
    assert not [line for line in text.splitlines() if line.startswith("{")], "log records go to the log file"
    assert '"event"' in (tmp_path / "lookout" / "logs" / "lookout.log").read_text()
    leftovers = [p for p in descendants if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not leftovers, f"processes left behind: {leftovers}"
    with psycopg.connect(env["LOOKOUT_DATABASE_URL"]) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM detections, jsonb_array_elements(objects) o WHERE o->>'class' = 'person'"
        ).fetchone()
        assert rows is not None and rows[0] > 0
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database_of(env)}" WITH (FORCE)')
