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
