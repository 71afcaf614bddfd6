"""Fixtures of the metrics tests: the shared test camera and a database of a test's own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from core.db import migrate
from tests.runner.conftest import camera  # noqa: F401  (the real test camera, for the runner)


@pytest.fixture
def private_database(pg_admin_url: str) -> Iterator[str]:
    """A fresh migrated database for one test, so that what it counts is only its own rows."""
    name = f"lookout_metrics_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = pg_admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
