"""stream_events records restarts beside state changes: a ``kind`` column, versions unique per state.

A restart of a service by the lifecycle's watchdog is audited like a state change, but it moves no
state and bumps no version, so only the ``state`` rows keep one row per version.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE stream_events ADD COLUMN kind text NOT NULL DEFAULT 'state';
ALTER TABLE stream_events DROP CONSTRAINT stream_events_stream_id_version_key;
CREATE UNIQUE INDEX stream_events_state_version ON stream_events (stream_id, version) WHERE kind = 'state';
CREATE INDEX stream_events_stream ON stream_events (stream_id, id);
"""

DOWNGRADE = """
DELETE FROM stream_events WHERE kind <> 'state';
DROP INDEX stream_events_stream;
DROP INDEX stream_events_state_version;
ALTER TABLE stream_events ADD CONSTRAINT stream_events_stream_id_version_key UNIQUE (stream_id, version);
ALTER TABLE stream_events DROP COLUMN kind;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
