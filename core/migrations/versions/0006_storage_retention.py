"""Storage that stays within its budget: detections partitioned by capture time (the storage janitor
drops whole partitions when everything in them is due, and creates them ahead), each frame's bytes,
a journal of frames whose rows are gone and whose S3 objects are being deleted (so a crash between
the two leaves nothing a later pass does not finish), per-stream storage counters, pinned events,
events that say their frame expired, and streams marked for deletion.

The rows stored so far become the default partition: nothing is copied.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE detections DROP CONSTRAINT detections_pkey;
ALTER TABLE detections DROP CONSTRAINT detections_stream_id_frame_seq_key;
ALTER TABLE detections DROP CONSTRAINT detections_stream_id_fkey;
DROP INDEX detections_newest;
ALTER TABLE detections RENAME TO detections_default;
ALTER TABLE detections_default ADD COLUMN bytes integer NOT NULL DEFAULT 0;

CREATE TABLE detections (
    id            bigint      NOT NULL DEFAULT nextval('detections_id_seq'),
    stream_id     uuid        NOT NULL REFERENCES streams (id) ON DELETE CASCADE,
    frame_seq     bigint      NOT NULL,
    capture_time  timestamptz NOT NULL,
    s3_key        text        NOT NULL,
    width         integer     NOT NULL,
    height        integer     NOT NULL,
    objects       jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    bytes         integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (id, capture_time),
    UNIQUE (stream_id, frame_seq, capture_time)
) PARTITION BY RANGE (capture_time);
CREATE INDEX detections_newest ON detections (stream_id, frame_seq DESC);
CREATE INDEX detections_stream_oldest ON detections (stream_id, capture_time);
CREATE INDEX detections_oldest ON detections (capture_time);
ALTER SEQUENCE detections_id_seq OWNED BY detections.id;
ALTER TABLE detections ATTACH PARTITION detections_default DEFAULT;

-- the range partitions the janitor made, [lower, upper)
CREATE TABLE detection_partitions (
    name   text        PRIMARY KEY,
    lower  timestamptz NOT NULL UNIQUE,
    upper  timestamptz NOT NULL
);

-- frames whose rows are deleted and whose S3 objects are not yet: the janitor deletes the objects,
-- then these rows (a row here is never an orphan: it names the object still to delete)
CREATE TABLE frame_deletions (
    id         bigserial   PRIMARY KEY,
    stream_id  uuid        NOT NULL,
    frame_seq  bigint      NOT NULL,
    s3_key     text        NOT NULL,
    bytes      integer     NOT NULL,
    reason     text        NOT NULL CHECK (reason IN ('age', 'stream_bytes', 'budget', 'stream_deleted')),
    queued_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE stream_storage (
    stream_id            uuid        PRIMARY KEY REFERENCES streams (id) ON DELETE CASCADE,
    bytes                bigint      NOT NULL DEFAULT 0,  -- the frames kept now
    frames               bigint      NOT NULL DEFAULT 0,
    stored_bytes         bigint      NOT NULL DEFAULT 0,  -- ever stored: the rate is its growth
    stored_frames        bigint      NOT NULL DEFAULT 0,
    deleted_bytes        bigint      NOT NULL DEFAULT 0,
    deleted_frames       bigint      NOT NULL DEFAULT 0,
    deleted_events       bigint      NOT NULL DEFAULT 0,
    deleted_through_seq  bigint,                          -- the newest frame retention deleted
    last_deletion_reason text,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
INSERT INTO stream_storage (stream_id, bytes, frames)
SELECT stream_id, sum(bytes), count(*) FROM detections GROUP BY stream_id;

-- the whole store's size and what was ever stored, sampled by the janitor (the forecast's rate)
CREATE TABLE storage_samples (
    at            timestamptz PRIMARY KEY DEFAULT now(),
    bytes         bigint      NOT NULL,
    stored_bytes  bigint      NOT NULL
);

ALTER TABLE events ADD COLUMN pinned_at timestamptz;
ALTER TABLE events ADD COLUMN frame_deleted_at timestamptz;
CREATE INDEX events_pinned ON events (stream_id, frame_seq) WHERE pinned_at IS NOT NULL;
CREATE INDEX events_stream_occurred ON events (stream_id, occurred_at);
CREATE INDEX events_frame ON events (stream_id, frame_seq);

ALTER TABLE streams ADD COLUMN delete_requested_at timestamptz;
"""

DOWNGRADE = """
ALTER TABLE streams DROP COLUMN delete_requested_at;
DROP INDEX events_frame;
DROP INDEX events_stream_occurred;
DROP INDEX events_pinned;
ALTER TABLE events DROP COLUMN frame_deleted_at;
ALTER TABLE events DROP COLUMN pinned_at;
DROP TABLE storage_samples;
DROP TABLE stream_storage;
DROP TABLE frame_deletions;
DROP TABLE detection_partitions;

CREATE TABLE detections_flat (
    id            bigint      PRIMARY KEY DEFAULT nextval('detections_id_seq'),
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
INSERT INTO detections_flat (id, stream_id, frame_seq, capture_time, s3_key, width, height, objects, created_at)
SELECT id, stream_id, frame_seq, capture_time, s3_key, width, height, objects, created_at FROM detections
ON CONFLICT DO NOTHING;
ALTER SEQUENCE detections_id_seq OWNED BY detections_flat.id;
DROP TABLE detections;
ALTER TABLE detections_flat RENAME TO detections;
ALTER TABLE detections RENAME CONSTRAINT detections_flat_pkey TO detections_pkey;
ALTER TABLE detections RENAME CONSTRAINT detections_flat_stream_id_frame_seq_key TO detections_stream_id_frame_seq_key;
ALTER TABLE detections RENAME CONSTRAINT detections_flat_stream_id_fkey TO detections_stream_id_fkey;
CREATE INDEX detections_newest ON detections (stream_id, frame_seq DESC);
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
