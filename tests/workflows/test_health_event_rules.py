"""What the watchdog tells as health events (workflows/supervision.py), without Temporal: debounced
outages and failures, their ends only when their starts were told, restarts, stable ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.health import StreamHealth
from core.health_events import HealthEvent, HealthKind
from core.messages import CameraState, ErrorKind, EventKind, Service, StateEvent, StreamFigures
from workflows.models import LifecycleParams
from workflows.supervision import Restart, StreamSupervisor

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
DEBOUNCE_S = 10.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def heartbeat(service: Service, camera: CameraState | None = None, **counts: int) -> StateEvent:
    figures = StreamFigures(camera=camera, **counts)
    return StateEvent(stream_id="s", service=service, kind=EventKind.HEARTBEAT, figures=figures)


def watchdog() -> StreamSupervisor:
    params = LifecycleParams(
        stream_id="s", startup_deadline_s=60, ack_deadline_s=15, liveness_timeout_s=20,
        health_debounce_s=DEBOUNCE_S,
    )  # fmt: skip
    supervisor = StreamSupervisor(params, StreamHealth())
    supervisor.telling = True
    supervisor.supervise_from(T0)
    supervisor.heartbeat(heartbeat(Service.RUNNER, CameraState.STREAMING, frames_read=10), T0)
    supervisor.heartbeat(heartbeat(Service.ML, frames_received=10), T0)
    return supervisor


def kinds(events: list[HealthEvent]) -> list[HealthKind]:
    return [e.kind for e in events]


def test_a_camera_blip_shorter_than_the_debounce_tells_nothing() -> None:
    w = watchdog()
    w.heartbeat(heartbeat(Service.RUNNER, CameraState.RECONNECTING, frames_read=11), at(1))
    w.due(at(5))
    w.heartbeat(heartbeat(Service.RUNNER, CameraState.STREAMING, frames_read=12), at(6))
    w.due(at(30))
    assert w.take_announcements() == []


def test_a_camera_outage_is_told_once_after_the_debounce_and_its_end_with_the_window() -> None:
    w = watchdog()
    w.heartbeat(heartbeat(Service.RUNNER, CameraState.RECONNECTING, frames_read=11), at(1))
    assert w.next_check_at() == at(1 + DEBOUNCE_S)
    w.due(at(1 + DEBOUNCE_S - 0.1))
    assert w.take_announcements() == []
    w.due(at(1 + DEBOUNCE_S))
    camera_error = StateEvent(
        stream_id="s", service=Service.RUNNER, kind=EventKind.ERROR, error_kind=ErrorKind.CAMERA, error="gone"
    )
    w.error(camera_error, at(25))  # the runner's reconnect budget spent: the same outage
    for second in (30, 40, 50):
        w.heartbeat(heartbeat(Service.ML, frames_received=10), at(second))
        w.heartbeat(heartbeat(Service.RUNNER, CameraState.CONNECTING), at(second))
        for decision in w.due(at(second)):
            assert isinstance(decision, Restart) and decision.camera
            w.restarted(decision, at(second))  # camera retries: no service_restarted
    [offline] = w.take_announcements()
    assert offline.kind is HealthKind.CAMERA_OFFLINE and offline.since == at(1)
    assert offline.occurred_at == at(1 + DEBOUNCE_S)

    w.heartbeat(heartbeat(Service.RUNNER, CameraState.STREAMING, frames_read=1), at(60))
    [online] = w.take_announcements()
    assert online.kind is HealthKind.CAMERA_ONLINE
    assert (online.since, online.occurred_at, online.downtime_s) == (at(1), at(60), 59.0)
    assert online.event_id != offline.event_id
    assert online.event_id.startswith("s:health:camera_online:")

    # the next outage is a new episode with new ids
    w.heartbeat(heartbeat(Service.RUNNER, CameraState.RECONNECTING), at(100))
    w.due(at(100 + DEBOUNCE_S))
    [again] = w.take_announcements()
    assert again.kind is HealthKind.CAMERA_OFFLINE and again.event_id != offline.event_id


def test_a_lost_service_is_restarted_told_failing_after_the_debounce_then_recovered() -> None:
    w = watchdog()
    w.heartbeat(heartbeat(Service.RUNNER, CameraState.STREAMING, frames_read=20), at(19))
    decisions = w.due(at(21))  # ML silent for the liveness timeout
    [restart] = decisions
    assert isinstance(restart, Restart) and restart.service is Service.ML
    w.restarted(restart, at(21))
    [restarted] = w.take_announcements()
    assert restarted.kind is HealthKind.SERVICE_RESTARTED and restarted.service is Service.ML
    assert restarted.reason is not None and "no heartbeat" in restarted.reason

    w.heartbeat(heartbeat(Service.RUNNER, CameraState.STREAMING, frames_read=30), at(25))
    w.due(at(21 + DEBOUNCE_S))
    [failed] = w.take_announcements()
    assert failed.kind is HealthKind.STREAM_FAILED and failed.final is False and failed.since == at(21)

    w.heartbeat(heartbeat(Service.ML, frames_received=1), at(40))  # counts began again: expected
    [recovered] = w.take_announcements()
    assert recovered.kind is HealthKind.STREAM_RECOVERED and recovered.downtime_s == 19.0


def test_a_restart_that_works_within_the_debounce_tells_only_the_restart() -> None:
    w = watchdog()
    error = StateEvent(stream_id="s", service=Service.ML, kind=EventKind.ERROR, error="process died")
    decision = w.error(error, at(2))
    assert isinstance(decision, Restart)
    w.restarted(decision, at(2))
    w.heartbeat(heartbeat(Service.ML, frames_received=1), at(4))
    w.due(at(60))
    assert kinds(w.take_announcements()) == [HealthKind.SERVICE_RESTARTED]
    assert w.health.failing_since is None


def test_counts_that_begin_again_without_a_restart_tell_that_the_service_started_over() -> None:
    w = watchdog()
    w.heartbeat(heartbeat(Service.ML, frames_received=50), at(5))
    w.heartbeat(heartbeat(Service.ML, frames_received=3), at(10))
    [started_over] = w.take_announcements()
    assert started_over.kind is HealthKind.SERVICE_RESTARTED and started_over.service is Service.ML
    assert started_over.reason is not None and "started over" in started_over.reason


def test_the_end_in_error_is_told_at_once_as_final() -> None:
    w = watchdog()
    w.failed_for_good("camera unreachable for 600s", at(3))
    [failed] = w.take_announcements()
    assert failed.kind is HealthKind.STREAM_FAILED and failed.final is True
    assert failed.reason == "camera unreachable for 600s"


def test_a_run_that_does_not_tell_health_events_marks_nothing_told_and_waits_for_nothing() -> None:
    w = watchdog()
    w.telling = False  # a run recorded before health events: its episodes stay untold
    w.heartbeat(heartbeat(Service.RUNNER, CameraState.RECONNECTING, frames_read=11), at(1))
    w.due(at(1 + DEBOUNCE_S))
    assert not w.health.camera_offline_announced and w.take_announcements() == []
    assert w.next_check_at() != at(1 + DEBOUNCE_S)
    w.telling = True  # its next run, continued as new with the patch, tells the outage then
    w.due(at(2 + DEBOUNCE_S))
    assert kinds(w.take_announcements()) == [HealthKind.CAMERA_OFFLINE]


def test_a_late_heartbeat_of_the_old_process_does_not_make_the_new_ones_reset_news() -> None:
    w = watchdog()
    w.heartbeat(heartbeat(Service.ML, frames_received=50), at(5))
    died = StateEvent(stream_id="s", service=Service.ML, kind=EventKind.ERROR, error="died")
    decision = w.error(died, at(6))
    assert isinstance(decision, Restart)
    w.restarted(decision, at(6))
    w.heartbeat(heartbeat(Service.ML, frames_received=51), at(6.5))  # the old process, late
    w.heartbeat(heartbeat(Service.ML, frames_received=2), at(8))  # the new one
    assert kinds(w.take_announcements()) == [HealthKind.SERVICE_RESTARTED]  # the restart, once
