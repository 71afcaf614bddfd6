"""``lookout stack``: real servers that come up, report their health, and keep data across restarts."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from core.kafka import create_consumer, create_producer
from core.storage import create_s3_client, ensure_bucket
from core.topics import declared_topics
from deploy import servers
from tests.conftest import make_settings
from tests.ports import free_s3_port

pytestmark = pytest.mark.integration

LOOKOUT = str(Path(sys.executable).parent / "lookout")


@pytest.fixture
def stack_env(tmp_path: Path, pg_admin_url: str) -> Iterator[dict[str, str]]:
    """Environment for a private stack: its own data folder, free ports and a throw-away database."""
    database = f"lookout_stack_{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "LOOKOUT_DATA_DIR": str(tmp_path / "stack"),
        "LOOKOUT_DATABASE_URL": pg_admin_url.rsplit("/", 1)[0] + "/" + database,
        "LOOKOUT_STACK_PG_PORT": str(servers.free_port()),
        "LOOKOUT_STACK_S3_PORT": str(free_s3_port()),
        "LOOKOUT_STACK_KAFKA_PORT": str(servers.free_port()),
        "LOOKOUT_STACK_KAFKA_CONTROLLER_PORT": str(servers.free_port()),
        "LOOKOUT_STACK_TEMPORAL_PORT": str(servers.free_port()),
        "LOOKOUT_STACK_TEMPORAL_UI_PORT": str(servers.free_port()),
    }
    yield env
    subprocess.run([LOOKOUT, "stack", "down"], env=env, capture_output=True, timeout=120)
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def lookout(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LOOKOUT, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=env["LOOKOUT_DATA_DIR"].rsplit("/", 1)[0],
    )


def notes(table: str, note: str) -> list[str]:
    """Names of the parts whose NOTE column in a ``lookout stack`` table is exactly ``note``."""
    # rich pads every cell to its column's width, the last one included
    rows = [line.rstrip() for line in table.splitlines()[1:]]
    return [row.split()[0] for row in rows if row.endswith(f"  {note}")]


def stack_settings(env: dict[str, str]):  # type: ignore[no-untyped-def]
    return make_settings(
        kafka_bootstrap=f"127.0.0.1:{env['LOOKOUT_STACK_KAFKA_PORT']}",
        s3_endpoint=f"127.0.0.1:{env['LOOKOUT_STACK_S3_PORT']}",
        s3_access_key="lookout",
        s3_secret_key="lookout-secret-key",
    )


async def test_stack_up_is_idempotent_reports_health_and_down_stops_only_what_it_started(
    stack_env: dict[str, str],
) -> None:
    first = lookout(stack_env, "stack", "up")
    assert first.returncode == 0, first.stderr
    assert notes(first.stdout, "started") == ["s3", "kafka", "temporal"], (
        first.stdout
    )  # Postgres: the machine's

    again = lookout(stack_env, "stack", "up")
    assert again.returncode == 0, again.stderr
    assert notes(again.stdout, "already running") == ["s3", "kafka", "temporal"], again.stdout

    status = lookout(stack_env, "stack", "status")
    assert status.returncode == 0, status.stdout
    for part in ("postgres", "s3", "kafka", "temporal", "temporal-ui"):
        assert part in status.stdout
    assert "down" not in status.stdout

    env_file = Path(stack_env["LOOKOUT_DATA_DIR"]) / "stack.env"
    assert (
        f"LOOKOUT_KAFKA_BOOTSTRAP=127.0.0.1:{stack_env['LOOKOUT_STACK_KAFKA_PORT']}" in env_file.read_text()
    )
    with psycopg.connect(stack_env["LOOKOUT_DATABASE_URL"]) as conn:
        assert conn.execute("SELECT count(*) FROM streams").fetchone() == (0,)
        # the first admin key, made once, its token only in a file of the owner's
        assert conn.execute("SELECT name, scope FROM api_keys").fetchall() == [("embedded stack", "admin")]
    data_dir = Path(stack_env["LOOKOUT_DATA_DIR"])
    for secret in ("api-key", "secret-key"):
        assert (data_dir / secret).stat().st_mode & 0o777 == 0o600, secret
    assert "made the first admin API key" in first.stdout and "made the first" not in again.stdout
    assert f"LOOKOUT_SECRET_KEY_FILE={data_dir / 'secret-key'}" in env_file.read_text()

    down = lookout(stack_env, "stack", "down")
    assert down.returncode == 0, down.stderr
    assert notes(down.stdout, "stopped") == ["temporal", "kafka", "s3"], down.stdout
    assert not servers.port_open(int(stack_env["LOOKOUT_STACK_KAFKA_PORT"]))
    assert lookout(stack_env, "stack", "status").returncode == 1
    assert servers.postgres_ok(stack_env["LOOKOUT_DATABASE_URL"]), (
        "the machine's Postgres is not ours to stop"
    )


async def _produce(settings, topic: str, value: bytes, key: bytes) -> int:  # type: ignore[no-untyped-def]
    producer = create_producer(settings)
    await producer.start()
    try:
        metadata = await producer.send_and_wait(topic, value, key=key, partition=0)
        return int(metadata.offset)
    finally:
        await producer.stop()


async def test_kafka_message_and_s3_object_survive_stack_down_and_up(stack_env: dict[str, str]) -> None:
    assert lookout(stack_env, "stack", "up").returncode == 0
    settings = stack_settings(stack_env)
    topic = settings.topic_states
    key = uuid.uuid4().hex.encode()
    before = await _produce(settings, topic, b"durable event", key)
    s3 = create_s3_client(settings)
    ensure_bucket(s3, "durability")
    s3.put_object("durability", "proof.txt", io.BytesIO(b"still here"), 10)

    assert lookout(stack_env, "stack", "down").returncode == 0
    assert not servers.port_open(int(stack_env["LOOKOUT_STACK_S3_PORT"]))
    assert lookout(stack_env, "stack", "up").returncode == 0

    assert s3.get_object("durability", "proof.txt").read() == b"still here"
    # the log is on disk: the first produce after a restart appends after what was there
    after = await _produce(settings, topic, b"after restart", key)
    assert after == before + 1
    consumer = create_consumer(settings, topic, group_id=f"durability-{key.decode()}")
    await consumer.start()
    try:
        found: dict[int, bytes] = {}
        async with asyncio.timeout(60):
            while len(found) < 2:
                batch = await consumer.getmany(timeout_ms=1000)
                found |= {r.offset: r.value for records in batch.values() for r in records if r.key == key}
        assert found == {before: b"durable event", after: b"after restart"}
    finally:
        await consumer.stop()


def test_without_a_reachable_postgres_stack_up_runs_a_private_cluster_and_down_stops_it(
    stack_env: dict[str, str],
) -> None:
    # a folder the postgres OS user can reach (pytest's own tmp folders are private to root)
    data_dir = Path(tempfile.mkdtemp(prefix="lookout-stack-", dir="/tmp"))
    data_dir.chmod(0o755)
    env = {
        **stack_env,
        "LOOKOUT_DATA_DIR": str(data_dir / "stack"),
        "LOOKOUT_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{servers.free_port()}/lookout",  # nobody listens
    }
    try:
        up = lookout(env, "stack", "up")
        assert up.returncode == 0, up.stderr
        assert notes(up.stdout, "started") == ["postgres", "s3", "kafka", "temporal"], up.stdout
        private_url = f"postgresql://postgres@127.0.0.1:{env['LOOKOUT_STACK_PG_PORT']}/lookout"
        with psycopg.connect(private_url) as conn:
            assert conn.execute("SELECT count(*) FROM detections").fetchone() == (0,)  # migrated
        assert f"LOOKOUT_DATABASE_URL={private_url}" in (data_dir / "stack" / "stack.env").read_text()
        status = lookout(env, "stack", "status")
        assert status.returncode == 0 and "private cluster" in status.stdout, status.stdout
        down = lookout(env, "stack", "down")
        assert notes(down.stdout, "stopped") == ["temporal", "kafka", "s3", "postgres"], down.stdout
        assert not servers.postgres_ok(private_url)
    finally:
        lookout(env, "stack", "down")
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_stack_up_creates_the_declared_topics_and_sets_back_a_drifted_configuration(
    stack_env: dict[str, str],
) -> None:
    assert lookout(stack_env, "stack", "up").returncode == 0
    settings = stack_settings(stack_env)
    declared = {spec.name: spec for spec in declared_topics(settings)}
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        topics = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(list(declared))}
        assert topics == {name: spec.partitions for name, spec in declared.items()}
        assert topics[settings.topic_commands] == topics[settings.topic_frames], "co-partitioned"
        frames = declared[settings.topic_frames]
        await admin.alter_configs(
            [
                ConfigResource(
                    ConfigResourceType.TOPIC, frames.name, configs={**frames.config, "retention.ms": "1"}
                )
            ]
        )
        again = lookout(stack_env, "stack", "up")
        assert again.returncode == 0, again.stderr
        assert f"reconfigured {frames.name}" in again.stdout, again.stdout

        async def retention_ms() -> str:
            (response,) = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, frames.name, configs={"retention.ms": None})]
            )
            return str(response.resources[0][4][0][1])

        await eventually_async(lambda: retention_ms(), frames.config["retention.ms"], 10)
    finally:
        await admin.close()


async def eventually_async(read, expected: str, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    """Wait until ``await read()`` gives ``expected`` (a topic's configuration reaches every broker's
    metadata a moment after the controller took it)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    value = await read()
    while value != expected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
        value = await read()
    assert value == expected
