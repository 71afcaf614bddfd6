"""Text that Postgres (and every consumer after it) can store: no NUL character, no lone surrogate.

Postgres refuses both in ``text`` and ``jsonb``; a request carrying them must be a 422 with a
reason, never a 500 from deep inside a write.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None when it can."""
    if "\x00" in value:
        return "contains a NUL character, which cannot be stored"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate, which is not valid Unicode"
    return None


def _storable(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


StorableText = Annotated[str, AfterValidator(_storable)]
