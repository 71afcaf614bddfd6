"""Fixtures of the metrics tests: the shared test camera and a database of a test's own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deploy import servers
from tests.runner.conftest import camera  # noqa: F401  (the real test camera, for the runner)


@pytest.fixture
def private_database(pg_admin_url: str) -> Iterator[str]:
    """A fresh migrated database for one test, so that what it counts is only its own rows."""
    with servers.scratch_database(pg_admin_url, "lookout_metrics") as url:
        yield url
