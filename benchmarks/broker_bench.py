"""Broker benchmark (not a test): Apache Kafka as ``lookout stack up`` runs it, measured in one run.

- ``stack up`` from cold (a new data folder: Postgres database, storage formats, topics made) and
  warm (the same folder after ``stack down``), in seconds;
- the broker's resident memory idle, and under a load like 4 streams (60 KB records at 20/s, three
  consumer groups polling as runner, ML and the state bridge do), with its CPU (% of one core) and
  the fetch latency (produce -> a consumer has it) p50 / p95;
- a consumer at the end of a 100,000-record partition: how soon a new record reaches it;
- with ``--frames-minutes M``: the frames topic under that load for M minutes of real time, its
  bytes on disk sampled every 10 s against its declared bound (``LOOKOUT_KAFKA_FRAMES_RETENTION_BYTES``).

    .venv/bin/python benchmarks/broker_bench.py [--seconds 30] [--frames-minutes 0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.throwaway import throwaway_settings  # noqa: E402
from core.kafka import create_consumer, create_producer, ensure_topics  # noqa: E402
from core.settings import Settings  # noqa: E402
from deploy.local_stack import LocalStack  # noqa: E402

RECORD = os.urandom(60_000)
STREAMS = 4
FPS = 5


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def broker_process(stack: LocalStack) -> psutil.Process:
    pid = stack.recorded_pid("kafka")
    assert pid is not None, "the broker is not running"
    return psutil.Process(pid)


def topic_bytes_on_disk(log_dir: Path, topic: str) -> int:
    return sum(
        f.stat().st_blocks * 512 for d in log_dir.glob(f"{topic}-*") if d.is_dir() for f in d.iterdir()
    )


async def stream_load(settings: Settings, seconds: float, broker: psutil.Process) -> dict[str, float]:
    """Frames of 4 streams at 5 fps on the frames topic for ``seconds``; three groups poll it."""
    topic = settings.topic_frames
    producer = create_producer(settings, idempotent=False)
    await producer.start()
    consumers = [create_consumer(settings, topic, group_id=f"bench-{uuid.uuid4().hex[:8]}") for _ in range(3)]
    await asyncio.gather(*(c.start() for c in consumers))
    keys = [uuid.uuid4().hex.encode() for _ in range(STREAMS)]
    sent_at: dict[bytes, float] = {}
    latencies: list[float] = []
    stop = asyncio.Event()

    async def poll(consumer: AIOKafkaConsumer, measure: bool) -> None:
        while not stop.is_set():
            for records in (await consumer.getmany(timeout_ms=200)).values():
                if measure:
                    now = time.monotonic()
                    latencies.extend(now - sent_at[r.value[:16]] for r in records if r.value[:16] in sent_at)

    pollers = [asyncio.create_task(poll(c, i == 0)) for i, c in enumerate(consumers)]
    await asyncio.sleep(3)  # the groups have joined
    broker.cpu_percent(None)
    started = time.monotonic()
    try:
        while time.monotonic() - started < seconds:
            tick = time.monotonic()
            for key in keys:
                tag = uuid.uuid4().bytes
                sent_at[tag] = time.monotonic()
                await producer.send(topic, tag + RECORD[16:], key=key)
            await asyncio.sleep(max(0.0, 1 / FPS - (time.monotonic() - tick)))
        cpu = broker.cpu_percent(None)
        rss = broker.memory_info().rss
    finally:
        stop.set()
        await asyncio.gather(*pollers, return_exceptions=True)
        await asyncio.gather(*(c.stop() for c in consumers), return_exceptions=True)
        await producer.stop()
    latencies.sort()
    return {
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
        "cpu": cpu,
        "rss_mb": rss / 2**20,
        "records": len(latencies),
    }


async def end_of_long_partition(settings: Settings) -> list[float]:
    """Seconds from a produce's acknowledgement to the consumer at the end of 100,000 records having it."""
    topic = f"bench-long-{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic], partitions=1)
    producer = create_producer(settings)
    await producer.start()
    delays = []
    try:
        await asyncio.gather(*[await producer.send(topic, b"x" * 100, partition=0) for _ in range(100_000)])
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        )
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_end(tp)
            for i in range(50):
                fetch = asyncio.create_task(consumer.getone())
                await asyncio.sleep(0.05)
                sent = time.monotonic()
                await producer.send_and_wait(topic, f"new {i}".encode(), partition=0)
                await fetch
                delays.append(time.monotonic() - sent)
        finally:
            await consumer.stop()
    finally:
        await producer.stop()
    return sorted(delays)


async def frames_retention(settings: Settings, log_dir: Path, minutes: float) -> list[int]:
    """The frames topic's bytes on disk every 10 s while 4 streams' frames arrive for ``minutes``."""
    producer = create_producer(settings, idempotent=False)
    await producer.start()
    keys = [uuid.uuid4().hex.encode() for _ in range(STREAMS)]
    samples = []
    started = next_sample = time.monotonic()
    try:
        while time.monotonic() - started < minutes * 60:
            tick = time.monotonic()
            await asyncio.gather(*[await producer.send(settings.topic_frames, RECORD, key=k) for k in keys])
            if tick >= next_sample:
                samples.append(topic_bytes_on_disk(log_dir, settings.topic_frames))
                next_sample += 10
            await asyncio.sleep(max(0.0, 1 / FPS - (time.monotonic() - tick)))
    finally:
        await producer.stop()
    return samples


def timed(what: str, action: object) -> float:
    started = time.monotonic()
    assert callable(action)
    action()
    took = time.monotonic() - started
    out(f"  {what}: {took:.1f} s")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--frames-minutes", type=float, default=0)
    args = parser.parse_args()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    out(f"Kafka broker benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores of {cpu}")
    with throwaway_settings("broker") as settings:
        stack = LocalStack(settings)
        try:
            out("lookout stack up:")
            timed("cold (new data folder: database, storage formatted, topics made)", stack.up)
            stack.down()
            timed("warm (the same folder after stack down)", stack.up)
            broker = broker_process(stack)
            time.sleep(5)
            out(f"broker RSS idle: {broker.memory_info().rss / 2**20:.0f} MB")
            runtime = stack.runtime_settings(stack.database_url())
            load = asyncio.run(stream_load(runtime, args.seconds, broker))
            out(
                f"under {STREAMS} streams of {FPS} fps (60 KB records, 3 groups) for {args.seconds:g} s: "
                f"broker {load['cpu']:.1f} % of a core, RSS {load['rss_mb']:.0f} MB; fetch latency "
                f"p50 {load['p50_ms']:.1f} ms, p95 {load['p95_ms']:.1f} ms ({load['records']:.0f} records)"
            )
            delays = asyncio.run(end_of_long_partition(runtime))
            out(
                "a consumer at the end of a 100,000-record partition gets a new record after "
                f"p50 {1000 * statistics.median(delays):.1f} ms, max {1000 * delays[-1]:.1f} ms (50 records)"
            )
            if args.frames_minutes > 0:
                log_dir = stack.data_dir / "kafka" / "log"
                samples = asyncio.run(frames_retention(runtime, log_dir, args.frames_minutes))
                bound = runtime.kafka_frames_retention_bytes
                out(
                    f"frames topic under {STREAMS} streams for {args.frames_minutes:g} min: on disk every 10 s "
                    f"(MiB) {[round(s / 2**20) for s in samples]}; max {max(samples) / 2**20:.0f} of the "
                    f"{bound / 2**20:.0f} MiB bound"
                )
        finally:
            stack.down()


if __name__ == "__main__":
    main()
