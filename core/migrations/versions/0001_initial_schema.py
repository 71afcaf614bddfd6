"""Initial schema: streams, outbox (with NOTIFY), stream_events audit, detections.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE streams (
    id               uuid PRIMARY KEY,
    url_redacted     text        NOT NULL,
    url_full         text        NOT NULL,  -- may hold credentials: never logged nor returned
    options          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    state            text        NOT NULL,
    error_reason     text,
    version          integer     NOT NULL DEFAULT 1,
    idempotency_key  text        UNIQUE,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX streams_created_at ON streams (created_at DESC);

CREATE TABLE outbox (
    id          bigserial   PRIMARY KEY,
    topic       text        NOT NULL,
    key         text        NOT NULL,
    payload     bytea       NOT NULL,
    dedupe_key  text        UNIQUE,  -- lets a retried activity insert the same message once
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz,
    attempts    integer     NOT NULL DEFAULT 0,
    last_error  text
);
CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL;

CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('lookout_outbox', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

CREATE TABLE stream_events (
    id          bigserial   PRIMARY KEY,
    stream_id   uuid        NOT NULL REFERENCES streams (id) ON DELETE CASCADE,
    from_state  text,
    to_state    text        NOT NULL,
    version     integer     NOT NULL,
    reason      text,
    source      text        NOT NULL,
    event_id    text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream_id, version)
);

CREATE TABLE detections (
    id            bigserial   PRIMARY KEY,
    stream_id     uuid        NOT NULL REFERENCES streams (id) ON DELETE CASCADE,
    frame_seq     bigint      NOT NULL,
    capture_time  timestamptz NOT NULL,
    s3_key        text        NOT NULL,
    width         integer     NOT NULL,
    height        integer     NOT NULL,
    objects       jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream_id, frame_seq)
);
CREATE INDEX detections_newest ON detections (stream_id, frame_seq DESC);
"""

DOWNGRADE = """
DROP TABLE detections;
DROP TABLE stream_events;
DROP TRIGGER outbox_notify ON outbox;
DROP FUNCTION outbox_notify();
DROP TABLE outbox;
DROP TABLE streams;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
