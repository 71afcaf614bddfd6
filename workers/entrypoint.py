"""The one bootstrap of the workers' console scripts: logs, settings, metrics endpoint, signals.

Each worker's ``main()`` is ``run_service(name, serve, metrics_port=...)``: JSON logs on stderr
under the service's name, the settings read once, the process's Prometheus metrics served on the
worker's own port, and ``serve(settings, stop)`` run until SIGINT or SIGTERM sets ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable

from core.logs import configure_logging
from core.metrics import start_metrics_server
from core.settings import Settings, get_settings

Serve = Callable[[Settings, asyncio.Event], Awaitable[None]]


def run_service(name: str, serve: Serve, *, metrics_port: Callable[[Settings], int]) -> None:
    """Run one worker process until it is signalled to stop (or ``serve`` returns)."""
    configure_logging(name)
    settings = get_settings()
    start_metrics_server(metrics_port(settings), settings.metrics_host)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_until_signalled(serve, settings))


async def _until_signalled(serve: Serve, settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await serve(settings, stop)
