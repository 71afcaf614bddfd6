"""Postgres: the asyncpg pool factory, database creation and the Alembic migrations."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from alembic import command
from alembic.config import Config
from tenacity import retry_if_exception_type

from core.retry import Stopped, retrying
from core.settings import Settings

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# what Postgres down, restarting or unreachable raises
POSTGRES_DOWN = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


async def _init_connection(conn: asyncpg.Connection) -> None:
    for jtype in ("json", "jsonb"):
        await conn.set_type_codec(jtype, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(settings: Settings) -> asyncpg.Pool:
    """An asyncpg pool whose json/jsonb columns read and write Python objects."""
    pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(),
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        init=_init_connection,
    )
    assert pool is not None
    return pool


async def connect_pool(settings: Settings, stop: asyncio.Event) -> asyncpg.Pool | None:
    """The pool, retried with backoff while Postgres is unreachable; None when ``stop`` is set first."""
    try:
        async for attempt in retrying(
            settings, "postgres connect", stop_event=stop, retry=retry_if_exception_type(POSTGRES_DOWN)
        ):
            with attempt:
                return await create_pool(settings)
    except Stopped:
        return None
    raise AssertionError("unreachable: retrying ends in a return or Stopped")


class PoolWorker(Protocol):
    """A worker over one pool that runs until its stop event is set."""

    async def run(self, stop: asyncio.Event) -> None: ...


async def run_on_pool(
    settings: Settings, stop: asyncio.Event, worker: Callable[[Settings, asyncpg.Pool], PoolWorker]
) -> None:
    """Connect the pool (retried until ``stop``), run ``worker(settings, pool)`` until ``stop``, close it."""
    pool = await connect_pool(settings, stop)
    if pool is None:
        return
    try:
        await worker(settings, pool).run(stop)
    finally:
        await pool.close()


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/") or "postgres"


async def ensure_database(url: str) -> bool:
    """Create the database named in ``url`` when it does not exist; True when it was created."""
    name = database_name(url)
    conn = await asyncpg.connect(_with_database(url, "postgres"))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        await conn.execute(f'CREATE DATABASE "{name}"')
        return True
    finally:
        await conn.close()


def alembic_config(url: str) -> Config:
    """Alembic configuration pointing at ``url`` (psycopg driver), without an ini file."""
    parts = urlsplit(url)
    sa_url = urlunsplit(("postgresql+psycopg", *parts[1:]))
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", sa_url.replace("%", "%%"))
    return config


def migrate(url: str, revision: str = "head") -> None:
    """Apply the schema migrations up to ``revision`` (blocking: run it in a thread from async code)."""
    command.upgrade(alembic_config(url), revision)
