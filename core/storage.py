"""S3 (MinIO API) client that creates the buckets it needs and hands out presigned links."""

from __future__ import annotations

from datetime import timedelta

from minio import Minio

from core.settings import Settings


def create_s3_client(settings: Settings, *, public: bool = False) -> Minio:
    """A blocking MinIO client; call it from a thread (``asyncio.to_thread``) in async code.

    ``public``: a client for signing links at ``s3_public_endpoint`` (signing makes no request).
    """
    endpoint = (settings.s3_public_endpoint or settings.s3_endpoint) if public else settings.s3_endpoint
    return Minio(
        endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value(),
        secure=settings.s3_secure,
        region=settings.s3_region,
    )


def ensure_bucket(client: Minio, bucket: str) -> None:
    """Create ``bucket`` when missing (idempotent, safe when several services race)."""
    if not client.bucket_exists(bucket):
        try:
            client.make_bucket(bucket)
        except Exception:
            if not client.bucket_exists(bucket):
                raise


def presigned_get(client: Minio, bucket: str, key: str, expiry_s: int) -> str:
    """A link that fetches ``key`` with plain HTTP until it expires."""
    return client.presigned_get_object(bucket, key, expires=timedelta(seconds=expiry_s))
