"""The order streams are listed in (GET /streams, the web page, ``lookout streams``): running ones
first, then ended ones, each newest first, paged by keyset on that order.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX streams_listing ON streams"
        " ((state NOT IN ('inactive', 'inactive_error')) DESC, created_at DESC, id DESC)"
    )


def downgrade() -> None:
    op.execute("DROP INDEX streams_listing")
