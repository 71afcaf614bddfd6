"""``lookout up`` and ``lookout demo``: the embedded stack, every Lookout service, and (demo) a camera.

``up`` runs the system for real cameras until Ctrl-C. ``demo`` also starts the test camera with the
real people clip, starts a stream for it through the API and shows its progress, read through the
API only; Ctrl-C shuts the stream down through the API, waits for a terminal state and stops
everything it started. The terminal gets these lines only: this process's own log records go to
``<data_dir>/logs/lookout.log`` (see ``cli.main``), the services' logs to files beside it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from cli.api_client import ApiError, LookoutClient
from cli.output import say
from cli.progress import StreamProgress
from cli.stack import parts_table
from cli.streams import configured_api_key
from cli.supervisor import ServiceSupervisor, Supervised, SupervisedServer, services_for
from core.settings import Settings, settings_env
from core.states import StreamState
from deploy.camera.control import TestCamera
from deploy.local_stack import LocalStack

DEMO_MOUNT = "people"
PROGRESS_EVERY_S = 2.0


@contextmanager
def interrupts() -> Iterator[threading.Event]:
    """An event set by Ctrl-C, SIGTERM or SIGHUP (a closed terminal), so the main loop shuts down in
    order whichever way the run is ended."""
    stop = threading.Event()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Interrupted(Exception):
    """A signal asked the run to stop while it was starting."""


class LookoutRun:
    """Starts the stack and the services; stops, in reverse order, what it started."""

    def __init__(self, settings: Settings) -> None:
        # what this run starts goes with it, even when it is killed (cli/supervisor.py)
        self.stack = LocalStack(settings, die_with_parent=True)
        self.settings = settings
        self.started_parts: list[str] = []
        self.supervisor: ServiceSupervisor | None = None
        self.runtime = settings

    @property
    def log_dir(self) -> str:
        """Where the services', the servers' and this process's logs are."""
        return str(self.stack.data_dir / "logs")

    @property
    def api_url(self) -> str:
        """The base URL of the API this run serves."""
        return f"http://{self.runtime.api_host}:{self.runtime.api_port}"

    def start(self, api_ready_timeout: float = 180.0, stop: threading.Event | None = None) -> LookoutClient:
        """Bring the stack up, start the services under the supervisor; returns a client once the API is
        ready. ``stop`` set meanwhile (a signal) ends the wait with ``Interrupted``."""
        say("starting the embedded stack ...")
        report = self.stack.up()
        for notice in self.stack.notices:
            say(f"note: {notice}")
        say(parts_table(report))
        self.started_parts = [p.name for p in report if p.note == "started"]
        self.runtime = self.stack.runtime_settings(self.stack.database_url())
        # only the servers this stack started are its to restart; one a user runs is theirs
        watched = [
            SupervisedServer(spec.name, self.stack, die_with_parent=spec.name in self.started_parts)
            for spec in self.stack.server_specs()
            if self.stack.recorded_pid(spec.name) is not None
        ]
        self.supervisor = ServiceSupervisor.for_lookout(
            self.stack.data_dir / "logs",
            env=settings_env(self.runtime),
            names=services_for(self.runtime),
            settings=self.runtime,
            servers=watched,
            on_restart=self._restarted,
            pid_file=self.stack.run_dir / "services.json",
        )
        self.supervisor.start()
        client = LookoutClient(self.api_url, api_key=self.api_key)
        self._wait_until_ready(client, api_ready_timeout, stop)
        say(f"services running (logs in {self.log_dir})")
        self.print_addresses()
        return client

    def _wait_until_ready(self, client: LookoutClient, timeout: float, stop: threading.Event | None) -> None:
        deadline = time.monotonic() + timeout
        while not client.ready():
            if stop is not None and stop.is_set():
                raise Interrupted("stopped before the API was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API is not ready after {timeout:.0f}s; see {self.log_dir}")
            time.sleep(0.5)

    def _restarted(self, part: Supervised) -> None:
        count = self.stack.record_restart(part.name)
        say(f"{part.name} had died and was restarted (restart {count})")

    @property
    def api_key(self) -> str | None:
        """The admin key ``stack up`` made (``LOOKOUT_API_KEY`` when set)."""
        return configured_api_key(self.settings) or _read(self.stack.api_key_path)

    def print_addresses(self) -> None:
        """The addresses a user opens: API docs, web page (its link carries the key, in the fragment
        a browser never sends), metrics, Temporal Web UI."""
        say(f"  API docs        {self.api_url}/docs")
        key = self.api_key
        say(f"  web page        {self.api_url}/" + (f"#key={key}" if key else ""))
        say(f"  metrics         {self.api_url}/metrics")
        say(f"  Temporal Web UI {self.runtime.temporal_ui_url}")

    def workflow_url(self, stream_id: str) -> str:
        """The stream's lifecycle workflow in the Temporal Web UI."""
        return f"{self.runtime.temporal_ui_url}/namespaces/default/workflows/stream-{stream_id}"

    def stop(self) -> None:
        """Stop the services, then the stack's servers this run started (not those it found running)."""
        if self.supervisor is not None:
            say("stopping the services ...")
            self.supervisor.stop()
        if self.started_parts:
            say(f"stopping what this run started: {', '.join(self.started_parts)}")
            self.stack.down(only=self.started_parts)


def run_up(settings: Settings) -> None:
    """Run the stack and the services until Ctrl-C."""
    run = LookoutRun(settings)
    with interrupts() as stop:
        try:
            run.start(stop=stop)
            say("Lookout is up; start a stream with: lookout init rtsp://HOST/PATH   (Ctrl-C stops)")
            stop.wait()
        except Interrupted:
            pass
        finally:
            run.stop()


def run_demo(settings: Settings, fps: float = 5.0) -> None:
    """The main job: stack, services, the test camera and one stream, with progress until Ctrl-C."""
    run = LookoutRun(settings)
    camera = TestCamera(log_dir=settings.data_dir.resolve() / "logs")
    client: LookoutClient | None = None
    stream_id: str | None = None
    with interrupts() as stop:
        try:
            client = run.start(stop=stop)
            camera.start(port=settings.demo_camera_port, mounts=[DEMO_MOUNT])
            url = camera.url(DEMO_MOUNT)
            say(f"demo camera: {url} (OpenCV's vtest.avi, people walking, looped)")
            stream_id = str(client.init(url, {"fps": fps})["id"])
            say(f"stream {stream_id} started: {run.workflow_url(stream_id)}")
            say("Ctrl-C shuts the stream down and stops everything")
            show_progress(StreamProgress(client, stream_id), stop)
        except Interrupted:
            pass
        finally:
            if client is not None and stream_id is not None:
                shutdown_stream(client, stream_id)
            camera.stop()
            run.stop()
            if client is not None:
                client.close()


def show_progress(progress: StreamProgress, stop: threading.Event) -> None:
    """A progress line every two seconds until ``stop`` is set or the stream ends."""
    while not stop.wait(PROGRESS_EVERY_S):
        try:
            state, line = progress.poll()
        except (ApiError, httpx.HTTPError) as exc:
            # the API rides through a restart of a stack server too; the next poll tries again
            say(f"{time.strftime('%H:%M:%S')}  the API did not answer: {exc}")
            continue
        say(line)
        if state.is_terminal:
            return


def shutdown_stream(client: LookoutClient, stream_id: str, timeout: float = 30.0) -> None:
    """Ask the API to stop the stream and wait until it reaches a terminal state."""
    say(f"shutting down stream {stream_id} ...")
    try:
        client.shutdown(stream_id)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = StreamState(client.state(stream_id)["state"])
            if state.is_terminal:
                say(f"stream {stream_id}: {state.value}")
                return
            time.sleep(0.5)
        say(f"stream {stream_id} not inactive after {timeout:.0f}s")
    except (ApiError, httpx.HTTPError, OSError) as exc:
        say(f"could not shut the stream down cleanly: {exc}")


def _read(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None
