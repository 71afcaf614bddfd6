"""Who may call what: every route but ``/healthz``, ``/readyz``, ``/metrics`` and the web page's own
files needs ``Authorization: Bearer <API key>``; ``ReadKey`` routes take any valid key, ``AdminKey``
routes only an admin one. A refusal says why: 401 for a missing, unknown or revoked key, 403 for a
key whose scope is too narrow."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.deps import DbDep
from core.api_keys import ApiKey, Scope, find_key

bearer = HTTPBearer(auto_error=False, description="An API key: `lookout keys create` makes one")
ASK_FOR_BEARER = {"WWW-Authenticate": "Bearer"}


async def api_key(
    db: DbDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> ApiKey:
    """The caller's key; 401 when there is none or it is unknown or revoked."""
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing API key: send the header Authorization: Bearer <key>",
            headers=ASK_FOR_BEARER,
        )
    key = await find_key(db, credentials.credentials)
    if key is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, detail="unknown or revoked API key", headers=ASK_FOR_BEARER
        )
    return key


def require(scope: Scope) -> Callable[[ApiKey], Awaitable[ApiKey]]:
    """A dependency that lets through keys whose scope allows ``scope``; 403 for the others."""

    async def allowed(key: Annotated[ApiKey, Depends(api_key)]) -> ApiKey:
        if not key.scope.allows(scope):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"this key's scope is {key.scope.value}; this call needs {scope.value}",
            )
        return key

    return allowed


ReadKey = Annotated[ApiKey, Depends(require(Scope.READ))]
AdminKey = Annotated[ApiKey, Depends(require(Scope.ADMIN))]
AUTH_RESPONSES: dict[int | str, dict[str, str]] = {
    401: {"description": "Missing, unknown or revoked API key"},
    403: {"description": "The key's scope does not allow this call"},
}
BODY_RESPONSES: dict[int | str, dict[str, str]] = {
    400: {"description": "The body is not JSON"},
    413: {"description": "The body is over LOOKOUT_MAX_REQUEST_BYTES"},
}
