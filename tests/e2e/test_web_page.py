"""The web page at ``/`` in real headless Chromium (Playwright driving Debian's ``chromium``).

The API is served over real HTTP by uvicorn in a thread, because a browser needs a socket. The fast
tests need only Postgres; the end-to-end test runs the whole pipeline in-process on the session's
servers: the test camera, the real runner and ML (YOLO) services, the lifecycle (outbox relay,
state bridge, Temporal worker), S3 for the annotated frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, Request, Response, async_playwright, expect

from core.metrics import FRAMES_PROCESSED, LIVE_FRAMES_PUBLISHED
from core.settings import Settings
from core.timeouts import within
from deploy.camera.control import TestCamera, free_port
from tests.conftest import make_settings
from tests.e2e.pipeline import TERMINAL, pipeline_settings, running_pipeline, served_api
from tests.observing import eventually, read_mjpeg
from tests.running_services import new_api_key, running_api, wait_for_state
from tests.stream_rows import add_streams

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CAMERA_PASSWORD = "page-must-not-show-this"
# pixels of the live frame in the colour of a person's box and label (ultralytics' first colour,
# drawn as #3838ff), counted on a canvas: the live view is same-origin, so the canvas can read it
BOX_PIXELS = """() => {
    const img = document.getElementById("live-view");
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let count = 0;
    for (let i = 0; i < data.length; i += 4) {
        if (data[i] < 110 && data[i + 1] < 110 && data[i + 2] > 200) count += 1;
    }
    return count;
}"""

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless; Playwright never downloads a browser of its own here."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: run deploy/bootstrap.sh (Debian package chromium)")
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


class PageWatch:
    """What a page did that it should not: console errors, failed loads, requests off this machine."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        self.foreign_requests: list[str] = []
        self.failed: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("request", self._on_request)
        page.on("response", self._on_response)

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def _on_response(self, response: Response) -> None:
        if response.status >= 400:
            self.failed.append(f"{response.status} {response.request.resource_type} {response.url}")

    def _on_request(self, request: Request) -> None:
        host = urlsplit(request.url).hostname
        if request.url.startswith(("http:", "https:")) and host != "127.0.0.1":
            self.foreign_requests.append(request.url)


@contextlib.asynccontextmanager
async def open_page(
    browser: Browser, url: str, key: str | None = None
) -> AsyncIterator[tuple[Page, PageWatch]]:
    """The page in a new browser context; with ``key`` opened by a link that carries it, as the demo's."""
    context = await browser.new_context(viewport={"width": 1280, "height": 1000})
    try:
        page = await context.new_page()
        watch = PageWatch(page)
        await page.goto(url + (f"/#key={key}" if key else ""))
        yield page, watch
    finally:
        await context.close()


@pytest.fixture(scope="module")
def page_settings(pg_url: str) -> Settings:
    """Enough for the API to start: /init's validation answers before anything else is reached."""
    return make_settings(database_url=pg_url)


# --- fast: the page is served and shows why /init refused a stream ------------------------------


@pytest.mark.integration
async def test_page_and_its_assets_are_served_with_their_content_types(page_settings: Settings) -> None:
    async with running_api(page_settings) as api:
        page = await api.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sorted(assets) == [
            "#streams-title",
            "/docs",
            "/static/app.js",
            "/static/favicon.svg",
            "/static/favicon.svg",
            "/static/style.css",
        ], "the page loads only its own files"
        modules = re.findall(r'from "\./([\w.]+)"', (await api.get("/static/app.js")).text)
        assert sorted(set(modules)) == ["page.js", "stream.js"], "app.js imports only the page's modules"
        expected = {
            "/static/app.js": "text/javascript; charset=utf-8",
            "/static/page.js": "text/javascript; charset=utf-8",
            "/static/stream.js": "text/javascript; charset=utf-8",
            "/static/style.css": "text/css; charset=utf-8",
            "/static/favicon.svg": "image/svg+xml",
        }
        for path, content_type in expected.items():
            response = await api.get(path)
            assert response.status_code == 200, path
            assert response.headers["content-type"] == content_type, path
            assert response.content, path
        for path in ("/static/index.html", "/static/..%2Fui.py", "/static/nothing.js"):
            assert (await api.get(path)).status_code == 404, path


@pytest.mark.integration
async def test_page_asks_for_a_key_once_then_shows_why_init_refused_a_stream(
    browser: Browser, page_settings: Settings, tmp_path: Path
) -> None:
    token = await new_api_key(page_settings)
    async with served_api(page_settings) as base_url, open_page(browser, base_url) as (page, watch):
        key_card = page.locator("#key-card")
        await expect(key_card).to_be_visible()
        await expect(key_card).to_contain_text("needs an API key")
        await page.screenshot(path=tmp_path / "web-page-key.png", full_page=True)
        await page.get_by_role("textbox", name="API key").fill("lk_wrong")
        await page.get_by_role("button", name="Use this key").click()
        await expect(key_card).to_contain_text("unknown or revoked API key")  # the API said why
        await page.get_by_role("textbox", name="API key").fill(token)
        await page.get_by_role("button", name="Use this key").click()
        await expect(key_card).to_be_hidden()
        await page.reload()  # kept for the tab's session: not asked again
        await expect(page.locator("#streams-status")).to_contain_text("Live")
        await expect(key_card).to_be_hidden()

        url_input = page.get_by_label("Stream URL")
        errors = page.get_by_role("alert").filter(has_text="The stream was not started")

        await url_input.fill("http://camera.local/live")
        await page.get_by_role("button", name="Start stream").click()
        await expect(errors).to_contain_text("Stream URL: URL scheme must be rtsp or rtsps")
        await expect(url_input).to_have_attribute("aria-invalid", "true")

        await url_input.fill("rtsp://camera.local/live")
        await page.get_by_label("Frames per second").fill("0")
        await page.get_by_role("button", name="Start stream").click()
        await expect(errors).to_contain_text("Frames per second: Input should be greater than 0")
        await expect(page.get_by_label("Frames per second")).to_have_attribute("aria-invalid", "true")
        await expect(url_input).not_to_have_attribute("aria-invalid", "true")
        await page.screenshot(path=tmp_path / "web-page-422.png", full_page=True)

        # user data is rendered inert: markup in a stream's URL shows as text, runs nothing
        markup = "<img/src=x/onerror=window.pwned=1><b>bold</b>"
        await url_input.fill(f"rtsp://camera.local/{markup}")
        await page.get_by_label("Frames per second").fill("1")
        await page.get_by_role("button", name="Start stream").click()
        streams = page.locator("#streams-body")
        await expect(streams).to_contain_text("<b>bold</b>")
        assert await streams.locator("b, img").count() == 0
        assert await page.evaluate("window.pwned") is None

    # the browser logs the refused calls themselves: the wrong key's 401 and the 422s
    assert [e for e in watch.errors if "422" not in e and "401" not in e] == []
    assert watch.foreign_requests == []


async def page_width(page: Page) -> tuple[int, int, list[str]]:
    """The document's width, the viewport's (the first must not exceed the second) and the visible
    elements that reach past the viewport (what to fix when it does)."""
    width, viewport, wide = await page.evaluate(
        """() => {
            const wide = [...document.querySelectorAll("body *")]
              .filter((e) => e.getClientRects().length && e.getBoundingClientRect().right > window.innerWidth + 1)
              .filter((e) => !e.closest(".table-wrap") || getComputedStyle(e).position !== "static")
              .slice(0, 8)
              .map((e) => `${e.tagName.toLowerCase()}#${e.id}.${e.className} ${Math.round(e.getBoundingClientRect().right)}px`);
            return [document.documentElement.scrollWidth, window.innerWidth, wide];
        }"""
    )
    return int(width), int(viewport), list(wide)


@pytest.mark.integration
async def test_three_hundred_streams_page_and_filter_and_no_value_widens_the_page(
    browser: Browser, private_database: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url=private_database)
    ids = await add_streams(settings, count=300, running=20)
    token = await new_api_key(settings)
    async with served_api(settings) as base_url, open_page(browser, base_url, key=token) as (page, watch):
        await page.set_viewport_size({"width": 1400, "height": 1000})
        rows = page.locator("#streams-body tr")
        await expect(rows).to_have_count(50)
        states = await page.locator("#streams-body .state").all_inner_texts()
        assert states[:20] == ["ml_started"] * 20 and "ml_started" not in states[20:], "running first"
        newest_running = await rows.first.get_attribute("data-stream-id")
        assert newest_running == ids[-1], "then newest first"
        assert await rows.nth(20).get_attribute("data-stream-id") == ids[-21]
        await expect(page.locator("#streams-count")).to_contain_text("50 shown (20 running)")
        width, viewport, wide = await page_width(page)
        assert width <= viewport, f"the page is {width} px wide in a {viewport} px window: {wide}"
        await page.screenshot(path=tmp_path / "streams-1400.png", full_page=False)
        await rows.nth(16).scroll_into_view_if_needed()
        await page.screenshot(path=tmp_path / "streams-1400-ended.png", full_page=False)
        assert await rows.nth(25).locator(".options-cell").is_hidden(), "ended streams are collapsed"

        await page.get_by_role("button", name="Show more").click()
        await expect(rows).to_have_count(100)
        await page.get_by_label("Search").fill("site-123")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_contain_text("site-123")
        await page.get_by_label("Search").fill("")
        await page.locator("#streams-show").select_option("running")
        await expect(rows).to_have_count(20)
        await page.locator("#streams-show").select_option("all")
        await page.locator("#streams-state").select_option("inactive_error")
        others = page.locator("#streams-body .state").filter(has_not_text="inactive_error")
        await expect(others).to_have_count(0)
        await expect(rows).to_have_count(50)
        reason = page.locator("#streams-body .reason").first
        await expect(reason).to_have_attribute("title", re.compile(r"^camera unreachable for 600s: no route"))
        width, viewport, wide = await page_width(page)
        assert width <= viewport, f"long errors widen the page to {width} px: {wide}"

        await page.locator("#streams-state").select_option("")
        await page.set_viewport_size({"width": 390, "height": 844})  # a phone
        await expect(page.locator("#streams-body .state").filter(has_text="ml_started")).to_have_count(20)
        width, viewport, wide = await page_width(page)
        await page.screenshot(path=tmp_path / "streams-390.png", full_page=True)
        assert width <= viewport, f"the page is {width} px wide on a {viewport} px phone: {wide}"
    assert watch.errors == [] and watch.foreign_requests == [], watch.failed


# --- end to end: the real pipeline behind the page --------------------------------------------


def frames_detected(stream_id: str) -> float:
    """Frames of the stream through the model so far (ML runs in this process)."""
    return float(FRAMES_PROCESSED.labels(stream_id)._value.get())


async def loaded_gallery_images(page: Page) -> list[dict[str, Any]]:
    images: list[dict[str, Any]] = await page.eval_on_selector_all(
        "#gallery img",
        "imgs => imgs.map(i => ({src: i.src, complete: i.complete, width: i.naturalWidth, alt: i.alt}))",
    )
    return images


@pytest.mark.e2e
async def test_stream_started_from_the_page_runs_shows_annotated_frames_and_stops(
    browser: Browser, settings: Settings, camera: TestCamera, tmp_path: Path
) -> None:
    web_settings = await pipeline_settings(
        settings,
        # generous: this test is about the page; test_pipeline.py holds the startup bound
        startup_deadline_s=90.0,
        live_watch_every_s=1.0,
        live_watch_for_s=3.0,
    )
    camera_url = camera.url("cam1").replace("rtsp://", f"rtsp://viewer:{CAMERA_PASSWORD}@")
    nobody_there = f"rtsp://127.0.0.1:{free_port()}/cam1/"
    nobody_there += "a-very-long-path-" * ((2000 - len(nobody_there)) // 17)
    nobody_there += "x" * (2000 - len(nobody_there))  # 2,000 characters, as the issue asks
    async with (
        running_pipeline(web_settings) as pipeline,
        served_api(web_settings) as base_url,
        open_page(browser, base_url, await new_api_key(web_settings)) as (page, watch),
    ):
        # a stream whose camera does not answer: it ends in inactive_error, with the reason shown
        async with page.expect_response(lambda r: r.url.endswith("/init")) as init:
            await page.get_by_label("Stream URL").fill(nobody_there)
            await page.get_by_role("button", name="Start stream").click()
        broken = page.locator(f'tr[data-stream-id="{(await (await init.value).json())["id"]}"]')

        started = time.monotonic()
        await page.get_by_label("Stream URL").fill(camera_url)
        await page.get_by_label("Frames per second").fill("2")
        await page.get_by_label("Minimum confidence").fill("0.3")
        await page.get_by_label("Classes to keep").fill("person")
        await page.get_by_label("Model input size").fill("320")
        async with page.expect_response(lambda r: r.url.endswith("/init")) as init:
            await page.get_by_role("button", name="Start stream").click()
        stream = await (await init.value).json()
        stream_id, short = stream["id"], stream["id"][:8]
        await expect(page.get_by_role("status").first).to_contain_text(f"Stream {short} accepted")
        await expect(page.get_by_label("Stream URL")).to_have_value("")  # credentials leave the screen

        row = page.locator(f'tr[data-stream-id="{stream_id}"]')
        state = row.locator(".state")
        await expect(state).to_have_text("ml_started", timeout=90_000)
        running_after = time.monotonic() - started
        await expect(row).to_contain_text("2 fps · confidence ≥ 0.3 · person · 320 px")
        # the services' heartbeats reach the page as the stream's health
        await expect(row.locator(".health-cell")).to_contain_text("ml ok", timeout=30_000)
        await expect(row.locator(".health-cell")).to_contain_text("runner ok")
        workflow = row.get_by_role("link", name=f"Workflow of stream {short}")
        assert await workflow.get_attribute("href") == stream["workflow_url"]
        assert stream["workflow_url"].startswith(web_settings.temporal_ui_url)

        # the stream was selected when it started: its newest annotated frames fill the gallery
        await expect(page.locator("#frames-title")).to_have_text(f"Newest frames of stream {short}")
        await page.wait_for_function(
            "n => [...document.querySelectorAll('#gallery img')]"
            ".filter(i => i.complete && i.naturalWidth > 0).length >= n",
            arg=2,
            timeout=30_000,
        )
        images = await loaded_gallery_images(page)
        assert all(i["width"] > 0 for i in images if i["complete"]), images
        s3_origin = f"http://{web_settings.s3_endpoint}/"
        assert all(i["src"].startswith(s3_origin) for i in images), images
        first_caption = page.locator("#gallery figcaption").first
        await expect(first_caption.get_by_role("list", name="Detected objects")).to_contain_text("person")
        # what its frames take, and the store against its budget
        await expect(row.locator(".storage")).to_contain_text(re.compile(r"\d+ frames · [\d.]+ (KiB|MiB)"))
        await expect(page.locator("#storage-status")).to_contain_text(
            re.compile(r"Storage: [\d.]+ (B|KiB|MiB) of 20\.0 GiB"), timeout=15_000
        )
        await page.screenshot(path=tmp_path / "web-page-running.png", full_page=True)

        # the stream's own card: its health, backend and storage, and the workflow link
        card = page.locator("#stream-card")
        await expect(card).to_be_visible()
        facts = page.locator("#stream-health")
        await expect(facts).to_contain_text(re.compile(r"Frames per second\s*[\d.]+ read · [\d.]+ detected"))
        await expect(facts).to_contain_text(re.compile(r"Newest frame\s*[\d.]+ s old"))
        await expect(facts).to_contain_text(re.compile(r"Backend\s*(openvino|onnx|torch)"))
        await expect(facts).to_contain_text(re.compile(r"Storage\s*\d+ frames"))
        await expect(facts).to_contain_text("Restarts")
        workflow_link = card.get_by_role("link", name="Workflow in Temporal")
        assert await workflow_link.get_attribute("href") == stream["workflow_url"]

        # the live view: nothing is encoded for it until someone watches; then frames that change,
        # with boxes drawn; when the viewer leaves, the encoding stops
        published, detected = LIVE_FRAMES_PUBLISHED._value.get(), frames_detected(stream_id)
        await asyncio.sleep(2.0)
        assert frames_detected(stream_id) > detected, "the stream detects frames meanwhile"
        assert LIVE_FRAMES_PUBLISHED._value.get() == published, "nobody watches: no live frame is made"
        await page.get_by_role("button", name="Watch live").click()
        live = page.locator("#live-view")
        await page.wait_for_function(
            "() => document.getElementById('live-view').naturalWidth > 0", timeout=30_000
        )
        shots = [await live.screenshot(path=tmp_path / "live-1.png")]
        await asyncio.sleep(2.0)  # the stream runs at 2 fps
        shots.append(await live.screenshot(path=tmp_path / "live-2.png"))
        assert shots[0] != shots[1], "the live view's frames change"
        box_pixels = await page.evaluate(BOX_PIXELS)
        assert box_pixels > 200, (
            f"no box drawn on the live frame ({box_pixels} pixels of a person's box colour)"
        )
        await page.screenshot(path=tmp_path / "web-page-live.png", full_page=True)
        assert LIVE_FRAMES_PUBLISHED._value.get() > published
        await page.get_by_role("button", name="Stop watching").click()
        await expect(live).to_be_hidden()
        await asyncio.sleep(web_settings.live_watch_for_s + 2.0)  # the last watch runs out
        after, detected = LIVE_FRAMES_PUBLISHED._value.get(), frames_detected(stream_id)
        await asyncio.sleep(2.0)
        assert frames_detected(stream_id) > detected, "the stream detects frames meanwhile"
        assert LIVE_FRAMES_PUBLISHED._value.get() == after, "nobody watches any more: no live frame"

        # draw a line down the middle of the newest frame: it reaches the stream, its counts and
        # its events (with a snapshot each) appear live
        analytics = page.locator("#analytics-card")
        await expect(analytics).to_be_visible()
        await page.wait_for_function("() => document.getElementById('draw-frame').naturalWidth > 0")
        canvas = page.locator("#draw-canvas")
        box = await canvas.bounding_box()
        assert box is not None
        await canvas.click(position={"x": box["width"] * 0.5, "y": box["height"] * 0.05})
        await canvas.click(position={"x": box["width"] * 0.5, "y": box["height"] * 0.95})
        await page.get_by_label("Name").fill("door")
        async with page.expect_response(lambda r: r.request.method == "PATCH") as patched:
            await page.get_by_role("button", name="Add to stream").click()
        line = (await (await patched.value).json())["options"]["lines"][0]
        assert line["name"] == "door" and abs(line["points"][0][0] - 0.5) < 0.01
        await expect(page.locator("#figures-body")).to_contain_text("door")
        # the crossing on the event timeline, with its snapshot, as the live feed brings it
        crossings = page.locator("#timeline-list li").filter(has_text="crossed door")
        await expect(crossings.first).to_be_visible(timeout=90_000)
        await expect(crossings.first.locator("img")).to_have_attribute("src", re.compile("^http"))
        await expect(page.locator("#timeline-axis .marker-crossed").first).to_be_visible()
        await expect(page.locator("#timeline-status")).to_contain_text("following live")
        # the counts move: the line's row leaves 0 / 0
        door_row = page.locator("#figures-body tr").filter(has_text="door")
        await expect(door_row).not_to_have_text(re.compile(r"door\s*\S\s*0\s*0"), timeout=30_000)
        await page.screenshot(path=tmp_path / "web-page-analytics.png", full_page=True)
        # filter the timeline by kind and by line, then jump from the crossing to its frame
        await page.locator("#timeline-kind").select_option("health")
        await expect(crossings).to_have_count(0)
        await page.locator("#timeline-kind").select_option("crossed")
        await page.locator("#timeline-zone").select_option("door")
        await expect(crossings.first).to_be_visible()
        await page.locator("#timeline-axis .marker-crossed").first.click()
        await page.wait_for_function("() => document.getElementById('event-frame-img').naturalWidth > 0")
        await expect(page.locator("#event-frame-caption")).to_contain_text("crossed door")
        await page.locator("#timeline-card").scroll_into_view_if_needed()
        await page.screenshot(path=tmp_path / "web-page-timeline.png", full_page=True)
        await page.get_by_role("button", name="Close the frame").click()
        await expect(page.locator("#event-frame")).to_be_hidden()

        html = await page.content()
        assert CAMERA_PASSWORD not in html
        await expect(row.locator(".stream-url")).to_contain_text("***")

        await row.get_by_role("button", name=f"Stop stream {short}").click()
        stop_clicked = time.monotonic()
        await expect(state).to_have_text("inactive", timeout=30_000)
        stopped_after = time.monotonic() - stop_clicked
        await expect(row.get_by_role("button", name=f"Stop stream {short}")).to_be_hidden()

        await expect(broken.locator(".state")).to_have_text("inactive_error", timeout=30_000)
        await expect(broken.locator(".reason")).to_contain_text("runner")
        await expect(broken.get_by_role("button", name=re.compile("^Stop"))).to_be_hidden()
        await page.screenshot(path=tmp_path / "web-page-stopped.png", full_page=True)
        # the stream with the 2,000-character URL, chosen: nothing on the page grows past the window
        await broken.get_by_role("button", name=re.compile("^Show frames")).click()
        await expect(page.locator("#stream-health")).to_contain_text("a-very-long-path")
        for viewport in ({"width": 1400, "height": 1000}, {"width": 390, "height": 844}):
            await page.set_viewport_size(viewport)
            width, inner, wide = await page_width(page)
            assert width <= inner, f"the page is {width} px wide in a {inner} px window: {wide}"
            await page.screenshot(
                path=tmp_path / f"web-page-long-url-{viewport['width']}.png", full_page=True
            )

        view = await wait_for_state(pipeline.api, stream_id, "inactive", timeout_s=5)
        assert view["error_reason"] is None
        assert CAMERA_PASSWORD not in json.dumps(view)

    log.info("ml_started %.1fs after Start; inactive %.1fs after Stop", running_after, stopped_after)
    assert watch.errors == []
    assert watch.foreign_requests == []


@pytest.mark.e2e
async def test_a_watched_stream_through_kill_9_of_its_detection_process_and_of_its_camera(
    browser: Browser, settings: Settings, own_camera: TestCamera, tmp_path: Path
) -> None:
    """What the live view, /state and the page say stays true: the view goes on through a restart of
    the detection process, says it is paused while the camera is dead, and ends with the stream."""
    own = await pipeline_settings(settings, live_watch_every_s=0.5, live_watch_for_s=2.0)
    token = await new_api_key(own)
    async with (
        running_pipeline(own) as pipeline,
        served_api(own) as base_url,
        open_page(browser, base_url, token) as (page, watch),
        httpx.AsyncClient(base_url=base_url, timeout=30) as client,
    ):
        options = {"fps": 5, "imgsz": 320}
        started = await pipeline.api.post("/init", json={"url": own_camera.url("cam1"), "options": options})
        stream_id, short = started.json()["id"], started.json()["id"][:8]
        view = await wait_for_state(pipeline.api, stream_id, {"ml_started", *TERMINAL}, timeout_s=90)
        assert view["state"] == "ml_started", view
        await page.get_by_role("button", name=f"Show frames of stream {short}").click()
        await page.get_by_role("button", name="Watch live").click()
        await page.wait_for_function("() => document.getElementById('live-view').naturalWidth > 0")
        status = page.locator("#live-status")
        await expect(status).to_have_text(re.compile("^Live:"))
        # a second viewer over HTTP counts the frames
        url = (
            await client.post(f"/streams/{stream_id}/live", headers={"Authorization": f"Bearer {token}"})
        ).json()
        got: list[bytes] = []
        stop = asyncio.Event()
        viewer = asyncio.create_task(read_mjpeg(client, url["url"], got, stop))
        try:
            await eventually(lambda: len(got) >= 5, what=lambda: f"{len(got)} live frames")

            # kill -9 of the detection process: both views stay open and show the new process's frames
            old_pid = pipeline.stream_pids(stream_id)["ml"]
            os.kill(old_pid, signal.SIGKILL)
            await eventually(
                lambda: pipeline.stream_pids(stream_id).get("ml") not in (None, old_pid),
                timeout_s=60,
                what=lambda: pipeline.stream_pids(stream_id),
            )
            shown_at_restart = len(got)
            await eventually(lambda: len(got) >= shown_at_restart + 5, timeout_s=60, what=lambda: len(got))
            assert not viewer.done(), "the view stayed open through the restart"

            async def restart_told() -> bool:
                state = (await pipeline.api.get(f"/state/{stream_id}")).json()
                ml = ((state.get("health") or {}).get("services") or {}).get("ml") or {}
                return state["state"] == "ml_started" and ml.get("restarts", 0) >= 1

            await eventually(restart_told, timeout_s=30, what=lambda: "ml_started with an ml restart")
            await expect(page.locator("#stream-health")).to_contain_text(re.compile(r"Restarts\s*ml 1"))
            await expect(status).to_have_text(re.compile("^Live:"))

            # kill -9 of the camera: the stream keeps retrying it; the page says the view is paused
            # and shows the last frame, rather than passing it off as live
            own_camera.kill()

            async def camera_unreachable() -> bool:
                state = (await pipeline.api.get(f"/state/{stream_id}")).json()
                runner = ((state.get("health") or {}).get("services") or {}).get("runner") or {}
                return runner.get("status") == "camera_unreachable"

            await eventually(camera_unreachable, timeout_s=60, what=lambda: "runner camera_unreachable")
            await expect(status).to_contain_text("Paused: runner camera unreachable", timeout=15_000)
            await expect(page.locator("#stream-health")).to_contain_text(
                re.compile(r"Frames per second\s*0 read")
            )
            await page.screenshot(path=tmp_path / "live-paused.png", full_page=False)
            frozen = len(got)
            await asyncio.sleep(2.0)
            assert len(got) == frozen, "no frame while the camera is dead"

            # the stream stopped: its views end
            assert (await pipeline.api.post("/shutdown", json={"id": stream_id})).status_code == 202
            await wait_for_state(pipeline.api, stream_id, {"inactive"}, timeout_s=60)
            await within(viewer, 15)  # the MJPEG response ended with the stream
            await expect(status).to_have_text("The stream is stopping or has ended: no live view.")
            await expect(page.get_by_role("button", name="Watch live")).to_be_hidden()
        finally:
            stop.set()
            viewer.cancel()
            await asyncio.gather(viewer, return_exceptions=True)
    assert watch.errors == [] and watch.foreign_requests == [], watch.failed
