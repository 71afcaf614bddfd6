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

# What a detection process imports before its first frame; ultralytics imports torchvision (and
# with it torch._dynamo, seconds of imports) lazily on the model's first predict.
PRELOADED_MODULES = ["workers.ml.child", "workers.ml.store", "workers.ml.detector", "torchvision"]


def detection_context() -> ForkServerContext:
    """The multiprocessing context of detection processes: forks of the preloading server."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED_MODULES)
    return context


def start_preloading() -> None:
    """Start the fork server now (it imports in the background), not with the first stream."""
    detection_context()
    forkserver.ensure_running()


def _exit_at_once() -> None:
    """The probe process of ``wait_until_preloaded``: nothing to do."""


def wait_until_preloaded(timeout_s: float = 120.0) -> None:
    """Block until the fork server has finished its imports: it forks a process only then."""
    probe = detection_context().Process(target=_exit_at_once, name="lookout-ml-preload-probe", daemon=True)
    probe.start()
    probe.join(timeout_s)
