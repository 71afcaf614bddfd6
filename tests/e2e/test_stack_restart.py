"""``lookout up`` stopped with Ctrl-C and started again: a stream that ran before runs again after,
detected without any user action (the box restarted for an upgrade must not end every camera). The
stack runs with MQTT on (its Mosquitto and ``lookout-mqtt`` supervised like the rest), and a live
scrape of every service exports each metric the Grafana dashboard and the alert rules query."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest

from cli.supervisor import services_for
from core.lifetime import terminate_with_parent
from core.settings import Settings
from deploy.camera.control import TestCamera
from tests.deploy.observability import alert_queries, dashboard_queries, exported, metrics_in
from tests.e2e.lookout_command import LOOKOUT, database_of, stack_env

pytestmark = pytest.mark.e2e

log = logging.getLogger(__name__)


class LookoutUp:
    """``lookout up`` as a process, its output in a file."""

    def __init__(self, env: dict[str, str], out: Path) -> None:
        self.env, self.out = env, out
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start it and wait until its services run."""
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(
                [LOOKOUT, "up"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=terminate_with_parent,  # a killed test run leaves no `lookout up` behind
            )
        self.starts += 1
        deadline = time.monotonic() + 240
        while self.out.read_text().count("services running") < self.starts:
            assert self.proc.poll() is None, self.out.read_text()[-3000:]
            assert time.monotonic() < deadline, self.out.read_text()[-3000:]
            time.sleep(0.5)

    def ctrl_c(self) -> int:
        return self.signal(signal.SIGINT)

    def signal(self, signum: int) -> int:
        """Send ``signum`` and wait for the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signum)
        return self.proc.wait(120)

    def descendants(self) -> set[int]:
        """Every process it started, and theirs (servers and services run in sessions of their own,
        but they are its children all the same)."""
        assert self.proc is not None
        return {child.pid for child in psutil.Process(self.proc.pid).children(recursive=True)}

    def api(self) -> httpx.Client:
        token = (Path(self.env["LOOKOUT_DATA_DIR"]) / "api-key").read_text().strip()  # made by `stack up`
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.env['LOOKOUT_API_PORT']}",
            timeout=10,
            headers={"Authorization": f"Bearer {token}"},
        )


@pytest.fixture
def up(tmp_path: Path, pg_admin_url: str) -> Iterator[LookoutUp]:
    env = stack_env(
        tmp_path / "lookout",
        pg_admin_url,
        liveness_timeout_s="4",
        heartbeat_interval_s="1",
        mqtt_enabled="true",
    )
    run = LookoutUp(env, tmp_path / "up.out")
    yield run
    if run.proc is not None and run.proc.poll() is None:
        run.ctrl_c()
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database_of(env)}" WITH (FORCE)')


def rows_after(api: httpx.Client, stream_id: str, after: datetime) -> int:
    items = api.get("/detection_result", params={"id": stream_id, "limit": 50}).json()["items"]
    return sum(1 for item in items if datetime.fromisoformat(item["capture_time"]) > after)


def wait_for(check, timeout_s: float, what: str) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, what
        time.sleep(0.5)
    return time.monotonic() - started


def test_lookout_up_stopped_and_started_again_resumes_the_running_stream(
    up: LookoutUp, camera: TestCamera
) -> None:
    up.start()
    api = up.api()
    stream_id = api.post(
        "/init", json={"url": camera.url("cam1"), "options": {"fps": 5, "imgsz": 320}}
    ).json()["id"]
    started_at = datetime.now(UTC)
    wait_for(lambda: rows_after(api, stream_id, started_at) > 0, 120, "no rows before the restart")
    assert_dashboard_metrics_exported(up)

    assert up.ctrl_c() == 0, up.out.read_text()[-3000:]
    with pytest.raises(httpx.TransportError):  # everything `up` started is down
        api.get("/healthz")
    up.start()
    restarted_at = datetime.now(UTC)
    took = wait_for(lambda: rows_after(api, stream_id, restarted_at) > 0, 90, "no rows after the restart")

    view = api.get(f"/state/{stream_id}").json()
    assert view["state"] == "ml_started", view
    assert view["error_reason"] is None
    restarts = {name: s["restarts"] for name, s in view["health"]["services"].items()}
    # the runner comes back only when the lifecycle restarts it; ML may be restarted too, or start the
    # stream's process from its first frames (options from the stream's row) before its deadline
    assert restarts["runner"] >= 1, restarts
    log.info("stack restart: first row of a frame captured after it %.1f s after `lookout up` was back", took)
    assert api.post("/shutdown", json={"id": stream_id}).status_code == 202
    wait_for(lambda: api.get(f"/state/{stream_id}").json()["state"] == "inactive", 30, "not inactive")
    assert up.ctrl_c() == 0


mqtt_on = Settings(_env_file=None, mqtt_enabled=True)  # type: ignore[call-arg]


def assert_dashboard_metrics_exported(up: LookoutUp) -> None:
    """Scrape the API and every worker of the running stack: each metric the dashboard and the alert
    rules query is in what they export."""
    env = up.env
    endpoints = [f"http://127.0.0.1:{env['LOOKOUT_API_PORT']}/metrics/"]
    endpoints += [
        f"http://127.0.0.1:{port}/metrics"
        for name, port in env.items()
        if name.startswith("LOOKOUT_METRICS_PORT_")
    ]
    assert len(endpoints) == 9
    names: set[str] = set()
    for url in endpoints:
        response = httpx.get(url, timeout=10, follow_redirects=True)
        assert response.status_code == 200, url
        names |= exported(response.text)
    mqtt = f"http://127.0.0.1:{env['LOOKOUT_METRICS_PORT_MQTT']}/metrics"
    # lookout-mqtt reached the stack's Mosquitto with the password `stack up` made
    wait_for(lambda: "lookout_mqtt_connected 1.0" in httpx.get(mqtt).text, 30, "lookout-mqtt not connected")
    wanted = metrics_in(dashboard_queries()) | metrics_in(alert_queries())
    assert wanted - names == set(), "queried, not exported"


def alive(pids: set[int]) -> set[int]:
    """The ``pids`` still running (a zombie has exited)."""
    running = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.add(pid)
        except psutil.NoSuchProcess:
            pass
    return running


def processes_of(data_dir: str) -> set[int]:
    """Every process on the machine whose environment names this stack's data folder."""
    found = set()
    for process in psutil.process_iter():
        try:
            if process.environ().get("LOOKOUT_DATA_DIR") == data_dir:
                found.add(process.pid)
        except psutil.Error:
            pass
    return found


def test_sighup_then_sigkill_of_lookout_up_leave_no_process_and_the_next_up_runs_one_set_of_services(
    up: LookoutUp, camera: TestCamera
) -> None:
    up.start()
    api = up.api()
    stream_id = api.post(
        "/init", json={"url": camera.url("cam2"), "options": {"fps": 5, "imgsz": 320}}
    ).json()["id"]
    started_at = datetime.now(UTC)
    wait_for(lambda: rows_after(api, stream_id, started_at) > 0, 120, "no rows before SIGHUP")

    # a closed terminal: stopped in order, as with Ctrl-C
    started = up.descendants()
    assert up.signal(signal.SIGHUP) == 0, up.out.read_text()[-3000:]
    assert alive(started) == set(), "processes left after SIGHUP"

    up.start()
    restarted_at = datetime.now(UTC)
    wait_for(lambda: rows_after(api, stream_id, restarted_at) > 0, 120, "no rows after SIGHUP")
    started = up.descendants()
    assert up.signal(signal.SIGKILL) == -signal.SIGKILL
    # every child asked the kernel for SIGTERM when its parent dies: they stop on their own
    wait_for(lambda: not alive(started), 60, f"processes left after SIGKILL: {alive(started)}")

    up.start()
    restarted_at = datetime.now(UTC)
    wait_for(lambda: rows_after(api, stream_id, restarted_at) > 0, 120, "no rows after SIGKILL")
    services = [
        psutil.Process(pid).cmdline()[1].rsplit("/", 1)[1]
        for pid in up.descendants()
        if "/bin/lookout-" in " ".join(psutil.Process(pid).cmdline()[:2])
    ]
    assert sorted(services) == sorted(services_for(mqtt_on)), "one set of services"
    assert processes_of(up.env["LOOKOUT_DATA_DIR"]) - up.descendants() - {up.proc.pid} == set(), (  # type: ignore[union-attr]
        "a process of this stack runs outside the new `lookout up`"
    )
    assert api.post("/shutdown", json={"id": stream_id}).status_code == 202
    wait_for(lambda: api.get(f"/state/{stream_id}").json()["state"] == "inactive", 30, "not inactive")
    assert up.ctrl_c() == 0
