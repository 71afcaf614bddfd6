"""Events say why a visit ended when it was not the object walking out: ``cause`` 'restart' on the
``left`` a restarted detection process sends for each visit its predecessor left open (its tracker's
state died with it), so occupancy comes back true and the restart shows in the events.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE events ADD COLUMN cause text CHECK (cause IN ('restart'))")


def downgrade() -> None:
    op.execute("ALTER TABLE events DROP COLUMN cause")
