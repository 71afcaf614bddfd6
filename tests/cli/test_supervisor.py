"""The service supervisor restarts a service that dies and leaves no process behind when stopped."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil

from cli.supervisor import ServiceSupervisor, SupervisedService


def wait_for(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_killed_service_is_restarted_and_stop_leaves_no_process(tmp_path: Path) -> None:
    services = [
        SupervisedService("sleeper", ["sleep", "300"], tmp_path / "sleeper.log"),
        SupervisedService("other", ["sleep", "300"], tmp_path / "other.log"),
    ]
    supervisor = ServiceSupervisor(services)
    supervisor.start()
    try:
        first = services[0].proc
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        assert wait_for(lambda: services[0].restarts == 1), "the dead service was not restarted"
        second = services[0].proc
        assert second is not None and second.pid != first.pid and second.poll() is None
        assert services[1].restarts == 0
    finally:
        supervisor.stop(timeout=5)
    pids = [s.proc.pid for s in services if s.proc is not None]
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
