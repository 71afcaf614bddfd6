"""Runs Lookout's services as child processes and restarts any that dies, logging the event."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy.servers import stop_process_group

log = logging.getLogger(__name__)

SERVICES = (
    "lookout-api",
    "lookout-outbox-relay",
    "lookout-state-bridge",
    "lookout-temporal-worker",
    "lookout-runner",
    "lookout-ml",
)


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

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        self.started_at = time.monotonic()
        log.info("service started", extra={"service_name": self.name, "pid": self.proc.pid})


class ServiceSupervisor:
    """Starts the services, restarts one that exits (with backoff), stops them all on ``stop()``."""

    def __init__(self, services: list[SupervisedService], *, max_backoff_s: float = 30.0) -> None:
        self.services = services
        self.max_backoff_s = max_backoff_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_lookout(
        cls, log_dir: Path, env: dict[str, str] | None = None, names: tuple[str, ...] = SERVICES
    ) -> ServiceSupervisor:
        """The Lookout services, each run from the venv's console script with its log in ``log_dir``."""
        bindir = Path(sys.executable).parent
        return cls(
            [SupervisedService(n, [str(bindir / n)], log_dir / f"{n}.log", dict(env or {})) for n in names]
        )

    def start(self) -> None:
        for service in self.services:
            service.start()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            for service in self.services:
                if service.proc is None or service.proc.poll() is None:
                    continue
                code = service.proc.returncode
                # a service that crashes right after starting is restarted with growing delays
                lived = time.monotonic() - service.started_at
                delay = 0.0 if lived > 60 else min(self.max_backoff_s, 2.0 ** min(service.restarts, 5))
                log.warning(
                    "service exited; restarting",
                    extra={"service_name": service.name, "exit_code": code, "restart_in_s": delay},
                )
                if self._stopping.wait(delay):
                    return
                service.start()
                service.restarts += 1

    def stop(self, timeout: float = 20.0) -> None:
        """Stop watching, then SIGTERM every service (SIGKILL after ``timeout``), all in parallel."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
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
        log.info("services stopped")
