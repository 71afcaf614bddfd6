"""Detection processes are forked from a server that has already imported torch, torchvision and ultralytics.

A freshly spawned interpreter spends almost all of a stream's start importing them: about 10 s of
a busy 2-core machine, nearly all of ``/init`` → ``ml_started`` (the model itself loads in 0.2 s and
warms up in under a second). The fork server pays for the imports once, when the ML service starts,
and each stream's process is forked from it ready to load the model. The server only imports:
no model, no torch thread pool, no CUDA context is ever made there, so nothing a fork must not
inherit. Each stream still gets its own OS process.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing import forkserver
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess

from core.inference import Backend
from core.settings import Settings
from workers.ml.child import run_model_preparation

# What a detection process imports before its first frame; ultralytics imports torchvision (and
# with it torch._dynamo, seconds of imports) lazily on the model's first predict.
PRELOADED_MODULES = [
    "workers.ml.child",
    "workers.ml.store",
    "workers.ml.detector",
    "workers.ml.engine_process",
    "ultralytics.utils.nms",
    "torchvision",
]
# The runtimes of the exported backends: imported once in the server too, so that their libraries'
# pages are shared by every detection process (no thread pool is made by importing them).
RUNTIME_MODULES = {Backend.OPENVINO: ["openvino"], Backend.ONNX: ["onnxruntime"]}


def preloaded_modules(settings: Settings | None = None) -> list[str]:
    """The fork server's imports: the detection process, and the runtime the settings pick; last,
    the heap they made is frozen (workers/frozen_heap.py)."""
    backend = Backend.AUTO if settings is None else settings.ml_backend
    runtimes = RUNTIME_MODULES.get(Backend.OPENVINO if backend is Backend.AUTO else backend, [])
    return [*PRELOADED_MODULES, *runtimes, "workers.frozen_heap"]


def detection_context(settings: Settings | None = None) -> ForkServerContext:
    """The multiprocessing context of detection processes: forks of the preloading server."""
    context = multiprocessing.get_context("forkserver")
    # only the call before the server starts counts: the service's first, with its settings
    context.set_forkserver_preload(preloaded_modules(settings))
    return context


def start_preloading(settings: Settings | None = None) -> None:
    """Start the fork server now (it imports in the background), not with the first stream."""
    detection_context(settings)
    forkserver.ensure_running()


def prepare_default_model(settings: Settings) -> BaseProcess | None:
    """Export the model of the service's default options now, in a process of its own, so the first
    stream finds it in the cache (workers/ml/models.py); None when PyTorch needs no export.

    Nothing waits for it: a stream that needs the same export meanwhile waits on its lock.
    """
    if settings.ml_backend is Backend.TORCH:
        return None
    process = detection_context().Process(
        target=run_model_preparation, args=(settings,), name="lookout-ml-prepare-model", daemon=True
    )
    process.start()
    return process


def _exit_at_once() -> None:
    """The probe process of ``wait_until_preloaded``: nothing to do."""


def wait_until_preloaded(timeout_s: float = 120.0) -> None:
    """Block until the fork server has finished its imports: it forks a process only then."""
    probe = detection_context().Process(target=_exit_at_once, name="lookout-ml-preload-probe", daemon=True)
    probe.start()
    probe.join(timeout_s)
