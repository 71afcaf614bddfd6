"""What a stream-running service (runner, ML) tells the lifecycle: state events and heartbeats.

``StateEventPublisher`` puts one service's events on the states topic, keyed by stream id, and
logs each one it got acknowledged (heartbeats at debug level: there are many). ``Heartbeats`` sends,
every ``heartbeat_interval_s``, one heartbeat per stream the service runs with its live figures,
and keeps the same figures in Prometheus; the lifecycle's watchdog restarts a service whose
heartbeats for a stream stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from core.messages import ErrorKind, EventKind, Service, StateEvent, StreamFigures
from core.metrics import NEWEST_FRAME_AGE_SECONDS, STREAM_FPS
from core.settings import Settings
from core.states import StreamState

log = logging.getLogger(__name__)


class StateEventPublisher:
    """Publishes ``service``'s state events; a broker outage loses none that it reports as sent."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer, service: Service) -> None:
        self._settings = settings
        self.producer = producer
        self.service = service

    async def publish(
        self,
        stream_id: str,
        kind: EventKind,
        *,
        state: StreamState | None = None,
        error: str | None = None,
        error_kind: ErrorKind | None = None,
        figures: StreamFigures | None = None,
    ) -> bool:
        """Publish one event; False (logged) when the broker did not take it."""
        event = StateEvent(
            stream_id=stream_id,
            service=self.service,
            kind=kind,
            state=state,
            error=error,
            error_kind=error_kind,
            figures=figures,
        )
        try:
            await self.producer.send_and_wait(
                self._settings.topic_states, event.model_dump_json().encode(), key=stream_id.encode()
            )
        except KafkaError as err:
            # the lifecycle re-sends a stop it got no acknowledgement for; progress is re-derived
            log.error(
                "state event not published",
                extra={"stream_id": stream_id, "kind": kind.value, "error": repr(err)},
            )
            return False
        log.log(
            logging.DEBUG if kind is EventKind.HEARTBEAT else logging.INFO,
            "state event published",
            extra={
                "stream_id": stream_id,
                "event_id": event.event_id,
                "kind": kind.value,
                "state": state.value if state else None,
                "error": error,
                "error_kind": error_kind.value if error_kind else None,
            },
        )
        return True


class Heartbeats:
    """Every interval, a heartbeat for each stream ``figures_of()`` returns (the streams run here).

    ``figures_of`` gives each stream's figures but ``fps``, which is derived here from the count
    ``rate_of`` picks (frames published or processed) between two heartbeats.
    """

    def __init__(
        self,
        publisher: StateEventPublisher,
        interval_s: float,
        figures_of: Callable[[], Mapping[str, StreamFigures]],
        rate_of: Callable[[StreamFigures], int | None],
    ) -> None:
        self._publisher = publisher
        self._interval_s = interval_s
        self._figures_of = figures_of
        self._rate_of = rate_of
        self._last: dict[str, tuple[float, int]] = {}  # stream id -> (time, count) at the last beat

    async def run(self) -> None:
        """Beat until cancelled."""
        while True:
            await asyncio.sleep(self._interval_s)
            await self.beat()

    async def beat(self) -> None:
        """One heartbeat per running stream, now."""
        now = time.monotonic()
        current = dict(self._figures_of())
        for gone in self._last.keys() - current.keys():
            del self._last[gone]
        service = self._publisher.service.value
        beats = []
        for stream_id, figures in current.items():
            count = self._rate_of(figures) or 0
            then, before = self._last.get(stream_id, (now, count))
            fps = (count - before) / (now - then) if now > then and count >= before else 0.0
            self._last[stream_id] = (now, count)
            with_fps = figures.model_copy(update={"fps": round(fps, 2)})
            STREAM_FPS.labels(service, stream_id).set(with_fps.fps)
            if with_fps.newest_frame_age_s is not None:
                NEWEST_FRAME_AGE_SECONDS.labels(service, stream_id).set(with_fps.newest_frame_age_s)
            beats.append(self._publisher.publish(stream_id, EventKind.HEARTBEAT, figures=with_fps))
        await asyncio.gather(*beats)
