"""Fixtures of the end-to-end tests: the real test camera, shared by the modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deploy.camera.control import TestCamera


@pytest.fixture(scope="session")
def camera(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCamera]:
    """The test camera looping the vtest clip (people walking) on mounts cam1..cam4."""
    cam = TestCamera(log_dir=tmp_path_factory.mktemp("camera")).start()
    yield cam
    cam.stop()
