"""A small HTTP client of Lookout's API: what the ``lookout`` commands, the demo and the soak benchmark call."""

from __future__ import annotations

from typing import Any

import httpx


class ApiError(RuntimeError):
    """The API answered with an error; the message carries its status and reason."""

    def __init__(self, status: int, detail: object) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class LookoutClient:
    """Calls the API at ``base_url`` (e.g. ``http://127.0.0.1:8000``) and returns the JSON bodies."""

    def __init__(self, base_url: str, timeout: float = 10.0, *, api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers)

    def absolute(self, path: str) -> str:
        """``path`` of this API as a full URL."""
        return str(self._http.base_url.join(path))

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(response.status_code, detail)
        return response.json()

    def init(
        self, url: str, options: dict[str, Any] | None = None, idempotency_key: str | None = None
    ) -> Any:
        """Start a stream (``POST /init``); the same ``idempotency_key`` returns the same stream."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/init", json={"url": url, "options": options or {}}, headers=headers)

    def live(self, stream_id: str) -> Any:
        """A ticket to the stream's live view: ``url`` (relative to the API), ``expires_at``."""
        return self._call("POST", f"/streams/{stream_id}/live")

    def shutdown(self, stream_id: str) -> Any:
        """Ask a stream to stop (``POST /shutdown``)."""
        return self._call("POST", "/shutdown", json={"id": stream_id})

    def state(self, stream_id: str) -> Any:
        """A stream's lifecycle state, error reason and timestamps (``GET /state/{id}``)."""
        return self._call("GET", f"/state/{stream_id}")

    def streams(self, **filters: Any) -> Any:
        """A page of streams, running ones first (``GET /streams``: ``state``, ``running``, ``q``,
        ``limit``, ``cursor``; None leaves a filter out)."""
        params = {name: value for name, value in filters.items() if value is not None}
        return self._call("GET", "/streams", params=params)

    def results(self, stream_id: str, limit: int = 10, cursor: str | None = None) -> Any:
        """A page of the stream's detections, newest first (``GET /detection_result``)."""
        params: dict[str, Any] = {"id": stream_id, "limit": limit}
        if cursor:
            params["cursor"] = cursor
        return self._call("GET", "/detection_result", params=params)

    def storage(self) -> Any:
        return self._call("GET", "/storage")

    def delete_stream(self, stream_id: str) -> Any:
        return self._call("DELETE", f"/streams/{stream_id}")

    def create_key(self, name: str, scope: str) -> Any:
        return self._call("POST", "/keys", json={"name": name, "scope": scope})

    def keys(self) -> Any:
        return self._call("GET", "/keys")

    def revoke_key(self, key_id: str) -> Any:
        return self._call("DELETE", f"/keys/{key_id}")

    def ready(self) -> bool:
        """True when ``/readyz`` answers 200 (Postgres, Kafka and Temporal reachable)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False
