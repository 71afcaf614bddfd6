"""The web page at ``/``: a static page and its script and stylesheet, no build step, nothing external.

The page talks to the API from the browser (``GET /streams``, ``POST /init``, ``POST /shutdown``,
``GET /detection_result``), so this router only serves files. Only the files named in ``ASSETS``
are served: a request can never reach anything else on disk.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

from api.deps import SettingsDep
from core.settings import Settings

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# name under /static/ -> media type; everything the page loads is listed here
ASSETS: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
    "stream.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def content_security_policy(settings: Settings) -> str:
    """Scripts and styles only from this origin, images also from the S3 endpoint the presigned links
    point at (another origin, maybe another host): nothing else may load or run."""
    s3 = (
        f"{'https' if settings.s3_secure else 'http'}://{settings.s3_public_endpoint or settings.s3_endpoint}"
    )
    return (
        f"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: {s3}; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


# The files are small and change with the code: browsers revalidate (ETag) rather than cache blindly.
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(tags=["web page"], include_in_schema=False)


@router.get("/")
async def web_page(settings: SettingsDep) -> FileResponse:
    """The Lookout web page: streams, their states, a start form, stop buttons and a frame gallery.

    The page itself holds no data: it asks for an API key and sends it with every call it makes.
    """
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers=HEADERS | {"Content-Security-Policy": content_security_policy(settings)},
    )


@router.get("/static/{name}")
async def web_page_asset(name: str) -> FileResponse:
    """One of the page's own files; 404 for any other name."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such file")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=HEADERS)
