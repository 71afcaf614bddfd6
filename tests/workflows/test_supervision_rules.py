"""The watchdog's rules on their own (workflows/supervision.py), without Temporal: what a stream's
health says from its first moment to a restart and back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.health import HealthStatus, StreamHealth
from core.messages import CameraState, ErrorKind, EventKind, Service, StateEvent, StreamFigures
from core.states import StreamState
from workflows.models import LifecycleParams
from workflows.supervision import Restart, StreamSupervisor

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def heartbeat(service: Service, camera: CameraState | None = None) -> StateEvent:
    figures = StreamFigures(camera=camera) if camera is not None else StreamFigures()
    return StateEvent(
        stream_id="s", service=service, kind=EventKind.HEARTBEAT, figures=figures, event_id="e", time=T0
    )


def supervisor() -> StreamSupervisor:
    params = LifecycleParams(stream_id="s", startup_deadline_s=60, ack_deadline_s=15, liveness_timeout_s=20)
    watchdog = StreamSupervisor(params, StreamHealth())
    watchdog.supervise_from(T0)
    return watchdog


def test_a_fresh_stream_is_starting_until_its_services_report_then_ok() -> None:
    watchdog = supervisor()
    assert {s.status for s in watchdog.health.services.values()} == {HealthStatus.STARTING}
    watchdog.heartbeat(heartbeat(Service.RUNNER, CameraState.CONNECTING), T0)
    assert watchdog.health.services[Service.RUNNER].status is HealthStatus.STARTING
    watchdog.heartbeat(heartbeat(Service.RUNNER, CameraState.STREAMING), T0)
    watchdog.heartbeat(heartbeat(Service.ML), T0)
    assert {s.status for s in watchdog.health.services.values()} == {HealthStatus.OK}


def test_a_restarted_service_is_recovering_until_it_runs_again() -> None:
    watchdog = supervisor()
    silent = T0 + timedelta(seconds=21)
    decisions = watchdog.due(silent)
    assert Restart(Service.RUNNER, "no heartbeat for 21s") in decisions
    for decision in decisions:
        assert isinstance(decision, Restart)
        watchdog.restarted(decision, silent)
    assert watchdog.health.services[Service.RUNNER].status is HealthStatus.RECOVERING
    watchdog.heartbeat(heartbeat(Service.RUNNER, CameraState.CONNECTING), silent)
    assert watchdog.health.services[Service.RUNNER].status is HealthStatus.RECOVERING
    watchdog.heartbeat(heartbeat(Service.RUNNER, CameraState.STREAMING), silent)
    assert watchdog.health.services[Service.RUNNER].status is HealthStatus.OK


def test_a_runner_that_publishes_again_has_its_camera_back_before_its_next_heartbeat() -> None:
    watchdog = supervisor()
    lost = StateEvent(
        stream_id="s", service=Service.RUNNER, kind=EventKind.ERROR, error="camera gone",
        error_kind=ErrorKind.CAMERA, event_id="e1", time=T0,
    )  # fmt: skip
    watchdog.error(lost, T0 + timedelta(seconds=1))
    assert watchdog.health.camera_unreachable_since is not None
    started = StateEvent(
        stream_id="s", service=Service.RUNNER, kind=EventKind.PROGRESS, state=StreamState.RUNNER_STARTED,
        event_id="e2", time=T0,
    )  # fmt: skip
    watchdog.progress(started, T0 + timedelta(seconds=2))
    assert watchdog.health.camera_unreachable_since is None
    assert watchdog.health.next_camera_retry_at is None
    assert watchdog.health.services[Service.RUNNER].status is HealthStatus.OK


def test_a_start_lost_before_the_stream_runs_is_sent_again_to_the_runner_only() -> None:
    """A rebalance can move a stream's partition right after a runner took its start: the runner
    that took it hands it over, the new owner never sees the start. The runner is watched from the
    stream's start; ML starts from the first frame and is watched once the stream runs."""
    params = LifecycleParams(stream_id="s", startup_deadline_s=90, ack_deadline_s=15, liveness_timeout_s=20)
    watchdog = StreamSupervisor(params, StreamHealth())
    watchdog.watch_runner_from(T0)
    assert watchdog.next_check_at() == T0 + timedelta(seconds=20)
    assert watchdog.due(T0 + timedelta(seconds=19)) == []
    assert watchdog.due(T0 + timedelta(seconds=20)) == [Restart(Service.RUNNER, "no heartbeat for 20s")]
    # a runner that beats is left alone
    fresh = StreamSupervisor(params, StreamHealth())
    fresh.watch_runner_from(T0)
    fresh.heartbeat(heartbeat(Service.RUNNER, CameraState.CONNECTING), T0 + timedelta(seconds=5))
    assert fresh.due(T0 + timedelta(seconds=20)) == []
