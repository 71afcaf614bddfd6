"""Analytics: events from zones and lines, each zone's occupancy and each line's counts, webhooks.

``events`` rows are written by a stream's detection process in the same transaction as the
detection row of the frame that shows them (and their outbox messages); ``event_id`` is derived
from the frame, so a redelivered frame stores nothing twice. ``stream_analytics`` holds per zone
its occupancy now and per line its counts in each direction. ``webhook_deliveries`` is the durable
queue of the webhook worker: one row per event of a stream with a ``webhook_url``, retried with
backoff until delivered or ``dead`` (the dead-letter record). ``streams.webhook_secret`` is the
stream's signing secret, sealed like the camera URL.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE events (
    id           bigserial   PRIMARY KEY,
    event_id     text        NOT NULL UNIQUE,
    stream_id    uuid        NOT NULL REFERENCES streams (id) ON DELETE CASCADE,
    frame_seq    bigint      NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('entered', 'left', 'dwell', 'crossed')),
    zone         text        NOT NULL,
    direction    text        CHECK (direction IN ('in', 'out')),
    track_id     integer     NOT NULL,
    class_name   text        NOT NULL,
    confidence   real        NOT NULL,
    dwell_s      real,
    occurred_at  timestamptz NOT NULL,
    s3_key       text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_stream ON events (stream_id, id);
CREATE INDEX events_kind ON events (kind, id);

CREATE TABLE stream_analytics (
    stream_id   uuid        NOT NULL REFERENCES streams (id) ON DELETE CASCADE,
    name        text        NOT NULL,
    shape       text        NOT NULL CHECK (shape IN ('zone', 'line')),
    occupancy   integer     NOT NULL DEFAULT 0,
    count_in    bigint      NOT NULL DEFAULT 0,  -- zones: entered; lines: crossed 'in'
    count_out   bigint      NOT NULL DEFAULT 0,  -- zones: left; lines: crossed 'out'
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, name)
);

CREATE TABLE webhook_deliveries (
    id               bigserial   PRIMARY KEY,
    event_pk         bigint      NOT NULL UNIQUE REFERENCES events (id) ON DELETE CASCADE,
    stream_id        uuid        NOT NULL REFERENCES streams (id) ON DELETE CASCADE,
    status           text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    delivered_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';

ALTER TABLE streams ADD COLUMN webhook_secret text;
"""

DOWNGRADE = """
ALTER TABLE streams DROP COLUMN webhook_secret;
DROP TABLE webhook_deliveries;
DROP TABLE stream_analytics;
DROP TABLE events;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
