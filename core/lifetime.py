"""Processes that must not outlive the one that started them (Linux ``PR_SET_PDEATHSIG``).

The kernel sends the signal when the parent *thread* exits, not only the parent process: a child
must be started from a thread that lives as long as the process (the main thread, or a daemon
thread that never returns) for the signal to mean "the process died".
"""

from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent dies (call it in the child,
    e.g. as ``preexec_fn``, or first thing in a child process's body)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signum)


def terminate_with_parent() -> None:
    """``preexec_fn`` for ``subprocess.Popen``: SIGTERM when the parent dies."""
    die_with_parent(signal.SIGTERM)


PR_SET_NAME = 15


def set_process_name(name: str) -> None:
    """Name this process for ``ps -o comm``, ``top`` and ``pgrep`` (Linux: at most 15 bytes kept)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters
M_ARENA_MAX = -8
PER_STREAM_ARENAS = 2
PER_STREAM_MMAP_THRESHOLD = 512 * 1024


def tune_malloc_for_frames() -> None:
    """glibc's malloc for a per-stream process, which allocates and frees a few MB of frames each
    time: its threads share two arenas (glibc makes one per thread that allocates, up to 8 per
    core: a capture process's decoder threads each kept several MB of their own), and blocks from
    512 KB up are always mapped apart and so given back when freed (glibc raises that threshold
    after the first such free, and the frames then stay in a heap that never shrinks)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mallopt(M_ARENA_MAX, PER_STREAM_ARENAS)
    libc.mallopt(M_MMAP_THRESHOLD, PER_STREAM_MMAP_THRESHOLD)
