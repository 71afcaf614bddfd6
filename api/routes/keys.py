"""API keys: create (the token is shown once), list, revoke. Admin keys only."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field

from api.auth import AUTH_RESPONSES, BODY_RESPONSES, AdminKey
from api.deps import DbDep
from core.api_keys import ApiKey, Scope, create_key, list_keys, revoke_key
from core.text import StorableText

router = APIRouter(tags=["keys"], responses=AUTH_RESPONSES | BODY_RESPONSES)


class NewKey(BaseModel):
    """A key to create."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[StorableText, Field(min_length=1, max_length=100, description="Who or what uses it")]
    scope: Scope = Field(description="read: state, streams, results; admin: also init, shutdown, keys")


class CreatedKey(BaseModel):
    """A new key with its token: shown this once, only its hash is kept."""

    id: uuid.UUID
    name: str
    scope: Scope
    prefix: str
    created_at: datetime
    token: str = Field(description="Send it as `Authorization: Bearer <token>`; it is not shown again")


class KeyList(BaseModel):
    keys: list[ApiKey]


@router.post("/keys", status_code=status.HTTP_201_CREATED)
async def create(body: NewKey, db: DbDep, _admin: AdminKey) -> CreatedKey:
    """Create a key; its token is in this response only."""
    key, token = await create_key(db, name=body.name, scope=body.scope)
    return CreatedKey(**key.model_dump(include={"id", "name", "scope", "prefix", "created_at"}), token=token)


@router.get("/keys")
async def keys(db: DbDep, _admin: AdminKey) -> KeyList:
    """Every key ever made, revoked ones included (never a token)."""
    return KeyList(keys=await list_keys(db))


@router.delete("/keys/{key_id}", responses={404: {"description": "No key has this id"}})
async def revoke(key_id: uuid.UUID, db: DbDep, _admin: AdminKey) -> ApiKey:
    """Revoke a key: calls with it are refused from now on."""
    key = await revoke_key(db, key_id)
    if key is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"key {key_id} not found")
    return key
