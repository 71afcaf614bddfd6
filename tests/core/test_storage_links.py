"""Presigned links are signed for the S3 address users reach, which may differ from the services'."""

from __future__ import annotations

from urllib.parse import urlsplit

from core.storage import create_s3_client, presigned_get
from tests.conftest import make_settings


def test_links_are_signed_for_the_public_endpoint_when_one_is_set() -> None:
    settings = make_settings(s3_endpoint="minio:9000", s3_public_endpoint="frames.example.org:9443")
    url = presigned_get(create_s3_client(settings, public=True), "lookout-frames", "s/1.jpg", 60)
    assert urlsplit(url).netloc == "frames.example.org:9443"
    assert "X-Amz-Signature=" in url
    assert (
        urlsplit(presigned_get(create_s3_client(settings), "lookout-frames", "k", 60)).netloc == "minio:9000"
    )


def test_links_use_the_services_endpoint_when_no_public_one_is_set() -> None:
    settings = make_settings(s3_endpoint="127.0.0.1:19000")
    url = presigned_get(create_s3_client(settings, public=True), "lookout-frames", "s/1.jpg", 60)
    assert urlsplit(url).netloc == "127.0.0.1:19000"
