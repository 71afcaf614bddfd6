"""The ML service's shared inference engines (workers/ml/engine.py): started when a stream's process
asks for one, restarted when one dies, stopped when no stream has used one for ``ml_engine_idle_s``.

Runs on the service's event loop and imports nothing heavy: an engine is a fork of the preloading
server (workers/ml/preload.py), like the streams' processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.context import ForkServerContext

from core.metrics import ENGINE_BATCHES, ENGINE_INFERENCES, ENGINE_RESTARTS, ENGINE_STREAMS
from core.settings import Settings
from workers.child_process import ChildProcess
from workers.ml.engine import (
    EXIT_FATAL,
    EngineFailed,
    EngineFigures,
    EngineKey,
    EngineLink,
    EngineReady,
    StopEngine,
    new_link,
)
from workers.ml.engine_process import run_engine
from workers.ml.preload import detection_context

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
RESTART_DELAY_S = (0.2, 10.0)  # first restart at once (almost), then doubling while it keeps dying
STABLE_AFTER_S = 30.0  # an engine that ran this long starts its restarts' delay over
HUNG_AFTER_S = 30.0  # an engine's loop silent this long (it reports every 2 s) is killed and restarted
UNREADY_DEATHS = 3  # deaths in a row before its model was ready: no restart can help

EngineMessage = EngineReady | EngineFailed | EngineFigures


class _Engine:
    """One engine process and its supervision."""

    def __init__(self, owner: Engines, key: EngineKey) -> None:
        self.owner = owner
        self.key = key
        self.ready: EngineReady | None = None
        self.fatal: str | None = None
        self.stopping = False
        self.started_at = 0.0
        self.delay_s = RESTART_DELAY_S[0]
        self.figures = EngineFigures(0, 0, 0, 0)
        self.child: ChildProcess[EngineMessage] | None = None
        self.unready_deaths = 0  # deaths in a row before the model was ready
        self.heard_at = 0.0  # the engine's loop reports every FIGURES_INTERVAL_S
        self._watch: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.ready, self.figures = None, EngineFigures(0, 0, 0, 0)
        self.started_at = self.heard_at = time.monotonic()
        self.child = ChildProcess(
            self.owner.context,
            target=run_engine,
            args=(self.owner.settings, self.key, self.owner.link),
            name="lookout-ml-engine",
            duplex=True,
            on_message=self._on_message,
            on_exit=self._on_exit,
        )
        try:
            self.child.start()
        except Exception as err:  # e.g. out of processes or memory: like a death, tried again later
            log.exception("inference engine did not start", extra={"engine": self.key.name})
            self.child = None
            self._died(f"did not start: {type(err).__name__}: {err}")
            return
        log.info("inference engine started", extra={"engine": self.key.name, "pid": self.child.pid})
        self._watch = asyncio.get_running_loop().call_later(HUNG_AFTER_S, self._check_alive)

    def _check_alive(self) -> None:
        """An engine whose loop has not reported for HUNG_AFTER_S is stuck: kill it (it is restarted)."""
        child = self.child
        if self.stopping or child is None or child.exited:
            return
        silent_s = time.monotonic() - self.heard_at
        if self.ready is not None and silent_s > HUNG_AFTER_S and child.pid is not None:
            log.error(
                "inference engine hung: killing it",
                extra={"engine": self.key.name, "silent_s": round(silent_s)},
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
            return
        self._watch = asyncio.get_running_loop().call_later(HUNG_AFTER_S / 3, self._check_alive)

    @property
    def pid(self) -> int | None:
        return None if self.child is None else self.child.pid

    async def stop(self) -> None:
        self.stopping = True
        if self._watch is not None:
            self._watch.cancel()
        if self.child is not None:
            child = self.child
            await child.stop(
                lambda: child.send(StopEngine()),
                grace_s=STOP_GRACE_S,
                terminate_grace_s=2.0,
                kill_grace_s=5.0,
            )
        with contextlib.suppress(KeyError):  # never reported
            ENGINE_STREAMS.remove(self.key.name)

    def _on_message(self, message: EngineMessage) -> None:
        self.heard_at = time.monotonic()
        if isinstance(message, EngineReady):
            self.ready = message
            self.unready_deaths = 0
            log.info(
                "inference engine ready",
                extra={
                    "engine": self.key.name,
                    "backend": message.label,
                    "note": message.note,
                    "slots": message.slots,
                },
            )
        elif isinstance(message, EngineFigures):
            name = self.key.name
            ENGINE_STREAMS.labels(name).set(message.clients)
            ENGINE_INFERENCES.labels(name).inc(max(0, message.requests - self.figures.requests))
            ENGINE_BATCHES.labels(name).inc(max(0, message.batches - self.figures.batches))
            self.figures = message
        elif isinstance(message, EngineFailed):
            log.error("inference engine failed", extra={"engine": self.key.name, "error": message.reason})
            if message.fatal:
                self.fatal = message.reason

    def _on_exit(self) -> None:
        exitcode = None if self.child is None else self.child.exitcode
        if self._watch is not None:
            self._watch.cancel()
        if self.stopping:
            return
        if self.fatal is not None or exitcode == EXIT_FATAL:
            self.owner.engine_failed(self, self.fatal or f"inference engine exited (code {exitcode})")
            return
        self._died(f"exit code {exitcode}")

    def _died(self, how: str) -> None:
        """Restart after a delay that grows while it keeps dying; a model that never became ready
        UNREADY_DEATHS times in a row (killed while loading: out of memory, a native crash) is fatal."""
        if self.ready is None:
            self.unready_deaths += 1
            if self.unready_deaths >= UNREADY_DEATHS:
                reason = f"inference engine for {self.key.name} died {self.unready_deaths} times loading the model ({how})"
                self.owner.engine_failed(self, reason)
                return
        if time.monotonic() - self.started_at > STABLE_AFTER_S:
            self.delay_s = RESTART_DELAY_S[0]
        log.warning(
            "inference engine died: restarting it",
            extra={"engine": self.key.name, "how": how, "delay_s": self.delay_s},
        )
        ENGINE_RESTARTS.labels(self.key.name).inc()
        self.owner.restarts += 1
        asyncio.get_running_loop().call_later(self.delay_s, self._restart)
        self.delay_s = min(RESTART_DELAY_S[1], self.delay_s * 2)

    def _restart(self) -> None:
        if not self.stopping:
            self.start()


class Engines:
    """The engines of one ML service, one per EngineKey that a running stream uses."""

    def __init__(
        self,
        settings: Settings,
        on_fatal: Callable[[list[str], str], None],
        *,
        context: ForkServerContext | None = None,
        link: EngineLink | None = None,
    ) -> None:
        self.settings = settings
        self.link = link or new_link()
        self.context = context or detection_context()
        self.restarts = 0
        self._on_fatal = on_fatal
        self._engines: dict[EngineKey, _Engine] = {}
        self._users: dict[str, EngineKey] = {}
        self._idle: dict[EngineKey, asyncio.TimerHandle] = {}
        self._stopping: set[asyncio.Task[None]] = set()

    def use(self, stream_id: str, key: EngineKey) -> None:
        """``stream_id``'s process runs on ``key``'s engine: start it unless it runs."""
        previous = self._users.get(stream_id)
        self._users[stream_id] = key
        if previous is not None and previous != key:
            self._idle_check(previous)
        timer = self._idle.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key not in self._engines:
            engine = _Engine(self, key)
            self._engines[key] = engine
            engine.start()

    def release(self, stream_id: str) -> None:
        """``stream_id``'s process has ended."""
        key = self._users.pop(stream_id, None)
        if key is not None:
            self._idle_check(key)

    def pid(self, key: EngineKey) -> int | None:
        engine = self._engines.get(key)
        return None if engine is None else engine.pid

    def ready(self, key: EngineKey) -> EngineReady | None:
        """What the engine of ``key`` runs, once its model is loaded (None: not yet, or none)."""
        engine = self._engines.get(key)
        return None if engine is None else engine.ready

    def figures(self, key: EngineKey) -> EngineFigures | None:
        """The engine's latest counts (it reports every 2 s)."""
        engine = self._engines.get(key)
        return None if engine is None else engine.figures

    def running(self) -> dict[EngineKey, int | None]:
        return {key: engine.pid for key, engine in self._engines.items()}

    async def close(self) -> None:
        for timer in self._idle.values():
            timer.cancel()
        self._idle.clear()
        engines = list(self._engines.values())
        self._engines.clear()
        await asyncio.gather(*(engine.stop() for engine in engines), *self._stopping, return_exceptions=True)

    def engine_failed(self, engine: _Engine, reason: str) -> None:
        """The engine's model cannot load: the streams on it fail; a later stream tries again."""
        self._engines.pop(engine.key, None)
        streams = [stream_id for stream_id, key in self._users.items() if key == engine.key]
        for stream_id in streams:
            self._users.pop(stream_id)
        self._on_fatal(streams, reason)

    def _idle_check(self, key: EngineKey) -> None:
        if key in self._users.values() or key not in self._engines or key in self._idle:
            return
        self._idle[key] = asyncio.get_running_loop().call_later(
            self.settings.ml_engine_idle_s, self._stop_idle, key
        )

    def _stop_idle(self, key: EngineKey) -> None:
        self._idle.pop(key, None)
        if key in self._users.values():
            return
        engine = self._engines.pop(key, None)
        if engine is None:
            return
        log.info("inference engine idle: stopping it", extra={"engine": key.name})
        task = asyncio.get_running_loop().create_task(engine.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
