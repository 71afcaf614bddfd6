"""Keeps Lookout running: restarts any service or stack server that dies, with backoff, logged and counted.

Services are child processes of the supervisor. The stack's own servers (S3, broker, Temporal) are
the ones ``LocalStack`` started (pid files); one that dies is started again from its recipe, on
the same port and data, and the services ride through the gap (their clients reconnect).

Nothing outlives the supervisor: every service (and every server a ``lookout up`` started) asks the
kernel for SIGTERM when its parent dies (``core/lifetime.py``), so a SIGKILL of ``lookout up``
takes them all down. The parent-death signal follows the thread that started a child, so the
thread that restarts them lives as long as the process. The services' pids are also written to
``<data_dir>/run/services.json``, and the next supervisor stops any that are still there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from core.lifetime import terminate_with_parent
from core.retry import delays
from core.settings import Settings
from deploy.local_stack import LocalStack
from deploy.servers import stop_process_group, stop_process_groups

log = logging.getLogger(__name__)

HEALTHY_AFTER_S = 60.0  # a part that ran this long before dying counts as healthy: restarted at once
SERVICES = (
    "lookout-api",
    "lookout-outbox-relay",
    "lookout-state-bridge",
    "lookout-temporal-worker",
    "lookout-runner",
    "lookout-ml",
    "lookout-webhooks",
    "lookout-janitor",
)


def services_for(settings: Settings) -> tuple[str, ...]:
    """The services ``lookout up`` runs with ``settings``: ``lookout-mqtt`` too when MQTT is on."""
    return (*SERVICES, "lookout-mqtt") if settings.mqtt_enabled else SERVICES


class Supervised(Protocol):
    """Something the supervisor keeps running."""

    name: str
    restarts: int
    started_at: float

    def running(self) -> bool: ...

    def start(self) -> None: ...


@dataclass
class SupervisedServer:
    """One of the stack's servers, restarted through ``LocalStack`` (which waits until it is ready)."""

    name: str
    stack: LocalStack
    die_with_parent: bool = False  # started by this run: it goes when the run goes
    restarts: int = 0
    started_at: float = field(default_factory=time.monotonic)

    def running(self) -> bool:
        """True while the pid the stack recorded for this server is alive."""
        return self.stack.recorded_pid(self.name) is not None

    def start(self) -> None:
        """Start the server from its recipe and wait until it is ready."""
        self.stack.start_part(self.name, die_with_parent=self.die_with_parent)
        self.started_at = time.monotonic()


@dataclass
class SupervisedService:
    """One service: its command, its log file, and how often it was restarted."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0

    def running(self) -> bool:
        """True while the service's process has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the service in a session of its own, its output appended to its log file; it gets
        SIGTERM when the thread that started it (the supervisor's) is gone."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                start_new_session=True,
                preexec_fn=terminate_with_parent,
            )
        self.started_at = time.monotonic()
        log.info("service started", extra={"service_name": self.name, "pid": self.proc.pid})


class ServiceSupervisor:
    """Starts the services, restarts a service or watched server that exits (with backoff), stops the
    services on ``stop()`` (the servers are the stack's to stop)."""

    def __init__(
        self,
        services: list[SupervisedService],
        *,
        servers: list[SupervisedServer] | None = None,
        settings: Settings | None = None,
        on_restart: Callable[[Supervised], None] | None = None,
        pid_file: Path | None = None,
    ) -> None:
        """``pid_file``: where the services' pids are kept, so that the next supervisor finds and
        stops any a killed one left (none should be: they die with it)."""
        self.services = services
        self.servers = servers or []
        self._settings = settings or Settings()
        self._on_restart = on_restart
        self._pid_file = pid_file
        self._stopping = threading.Event()
        self._idle = threading.Event()  # the watcher has seen the stop and restarts nothing more
        self._thread: threading.Thread | None = None

    @classmethod
    def for_lookout(
        cls,
        log_dir: Path,
        env: dict[str, str] | None = None,
        names: tuple[str, ...] = SERVICES,
        **options: Any,
    ) -> ServiceSupervisor:
        """The Lookout services, each run from the venv's console script with its log in ``log_dir``."""
        bindir = Path(sys.executable).parent
        return cls(
            [SupervisedService(n, [str(bindir / n)], log_dir / f"{n}.log", dict(env or {})) for n in names],
            **options,
        )

    def start(self) -> None:
        """Stop what an earlier supervisor left, start every service, then watch them (and the
        servers) from a background thread."""
        self._stop_leftovers()
        for service in self.services:
            service.start()
        self._record_pids()
        self._thread = threading.Thread(target=self._watch_then_park, name="supervisor", daemon=True)
        self._thread.start()

    def _watch_then_park(self) -> None:
        try:
            self._watch()
        finally:
            self._idle.set()
        # What this thread restarted gets SIGTERM when the thread ends: it ends with the process.
        threading.Event().wait()

    def _watch(self) -> None:
        # servers first: the services need them
        watched: list[Supervised] = [*self.servers, *self.services]
        waits = {part.name: delays(self._settings) for part in watched}
        while not self._stopping.wait(0.5):
            for part in watched:
                if part.running():
                    continue
                # one that crashes right after starting is restarted after growing delays; one that
                # ran for a while is restarted at once, and its delays start again from the first
                lived = time.monotonic() - part.started_at
                if lived > HEALTHY_AFTER_S:
                    waits[part.name] = delays(self._settings)
                delay = 0.0 if lived > HEALTHY_AFTER_S else next(waits[part.name])
                log.warning("exited; restarting", extra={"service_name": part.name, "restart_in_s": delay})
                if self._stopping.wait(delay):
                    return
                try:
                    part.start()
                except Exception:  # e.g. a server not ready in time: tried again on the next round
                    log.exception("restart failed", extra={"service_name": part.name})
                    part.restarts += 1
                    part.started_at = time.monotonic()
                    continue
                part.restarts += 1  # counted once the new process exists: readers see both together
                self._record_pids()
                log.warning("restarted", extra={"service_name": part.name, "restarts": part.restarts})
                if self._on_restart is not None:
                    self._on_restart(part)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop watching, then SIGTERM every service (SIGKILL after ``timeout``), all in parallel."""
        self._stopping.set()
        if self._thread is not None:
            self._idle.wait()
        threads = [
            threading.Thread(target=stop_process_group, args=(s.proc.pid, timeout))
            for s in self.services
            if s.proc is not None and s.proc.poll() is None
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for service in self.services:
            if service.proc is not None:
                service.proc.wait()
        if self._pid_file is not None:
            self._pid_file.unlink(missing_ok=True)
        log.info("services stopped")

    def _record_pids(self) -> None:
        if self._pid_file is None:
            return
        pids = {s.name: s.proc.pid for s in self.services if s.proc is not None}
        self._pid_file.parent.mkdir(parents=True, exist_ok=True)
        self._pid_file.write_text(json.dumps(pids))

    def _stop_leftovers(self) -> None:
        """Stop the services an earlier supervisor recorded that still run (the same command), so
        that a restart never runs two sets side by side."""
        if self._pid_file is None or not self._pid_file.exists():
            return
        recorded: dict[str, int] = json.loads(self._pid_file.read_text() or "{}")
        leftovers = []
        for name, pid in recorded.items():
            with contextlib.suppress(OSError):  # gone
                if name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    leftovers.append(pid)
        if leftovers:
            log.warning("stopping services an earlier run left", extra={"pids": leftovers})
            stop_process_groups(leftovers)
        self._pid_file.unlink(missing_ok=True)
