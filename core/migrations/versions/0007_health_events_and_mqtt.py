"""Health events beside zone events, and the MQTT sink's queue.

``events`` also holds a stream's health events (``camera_offline``, ``camera_online``,
``service_restarted``, ``stream_failed``, ``stream_recovered``): they show no frame and no object, so
those columns may be empty for them, and they carry ``service``, ``reason``, ``since`` (when the
episode began) and ``final`` (a failure that ended the stream). ``mqtt_deliveries`` is the queue of
``lookout-mqtt``: one row per event, inserted in the event's transaction while MQTT is enabled, kept
after publishing (``published_at``) for a while so a broker that lost them can be given them again.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ZONE_KINDS = "'entered', 'left', 'dwell', 'crossed'"
HEALTH_KINDS = "'camera_offline', 'camera_online', 'service_restarted', 'stream_failed', 'stream_recovered'"

UPGRADE = f"""
ALTER TABLE events DROP CONSTRAINT events_kind_check;
ALTER TABLE events ADD CONSTRAINT events_kind_check CHECK (kind IN ({ZONE_KINDS}, {HEALTH_KINDS}));
ALTER TABLE events ALTER COLUMN frame_seq DROP NOT NULL,
                   ALTER COLUMN zone DROP NOT NULL,
                   ALTER COLUMN track_id DROP NOT NULL,
                   ALTER COLUMN class_name DROP NOT NULL,
                   ALTER COLUMN confidence DROP NOT NULL,
                   ALTER COLUMN s3_key DROP NOT NULL;
ALTER TABLE events ADD COLUMN service text,
                   ADD COLUMN reason text,
                   ADD COLUMN since timestamptz,
                   ADD COLUMN final boolean;
ALTER TABLE events ADD CONSTRAINT events_shape CHECK (
    kind IN ({HEALTH_KINDS})
    OR (frame_seq IS NOT NULL AND zone IS NOT NULL AND track_id IS NOT NULL AND class_name IS NOT NULL
        AND confidence IS NOT NULL AND s3_key IS NOT NULL)
);

-- a stream's newest event of some kinds (lookout-mqtt's availability: its camera and failure events)
CREATE INDEX events_stream_kind ON events (stream_id, kind, id);

CREATE TABLE mqtt_deliveries (
    id            bigserial   PRIMARY KEY,
    event_pk      bigint      NOT NULL UNIQUE REFERENCES events (id) ON DELETE CASCADE,
    published_at  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX mqtt_deliveries_due ON mqtt_deliveries (id) WHERE published_at IS NULL;
CREATE INDEX mqtt_deliveries_published ON mqtt_deliveries (published_at) WHERE published_at IS NOT NULL;
-- lookout-mqtt wakes on it (LISTEN lookout_mqtt) instead of waiting for its next poll
CREATE FUNCTION mqtt_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('lookout_mqtt', '');
    RETURN NULL;
END $$;
CREATE TRIGGER mqtt_notify AFTER INSERT ON mqtt_deliveries FOR EACH STATEMENT EXECUTE FUNCTION mqtt_notify();
"""

DOWNGRADE = f"""
DROP TABLE mqtt_deliveries;
DROP FUNCTION mqtt_notify();
DROP INDEX events_stream_kind;
DELETE FROM events WHERE kind IN ({HEALTH_KINDS});
ALTER TABLE events DROP CONSTRAINT events_shape;
ALTER TABLE events DROP COLUMN final, DROP COLUMN since, DROP COLUMN reason, DROP COLUMN service;
ALTER TABLE events ALTER COLUMN frame_seq SET NOT NULL,
                   ALTER COLUMN zone SET NOT NULL,
                   ALTER COLUMN track_id SET NOT NULL,
                   ALTER COLUMN class_name SET NOT NULL,
                   ALTER COLUMN confidence SET NOT NULL,
                   ALTER COLUMN s3_key SET NOT NULL;
ALTER TABLE events DROP CONSTRAINT events_kind_check;
ALTER TABLE events ADD CONSTRAINT events_kind_check CHECK (kind IN ({ZONE_KINDS}));
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
