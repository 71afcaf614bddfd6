"""``lookout-runner`` serves per-stream frame counts, reported by its capture process, on its metrics port."""

from __future__ import annotations

import uuid

import pytest

from core.kafka import consumer_group, create_producer, ensure_topics
from core.messages import StartCommand, StopCommand, StreamOptions
from core.sealing import UrlSealer
from core.settings import Settings
from deploy import servers
from deploy.camera.control import TestCamera
from tests.service_processes import MetricSamples, running_service, wait_for_metrics
from tests.workers.runner.conftest import runner_settings

pytestmark = pytest.mark.integration


async def send(settings: Settings, command: StartCommand | StopCommand) -> None:
    producer = create_producer(settings, client_id="metrics-test")
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic_commands, command.model_dump_json().encode(), key=command.stream_id.encode()
        )
    finally:
        await producer.stop()


async def test_runner_metrics_count_frames_read_and_published_per_stream_and_forget_a_stopped_stream(
    camera: TestCamera, kafka_bootstrap: str
) -> None:
    port = servers.free_port()
    settings = runner_settings(kafka_bootstrap, metrics_port_runner=port)
    await ensure_topics(settings, [settings.topic_commands, settings.topic_frames, settings.topic_states])
    stream_id = f"s-{uuid.uuid4().hex[:8]}"

    def published(scraped: MetricSamples) -> float:
        return scraped.value("lookout_frames_published_total", stream_id=stream_id) or 0

    async with running_service("lookout-runner", settings) as runner:
        start = StartCommand(
            stream_id=stream_id,
            url_sealed=UrlSealer(settings).seal(camera.url("cam1")),
            options=StreamOptions(fps=5),
        )
        await send(settings, start)
        scraped = await wait_for_metrics(port, lambda m: published(m) >= 3, service=runner)

        # the heartbeats' figures too: the stream's rate and the age of its newest frame
        beat = await wait_for_metrics(
            port,
            lambda m: (m.value("lookout_stream_fps", service="runner", stream_id=stream_id) or 0) > 0,
            service=runner,
        )
        assert (
            beat.value("lookout_newest_frame_age_seconds", service="runner", stream_id=stream_id) or 99
        ) < 5
        read = scraped.value("lookout_frames_read_total", stream_id=stream_id)
        # the camera sends 25 fps and the stream asks for 5: more frames are read than published
        assert read is not None and read > published(scraped)
        assert (
            scraped.value(
                "lookout_consumer_lag",
                group=consumer_group(settings, "runner"),
                topic=settings.topic_commands,
            )
            == 0
        )

        await send(settings, StopCommand(stream_id=stream_id))
        await wait_for_metrics(port, lambda m: not m.has_label("stream_id", stream_id), service=runner)

        assert await runner.terminate() == 0
    records = runner.records()
    assert any(r["event"] == "metrics served" and r["port"] == port for r in records)
    capture_lines = [r for r in records if r["logger"].startswith("workers.runner.capture")]
    assert capture_lines and all(r["stream_id"] == stream_id for r in capture_lines)
