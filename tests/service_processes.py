"""Lookout's console scripts run as real processes, with the test's settings as their environment.

``running_service("lookout-runner", settings)`` starts one, collects its JSON log lines from stderr
and kills it on exit if the test did not ``terminate()`` it. ``scrape_metrics(port)`` reads what a
worker serves on its metrics port; ``wait_for_metrics`` scrapes until they say what a test expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from core.settings import Settings, settings_env
from core.timeouts import within
from deploy import servers


class ServiceProcess:
    """A started console script and the lines it has logged so far."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.lines.append(line.decode().rstrip("\n"))

    def logged(self, event: str) -> bool:
        return any(f'"event": "{event}"' in line for line in self.lines)

    def records(self) -> list[dict[str, Any]]:
        """The JSON log lines so far, parsed (every line must be one)."""
        return [json.loads(line) for line in self.lines]

    async def terminate(self, within_s: float = 30) -> int:
        """SIGTERM, then its exit status; fails, showing its last lines, if it does not exit in time."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = await within(self.proc.wait(), within_s)
        except TimeoutError:
            last = "\n".join(self.lines[-20:])
            raise AssertionError(f"still running {within_s:g}s after SIGTERM; last lines:\n{last}") from None
        await self._finish_reading()
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self._finish_reading()

    async def _finish_reading(self) -> None:
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):  # a child may hold stderr open
            await within(self._reader, 5)


async def start_service(name: str, settings: Settings) -> ServiceProcess:
    """Start the console script ``name`` with ``settings`` (INFO logs on stderr)."""
    proc = await asyncio.create_subprocess_exec(
        servers.venv_bin(name),
        env={**os.environ, **settings_env(settings), "LOOKOUT_LOG_LEVEL": "INFO"},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    return ServiceProcess(proc)


@contextlib.asynccontextmanager
async def running_service(name: str, settings: Settings) -> AsyncIterator[ServiceProcess]:
    """The console script ``name`` running while the block runs; killed at the end if still alive."""
    service = await start_service(name, settings)
    try:
        yield service
    finally:
        await service.kill()


class MetricSamples:
    """One scrape of a metrics endpoint: ``value(name, **labels)`` for a sample, None when absent."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float | None:
        for sample_name, sample_labels, value in self.samples:
            if sample_name == name and sample_labels == labels:
                return value
        return None

    def has_label(self, label: str, value: str) -> bool:
        """True when any sample carries ``label=value`` (e.g. a stream id)."""
        return any(labels.get(label) == value for _name, labels, _value in self.samples)


async def scrape_metrics(port: int) -> MetricSamples | None:
    """What ``127.0.0.1:port/metrics`` serves now; None while nothing answers there."""
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            response = await http.get(f"http://127.0.0.1:{port}/metrics")
    except httpx.TransportError:
        return None
    response.raise_for_status()
    return MetricSamples(response.text)


async def wait_for_metrics(
    port: int,
    check: Callable[[MetricSamples], bool],
    *,
    service: ServiceProcess | None = None,
    timeout_s: float = 30.0,
) -> MetricSamples:
    """Scrape ``port`` until ``check`` holds and return that scrape; fails showing the last scrape's
    Lookout series and the service's last log lines."""
    deadline = time.monotonic() + timeout_s
    scraped = None
    while time.monotonic() < deadline:
        scraped = await scrape_metrics(port)
        if scraped is not None and check(scraped):
            return scraped
        await asyncio.sleep(0.3)
    series = [line for line in (scraped.text if scraped else "").splitlines() if line.startswith("lookout_")]
    logged = service.lines[-15:] if service is not None else []
    raise AssertionError(
        f"metrics on port {port} not as expected after {timeout_s:g}s\n"
        + "\n".join(["last scrape:", *series, "last log lines:", *logged])
    )
