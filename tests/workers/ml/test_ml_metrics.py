"""``lookout-ml`` serves per-stream detection metrics, reported by its detection process, on its metrics port."""

from __future__ import annotations

import asyncpg
import pytest

from core.kafka import consumer_group
from core.messages import StopCommand, StreamOptions
from core.settings import Settings
from deploy import servers
from tests.service_processes import MetricSamples, running_service, wait_for_metrics
from tests.workers.ml.conftest import create_topics, frame_sender, insert_stream, jpeg_of, topics_of_their_own

pytestmark = pytest.mark.integration

BURST = 20  # frames sent at once to a queue of one: all but a few are dropped


async def test_ml_metrics_count_processed_dropped_and_stored_frames_with_their_timings_per_stream(
    settings: Settings, db_pool: asyncpg.Pool
) -> None:
    bus_jpeg = jpeg_of("bus.jpg")
    port = servers.free_port()
    ml_settings = topics_of_their_own(settings).model_copy(
        update={"ml_queue_size": 1, "ml_imgsz": 320, "metrics_port_ml": port}
    )
    await create_topics(ml_settings)
    stream_id = await insert_stream(db_pool, StreamOptions(imgsz=320))

    def of_stream(scraped: MetricSamples, name: str, **labels: str) -> float:
        return scraped.value(name, stream_id=stream_id, **labels) or 0

    def every_frame_settled(scraped: MetricSamples) -> bool:
        processed = of_stream(scraped, "lookout_frames_processed_total")
        dropped = of_stream(scraped, "lookout_frames_dropped_total", service="ml")
        return processed >= 1 and processed + dropped == BURST

    async with running_service("lookout-ml", ml_settings) as ml, frame_sender(ml_settings) as sender:
        # the first frame starts the stream's process, which loads the model while the rest arrive
        for seq in range(1, BURST + 1):
            await sender.frame(stream_id, seq, bus_jpeg)
        scraped = await wait_for_metrics(port, every_frame_settled, service=ml, timeout_s=60)

        processed = of_stream(scraped, "lookout_frames_processed_total")
        assert of_stream(scraped, "lookout_frames_dropped_total", service="ml") >= 1
        assert of_stream(scraped, "lookout_inference_seconds_count") == processed
        assert of_stream(scraped, "lookout_inference_seconds_sum") > 0
        # bus.jpg shows people and a bus: every processed frame is stored, and its latency measured
        assert of_stream(scraped, "lookout_detections_stored_total") == processed
        assert of_stream(scraped, "lookout_capture_to_row_seconds_count") == processed
        assert of_stream(scraped, "lookout_capture_to_row_seconds_sum") > 0
        lag = scraped.value(
            "lookout_consumer_lag", group=consumer_group(ml_settings, "ml"), topic=ml_settings.topic_frames
        )
        assert lag == 0  # ML hands every fetched frame to its queue at once
        engine = "yolov10n.pt auto fp32 320"  # the shared engine of the stream's model (key.name)
        scraped = await wait_for_metrics(
            port,
            lambda m: (m.value("lookout_engine_inferences_total", engine=engine) or 0) >= processed,
            service=ml,
        )
        assert scraped.value("lookout_engine_streams", engine=engine) == 1
        assert (scraped.value("lookout_engine_batches_total", engine=engine) or 0) >= 1
        assert (scraped.value("lookout_engine_restarts_total", engine=engine) or 0) == 0

        await sender.command(stream_id, StopCommand(stream_id=stream_id).model_dump_json())
        await wait_for_metrics(port, lambda m: not m.has_label("stream_id", stream_id), service=ml)

        assert await ml.terminate() == 0
    # the detection process serves one stream: each of its lines names it; the engine serves every
    # stream of its model, and names the stream only where one connects
    ready = [r for r in ml.records() if r["event"] == "detection process ready" and r["service"] == "ml"]
    assert ready and all(r["stream_id"] == stream_id for r in ready)
    connected = [r for r in ml.records() if r["service"] == "ml-engine" and r["event"] == "stream connected"]
    assert [r["stream_id"] for r in connected] == [stream_id]
    assert any(r["event"] == "inference engine ready" and r.get("stream_id") is None for r in ml.records())
