"""API keys: random tokens that only the caller keeps; Lookout stores their hashes, a name and a scope.

``read`` may look (state, streams, results); ``admin`` may also act (init, shutdown, keys). A key
is revoked, never deleted, so that a list shows what existed. The tokens carry 256 random bits, so
a plain SHA-256 of them is enough to store: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime
from enum import StrEnum

import asyncpg
from pydantic import BaseModel

TOKEN_PREFIX = "lk_"
PREFIX_SHOWN = 10  # characters of a token kept to tell keys apart


class Scope(StrEnum):
    READ = "read"
    ADMIN = "admin"

    def allows(self, needed: Scope) -> bool:
        return self is Scope.ADMIN or needed is Scope.READ


class ApiKey(BaseModel):
    """A key as stored: never its token."""

    id: uuid.UUID
    name: str
    scope: Scope
    prefix: str
    created_at: datetime
    revoked_at: datetime | None = None


_COLUMNS = "id, name, scope, prefix, created_at, revoked_at"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_key(
    pool: asyncpg.Pool | asyncpg.Connection, *, name: str, scope: Scope, token: str | None = None
) -> tuple[ApiKey, str]:
    """A new key and its token (shown once: only its hash is stored). ``token``: one made before
    (the embedded stack's key file) to register."""
    token = token or new_token()
    row = await pool.fetchrow(
        f"""
        INSERT INTO api_keys (id, name, scope, token_hash, prefix) VALUES ($1, $2, $3, $4, $5)
        RETURNING {_COLUMNS}
        """,
        uuid.uuid4(),
        name,
        scope.value,
        token_hash(token),
        token[:PREFIX_SHOWN],
    )
    assert row is not None
    return ApiKey.model_validate(dict(row)), token


async def key_known(pool: asyncpg.Pool | asyncpg.Connection, token: str) -> bool:
    """Whether this token was ever registered (revoked or not)."""
    return bool(await pool.fetchval("SELECT 1 FROM api_keys WHERE token_hash = $1", token_hash(token)))


async def find_key(pool: asyncpg.Pool, token: str) -> ApiKey | None:
    """The key of ``token`` when it exists and is not revoked."""
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM api_keys WHERE token_hash = $1 AND revoked_at IS NULL", token_hash(token)
    )
    return ApiKey.model_validate(dict(row)) if row else None


async def key_active(pool: asyncpg.Pool, key_id: uuid.UUID) -> bool:
    """Whether the key with this id exists and is not revoked."""
    return bool(await pool.fetchval("SELECT 1 FROM api_keys WHERE id = $1 AND revoked_at IS NULL", key_id))


async def list_keys(pool: asyncpg.Pool) -> list[ApiKey]:
    rows = await pool.fetch(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, id")
    return [ApiKey.model_validate(dict(row)) for row in rows]


async def revoke_key(pool: asyncpg.Pool, key_id: uuid.UUID) -> ApiKey | None:
    """Revoke a key (once; a second revoke keeps the first time); None for an unknown id."""
    row = await pool.fetchrow(
        f"""
        UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
        RETURNING {_COLUMNS}
        """,
        key_id,
    )
    return ApiKey.model_validate(dict(row)) if row else None
