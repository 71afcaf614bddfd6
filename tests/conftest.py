"""Session-scoped throw-away servers on free ports, so the suite never touches a developer's stack.

Each server starts only when a test asks for it: ``pg_url`` (a fresh migrated database on the
machine's Postgres, or on a private cluster when none answers), ``kafka_bootstrap`` (Apache Kafka
in KRaft mode from the stack's recipe, in a temp folder), ``s3_endpoint`` (SeaweedFS in a temp
folder), ``temporal_address`` (dev server with a temp database). ``settings`` points a
``Settings`` at all four.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from core.db import create_pool
from core.kafka import ensure_topics
from core.sealing import generate_key
from core.settings import Settings
from core.temporal import SEARCH_ATTRIBUTES
from deploy import servers
from deploy.camera.control import TestCamera
from tests.databases import scratch_database
from tests.mqtt_broker import Broker
from tests.ports import free_s3_port

S3_ACCESS_KEY = "lookout-test"
S3_SECRET_KEY = "lookout-test-secret"
TEST_SECRET_KEY = generate_key()  # seals the camera URLs of this test session
ADMIN_PG_URL = os.environ.get("LOOKOUT_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--workflow-environment",
        default="time-skipping",
        help="the workflow tests' Temporal: time-skipping (default), local, or host:port of a server",
    )


@pytest.fixture(scope="session")
def servers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def pg_admin_url(servers_dir: Path) -> Iterator[str]:
    """The machine's Postgres when it answers, else a private cluster for this session."""
    if servers.postgres_ok(ADMIN_PG_URL):
        yield ADMIN_PG_URL
        return
    pg_dir = Path("/tmp") / f"lookout-test-pg-{uuid.uuid4().hex[:8]}"  # runuser postgres must reach it
    spec = servers.postgres_cluster(pg_dir / "pg", servers.free_port())
    proc = spec.start(die_with_parent=True)
    try:
        yield spec.address
    finally:
        servers.stop_process_group(proc.pid)


@pytest.fixture(scope="session")
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database with the migrated schema, dropped at the end of the session."""
    with scratch_database(pg_admin_url, "lookout_test") as url:
        yield url


@pytest.fixture(scope="session")
def s3_endpoint(servers_dir: Path) -> Iterator[str]:
    """A SeaweedFS S3 server in a temp folder; yields ``host:port``."""
    port = free_s3_port()
    proc = servers.s3_server(servers_dir / "s3", port, S3_ACCESS_KEY, S3_SECRET_KEY).start(
        die_with_parent=True
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        servers.stop_process_group(proc.pid)


@pytest.fixture(scope="session")
def kafka_bootstrap(servers_dir: Path) -> Iterator[str]:
    """An Apache Kafka broker (the stack's recipe) in a temp folder; yields its bootstrap address."""
    spec = servers.kafka_broker(
        servers_dir / "kafka", servers.free_port(), controller_port=servers.free_port()
    )
    proc = spec.start(die_with_parent=True)
    try:
        yield spec.address
    finally:
        servers.stop_process_group(proc.pid)


@pytest.fixture(scope="session")
def temporal_address(servers_dir: Path) -> Iterator[str]:
    """A Temporal dev server (headless) with the lifecycle's search attributes registered."""
    spec = servers.temporal_dev_server(servers_dir / "temporal", servers.free_port(), None, SEARCH_ATTRIBUTES)
    proc = spec.start(die_with_parent=True)
    try:
        yield spec.address
    finally:
        servers.stop_process_group(proc.pid)


@pytest.fixture
def private_database(pg_admin_url: str) -> Iterator[str]:
    """A fresh migrated database for one test, so that what it counts is only its own rows."""
    with scratch_database(pg_admin_url, "lookout_private") as url:
        yield url


@pytest.fixture(scope="session")
def camera(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCamera]:
    """The shared test camera looping the demo clip (people walking) on mounts cam1..cam4; tests that
    break a camera start their own."""
    cam = TestCamera(log_dir=tmp_path_factory.mktemp("camera")).start()
    yield cam
    cam.stop()


@pytest.fixture
def own_camera(tmp_path: Path) -> Iterator[TestCamera]:
    """A camera of one test (mount cam1 and the others), to kill, freeze or bring back."""
    cam = TestCamera(log_dir=tmp_path).start()
    yield cam
    cam.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A real Mosquitto of one test (tests/mqtt_broker.py), to kill -9 and start again."""
    running = Broker(tmp_path / "mqtt").start()
    yield running
    running.stop()


def make_settings(**overrides: object) -> Settings:
    """Settings that ignore the developer's ``.env`` and environment defaults for the stack."""
    base: dict[str, object] = {
        "s3_access_key": S3_ACCESS_KEY,
        "s3_secret_key": S3_SECRET_KEY,
        "startup_deadline_s": 20.0,
        "ack_deadline_s": 5.0,
        "secret_key": TEST_SECRET_KEY,
        # the suite's many streams share a database and a few keys: the limits have tests of their own
        "max_active_streams": 100_000,
        "init_rate_per_minute": 100_000,
        # the same model on every CPU: `auto` would pick INT8 on one with VNNI (tests of their own)
        "ml_precision": "fp32",
    }
    return Settings(_env_file=None, **(base | overrides))  # type: ignore[call-arg, arg-type]


@pytest.fixture(scope="session")
async def settings(
    pg_url: str, kafka_bootstrap: str, s3_endpoint: str, temporal_address: str, servers_dir: Path
) -> Settings:
    """Settings pointing at every throw-away server, with Lookout's topics created."""
    result = make_settings(
        database_url=pg_url,
        kafka_bootstrap=kafka_bootstrap,
        s3_endpoint=s3_endpoint,
        temporal_address=temporal_address,
        data_dir=servers_dir / "data",
    )
    await ensure_topics(result)
    return result


@pytest.fixture(scope="session")
async def db_pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(settings)
    yield pool
    await pool.close()
