"""Camera URLs sealed end to end: encrypted and authenticated wherever they are stored or sent.

A stream's URL may carry the camera's password. The API seals it as it accepts the stream; it is
stored sealed (``streams.url_full``), travels sealed in the start command, and only the runner opens
it, in memory, to connect. Fernet (AES-128-CBC with an HMAC-SHA256) from ``cryptography``, keyed by
``LOOKOUT_SECRET_KEY``; after a rotation the previous keys still open what they sealed, and
``seal_stored_urls`` re-seals the stored URLs with the current key.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import asyncpg
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from core.settings import Settings

# What every Fernet token starts with (its version byte, base64): a stored URL that does not is in
# clear, written before URLs were sealed.
SEALED_PREFIX = "gAAAAA"


class SealingKeyMissing(RuntimeError):
    """No secret key is configured: camera URLs can be neither sealed nor opened."""


def generate_key() -> str:
    """A new secret key (for ``LOOKOUT_SECRET_KEY``)."""
    return Fernet.generate_key().decode()


def _keys(settings: Settings) -> list[str]:
    current = settings.secret_key.get_secret_value().strip()
    if not current and settings.secret_key_file is not None:
        current = settings.secret_key_file.read_text().strip()
    if not current:
        raise SealingKeyMissing(
            "no secret key: set LOOKOUT_SECRET_KEY or LOOKOUT_SECRET_KEY_FILE (`lookout stack up` makes one)"
        )
    previous = [k.strip() for k in settings.secret_keys_previous.get_secret_value().split(",") if k.strip()]
    return [current, *previous]


def _purpose_key(key: str, purpose: str) -> bytes:
    return hashlib.sha256(f"lookout {purpose}:".encode() + key.encode()).digest()


def purpose_keys(settings: Settings, purpose: str) -> list[bytes]:
    """Keys for one purpose (e.g. signing live-view tickets), derived from the configured secret keys:
    the first from the current one (it signs), the others from the previous ones (they still check)."""
    return [_purpose_key(key, purpose) for key in _keys(settings)]


class UrlSealer:
    """Seals and opens camera URLs with the configured keys (the first one seals)."""

    def __init__(self, settings: Settings) -> None:
        keys = _keys(settings)
        self._fernet = MultiFernet([Fernet(key.encode()) for key in keys])
        self._digest_key = _purpose_key(keys[0], "url digest")

    def seal(self, url: str) -> str:
        return self._fernet.encrypt(url.encode()).decode()

    def open(self, sealed: str) -> str:
        """The URL in clear; raises ``InvalidToken`` when no configured key sealed it (or it was altered)."""
        return self._fernet.decrypt(sealed.encode()).decode()

    def reseal(self, sealed: str) -> str:
        """The same URL sealed with the current key."""
        return self._fernet.rotate(sealed.encode()).decode()

    def digest(self, url: str) -> str:
        """A keyed hash of the URL: two requests name the same camera exactly when they are equal."""
        return hmac.new(self._digest_key, url.encode(), hashlib.sha256).hexdigest()


async def seal_stored_urls(pool: asyncpg.Pool, settings: Settings) -> int:
    """Seal the URLs stored in clear and re-seal the others with the current key; how many changed.

    Run after the migrations and after a key rotation (``lookout db migrate`` does it).
    """
    sealer = UrlSealer(settings)
    changed = 0
    async with pool.acquire() as conn, conn.transaction():
        for row in await conn.fetch("SELECT id, url_full, url_digest FROM streams FOR UPDATE"):
            stored: str = row["url_full"]
            if stored.startswith(SEALED_PREFIX):
                try:
                    url = sealer.open(stored)
                except InvalidToken:
                    continue  # sealed by a key no longer configured: left as it is
                resealed = sealer.reseal(stored)
            else:
                url, resealed = stored, sealer.seal(stored)
            await conn.execute(
                "UPDATE streams SET url_full = $2, url_digest = $3 WHERE id = $1",
                row["id"],
                resealed,
                sealer.digest(url),
            )
            changed += 1
        # start commands queued before URLs were sealed carry theirs in clear: seal them too
        for row in await conn.fetch(
            "SELECT id, payload FROM outbox WHERE topic = $1 AND position('\"url\":' IN convert_from(payload, 'UTF8')) > 0",
            settings.topic_commands,
        ):
            command = json.loads(row["payload"])
            command["url_sealed"] = sealer.seal(command.pop("url"))
            await conn.execute(
                "UPDATE outbox SET payload = $2 WHERE id = $1", row["id"], json.dumps(command).encode()
            )
            changed += 1
    return changed
