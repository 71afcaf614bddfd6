"""The state-manager bridge against the real broker: signals, commits, dead letters, Temporal outages."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from temporalio.service import RPCError, RPCStatusCode

from core.kafka import create_producer, ensure_topics
from core.messages import EventKind, Service, StateEvent
from core.settings import Settings
from core.states import StreamState
from core.temporal import STREAM_ID, connect_temporal, workflow_id
from core.timeouts import within
from tests.observing import consume, eventually, sample
from tests.running_services import isolated_settings, private_broker, private_temporal, running_bridge
from workers.state_bridge import MalformedEvent, parse_state_event

pytestmark = pytest.mark.integration


@pytest.fixture
async def bridge_settings(settings: Settings) -> Settings:
    return await isolated_settings(settings)


def state_event(stream_id: str | None = None, **fields: object) -> StateEvent:
    base: dict[str, object] = {
        "stream_id": stream_id or str(uuid.uuid4()),
        "service": Service.RUNNER,
        "kind": EventKind.PROGRESS,
        "state": StreamState.RUNNER_STARTED,
    }
    return StateEvent.model_validate(base | fields)


async def publish(settings: Settings, *values: bytes, key: bytes = b"k") -> None:
    producer: AIOKafkaProducer = create_producer(settings)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(settings.topic_states, value, key=key)
    finally:
        await producer.stop()


class RecordingSignaller:
    """Stands in for signal-with-start: records events; fails the first ``failures`` calls with ``error``."""

    def __init__(self, failures: int = 0, error: BaseException | None = None) -> None:
        self.calls: list[StateEvent] = []
        self.accepted: list[StateEvent] = []
        self._failures = failures
        self._error = error or RPCError("temporal is down", RPCStatusCode.UNAVAILABLE, b"")

    async def __call__(self, event: StateEvent) -> None:
        self.calls.append(event)
        if len(self.calls) <= self._failures:
            raise self._error
        self.accepted.append(event)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "empty"),
        (b"\xff\xfe not json", "Invalid JSON"),
        (b'{"stream_id": "x"}', "service: Field required"),
        (b'{"stream_id": "x", "service": "runner", "kind": "progress", "state": "running"}', "state: Input"),
    ],
)
def test_parse_state_event_names_what_is_wrong_without_quoting_the_message(value: bytes, reason: str) -> None:
    with pytest.raises(MalformedEvent) as raised:
        parse_state_event(value)

    assert reason in str(raised.value)


def test_parse_state_event_refuses_a_stream_id_that_is_no_uuid() -> None:
    with pytest.raises(MalformedEvent, match="not a UUID"):
        parse_state_event(state_event(stream_id="stream-1").model_dump_json().encode())


async def test_bridge_signals_every_event_in_order_and_commits_after_the_signals(
    bridge_settings: Settings,
) -> None:
    stream_id = str(uuid.uuid4())
    events = [
        state_event(stream_id, state=state) for state in (StreamState.RUNNER_STARTED, StreamState.ML_STARTED)
    ]
    await publish(bridge_settings, *(e.model_dump_json().encode() for e in events), key=stream_id.encode())
    group = f"test-bridge-{uuid.uuid4().hex[:8]}"

    signaller = RecordingSignaller()
    async with running_bridge(bridge_settings, signal_event=signaller, group_id=group):
        await eventually(lambda: len(signaller.accepted) == 2)

    assert [e.event_id for e in signaller.accepted] == [e.event_id for e in events]
    again = RecordingSignaller()
    async with running_bridge(bridge_settings, signal_event=again, group_id=group) as bridge:
        await within(bridge.assigned.wait(), 15)
        await asyncio.sleep(1.0)
    assert again.calls == [], "a restarted bridge must resume after the committed events"


async def test_malformed_messages_are_dead_lettered_counted_and_skipped(bridge_settings: Settings) -> None:
    good = state_event()
    malformed = [
        b"{not json",
        b'{"stream_id": "x"}',
        state_event(stream_id="not-a-uuid").model_dump_json().encode(),
    ]
    await publish(bridge_settings, *malformed, good.model_dump_json().encode())
    bad_on_states = {"service": "state-bridge", "topic": bridge_settings.topic_states}
    counted_before = sample("lookout_bad_messages_total", **bad_on_states)

    signaller = RecordingSignaller()
    async with running_bridge(bridge_settings, signal_event=signaller):
        await eventually(lambda: len(signaller.accepted) == 1)
        dead = await consume(
            bridge_settings, bridge_settings.topic_dead_letter, until=lambda got: len(got) >= 3
        )

    assert [e.event_id for e in signaller.accepted] == [good.event_id]
    assert sorted(r.value for r in dead) == sorted(malformed)
    for record in dead:
        headers = dict(record.headers)
        assert headers["error"].startswith(b"malformed: ")
        assert headers["source_topic"] == bridge_settings.topic_states.encode()
        assert int(headers["source_offset"]) >= 0
    assert sample("lookout_bad_messages_total", **bad_on_states) - counted_before == 3


async def test_signal_retried_while_temporal_is_unavailable_and_the_offset_committed_only_after(
    bridge_settings: Settings,
) -> None:
    event = state_event()
    await publish(bridge_settings, event.model_dump_json().encode())
    group = f"test-bridge-{uuid.uuid4().hex[:8]}"

    # Temporal stays down: the bridge stops while still retrying, so nothing is committed ...
    down = RecordingSignaller(failures=1000)
    async with running_bridge(bridge_settings, signal_event=down, group_id=group, max_backoff_s=0.2):
        await eventually(lambda: len(down.calls) >= 3)
    assert down.accepted == []

    # ... and the next bridge of the group gets the same event, fails twice more, then signals it.
    recovering = RecordingSignaller(failures=2)
    async with running_bridge(bridge_settings, signal_event=recovering, group_id=group, max_backoff_s=0.2):
        await eventually(lambda: len(recovering.accepted) == 1)
    assert [e.event_id for e in recovering.calls] == [event.event_id] * 3

    after = RecordingSignaller()
    async with running_bridge(bridge_settings, signal_event=after, group_id=group) as bridge:
        await within(bridge.assigned.wait(), 15)
        await asyncio.sleep(1.0)
    assert after.calls == []


async def test_an_event_temporal_rejects_for_good_is_dead_lettered_not_retried_forever(
    bridge_settings: Settings,
) -> None:
    rejected, good = state_event(), state_event()
    await publish(bridge_settings, rejected.model_dump_json().encode(), good.model_dump_json().encode())
    signaller = RecordingSignaller(
        failures=1, error=RPCError("payload too large", RPCStatusCode.INVALID_ARGUMENT, b"")
    )

    async with running_bridge(bridge_settings, signal_event=signaller):
        await eventually(lambda: len(signaller.accepted) == 1)
        dead = await consume(
            bridge_settings, bridge_settings.topic_dead_letter, until=lambda got: len(got) >= 1
        )

    assert [e.event_id for e in signaller.calls] == [rejected.event_id, good.event_id]
    assert dict(dead[0].headers)["error"].startswith(b"signal rejected: INVALID_ARGUMENT")


async def test_bridge_signal_with_start_creates_the_streams_workflow_with_its_search_attribute(
    bridge_settings: Settings,
) -> None:
    event = state_event(service=Service.API, state=StreamState.INIT_STARTUP)
    await publish(bridge_settings, event.model_dump_json().encode(), key=event.stream_id.encode())
    client = await connect_temporal(bridge_settings)
    handle = client.get_workflow_handle(workflow_id(event.stream_id))

    async def started() -> bool:
        try:
            await handle.describe()
        except RPCError:
            return False
        return True

    async with running_bridge(bridge_settings):  # no worker: Temporal accepts the start and signal alone
        await eventually(started)
    description = await handle.describe()
    assert description.typed_search_attributes.get(STREAM_ID) == event.stream_id
    await handle.terminate("test cleanup")


async def test_a_real_temporal_outage_delays_the_signal_without_losing_or_dead_lettering_the_event(
    bridge_settings: Settings, tmp_path: Path
) -> None:
    temporal = private_temporal(tmp_path)
    await temporal.start_async()
    try:
        on_private = bridge_settings.model_copy(update={"temporal_address": temporal.address})
        event = state_event(service=Service.API, state=StreamState.INIT_STARTUP)
        retries_before = sample("lookout_bridge_signal_retries_total")
        dead_before = sample(
            "lookout_dead_lettered_total", service="state-bridge", topic=on_private.topic_states
        )

        async with running_bridge(on_private, max_backoff_s=1.0) as bridge:
            await within(bridge.assigned.wait(), 15)
            await temporal.stop_async()
            await publish(on_private, event.model_dump_json().encode(), key=event.stream_id.encode())
            # the SDK retries for a while itself before it reports UNAVAILABLE to the bridge
            await eventually(
                lambda: sample("lookout_bridge_signal_retries_total") > retries_before, timeout_s=40
            )
            await temporal.start_async()
            client = await connect_temporal(on_private)
            handle = client.get_workflow_handle(workflow_id(event.stream_id))

            async def started() -> bool:
                try:
                    await handle.describe()
                except RPCError:
                    return False
                return True

            await eventually(started, timeout_s=40)

        assert (
            sample("lookout_dead_lettered_total", service="state-bridge", topic=on_private.topic_states)
            == dead_before
        )
        await handle.terminate("test cleanup")
    finally:
        await temporal.stop_async()


async def test_bridge_started_while_the_broker_is_down_waits_for_it_and_then_works(
    bridge_settings: Settings, tmp_path: Path
) -> None:
    broker = private_broker(tmp_path)  # not started yet
    on_private = bridge_settings.model_copy(update={"kafka_bootstrap": broker.address})
    signaller = RecordingSignaller()
    try:
        async with running_bridge(on_private, signal_event=signaller, max_backoff_s=0.5) as bridge:
            await asyncio.sleep(2.0)  # a few failed starts, no crash
            await broker.start_async()
            await ensure_topics(on_private, [on_private.topic_states, on_private.topic_dead_letter])
            event = state_event()
            await publish(on_private, event.model_dump_json().encode())
            await eventually(lambda: len(signaller.accepted) == 1, timeout_s=30)
            assert bridge.assigned.is_set()
    finally:
        await broker.stop_async()
