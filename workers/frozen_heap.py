"""Imported last by a fork server's preload list (workers/ml/preload.py, workers/runner/stream.py):
``gc.freeze()`` moves every object the preloaded imports made into the collector's permanent
generation, so that no collection in a forked child walks them. A walk writes each object's
header, and with it copies the page it sits on: without the freeze every per-stream process
would end up with a private copy of most of the preloaded heap (tens of MB each)."""

import gc

gc.collect()
gc.freeze()
