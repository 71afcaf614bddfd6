"""Keep credentials of RTSP URLs out of logs, responses, events and Temporal payloads."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

# Query parameters some cameras take credentials in (``?user=admin&password=...``).
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|auth|sig|cred|user|login", re.IGNORECASE)


def redact_url(url: str) -> str:
    """Return ``url`` with any user info replaced by ``***`` (``rtsp://***@host/path``), and the values
    of credential-like query parameters too (``?user=***&password=***``)."""
    parts = urlsplit(url)
    query = _redact_query(parts.query)
    if parts.username is None and parts.password is None:
        if query == parts.query:
            return url
        return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_query(query: str) -> str:
    """The query with the value of every credential-like parameter replaced; other text kept as is."""
    if not query:
        return query
    fields = []
    for field in query.split("&"):
        name, sep, _value = field.partition("=")
        if sep and _SECRET_PARAM.search(unquote(name)):
            field = f"{name}=***"
        fields.append(field)
    return "&".join(fields)
