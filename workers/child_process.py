"""One stream's child process, from both sides: its supervision by a service, and its own start-up.

The runner and ML each run one OS process per stream, and supervise it the same way. Nothing here
blocks the service's event loop: the child is started (on a worker thread where spawning a fresh
interpreter takes a moment), its pipe is read with ``add_reader``, its exit is noticed at once on
the process sentinel (so a child that dies on its own is reaped and reported without delay), and a
stop waits on that exit with timeouts, escalating from the service's own way of asking (an event,
a message) to SIGTERM and SIGKILL. Each service keeps its protocol: its messages, what an exit
means and the error texts it reports. This module imports nothing heavy, so that a service's
handle on its streams stays light; the heavy modules are imported inside the child.

Inside the child, ``run_child`` is the start-up and the end both services share.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from typing import Generic, NoReturn, TypeVar

from core.lifetime import die_with_parent, tune_malloc_for_frames
from core.logs import configure_logging
from core.timeouts import within

log = logging.getLogger(__name__)

EXIT_STOPPED = 0  # ended as asked, or had nothing to do
EXIT_CRASHED = 1  # an exception escaped the child's body

REAP_JOIN_S = 5.0

Received = TypeVar("Received")
ChildContext = SpawnContext | ForkServerContext


class StopEnding(enum.Enum):
    """How a stop ended."""

    NOT_RUNNING = "not running"  # never started, or had exited (and been reaped) before the stop
    EXITED = "exited"  # exited within the grace after being asked
    TERMINATED = "terminated"  # exited after SIGTERM
    KILLED = "killed"  # was sent SIGKILL


@dataclass(frozen=True)
class StopResult:
    """How a stop ended, and the child's exit code (None: not reaped within the graces)."""

    ending: StopEnding
    exitcode: int | None


def _no_escalation_hook(step: StopEnding) -> None:
    """The default ``escalating`` hook of ``ChildProcess.stop``: nothing to say."""


class ChildProcess(Generic[Received]):
    """A child process serving one stream, seen from the service's event loop (made on that loop).

    The child's target is called with the child's end of the pipe first, then ``args``. Every
    message the child sends goes to ``on_message``; ``on_exit`` runs once the child is reaped,
    whatever ended it (``stopping`` tells whether a stop was under way).
    """

    def __init__(
        self,
        context: ChildContext,
        *,
        target: Callable[..., object],
        args: tuple[object, ...],
        name: str,
        duplex: bool,
        on_message: Callable[[Received], None],
        on_exit: Callable[[], None],
    ) -> None:
        conn, child_conn = context.Pipe(duplex=duplex)
        self._conn: Connection[object, Received] = conn
        self._child_conn = child_conn
        self._process = context.Process(
            target=target,
            args=(child_conn, *args),
            name=name,
            daemon=True,  # never outlives its service
        )
        self._on_message = on_message
        self._on_exit = on_exit
        self._loop = asyncio.get_running_loop()
        self._spawned = False
        self._exited = asyncio.Event()
        self._reaping: asyncio.Task[None] | None = None
        self.stopping = False
        self.pid: int | None = None
        self.exitcode: int | None = None

    @property
    def exited(self) -> bool:
        """The child is gone and reaped."""
        return self._exited.is_set()

    def start(self) -> None:
        """Start the child from the event loop's thread (a fork is quick), then watch it."""
        self._spawned = True
        try:
            self._process.start()
        except BaseException:
            self._conn.close()
            raise
        finally:
            self._child_conn.close()  # the child holds its own copy; ours would hide the child's exit
        self._watch()

    async def start_on_thread(self) -> None:
        """Start the child on a worker thread (spawning a fresh interpreter takes a moment), then watch it."""
        self._spawned = True
        try:
            await asyncio.to_thread(self._process.start)
        except BaseException:
            self._conn.close()
            raise
        finally:
            self._child_conn.close()  # the service keeps only its end, so the pipe reports EOF once the child is gone
        self._watch()

    def send(self, message: object) -> None:
        """Send to the child over a duplex pipe."""
        with contextlib.suppress(OSError):  # the child is gone; its exit is reported by on_exit
            self._conn.send(message)

    async def stop(
        self,
        ask: Callable[[], None],
        *,
        grace_s: float,
        terminate_grace_s: float,
        kill_grace_s: float | None,
        escalating: Callable[[StopEnding], None] = _no_escalation_hook,
    ) -> StopResult:
        """Stop the child: ``ask`` it, then SIGTERM, then SIGKILL, waiting a grace after each.

        ``escalating`` hears each step (``TERMINATED``, ``KILLED``) just before its signal is sent.
        ``kill_grace_s`` None: after SIGKILL, wait for the exit however long it takes.
        """
        if not self._spawned or self.exited:
            return StopResult(StopEnding.NOT_RUNNING, self.exitcode)
        self.stopping = True
        if self._process.is_alive():
            ask()
        if await self._wait_exited(grace_s):
            return StopResult(StopEnding.EXITED, self.exitcode)
        escalating(StopEnding.TERMINATED)
        self._process.terminate()
        if await self._wait_exited(terminate_grace_s):
            return StopResult(StopEnding.TERMINATED, self.exitcode)
        escalating(StopEnding.KILLED)
        self._process.kill()
        await self._wait_exited(kill_grace_s)
        return StopResult(StopEnding.KILLED, self.exitcode)

    async def _wait_exited(self, within_s: float | None) -> bool:
        try:
            await within(self._exited.wait(), within_s)
        except TimeoutError:
            return False
        return True

    def _watch(self) -> None:
        self.pid = self._process.pid
        self._loop.add_reader(self._conn.fileno(), self._read)
        self._loop.add_reader(self._process.sentinel, self._on_sentinel)

    def _read(self) -> None:
        try:
            while self._conn.poll():
                self._on_message(self._conn.recv())
        except (EOFError, OSError):
            self._stop_reading()

    def _stop_reading(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._conn.fileno())

    def _on_sentinel(self) -> None:
        # The sentinel is readable: the child is gone. Read what it said before dying, then reap it.
        self._loop.remove_reader(self._process.sentinel)
        self._read()
        self._stop_reading()
        self._reaping = self._loop.create_task(self._reap())

    async def _reap(self) -> None:
        # The kernel closes the child's files a moment before its exit status can be collected.
        await asyncio.to_thread(self._process.join, REAP_JOIN_S)
        self.exitcode = self._process.exitcode
        self._conn.close()
        with contextlib.suppress(ValueError):  # not reaped within the join: it keeps its resources
            self._process.close()
        self._exited.set()
        self._on_exit()


def run_child(
    service: str,
    stream_id: str | None,
    conn: Connection,
    body: Callable[[], int],
    *,
    crash_event: str,
    on_crash: Callable[[BaseException], None] | None = None,
) -> NoReturn:
    """Inside the child: run ``body`` and exit with the code it returns (``EXIT_CRASHED`` if it raises).

    Every log line of the process carries ``stream_id`` (None: the process serves several streams). A crash is logged as ``crash_event`` and
    handed to ``on_crash`` (to tell the service why) before the process exits.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the service decides
    die_with_parent()  # a service killed with SIGKILL leaves no stream process behind
    tune_malloc_for_frames()
    configure_logging(service, stream_id=stream_id)
    code = EXIT_CRASHED
    try:
        code = body()
    except BaseException as err:
        code = EXIT_CRASHED
        log.exception(crash_event, extra={"stream_id": stream_id})
        if on_crash is not None:
            on_crash(err)
    finally:
        conn.close()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        # Everything is closed: skip the interpreter's teardown. A camera reader abandoned inside a
        # blocking OpenCV call must not hold it up or crash it, and once torch is loaded it takes
        # seconds, which would eat into the stop's deadline.
        os._exit(code)
