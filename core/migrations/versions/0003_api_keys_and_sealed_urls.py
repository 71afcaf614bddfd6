"""API keys (stored as hashes, with a scope and a revocation time) and the digest of each stream's URL.

``streams.url_full`` holds the camera URL sealed (encrypted and authenticated, see core/sealing.py)
from now on; ``url_digest`` (a keyed hash) lets an idempotent ``/init`` compare URLs without opening
them. Rows written before hold the URL in clear: ``lookout db migrate`` seals them after this
migration (core/sealing.py, ``seal_stored_urls``).

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE api_keys (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL,
    scope       text        NOT NULL CHECK (scope IN ('read', 'admin')),
    token_hash  text        NOT NULL UNIQUE,  -- sha256 of the token; the token itself is never stored
    prefix      text        NOT NULL,         -- its first characters, to tell keys apart in a list
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
ALTER TABLE streams ADD COLUMN url_digest text;
"""

DOWNGRADE = """
ALTER TABLE streams DROP COLUMN url_digest;
DROP TABLE api_keys;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
