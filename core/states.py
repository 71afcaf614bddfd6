"""The public lifecycle states of a stream and the order they never move back in."""

from __future__ import annotations

from enum import StrEnum


class StreamState(StrEnum):
    """Lifecycle states, exactly the public strings of DESIGN.md."""

    INIT_STARTUP = "init_startup"
    IN_STARTUP_PROCESSING = "in_startup_processing"
    RUNNER_STARTED = "runner_started"
    ML_STARTED = "ml_started"
    INIT_SHUTDOWN = "init_shutdown"
    IN_SHUTDOWN_PROCESSING = "in_shutdown_processing"
    INACTIVE = "inactive"
    INACTIVE_ERROR = "inactive_error"

    @property
    def rank(self) -> int:
        """Position in the lifecycle; a stored state only moves to a higher rank."""
        return _ORDER.index(self)

    @property
    def is_terminal(self) -> bool:
        return self in (StreamState.INACTIVE, StreamState.INACTIVE_ERROR)

    @property
    def is_shutting_down(self) -> bool:
        return self.rank >= StreamState.INIT_SHUTDOWN.rank


_ORDER = list(StreamState)


def may_advance(current: StreamState, new: StreamState) -> bool:
    """True when ``new`` is strictly later than ``current`` (terminal states are final)."""
    if current.is_terminal:
        return False
    return new.rank > current.rank
