"""MQTT sink benchmark (not a test): what ``lookout-mqtt`` costs and how late events reach a client.

Runs a real Postgres (the machine's, else a private cluster), Debian's Mosquitto and the
``lookout-mqtt`` console script in a temp folder, with a real MQTT client subscribed. It measures
the sink's CPU while idle (it polls Postgres every ``LOOKOUT_MQTT_POLL_S``), then stores ``--events``
health events at ``--rate`` per second through ``store_health_event`` (as the lifecycle does) and
prints, from each event's commit to its arrival at the client: p50, p95 and max, and the sink's CPU
per thousand events.

    .venv/bin/python benchmarks/mqtt_bench.py [--events 1000] [--rate 50] [--streams 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from core.db import create_pool  # noqa: E402
from core.health_events import HealthEvent, HealthKind, health_event_id, store_health_event  # noqa: E402
from core.settings import Settings  # noqa: E402
from deploy import servers  # noqa: E402
from tests.conftest import ADMIN_PG_URL, make_settings  # noqa: E402
from tests.databases import scratch_database  # noqa: E402
from tests.mqtt_broker import PASSWORD, USER, Broker, sink_process, subscribed  # noqa: E402


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


async def measure(settings: Settings, broker: Broker, args: argparse.Namespace, folder: Path) -> None:
    pool = await create_pool(settings)
    streams = [str(uuid.uuid4()) for _ in range(args.streams)]
    for stream_id in streams:
        await pool.execute(
            "INSERT INTO streams (id, url_redacted, url_full, state) VALUES ($1, 'rtsp://h/x', 'x', 'ml_started')",
            uuid.UUID(stream_id),
        )
    sink = sink_process(settings, folder / "mqtt.log")
    committed: dict[str, float] = {}
    try:
        async with subscribed(broker.port, "lookout/+/events") as client:
            process = psutil.Process(sink.pid)
            await asyncio.sleep(5)  # connected, discovery and retained state published
            before = cpu_s(process)
            await asyncio.sleep(args.idle)
            idle = (cpu_s(process) - before) / args.idle * 100
            out(
                f"idle: {idle:.2f} % of a core ({args.streams} running streams, polling every {settings.mqtt_poll_s} s)"
            )

            before, started = cpu_s(process), time.monotonic()
            for i in range(args.events):
                stream_id = streams[i % len(streams)]
                at = datetime.now(UTC)
                event = HealthEvent(
                    event_id=health_event_id(stream_id, HealthKind.SERVICE_RESTARTED, at, str(i)),
                    stream_id=stream_id, kind=HealthKind.SERVICE_RESTARTED, occurred_at=at, reason="bench",
                )  # fmt: skip
                await store_health_event(pool, settings, event)
                committed[event.event_id] = time.monotonic()
                await asyncio.sleep(max(0.0, started + (i + 1) / args.rate - time.monotonic()))
            deadline = time.monotonic() + 60
            while len({json.loads(m.payload)["event_id"] for m in client.messages}) < args.events:
                if time.monotonic() > deadline:
                    raise RuntimeError("not every event arrived within 60 s")
                await asyncio.sleep(0.05)
            busy = cpu_s(process) - before
        arrived: dict[str, float] = {}
        for message in client.messages:
            arrived.setdefault(json.loads(message.payload)["event_id"], message.at)
        late_ms = sorted((arrived[e] - committed[e]) * 1000 for e in committed)
        p95 = late_ms[int(len(late_ms) * 0.95) - 1]
        out(
            f"{args.events} events at {args.rate}/s: commit to client p50 {statistics.median(late_ms):.0f} ms,"
            f" p95 {p95:.0f} ms, max {late_ms[-1]:.0f} ms; sink CPU {busy / args.events * 1000:.2f} s per"
            f" 1,000 events ({busy / (time.monotonic() - started) * 100:.1f} % of a core while sending)"
        )
    finally:
        sink.terminate()
        sink.wait(30)
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds the idle CPU is measured over")
    args = parser.parse_args()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")  # fmt: skip
    out(f"CPU: {model}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="lookout-mqtt-bench-") as root:
        folder = Path(root)
        admin = ADMIN_PG_URL
        cluster = None
        if not servers.postgres_ok(admin):
            folder.chmod(0o755)
            spec = servers.postgres_cluster(folder / "pg", servers.free_port())
            cluster = spec.start(die_with_parent=True)
            admin = spec.address
        broker = Broker(folder / "mqtt").start()
        try:
            with scratch_database(admin, "lookout_mqtt_bench") as url:
                settings = make_settings(
                    database_url=url, mqtt_enabled=True, mqtt_port=broker.port, mqtt_username=USER,
                    mqtt_password=PASSWORD, metrics_port_mqtt=0, data_dir=folder / "data",
                )  # fmt: skip
                asyncio.run(measure(settings, broker, args, folder))
        finally:
            broker.stop()
            if cluster is not None:
                servers.stop_process_group(cluster.pid)


if __name__ == "__main__":
    main()
