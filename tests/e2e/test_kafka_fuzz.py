"""Malformed records on every topic a service consumes: each one logged, counted and dead-lettered,
no service restarts, and a new stream works afterwards. The runner and ML run as real processes."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import asyncpg
import pytest
from aiokafka import ConsumerRecord

from core.kafka import create_producer
from core.settings import Settings
from deploy.camera.control import TestCamera
from tests.e2e.healing import healing_pipeline
from tests.observing import consume, sample
from tests.ports import free_port
from tests.service_processes import scrape_metrics

pytestmark = pytest.mark.e2e

SECRET = f"pw-{uuid.uuid4().hex[:8]}"
COMMANDS = [
    b"",
    b"not json",
    b"\xff\xfe\x00",
    b'{"kind": "launch", "stream_id": "x"}',
    b'{"kind": "start"}',
    # an old-style start command with the camera URL in clear: refused, and its password never logged
    json.dumps({"kind": "start", "stream_id": "s", "url": f"rtsp://admin:{SECRET}@cam/x"}).encode(),
]
FRAMES: list[list[tuple[str, bytes]]] = [
    [],
    [("stream_id", b"x")],
    [("stream_id", b"x"), ("frame_seq", b"seven"), ("capture_ts", b"1"), ("width", b"1"), ("height", b"1")],
    [("frame_seq", b"1"), ("capture_ts", b"1"), ("width", b"1"), ("height", b"1")],
    [("stream_id", b"\xff"), ("frame_seq", b"1"), ("capture_ts", b"1"), ("width", b"1"), ("height", b"1")],
]
STATES = [b"garbage", b'{"event_id": 1}', b'{"stream_id": "not-a-uuid", "service": "ml", "kind": "ack"}', b""]


async def test_malformed_records_on_every_topic_are_counted_and_dead_lettered_and_no_service_restarts(
    settings: Settings, db_pool: asyncpg.Pool, camera: TestCamera, tmp_path: Path
) -> None:
    ports = {"metrics_port_runner": free_port(), "metrics_port_ml": free_port()}
    async with healing_pipeline(settings, db_pool, tmp_path, **ports) as healing:
        s = healing.settings
        bridge_before = sample("lookout_bad_messages_total", service="state-bridge", topic=s.topic_states)
        pids = {name: healing.pid_of(name) for name in ("lookout-runner", "lookout-ml")}
        producer = create_producer(s)
        await producer.start()
        try:
            for value in COMMANDS:
                await producer.send_and_wait(s.topic_commands, value, key=b"fuzz")
            for headers in FRAMES:
                await producer.send_and_wait(s.topic_frames, b"\xff\xd8junk", key=b"fuzz", headers=headers)
            for value in STATES:
                await producer.send_and_wait(s.topic_states, value, key=b"fuzz")
        finally:
            await producer.stop()

        def dead_letters(records: list[ConsumerRecord[bytes, bytes]]) -> dict[tuple[str, str], int]:
            counts: dict[tuple[str, str], int] = {}
            for record in records:
                headers = dict(record.headers)
                where = (headers["source_topic"].decode(), headers["consumer_group"].decode())
                counts[where] = counts.get(where, 0) + 1
            return counts

        expected = {
            s.topic_commands: len(COMMANDS),  # for the runner's group and ML's group each
            s.topic_frames: len(FRAMES),
            s.topic_states: len(STATES),
        }

        def all_there(records: list[ConsumerRecord[bytes, bytes]]) -> bool:
            by_topic: dict[str, int] = {}
            for (topic, _group), count in dead_letters(records).items():
                by_topic[topic] = by_topic.get(topic, 0) + count
            return (
                by_topic.get(s.topic_commands, 0) >= 2 * len(COMMANDS)
                and by_topic.get(s.topic_frames, 0) >= len(FRAMES)
                and by_topic.get(s.topic_states, 0) >= len(STATES)
            )

        records = await consume(s, s.topic_dead_letter, until=all_there, timeout_s=60)
        groups = {topic: sorted(g for (t, g) in dead_letters(records) if t == topic) for topic in expected}
        assert len(groups[s.topic_commands]) == 2, groups  # the runner's and ML's consumer groups

        runner = await scrape_metrics(ports["metrics_port_runner"])
        ml = await scrape_metrics(ports["metrics_port_ml"])
        assert runner is not None and ml is not None
        assert runner.value("lookout_bad_messages_total", service="runner", topic=s.topic_commands) == len(
            COMMANDS
        )
        assert ml.value("lookout_bad_messages_total", service="ml", topic=s.topic_commands) == len(COMMANDS)
        assert ml.value("lookout_bad_messages_total", service="ml", topic=s.topic_frames) == len(FRAMES)
        bridge_after = sample("lookout_bad_messages_total", service="state-bridge", topic=s.topic_states)
        assert bridge_after - bridge_before == len(STATES)

        assert {name: healing.pid_of(name) for name in pids} == pids, "a service restarted"
        assert all(service.restarts == 0 for service in healing.supervisor.services)
        for service in healing.supervisor.services:
            assert SECRET not in service.log_path.read_text(), f"{service.name} logged the password"

        stream_id = await healing.start_stream(camera.url("cam2"))  # and the pipeline still works
        view, _ = await healing.shut_down(stream_id)
        assert view["state"] == "inactive"
