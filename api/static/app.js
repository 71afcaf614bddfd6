// Lookout's web page: streams with live states, a start form, stop buttons, the chosen stream's
// zones, lines and frame gallery (its live view and timeline: stream.js). Plain browser JavaScript
// modules, no dependencies, no build step.

import {
  $, ACTIVE_STATES, ENDED_STATES, KEY_STORAGE, NEEDS_KEY, STATE_HINTS, analyticsShapes, api, askForKey, bytes,
  clockTime, describeOptions, duration, el, safeHttpUrl, setText, shortId,
} from "./page.js";
import {
  closeEventFrame, followEvents, followSelection, renderStreamCard, renderTimeline, renderZoneChoices, stopLive,
  TIMELINE_EVERY_MS, watchLive, watching,
} from "./stream.js";

const STREAMS_EVERY_MS = 1500;
const FRAMES_EVERY_MS = 2000;
const STORAGE_EVERY_MS = 10000;
const FRAMES_SHOWN = 12;

// the form's fields by the name the API uses for them in a 422's `loc`
const FIELD_LABELS = {
  url: "Stream URL",
  fps: "Frames per second",
  confidence: "Minimum confidence",
  classes: "Classes to keep",
  imgsz: "Model input size",
  backend: "Inference backend",
  motion_gating: "Motion gating",
  motion_max_skip_s: "Detect at least every (s)",
};

const hashParams = new URLSearchParams(location.hash.slice(1));
let selectedId = hashParams.get("stream");
// An API key in the link (`lookout demo` prints one: #key=...) is kept for this tab's session and
// taken out of the address bar. The fragment never reaches a server or its logs.
if (hashParams.get("key")) {
  sessionStorage.setItem(KEY_STORAGE, hashParams.get("key"));
  history.replaceState(null, "", selectedId ? `#stream=${encodeURIComponent(selectedId)}` : location.pathname);
}
const rows = new Map(); // stream id -> its <tr> and the cells updated in place
const shownFrames = new Map(); // frame key -> <li>, so a frame's image loads once, not every refresh

function useKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("api-key").value = "";
  $("key-card").hidden = true;
  refreshStreams();
}

// --- streams -----------------------------------------------------------------------------------

const STREAMS_PAGE = 50;
let streamPages = 1; // pages shown: "Show more" adds one; a new filter starts again from one
let streamsAsked = 0; // the newest request: an older answer (another filter's) is not rendered

// GET /streams with the filter's values: running ones first, then ended ones, newest first.
function streamsQuery() {
  const params = new URLSearchParams({ limit: String(Math.min(STREAMS_PAGE * streamPages, 1000)) });
  const show = $("streams-show").value;
  if (show !== "all") params.set("running", show === "running" ? "true" : "false");
  if ($("streams-state").value) params.set("state", $("streams-state").value);
  const text = $("streams-search").value.trim();
  if (text) params.set("q", text);
  return `/streams?${params}`;
}

function filtering() {
  return $("streams-show").value !== "all" || $("streams-state").value !== "" || $("streams-search").value.trim() !== "";
}

function filterChanged() {
  streamPages = 1;
  refreshStreams();
}

async function refreshStreams() {
  try {
    const asked = ++streamsAsked;
    const body = await api("GET", streamsQuery());
    if (asked !== streamsAsked) return;
    renderStreams(body.streams);
    const more = body.next_cursor !== null && body.next_cursor !== undefined && STREAMS_PAGE * streamPages < 1000;
    $("streams-more").hidden = !more;
    const running = body.streams.filter((s) => !ENDED_STATES.has(s.state)).length;
    setText($("streams-count"), `${body.streams.length} shown (${running} running)${more ? " · more below" : ""}`);
    setText($("streams-empty"), filtering() ? "No stream matches the filter." : "No streams yet. Start one above.");
    const status = $("streams-status");
    status.classList.remove("warn");
    setText(status, `Live · updated ${new Date().toLocaleTimeString()}`);
  } catch (error) {
    const status = $("streams-status");
    status.classList.add("warn");
    setText(status, `${error.message} — retrying`);
  }
}

function renderStreams(streams) {
  for (const stream of streams) streamsById.set(stream.id, stream);
  $("streams-empty").hidden = streams.length > 0;
  $("streams-table").hidden = streams.length === 0;
  const body = $("streams-body");
  const listed = new Set();
  streams.forEach((stream, index) => {
    listed.add(stream.id);
    const row = rows.get(stream.id) || createRow(stream);
    updateRow(row, stream);
    // move a row only when it is out of place: moving it would take the focus off its buttons
    if (body.children[index] !== row.tr) body.insertBefore(row.tr, body.children[index] || null);
  });
  for (const [id, row] of rows) {
    if (!listed.has(id)) {
      row.tr.remove();
      rows.delete(id);
    }
  }
  renderSelection();
}

function createRow(stream) {
  const row = {
    tr: el("tr", { "data-stream-id": stream.id }),
    id: el("code", { class: "stream-id", title: stream.id, text: shortId(stream.id) }),
    url: el("div", { class: "stream-url" }),
    state: el("span", { class: "state" }),
    reason: el("p", { class: "reason", hidden: "" }),
    storage: el("p", { class: "storage muted", hidden: "" }),
    health: el("td", { class: "health-cell" }),
    options: el("td", { class: "options-cell" }),
    updated: el("td", { class: "updated" }),
    frames: el("button", { type: "button", class: "secondary", "aria-pressed": "false" }, "Frames"),
    stop: el("button", { type: "button", class: "danger" }, "Stop"),
    workflow: el("a", { class: "workflow", target: "_blank", rel: "noopener noreferrer" }, "Workflow"),
  };
  const label = `stream ${shortId(stream.id)}`;
  row.frames.setAttribute("aria-label", `Show frames of ${label}`);
  row.stop.setAttribute("aria-label", `Stop ${label}`);
  row.workflow.setAttribute("aria-label", `Workflow of ${label} in the Temporal Web UI (opens a new tab)`);
  row.frames.addEventListener("click", () => selectStream(stream.id));
  row.stop.addEventListener("click", () => stopStream(stream.id, row.stop));
  row.tr.append(
    el("td", {}, row.id, row.url),
    el("td", {}, row.state, row.reason, row.storage),
    row.health,
    row.options,
    row.updated,
    el("td", {}, el("div", { class: "actions" }, row.frames, row.workflow, row.stop)),
  );
  rows.set(stream.id, row);
  return row;
}

function updateRow(row, stream) {
  setText(row.url, stream.url_redacted);
  row.url.title = stream.url_redacted;
  if (row.state.dataset.state !== stream.state) {
    row.state.dataset.state = stream.state;
    row.state.className = `state state-${stream.state}`;
    row.state.textContent = stream.state;
    row.state.title = STATE_HINTS[stream.state] || "";
  }
  row.reason.hidden = !stream.error_reason;
  setText(row.reason, stream.error_reason || "");
  row.reason.title = stream.error_reason || "";
  const kept = stream.storage;
  row.storage.hidden = !kept;
  if (kept) {
    const oldest = kept.oldest_frame_age_s === null ? "" : ` · oldest ${duration(kept.oldest_frame_age_s)}`;
    setText(row.storage, `${kept.frames} frames · ${bytes(kept.bytes)}${oldest}`);
    row.storage.title = kept.deleted_frames
      ? `${kept.deleted_frames} frames deleted (last: ${kept.last_deletion_reason})`
      : "nothing deleted yet";
  }
  renderHealth(row.health, stream);
  setText(row.options, describeOptions(stream.options || {}));
  row.options.title = row.options.textContent;
  setText(row.updated, clockTime(stream.updated_at));
  row.stop.hidden = !ACTIVE_STATES.has(stream.state);
  row.tr.classList.toggle("ended", ENDED_STATES.has(stream.state));
  const workflowUrl = safeHttpUrl(stream.workflow_url);
  row.workflow.hidden = workflowUrl === null;
  if (workflowUrl !== null && row.workflow.href !== workflowUrl) row.workflow.href = workflowUrl;
}

// Per service: its status from the lifecycle's watchdog, and its live figures as a tooltip.
function renderHealth(cell, stream) {
  const services = (stream.health && stream.health.services) || {};
  const names = Object.keys(services).sort();
  cell.replaceChildren();
  if (names.length === 0) {
    cell.append(el("span", { class: "health-none", text: stream.health_unavailable || "" }));
    return;
  }
  for (const name of names) {
    const service = services[name];
    const figures = service.figures || {};
    const parts = [`${name}: ${service.status}`];
    if (figures.fps !== undefined) parts.push(`${figures.fps} fps`);
    if (figures.newest_frame_age_s !== undefined && figures.newest_frame_age_s !== null)
      parts.push(`newest frame ${figures.newest_frame_age_s} s old`);
    if (figures.frames_dropped) parts.push(`${figures.frames_dropped} dropped`);
    if (figures.frames_skipped) parts.push(`${figures.frames_skipped} skipped (no motion)`);
    if (figures.frames_not_stored) parts.push(`${figures.frames_not_stored} not stored (store policy)`);
    if (figures.backend) {
      const engine = figures.engine === "shared" ? "shared engine" : figures.threads ? `${figures.threads} threads` : "";
      parts.push(engine ? `${figures.backend}, ${engine}` : figures.backend);
    }
    if (figures.model_note) parts.push(figures.model_note);
    if (figures.engine_lost) parts.push(`${figures.engine_lost} lost with the engine (retried)`);
    if (service.restarts) parts.push(`${service.restarts} restarts, last: ${service.last_restart_reason}`);
    cell.append(
      el("span", {
        class: `health health-${service.status}`,
        title: parts.join(" · "),
        text: `${name} ${service.status.replace("_", " ")}`,
      }),
    );
  }
}

async function refreshStorage() {
  try {
    const view = await api("GET", "/storage");
    const used = `${bytes(view.bytes)} of ${bytes(view.budget_bytes)} (${Math.round(view.used_fraction * 100)} %)`;
    let forecast = "not filling";
    if (view.days_until_full === 0) forecast = "budget reached: the oldest frames go first";
    else if (view.days_until_full !== null) forecast = `full in ${view.days_until_full.toFixed(1)} days`;
    setText($("storage-status"), `Storage: ${used} · ${view.frames} frames · ${forecast}`);
  } catch (error) {
    setText($("storage-status"), `Storage: ${error.message}`);
  }
}

async function stopStream(id, button) {
  button.disabled = true;
  hideNotice();
  try {
    await api("POST", "/shutdown", { id });
  } catch (error) {
    showNotice(`Stream ${shortId(id)} was not stopped: ${describeError(error).join("; ")}`);
  } finally {
    button.disabled = false;
  }
  await refreshStreams();
  // the Stop button hides once the stream is stopping: keep keyboard focus on the same row
  if (button.hidden && document.activeElement === document.body) rows.get(id)?.frames.focus();
}

function showNotice(text) {
  const notice = $("page-notice");
  notice.textContent = text;
  notice.hidden = false;
}

function hideNotice() {
  $("page-notice").hidden = true;
}

// --- the start form ----------------------------------------------------------------------------

function readForm(form) {
  const problems = [];
  const options = {};
  for (const name of ["fps", "confidence", "imgsz", "motion_max_skip_s"]) {
    const input = form.elements[name];
    if (input.validity.badInput) problems.push({ field: name, msg: "is not a number" });
    else if (input.value !== "") options[name] = Number(input.value);
  }
  const classes = form.elements.classes.value.split(",").map((c) => c.trim()).filter(Boolean);
  if (classes.length) options.classes = classes;
  if (form.elements.backend.value) options.backend = form.elements.backend.value;
  if (form.elements.motion_gating.checked) options.motion_gating = true;
  return { body: { url: form.elements.url.value.trim(), options }, problems };
}

// A 422's detail is a list of {loc, msg}; other errors carry a string. Returns lines to show.
function describeError(error, fields) {
  if (Array.isArray(error.detail)) {
    return error.detail.map((item) => {
      const field = Array.isArray(item.loc) ? [...item.loc].reverse().find((part) => part in FIELD_LABELS) : null;
      if (field && fields) fields.add(field);
      const where = field ? FIELD_LABELS[field] : (item.loc || []).filter((p) => p !== "body").join(" → ");
      return where ? `${where}: ${item.msg}` : item.msg;
    });
  }
  if (typeof error.detail === "string") return [error.detail];
  return [error.status ? `${error.message} (HTTP ${error.status})` : error.message];
}

function showFormErrors(form, lines, fields) {
  const list = $("start-error-list");
  list.replaceChildren(...lines.map((line) => el("li", { text: line })));
  $("start-errors").hidden = false;
  for (const name of fields) {
    form.elements[name].setAttribute("aria-invalid", "true");
    form.elements[name].setAttribute("aria-errormessage", "start-errors");
  }
}

function clearFormErrors(form) {
  $("start-errors").hidden = true;
  $("start-error-list").replaceChildren();
  for (const name of Object.keys(FIELD_LABELS)) {
    form.elements[name].removeAttribute("aria-invalid");
    form.elements[name].removeAttribute("aria-errormessage");
  }
}

async function startStream(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const button = $("start-button");
  clearFormErrors(form);
  setText($("start-status"), "");
  const { body, problems } = readForm(form);
  if (problems.length) {
    const fields = new Set(problems.map((p) => p.field));
    showFormErrors(form, problems.map((p) => `${FIELD_LABELS[p.field]}: ${p.msg}`), fields);
    return;
  }
  button.disabled = true;
  setText($("start-status"), "Starting…");
  try {
    const stream = await api("POST", "/init", body);
    setText($("start-status"), `Stream ${shortId(stream.id)} accepted; its state is shown below.`);
    form.elements.url.value = ""; // it may hold credentials: do not leave them on screen
    selectStream(stream.id);
    await refreshStreams();
  } catch (error) {
    setText($("start-status"), "");
    const fields = new Set();
    showFormErrors(form, describeError(error, fields), fields);
  } finally {
    button.disabled = false;
  }
}

// --- the gallery of the selected stream's newest annotated frames ------------------------------

function selectStream(id) {
  if (selectedId !== id) {
    selectedId = id;
    shownFrames.clear();
    $("gallery").replaceChildren();
    $("draw-frame").removeAttribute("src");
    drawnPoints = [];
    if (watching()) stopLive("Not watching.");
    closeEventFrame();
    history.replaceState(null, "", `#stream=${encodeURIComponent(id)}`);
  }
  renderSelection();
  refreshFrames();
}

// --- zones and lines of the selected stream: drawing, counts, the live event feed ---------------

let drawnPoints = []; // fractions of the frame, [x, y]
const streamsById = new Map();
followSelection(() => selectedId, () => streamsById.get(selectedId));

function drawShapes() {
  const canvas = $("draw-canvas");
  const img = $("draw-frame");
  canvas.width = img.clientWidth;
  canvas.height = img.clientHeight;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const stream = streamsById.get(selectedId);
  const path = (points, closed, color) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = 3;
    ctx.beginPath();
    points.forEach(([x, y], i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x * canvas.width, y * canvas.height));
    if (closed) ctx.closePath();
    ctx.stroke();
  };
  if (stream) {
    const { zones, lines } = analyticsShapes(stream);
    ctx.font = "14px sans-serif";
    for (const zone of zones) {
      path(zone.points, true, "#ffb300");
      ctx.fillStyle = "#ffb300";
      ctx.fillText(zone.name, zone.points[0][0] * canvas.width + 4, zone.points[0][1] * canvas.height + 16);
    }
    for (const line of lines) {
      path(line.points, false, "#00bfff");
      ctx.fillStyle = "#00bfff";
      ctx.fillText(line.name, line.points[0][0] * canvas.width + 4, line.points[0][1] * canvas.height + 16);
    }
  }
  if (drawnPoints.length) {
    path(drawnPoints, false, "#ff4081");
    ctx.fillStyle = "#ff4081";
    for (const [x, y] of drawnPoints) ctx.fillRect(x * canvas.width - 3, y * canvas.height - 3, 6, 6);
  }
}

function placePoint(event) {
  const canvas = $("draw-canvas");
  const box = canvas.getBoundingClientRect();
  const round = (v) => Math.min(1, Math.max(0, Math.round(v * 1000) / 1000));
  drawnPoints.push([round((event.clientX - box.left) / box.width), round((event.clientY - box.top) / box.height)]);
  const shape = new FormData($("shape-form")).get("shape");
  if (shape === "line" && drawnPoints.length > 2) drawnPoints = drawnPoints.slice(-2);
  drawShapes();
}

async function saveShape(event) {
  event.preventDefault();
  const form = $("shape-form");
  const errors = $("shape-errors");
  errors.hidden = true;
  const stream = streamsById.get(selectedId);
  if (!stream) return;
  const data = new FormData(form);
  const kind = data.get("shape");
  const classes = String(data.get("classes") || "").split(",").map((c) => c.trim()).filter(Boolean);
  const shape = { name: String(data.get("name") || "").trim(), points: drawnPoints };
  if (classes.length) shape.classes = classes;
  if (kind === "zone" && data.get("dwell_s")) shape.dwell_s = Number(data.get("dwell_s"));
  const { zones, lines } = analyticsShapes(stream);
  const change = kind === "zone" ? { zones: [...zones, shape] } : { lines: [...lines, shape] };
  await patchShapes(change, errors, () => {
    drawnPoints = [];
    form.reset();
  });
}

async function patchShapes(change, errors, done) {
  try {
    const view = await api("PATCH", `/streams/${encodeURIComponent(selectedId)}`, { options: change });
    streamsById.set(view.id, view);
    if (done) done();
    drawShapes();
    renderFigures(view);
    setText($("analytics-status"), "Saved: the stream's detection process uses it from its next frames.");
  } catch (error) {
    errors.hidden = false;
    const lines = Array.isArray(error.detail)
      ? error.detail.map((d) => `${(d.loc || []).slice(2).join(" › ")}: ${d.msg}`)
      : [error.message];
    errors.replaceChildren(...lines.map((line) => el("p", { text: line })));
  }
}

function renderFigures(stream) {
  const figures = stream.analytics || { zones: [], lines: [] };
  const remove = (kind, name) => {
    const { zones, lines } = analyticsShapes(stream);
    const change = kind === "zone" ? { zones: zones.filter((z) => z.name !== name) } : { lines: lines.filter((l) => l.name !== name) };
    patchShapes(change, $("shape-errors"));
  };
  const button = (kind, name) => {
    const b = el("button", { type: "button", class: "secondary small", onclick: () => remove(kind, name) }, "Remove");
    b.setAttribute("aria-label", `Remove ${kind} ${name}`);
    return b;
  };
  $("figures-body").replaceChildren(
    ...figures.zones.map((z) => el("tr", {}, el("th", { scope: "row", text: `▭ ${z.name}` }),
      el("td", { text: String(z.occupancy) }), el("td", { text: String(z.entered) }), el("td", { text: String(z.left) }),
      el("td", {}, button("zone", z.name)))),
    ...figures.lines.map((l) => el("tr", {}, el("th", { scope: "row", text: `╱ ${l.name}` }),
      el("td", { text: "–" }), el("td", { text: String(l.in) }), el("td", { text: String(l.out) }),
      el("td", {}, button("line", l.name)))),
  );
}

function renderAnalytics() {
  const stream = streamsById.get(selectedId);
  const card = $("analytics-card");
  card.hidden = !stream || !ACTIVE_STATES.has(stream.state);
  if (card.hidden) return;
  renderFigures(stream);
  const newest = $("gallery").querySelector("img");
  const img = $("draw-frame");
  if (newest && !img.getAttribute("src")) {
    img.src = newest.src;
    img.onload = drawShapes;
  }
  drawShapes();
}

function renderSelection() {
  for (const [id, row] of rows) {
    const selected = id === selectedId;
    row.tr.classList.toggle("selected", selected);
    row.frames.setAttribute("aria-pressed", String(selected));
  }
  setText($("frames-title"), selectedId ? `Newest frames of stream ${shortId(selectedId)}` : "Newest frames");
  const stream = streamsById.get(selectedId);
  renderStreamCard(stream);
  if (stream) {
    followEvents(stream.id, ACTIVE_STATES.has(stream.state));
    renderZoneChoices(stream);
  }
  renderAnalytics();
}

// One item of GET /detection_result as the gallery shows it; keyed by frame_seq, as its image_url
// is signed afresh on every response.
function frameOf(item) {
  return {
    key: String(item.frame_seq),
    seq: item.frame_seq,
    url: safeHttpUrl(item.image_url),
    width: item.width,
    height: item.height,
    objects: item.objects || [],
    capturedAt: item.capture_time,
  };
}

// Objects grouped by class, most frequent first: "person 78%" or "8 × person · 38–84%".
function objectSummaries(objects) {
  const byClass = new Map();
  for (const object of objects) {
    byClass.set(object.class, [...(byClass.get(object.class) || []), object.confidence]);
  }
  const percent = (confidence) => Math.round(confidence * 100);
  return [...byClass]
    .sort((a, b) => b[1].length - a[1].length)
    .map(([name, confidences]) => confidences.length === 1
      ? `${name} ${percent(confidences[0])}%`
      : `${confidences.length} × ${name} · ${percent(Math.min(...confidences))}–${percent(Math.max(...confidences))}%`);
}

function createFrame(frame) {
  const labels = objectSummaries(frame.objects);
  const names = labels.length ? labels.join(", ") : "no objects";
  const img = el("img", {
    src: frame.url || "",
    alt: `Frame ${frame.seq} with ${names}`,
    width: frame.width,
    height: frame.height,
    decoding: "async",
  });
  const caption = el(
    "figcaption",
    {},
    el("ul", { class: "objects", "aria-label": "Detected objects" },
      ...(labels.length ? labels.map((label) => el("li", { text: label })) : [el("li", { class: "none", text: "no objects" })])),
    el("p", { class: "frame-meta", text: `frame ${frame.seq} · ${clockTime(frame.capturedAt)}` }),
  );
  const link = el("a", { href: frame.url || "#", target: "_blank", rel: "noopener noreferrer" }, img);
  link.setAttribute("aria-label", `Open frame ${frame.seq} full size (new tab)`);
  return el("li", { "data-frame": frame.key }, el("figure", {}, link, caption));
}

async function refreshFrames() {
  const id = selectedId;
  if (!id) return;
  const status = $("frames-status");
  try {
    const body = await api("GET", `/detection_result?id=${encodeURIComponent(id)}&limit=${FRAMES_SHOWN}`);
    if (id !== selectedId) return; // the selection changed while waiting
    const items = body.items.map(frameOf);
    const gallery = $("gallery");
    const keep = new Set(items.map((f) => f.key));
    for (const [key, li] of shownFrames) {
      if (!keep.has(key)) {
        li.remove();
        shownFrames.delete(key);
      }
    }
    items.forEach((frame, index) => {
      let li = shownFrames.get(frame.key);
      if (!li) {
        li = createFrame(frame);
        shownFrames.set(frame.key, li);
      }
      if (gallery.children[index] !== li) gallery.insertBefore(li, gallery.children[index] || null);
    });
    status.classList.remove("warn");
    setText(status, items.length
      ? `${items.length} newest annotated frames · refreshed ${new Date().toLocaleTimeString()}`
      : "No annotated frames yet — they appear here once the stream is running.");
  } catch (error) {
    if (id !== selectedId) return;
    status.classList.add("warn");
    setText(status, error.status === 404 ? "No detections for this stream." : `${error.message} — retrying`);
  }
}

// --- polling: each loop waits for its previous request, and pauses while the tab is hidden ----

function every(ms, task) {
  const loop = async () => {
    if (!document.hidden) await task();
    setTimeout(loop, ms);
  };
  loop();
}

$("start-form").addEventListener("submit", startStream);
$("streams-filter").addEventListener("submit", (event) => event.preventDefault());
$("streams-show").addEventListener("change", filterChanged);
$("streams-state").addEventListener("change", filterChanged);
let searchTimer = null;
$("streams-search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(filterChanged, 250);
});
$("streams-more").addEventListener("click", () => {
  streamPages += 1;
  refreshStreams();
});
$("key-form").addEventListener("submit", useKey);
$("draw-canvas").addEventListener("click", placePoint);
$("shape-form").addEventListener("submit", saveShape);
$("shape-clear").addEventListener("click", () => {
  drawnPoints = [];
  drawShapes();
});
window.addEventListener("resize", drawShapes);
$("live-toggle").addEventListener("click", watchLive);
$("event-frame-close").addEventListener("click", closeEventFrame);
$("timeline-kind").addEventListener("change", renderTimeline);
$("timeline-zone").addEventListener("change", renderTimeline);
$("timeline-filter").addEventListener("submit", (event) => event.preventDefault());
// a hidden tab stops watching: nobody sees the frames, so the detector need not encode them
document.addEventListener("visibilitychange", () => {
  if (document.hidden && watching()) stopLive("Not watching: the tab was hidden.");
});
if (!sessionStorage.getItem(KEY_STORAGE)) askForKey(NEEDS_KEY);
every(STREAMS_EVERY_MS, refreshStreams);
every(FRAMES_EVERY_MS, refreshFrames);
every(STORAGE_EVERY_MS, refreshStorage);
every(TIMELINE_EVERY_MS, async () => selectedId && renderTimeline());
