"""Broker benchmark (not a test): the embedded broker as ``stack up`` runs it, Tansu on SeaweedFS.

Re-measures the workarounds earlier releases needed against the juicefs gateway, on one run:

- fetch latency (produce → a consumer has it) at 50 ms and at 500 ms ``fetch_max_wait_ms``, with a
  stream-like load of 60 KB records at 10 records/s and three consumer groups polling;
- CPU of the broker and of the S3 server during that load (% of one core);
- how fast a new consumer group reads a partition's history (records/s);
- the first produce after a restart of the broker, with no fetch before it (must append).

    .venv/bin/python benchmarks/broker_bench.py [--seconds 20] [--history 2000] [--s3 juicefs]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from core.kafka import create_consumer, create_producer, ensure_topics  # noqa: E402
from core.settings import Settings  # noqa: E402
from deploy import servers  # noqa: E402
from deploy.local_stack import LocalStack  # noqa: E402
from tests.ports import free_s3_port  # noqa: E402

RECORD = os.urandom(60_000)


def cpu_of(pid: int) -> psutil.Process:
    proc = psutil.Process(pid)
    proc.cpu_percent(None)
    return proc


async def fetch_latency(settings: Settings, wait_ms: int, seconds: float) -> dict[str, float]:
    """Produce 10 records/s; three groups poll; the latency of one group, CPU of broker and S3."""
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    tuned = settings.model_copy(update={"kafka_fetch_max_wait_ms": wait_ms})
    await ensure_topics(tuned, [topic], partitions=3)
    producer = create_producer(tuned)
    await producer.start()
    consumers = [create_consumer(tuned, topic, group_id=f"bench-{uuid.uuid4().hex[:8]}") for _ in range(3)]
    await asyncio.gather(*(c.start() for c in consumers))
    sent_at: dict[bytes, float] = {}
    latencies: list[float] = []
    stop = asyncio.Event()

    async def poll(consumer: AIOKafkaConsumer, measure: bool) -> None:
        while not stop.is_set():
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    if measure and record.key in sent_at:
                        latencies.append(time.monotonic() - sent_at[record.key])

    pollers = [asyncio.create_task(poll(c, i == 0)) for i, c in enumerate(consumers)]
    await asyncio.sleep(3)  # joins
    procs = {name: cpu_of(pid) for name, pid in PIDS.items()}
    started = time.monotonic()
    i = 0
    while time.monotonic() - started < seconds:
        key = f"{i}".encode()
        sent_at[key] = time.monotonic()
        await producer.send_and_wait(topic, RECORD, key=key)
        i += 1
        await asyncio.sleep(max(0.0, started + i / 10 - time.monotonic()))
    cpu = {name: proc.cpu_percent(None) for name, proc in procs.items()}
    await asyncio.sleep(1)
    stop.set()
    await asyncio.gather(*pollers)
    await asyncio.gather(*(c.stop() for c in consumers))
    await producer.stop()
    q = statistics.quantiles(latencies, n=20)
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": q[18] * 1000,
        "received": len(latencies),
        "sent": i,
        **{f"cpu_{k}": v for k, v in cpu.items()},
    }


async def history_read(settings: Settings, records: int) -> float:
    """Records/s a new consumer group reads from the start of one partition's history."""
    topic = f"bench-history-{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic], partitions=1)
    producer = create_producer(settings)
    await producer.start()
    small = os.urandom(500)
    await asyncio.gather(*(producer.send(topic, small, partition=0) for _ in range(records)))
    await producer.flush()
    await producer.stop()
    consumer = create_consumer(settings, topic, group_id=f"bench-{uuid.uuid4().hex[:8]}")
    await consumer.start()
    started = time.monotonic()
    got = 0
    while got < records and time.monotonic() - started < 120:
        got += sum(len(r) for r in (await consumer.getmany(timeout_ms=500)).values())
    elapsed = time.monotonic() - started
    await consumer.stop()
    return got / elapsed


async def append_after_restart(stack: LocalStack, settings: Settings) -> tuple[int, int]:
    """(offset before, first offset after) a kill -9 and restart of the broker, nothing fetched between."""
    topic = f"bench-restart-{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic], partitions=1)
    producer = create_producer(settings)
    await producer.start()
    for _ in range(5):
        before = (await producer.send_and_wait(topic, b"x", partition=0)).offset
    await producer.stop()
    pid = stack.recorded_pid("kafka")
    assert pid is not None
    os.kill(pid, 9)
    await asyncio.to_thread(servers.stop_process_group, pid)  # reaps it
    await asyncio.to_thread(stack.start_part, "kafka")
    PIDS["broker"] = stack.recorded_pid("kafka") or 0
    producer = create_producer(settings)
    await producer.start()
    after = (await producer.send_and_wait(topic, b"y", partition=0)).offset
    await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    consumer.assign([TopicPartition(topic, 0)])
    await consumer.getmany(timeout_ms=1000)
    await consumer.stop()
    return before, after


PIDS: dict[str, int] = {}


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--history", type=int, default=2000)
    parser.add_argument("--s3", choices=["seaweedfs", "juicefs"], default="seaweedfs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lookout-broker-bench-") as root:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            data_dir=Path(root),
            stack_s3_port=free_s3_port(),
            stack_kafka_port=servers.free_port(),
        )
        recipe = servers.juicefs_gateway if args.s3 == "juicefs" else servers.s3_server
        stack = LocalStack(settings, s3_recipe=recipe)
        stack.run_dir.mkdir(parents=True)
        try:
            stack.start_part("s3")
            stack.prepare_s3()
            stack.start_part("kafka")
            PIDS.update(broker=stack.recorded_pid("kafka") or 0, s3=stack.recorded_pid("s3") or 0)
            runtime = settings.model_copy(
                update={"kafka_bootstrap": f"127.0.0.1:{settings.stack_kafka_port}"}
            )
            out = sys.stdout.write
            out(f"broker: Tansu on {args.s3}, {os.cpu_count()} cores\n")
            for wait_ms in (50, 500):
                r = await fetch_latency(runtime, wait_ms, args.seconds)
                out(
                    f"fetch_max_wait_ms={wait_ms:<4} latency p50 {r['p50_ms']:6.1f} ms  p95 {r['p95_ms']:6.1f} ms"
                    f"  received {r['received']}/{r['sent']}  CPU broker {r['cpu_broker']:5.1f} %"
                    f"  S3 {r['cpu_s3']:5.1f} %  (60 KB x 10/s, 3 groups)\n"
                )
            rate = await history_read(runtime, args.history)
            out(f"history read by a new group: {rate:,.0f} records/s ({args.history} records)\n")
            before, after = await append_after_restart(stack, runtime)
            verdict = "appends" if after == before + 1 else "REUSES OFFSETS"
            out(
                f"first produce after kill -9 + restart, no fetch first: offset {after} after {before} ({verdict})\n"
            )
        finally:
            stack.down(only=["kafka", "s3"])


if __name__ == "__main__":
    asyncio.run(main())
