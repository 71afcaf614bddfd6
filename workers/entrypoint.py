"""The one bootstrap of the workers' console scripts: logs, settings, metrics endpoint, signals.

Each worker's ``main()`` is ``run_service(name, serve, metrics_port=...)``: JSON logs on stderr
under the service's name, the settings read once, the process's Prometheus metrics served on the
worker's own port, and ``serve(settings, stop)`` run until SIGINT or SIGTERM sets ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable

from core.logs import configure_logging
from core.metrics import start_metrics_server
from core.settings import Settings, get_settings

Serve = Callable[[Settings, asyncio.Event], Awaitable[None]]

log = logging.getLogger(__name__)
STOP_DEADLINE_EXIT = 70  # the exit status of a service whose stop overran its deadline


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

    def stopping() -> None:
        if not stop.is_set():
            _exit_after(settings.service_stop_deadline_s)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping)
    await serve(settings, stop)


def _exit_after(deadline_s: float) -> None:
    """A stop must end: whatever still holds the process after ``deadline_s`` (a client waiting for a
    server that died with the stack, e.g. when ``lookout up`` was SIGKILLed), it exits then."""

    def overrun() -> None:
        log.error("stop overran its deadline: exiting", extra={"deadline_s": deadline_s})
        logging.shutdown()
        os._exit(STOP_DEADLINE_EXIT)

    timer = threading.Timer(deadline_s, overrun)
    timer.daemon = True
    timer.start()
