"""The watchdog of a running stream: what the lifecycle does about heartbeats, errors and silence.

Pure decisions, no Temporal calls: the lifecycle workflow feeds it the stream's heartbeats and
errors with ``workflow.now()`` and carries out what it answers (restart a service, end the stream),
so the rules are deterministic under replay and testable on their own.

- A service whose heartbeat is older than the liveness timeout has lost the stream: it is
  restarted; while it stays silent the waits double (from the timeout, up to the backoff maximum).
  The runner is watched from the stream's start, the others once it runs (``ml_started``).
  Past ``restart_budget`` restarts within ``restart_window_s`` the stream ends, naming the service.
- A process error (a capture or detection process died) restarts that service at once, within the
  same budget; a fatal error (no restart can help) ends the stream.
- The camera unreachable (the runner spent its reconnect budget) is retried with backoff for up to
  ``camera_retry_s`` (0: for ever), without counting against the services' budget; the runner's
  ``runner_started`` of a new capture, or a heartbeat that shows the camera streaming, ends the outage.
- Health events (``core/health_events.py``) are what it has to tell: a camera outage or a failing
  stream once it has lasted ``health_debounce_s`` (and its end, only when its start was told), each
  restart it sends, a service's process that started over by itself. ``take_announcements`` hands
  them to the lifecycle, which stores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from core.health import HealthStatus, ServiceHealth, StreamHealth
from core.health_events import HealthEvent, HealthKind, downtime_s, health_event_id
from core.messages import CameraState, ErrorKind, Service, StateEvent, StreamFigures
from core.states import StreamState
from workflows.models import LifecycleParams

SUPERVISED = (Service.RUNNER, Service.ML)
CAMERA_RETRY_MAX_S = 60.0


@dataclass(frozen=True)
class Restart:
    """Send ``service`` a restart for the stream."""

    service: Service
    reason: str
    camera: bool = False  # a retry of the camera, outside the services' restart budget


@dataclass(frozen=True)
class GiveUp:
    """End the stream in ``inactive_error`` with ``reason``."""

    reason: str


Decision = Restart | GiveUp
# the counts a service's heartbeat carries since its process for the stream started
STARTED_OVER_COUNTS = {Service.RUNNER: "frames_read", Service.ML: "frames_received"}


def _span(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 120 else f"{seconds:g}s"


class StreamSupervisor:
    """Decides, for one running stream, when a service is restarted and when the stream is lost."""

    def __init__(self, params: LifecycleParams, health: StreamHealth) -> None:
        self._params = params
        self.health = health
        self._announcements: list[HealthEvent] = []
        # health events are decided only in runs that tell them (the lifecycle's patch): a run that
        # does not must neither mark an episode told nor start a timer for one
        self.telling = False
        for service in SUPERVISED:
            health.services.setdefault(service, ServiceHealth())

    @property
    def stream_id(self) -> str:
        return self._params.stream_id

    def take_announcements(self) -> list[HealthEvent]:
        """The health events decided since the last call, oldest first."""
        taken, self._announcements = self._announcements, []
        return taken

    def _announce(
        self,
        kind: HealthKind,
        now: datetime,
        *,
        since: datetime | None = None,
        detail: str = "",
        **fields: object,
    ) -> None:
        if not self.telling:
            return
        self._announcements.append(
            HealthEvent.model_validate(
                {
                    "event_id": health_event_id(self.stream_id, kind, since or now, detail),
                    "stream_id": self.stream_id,
                    "kind": kind,
                    "occurred_at": now,
                    "since": since,
                    "downtime_s": downtime_s(kind, since, now),
                    **fields,
                }
            )
        )

    def failed_for_good(self, reason: str, now: datetime) -> None:
        """The stream ended in ``inactive_error``: told at once, whatever the debounce."""
        self._announce(HealthKind.STREAM_FAILED, now, since=self.health.failing_since, detail="final",
                       reason=reason, final=True)  # fmt: skip

    def supervise_from(self, now: datetime) -> None:
        """The stream runs (``ml_started``): liveness counts from now."""
        if self.health.supervised_since is None:
            self.health.supervised_since = now

    def watch_runner_from(self, now: datetime) -> None:
        """The stream is starting: the runner's liveness counts from now, before the stream runs.

        A start command can be lost to a rebalance: the runner that took it hands the stream over
        when its partition moves, and the new owner resumes after the start's committed offset. ML
        needs no such watch during start-up: the stream's first frame starts its process."""
        if self.health.runner_watched_since is None:
            self.health.runner_watched_since = now

    @property
    def supervising(self) -> bool:
        return self.health.supervised_since is not None

    def heartbeat(self, event: StateEvent, now: datetime) -> None:
        """A service's live figures for the stream."""
        health = self.health.services.get(event.service)
        if health is None:
            return
        figures = event.figures or StreamFigures()
        dropped = health.figures is not None and figures.frames_dropped > health.figures.frames_dropped
        self._note_started_over(event.service, health, figures, now)
        health.figures = figures
        health.last_heartbeat_at = now
        health.restarts_unanswered = 0
        if event.service is Service.RUNNER and figures.camera is CameraState.RECONNECTING:
            health.status = HealthStatus.CAMERA_UNREACHABLE
            self._camera_down(now)
            return
        if event.service is Service.RUNNER and figures.camera is CameraState.STREAMING:
            self._camera_back(now)
        if figures.camera is CameraState.CONNECTING:
            # still opening the camera: a fresh stream is starting, a restarted one recovering
            health.status = HealthStatus.STARTING if health.restarts == 0 else HealthStatus.RECOVERING
        elif self.health.camera_unreachable_since is not None and event.service is Service.RUNNER:
            health.status = HealthStatus.CAMERA_UNREACHABLE
        else:
            health.status = HealthStatus.DEGRADED if dropped else HealthStatus.OK
        self._maybe_recovered(now)

    def _note_started_over(
        self, service: Service, health: ServiceHealth, figures: StreamFigures, now: datetime
    ) -> None:
        """A heartbeat whose counts began again, with no restart sent: the service's process for the
        stream started over by itself (the service restarted and resumed it)."""
        name = STARTED_OVER_COUNTS[service]
        before = getattr(health.figures, name, None) if health.figures is not None else None
        after = getattr(figures, name, None)
        reset = before is not None and after is not None and after < before
        if health.counts_reset_expected:
            # a restart was sent: its reset is no news. A late heartbeat of the old process does not
            # end the wait; the reset does, or twice the liveness timeout after the restart.
            waited = health.last_restart_at is not None and (now - health.last_restart_at).total_seconds()
            if reset or (waited and waited > 2 * self._params.liveness_timeout_s):
                health.counts_reset_expected = False
            return
        if not reset:
            return
        reason = f"its process for the stream started over ({name} {before} -> {after})"
        self._announce(HealthKind.SERVICE_RESTARTED, now, detail=f"{service.value}:self",
                       service=service, reason=reason)  # fmt: skip

    def _maybe_recovered(self, now: datetime) -> None:
        """Every service runs the stream again (a heartbeat since its last restart): the failing
        episode is over, told when its start was."""
        since = self.health.failing_since
        if since is None:
            return
        services = [self.health.services[s] for s in SUPERVISED]
        if any(
            h.restarts_unanswered or h.status in (HealthStatus.LOST, HealthStatus.RECOVERING)
            for h in services
        ):
            return
        if self.health.failure_announced:
            self._announce(HealthKind.STREAM_RECOVERED, now, since=since, reason=self.health.failing_reason)
        self.health.failing_since = None
        self.health.failing_reason = None
        self.health.failure_announced = False

    def _camera_down(self, now: datetime) -> None:
        if self.health.camera_down_since is None:
            self.health.camera_down_since = now

    def progress(self, event: StateEvent, now: datetime) -> None:
        """A service's progress event while the stream runs: a runner that has published a frame
        again (``runner_started`` of its new capture) has its camera back, before its next heartbeat."""
        if (
            event.service is Service.RUNNER
            and event.state is StreamState.RUNNER_STARTED
            and (
                self.health.camera_unreachable_since is not None or self.health.camera_down_since is not None
            )
        ):
            self._camera_back(now)
            self.health.services[Service.RUNNER].status = HealthStatus.OK

    def _camera_back(self, now: datetime) -> None:
        self.health.camera_unreachable_since = None
        self.health.camera_retries = 0
        self.health.next_camera_retry_at = None
        self.health.camera_error = None
        since = self.health.camera_down_since
        if since is not None and self.health.camera_offline_announced:
            self._announce(HealthKind.CAMERA_ONLINE, now, since=since)
        self.health.camera_down_since = None
        self.health.camera_offline_announced = False

    def error(self, event: StateEvent, now: datetime) -> Decision | None:
        """A service's error while the stream runs: restart it, retry the camera, or give up."""
        health = self.health.services.get(event.service)
        if health is None:
            return None
        detail = event.error or "no details"
        if event.error_kind is ErrorKind.FATAL:
            health.status = HealthStatus.LOST
            return GiveUp(f"{event.service.value} error: {detail}")
        if event.error_kind is ErrorKind.CAMERA:
            return self._camera_lost(health, detail, now)
        return self._restart_or_give_up(event.service, f"{event.service.value} error: {detail}", now)

    def due(self, now: datetime) -> list[Decision]:
        """What the watchdog must do now: restarts of silent services, a camera retry, or giving up."""
        decisions: list[Decision] = []
        self._announce_due(now)
        give_up_at = self._camera_window_ends_at()
        if give_up_at is not None and now >= give_up_at:
            return [self._camera_given_up(now)]
        camera_retry_at = self.health.next_camera_retry_at
        if camera_retry_at is not None and now >= camera_retry_at:
            self.health.next_camera_retry_at = None
            self.health.camera_retries += 1
            decisions.append(
                Restart(
                    Service.RUNNER, f"camera unreachable: retry {self.health.camera_retries}", camera=True
                )
            )
        for service in SUPERVISED:
            if decisions and service is Service.RUNNER:
                continue  # just retried for the camera: its liveness counts from that restart
            due_at = self._liveness_due_at(service)
            if due_at is None or now < due_at:
                continue
            silent_s = (now - self._last_sign_of_life(service)).total_seconds()
            decision = self._restart_or_give_up(service, f"no heartbeat for {silent_s:.0f}s", now, lost=True)
            decisions.append(decision)
            if isinstance(decision, GiveUp):
                return [decision]
        return decisions

    def _announce_due(self, now: datetime) -> None:
        """A camera outage or a failing stream that has lasted the debounce is told, once."""
        if not self.telling:
            return
        down = self.health.camera_down_since
        if down is not None and not self.health.camera_offline_announced and now >= self._told_at(down):
            self.health.camera_offline_announced = True
            self._announce(HealthKind.CAMERA_OFFLINE, now, since=down, reason=self.health.camera_error)
        failing = self.health.failing_since
        if failing is not None and not self.health.failure_announced and now >= self._told_at(failing):
            self.health.failure_announced = True
            self._announce(HealthKind.STREAM_FAILED, now, since=failing, reason=self.health.failing_reason,
                           final=False)  # fmt: skip

    def _told_at(self, since: datetime) -> datetime:
        return since + timedelta(seconds=self._params.health_debounce_s)

    def restarted(self, restart: Restart, now: datetime) -> None:
        """Record that ``restart`` was sent."""
        health = self.health.services[restart.service]
        health.restarts += 1
        health.last_restart_at = now
        health.last_restart_reason = restart.reason
        health.counts_reset_expected = True
        if restart.camera:
            health.status = HealthStatus.CAMERA_UNREACHABLE
            return
        health.restart_times.append(now)
        health.restarts_unanswered += 1
        health.status = HealthStatus.RECOVERING
        self._announce(HealthKind.SERVICE_RESTARTED, now, detail=restart.service.value,
                       service=restart.service, reason=restart.reason)  # fmt: skip
        if self.health.failing_since is None:
            self.health.failing_since = now
            self.health.failing_reason = f"{restart.service.value}: {restart.reason}"

    def next_check_at(self) -> datetime | None:
        """When ``due`` may next have something to do (None: nothing is pending)."""
        if not self.supervising:
            return self._liveness_due_at(Service.RUNNER)
        times = [t for s in SUPERVISED if (t := self._liveness_due_at(s)) is not None]
        for camera_time in (self.health.next_camera_retry_at, self._camera_window_ends_at()):
            if camera_time is not None:
                times.append(camera_time)
        if (
            self.telling
            and self.health.camera_down_since is not None
            and not self.health.camera_offline_announced
        ):
            times.append(self._told_at(self.health.camera_down_since))
        if self.telling and self.health.failing_since is not None and not self.health.failure_announced:
            times.append(self._told_at(self.health.failing_since))
        return min(times) if times else None

    # --- rules ---------------------------------------------------------------------------------------

    def _camera_lost(self, health: ServiceHealth, detail: str, now: datetime) -> Decision | None:
        health.status = HealthStatus.CAMERA_UNREACHABLE
        self.health.camera_error = detail
        self._camera_down(now)
        if self.health.camera_unreachable_since is None:
            self.health.camera_unreachable_since = now
        give_up_at = self._camera_window_ends_at()
        if give_up_at is not None and now >= give_up_at:
            return self._camera_given_up(now)
        wait_s = min(self._params.liveness_timeout_s / 4 * 2**self.health.camera_retries, CAMERA_RETRY_MAX_S)
        retry_at = now + timedelta(seconds=wait_s)
        self.health.next_camera_retry_at = min(retry_at, give_up_at) if give_up_at else retry_at
        return None

    def _camera_window_ends_at(self) -> datetime | None:
        since = self.health.camera_unreachable_since
        if since is None or not self._params.camera_retry_s:
            return None
        return since + timedelta(seconds=self._params.camera_retry_s)

    def _camera_given_up(self, now: datetime) -> GiveUp:
        since = self.health.camera_unreachable_since
        assert since is not None
        self.health.services[Service.RUNNER].status = HealthStatus.LOST
        return GiveUp(
            f"camera unreachable for {(now - since).total_seconds():.0f}s (retried"
            f" {self.health.camera_retries} times within {_span(self._params.camera_retry_s)}):"
            f" {self.health.camera_error or 'no details'}"
        )

    def _restart_or_give_up(
        self, service: Service, why: str, now: datetime, *, lost: bool = False
    ) -> Decision:
        health = self.health.services[service]
        window_start = now - timedelta(seconds=self._params.restart_window_s)
        health.restart_times = [t for t in health.restart_times if t > window_start]
        if len(health.restart_times) >= self._params.restart_budget:
            health.status = HealthStatus.LOST
            tried = len(health.restart_times)
            window = _span(self._params.restart_window_s)
            return GiveUp(
                f"{service.value} lost the stream: {why}; {tried} restarts in the last {window} did not bring"
                f" it back (last: {health.last_restart_reason or 'none'})"
            )
        if lost:
            health.status = HealthStatus.LOST
        return Restart(service, why)

    def _last_sign_of_life(self, service: Service) -> datetime:
        health = self.health.services[service]
        watched = self.health.runner_watched_since if service is Service.RUNNER else None
        known = [
            t
            for t in (health.last_heartbeat_at, health.last_restart_at, self.health.supervised_since, watched)
            if t
        ]
        return max(known)

    def _liveness_due_at(self, service: Service) -> datetime | None:
        if not self.supervising and not (service is Service.RUNNER and self.health.runner_watched_since):
            return None
        if service is Service.RUNNER and self.health.next_camera_retry_at is not None:
            return None  # the camera retry brings the runner back
        health = self.health.services[service]
        wait_s = min(
            self._params.liveness_timeout_s * 2**health.restarts_unanswered,
            max(self._params.liveness_timeout_s, self._params.restart_backoff_max_s),
        )
        return self._last_sign_of_life(service) + timedelta(seconds=wait_s)
