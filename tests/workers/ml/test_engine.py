"""The shared inference engine (workers/ml/engine.py) under its supervisor (workers/ml/engines.py), on
the real model: several streams' processes on one model, fair turns, kill -9 of the engine and of a
stream's process, a model that does not load, and no shared memory left behind."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from core.inference import Backend
from core.messages import StreamOptions
from core.settings import Settings
from core.timeouts import within
from deploy.camera.clip import ensure_clip
from tests.observing import eventually
from workers.ml.child import load_stream_detector
from workers.ml.detector import DetectionOptions
from workers.ml.engine import (
    EngineClient,
    EngineFigures,
    EngineKey,
    EngineLink,
    Hello,
    Infer,
    Welcome,
    engine_key,
)
from workers.ml.engines import Engines
from workers.ml.models import clip_frames, shipped_images
from workers.ml.preload import detection_context

pytestmark = pytest.mark.integration

SEGMENT = "memfd:lookout-engine-segment"
OPTIONS = DetectionOptions(imgsz=320, confidence=0.25)


@pytest.fixture(scope="module")
def engine_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"ml_imgsz": 320, "ml_backend": Backend.OPENVINO, "ml_engine_idle_s": 60.0}
    )


@pytest.fixture(scope="module")
def frames(engine_settings: Settings) -> list[np.ndarray[Any, Any]]:
    clip = clip_frames(ensure_clip())
    images = clip[::40][:8] or []
    images += [cv2.imread(str(path)) for path in shipped_images()]
    return images


class FatalReports:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str]] = []

    def __call__(self, streams: list[str], reason: str) -> None:
        self.calls.append((streams, reason))


async def running_engine(engines: Engines, key: EngineKey, *streams: str) -> int:
    for stream_id in streams:
        engines.use(stream_id, key)
    await eventually(lambda: engines.ready(key) is not None, 120)
    pid = engines.pid(key)
    assert pid is not None
    return pid


def segments_mapped(pid: int) -> int:
    """The engine's mappings of streams' segments (memfd: never a file in /dev/shm)."""
    with open(f"/proc/{pid}/maps") as maps:
        return sum(SEGMENT in line for line in maps)


def shm_files() -> set[str]:
    return set(os.listdir("/dev/shm"))


def connect(engine_settings: Settings, link: EngineLink, key: EngineKey, stream_id: str) -> EngineClient:
    return EngineClient(link, key, stream_id, start_timeout_s=120, wait_s=engine_settings.ml_engine_wait_s)


def client_loop(link: EngineLink, key: EngineKey, stream_id: str, seconds: float, results: Any) -> None:
    """A stream's process in miniature: detect the bus over and over; report (done, lost, errors)."""
    image = cv2.imread(str(shipped_images()[0]))
    client = EngineClient(link, key, stream_id, start_timeout_s=120, wait_s=30)
    results.put(("connected", stream_id, os.getpid()))
    done = errors = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            found = client.detect(image, OPTIONS)
            done += any(o.class_name == "bus" for o in found)
        except Exception:
            errors += 1
        results.put(("progress", stream_id, done))
    results.put(("end", stream_id, (done, client.lost, errors)))
    client.close()


async def test_one_engine_serves_three_streams_with_the_boxes_each_would_find_with_its_own_model(
    engine_settings: Settings, frames: list[np.ndarray[Any, Any]]
) -> None:
    fatal = FatalReports()
    engines = Engines(engine_settings, fatal)
    key = engine_key(engine_settings, StreamOptions())
    try:
        pid = await running_engine(engines, key, "a", "b", "c")
        assert engines.running() == {key: pid}, "one engine for the three streams of one model"
        clients = [await asyncio.to_thread(connect, engine_settings, engines.link, key, s) for s in "abc"]
        assert segments_mapped(pid) == 3
        own = load_stream_detector(engine_settings, StreamOptions(), 1)

        def boxes(found: list[Any]) -> list[tuple[int, Any]]:
            return [(o.class_id, o.box) for o in found]

        for image in frames:
            alone = boxes(own.detect(image, OPTIONS))
            shared = await asyncio.gather(*(asyncio.to_thread(c.detect, image, OPTIONS) for c in clients))
            assert all(boxes(found) == alone for found in shared)
        assert clients[0].label == own.label == "openvino fp32"
        assert clients[0].note == own.note == "fp32: asked for"  # why this precision
        for client in clients:
            client.close()
        await eventually(lambda: segments_mapped(pid) == 0, 10)
        assert not fatal.calls
    finally:
        await engines.close()


@pytest.mark.parametrize("backend", [Backend.TORCH, Backend.ONNX], ids=str)
async def test_pytorch_and_onnx_runtime_engines_run_the_streams_frames_in_batches(
    engine_settings: Settings, backend: Backend
) -> None:
    own = engine_settings.model_copy(update={"ml_backend": backend, "ml_engine_batch_wait_ms": 50.0})
    engines = Engines(own, FatalReports())
    key = engine_key(own, StreamOptions())
    image = cv2.imread(str(shipped_images()[0]))
    try:
        await running_engine(engines, key, *"abcd")
        clients = [await asyncio.to_thread(connect, own, engines.link, key, s) for s in "abcd"]

        def detect_some(client: EngineClient) -> bool:
            return all(any(o.class_name == "bus" for o in client.detect(image, OPTIONS)) for _ in range(3))

        assert all(await asyncio.gather(*(asyncio.to_thread(detect_some, c) for c in clients)))
        await eventually(lambda: (engines.figures(key) or EngineFigures(0, 0, 0, 0)).requests == 12, 10)
        figures = engines.figures(key)
        assert figures is not None and figures.batches < figures.requests, "frames of streams ran together"
        assert clients[0].label == f"{backend.value} fp32"
        for client in clients:
            client.close()
    finally:
        await engines.close()


async def test_turns_are_fair_when_every_stream_asks_as_fast_as_it_can(engine_settings: Settings) -> None:
    engines = Engines(engine_settings, FatalReports())
    key = engine_key(engine_settings, StreamOptions())
    image = cv2.imread(str(shipped_images()[1]))
    try:
        await running_engine(engines, key, "a", "b", "c")
        clients = [await asyncio.to_thread(connect, engine_settings, engines.link, key, s) for s in "abc"]

        def greedy(client: EngineClient) -> int:
            count, deadline = 0, time.monotonic() + 4.0
            while time.monotonic() < deadline:
                client.detect(image, OPTIONS)
                count += 1
            return count

        counts = await asyncio.gather(*(asyncio.to_thread(greedy, c) for c in clients))
        assert min(counts) > 0 and min(counts) / max(counts) > 0.6, counts
        for client in clients:
            client.close()
    finally:
        await engines.close()


async def test_a_stream_may_have_one_request_in_the_engine_at_a_time(engine_settings: Settings) -> None:
    engines = Engines(engine_settings, FatalReports())
    key = engine_key(engine_settings, StreamOptions())
    try:
        await running_engine(engines, key, "a")

        def two_at_once() -> bool:
            conn = Client(engines.link.address(key), family="AF_UNIX", authkey=engines.link.authkey)
            conn.send(Hello("a"))
            assert isinstance(conn.recv(), Welcome)
            from multiprocessing import reduction

            os.close(reduction.recv_handle(conn))
            conn.send(Infer(1))
            conn.send(Infer(2))
            try:
                while True:
                    conn.recv()
            except EOFError:
                return True  # dropped

        assert await within(asyncio.to_thread(two_at_once), 30)
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # connects, then says nothing
        silent.connect(engines.link.address(key))
        try:
            client = await asyncio.to_thread(connect, engine_settings, engines.link, key, "b")
            found = await asyncio.to_thread(client.detect, cv2.imread(str(shipped_images()[0])), OPTIONS)
            assert any(o.class_name == "bus" for o in found), "a silent peer does not stall the engine"
            client.close()
        finally:
            silent.close()
        with pytest.raises(AuthenticationError):
            wrong = Client(engines.link.address(key), family="AF_UNIX", authkey=b"not the key")
            wrong.recv()
    finally:
        await engines.close()


async def test_kill_9_of_the_engine_restarts_it_and_the_streams_go_on_counting_what_was_lost(
    engine_settings: Settings,
) -> None:
    engines = Engines(engine_settings, FatalReports())
    key = engine_key(engine_settings, StreamOptions())
    context = detection_context()
    results = context.Queue()
    before = shm_files()
    try:
        first = await running_engine(engines, key, "a", "b")
        processes = [
            context.Process(target=client_loop, args=(engines.link, key, s, 14.0, results), daemon=True)
            for s in "ab"
        ]
        for process in processes:
            process.start()
        progress = {"a": 0, "b": 0}

        async def seen(stream_id: str, at_least: int, timeout_s: float) -> None:
            deadline = time.monotonic() + timeout_s
            while progress[stream_id] < at_least:
                assert time.monotonic() < deadline, progress
                kind, sid, value = await asyncio.to_thread(results.get, True, timeout_s)
                if kind == "progress":
                    progress[sid] = value
                elif kind == "end":
                    ends[sid] = value

        ends: dict[str, tuple[int, int, int]] = {}
        await seen("a", 3, 60)
        await seen("b", 3, 60)
        os.kill(first, signal.SIGKILL)
        at_kill = dict(progress)
        await eventually(lambda: engines.pid(key) not in (None, first) and engines.ready(key) is not None, 60)
        second = engines.pid(key)
        await seen("a", at_kill["a"] + 3, 60)
        await seen("b", at_kill["b"] + 3, 60)
        while len(ends) < 2:
            kind, sid, value = await asyncio.to_thread(results.get, True, 60)
            if kind == "end":
                ends[sid] = value
        for done, lost, errors in ends.values():
            assert done > 0
            assert errors == 0, "every frame was answered: the one in flight once the engine was back"
            assert lost == 1, "the request in flight at the kill is counted"
        assert engines.restarts == 1
        for process in processes:
            process.join(10)
        assert second is not None
        await eventually(lambda: segments_mapped(second) == 0, 10)
        assert shm_files() == before
    finally:
        await engines.close()


async def test_kill_9_of_a_streams_process_leaves_the_engine_and_the_other_stream_alone(
    engine_settings: Settings,
) -> None:
    engines = Engines(engine_settings, FatalReports())
    key = engine_key(engine_settings, StreamOptions())
    context = detection_context()
    results = context.Queue()
    try:
        pid = await running_engine(engines, key, "a", "b")
        processes = {
            s: context.Process(target=client_loop, args=(engines.link, key, s, 8.0, results), daemon=True)
            for s in "ab"
        }
        for process in processes.values():
            process.start()
        pids: dict[str, int] = {}
        while len(pids) < 2:
            kind, sid, value = await asyncio.to_thread(results.get, True, 60)
            if kind == "connected":
                pids[sid] = value
        await eventually(lambda: segments_mapped(pid) == 2, 30)
        os.kill(pids["a"], signal.SIGKILL)
        await eventually(lambda: segments_mapped(pid) == 1, 10)  # the dead stream's segment is unmapped
        end = None
        while end is None:
            kind, sid, value = await asyncio.to_thread(results.get, True, 60)
            if kind == "end":
                end = value
        done, lost, errors = end
        assert done > 0 and lost == 0 and errors == 0
        assert engines.pid(key) == pid and engines.restarts == 0
        processes["b"].join(10)
        await eventually(lambda: segments_mapped(pid) == 0, 10)
    finally:
        await engines.close()


async def test_a_model_that_does_not_load_fails_its_streams_once_and_is_not_restarted(
    engine_settings: Settings, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a torch checkpoint")
    own = engine_settings.model_copy(update={"ml_model": str(broken)})
    fatal = FatalReports()
    engines = Engines(own, fatal)
    key = engine_key(own, StreamOptions())
    try:
        engines.use("a", key)
        engines.use("b", key)
        await eventually(lambda: bool(fatal.calls), 60)
        ((streams, reason),) = fatal.calls
        assert sorted(streams) == ["a", "b"] and "broken.pt" in reason and "failed to load" in reason
        assert engines.running() == {} and engines.restarts == 0
    finally:
        await engines.close()


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU here: the engine's CUDA path runs where one is lent"
)
async def test_the_engine_batches_on_a_cuda_gpu(engine_settings: Settings) -> None:
    gpu = engine_settings.model_copy(update={"ml_backend": Backend.TORCH, "ml_device": "cuda:0"})
    engines = Engines(gpu, FatalReports())
    key = engine_key(gpu, StreamOptions())
    image = cv2.imread(str(shipped_images()[0]))
    try:
        await running_engine(engines, key, *"abcd")
        clients = [await asyncio.to_thread(connect, gpu, engines.link, key, s) for s in "abcd"]
        found = await asyncio.gather(*(asyncio.to_thread(c.detect, image, OPTIONS) for c in clients))
        assert all(any(o.class_name == "bus" for o in f) for f in found)
        assert clients[0].label == "torch fp32"
    finally:
        await engines.close()
