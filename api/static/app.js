// Lookout's web page: streams with live states, a start form, stop buttons, and a frame gallery.
// Plain browser JavaScript, no dependencies. Everything from the API is put on the page as text
// (textContent, attributes), never as HTML, so a stream's URL or an error reason cannot inject markup.

const STREAMS_EVERY_MS = 1500;
const FRAMES_EVERY_MS = 2000;
const FRAMES_SHOWN = 12;

const ACTIVE_STATES = new Set(["init_startup", "in_startup_processing", "runner_started", "ml_started"]);
const STATE_HINTS = {
  init_startup: "Accepted by the API",
  in_startup_processing: "Lifecycle workflow started",
  runner_started: "Runner is reading frames",
  ml_started: "Running: frames are being detected",
  init_shutdown: "Shutdown requested",
  in_shutdown_processing: "Waiting for the services to stop",
  inactive: "Stopped cleanly",
  inactive_error: "Stopped because of an error",
};
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

const $ = (id) => document.getElementById(id);

const KEY_STORAGE = "lookout.apiKey";
const NEEDS_KEY = "This page needs an API key (`lookout keys create`, or the one in .lookout/api-key).";
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

// --- talking to the API ------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

async function api(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (!key) {
    askForKey(NEEDS_KEY);
    throw new ApiError(401, NEEDS_KEY);
  }
  init.headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, "The API cannot be reached");
  }
  let payload = null;
  try {
    payload = await response.json();
  } catch {
    // not JSON: the status says enough
  }
  if (!response.ok) {
    const error = new ApiError(response.status, payload && payload.detail !== undefined ? payload.detail : null);
    if (response.status === 401 || response.status === 403) askForKey(error.message);
    throw error;
  }
  return payload;
}

// --- the API key: asked for once per tab session -------------------------------------------------

function askForKey(why) {
  const card = $("key-card");
  card.hidden = false;
  setText($("key-status"), why || "This page needs an API key.");
  $("api-key").focus();
}

function useKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("api-key").value = "";
  $("key-card").hidden = true;
  refreshStreams();
}

// --- small DOM helpers -------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function shortId(id) {
  return id.slice(0, 8);
}

function clockTime(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleTimeString();
}

function safeHttpUrl(url) {
  try {
    const parsed = new URL(url, location.href);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch {
    return null;
  }
}

function describeOptions(options) {
  const parts = [];
  if (options.fps != null) parts.push(`${options.fps} fps`);
  if (options.confidence != null) parts.push(`confidence ≥ ${options.confidence}`);
  if (options.classes && options.classes.length) parts.push(options.classes.join(", "));
  if (options.imgsz != null) parts.push(`${options.imgsz} px`);
  if (options.backend) parts.push(options.backend);
  if (options.motion_gating) parts.push("motion gating");
  return parts.length ? parts.join(" · ") : "defaults";
}

// --- streams -----------------------------------------------------------------------------------

async function refreshStreams() {
  try {
    const body = await api("GET", "/streams");
    renderStreams(body.streams);
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
    el("td", {}, row.state, row.reason),
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
  renderHealth(row.health, stream);
  setText(row.options, describeOptions(stream.options || {}));
  setText(row.updated, clockTime(stream.updated_at));
  row.stop.hidden = !ACTIVE_STATES.has(stream.state);
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
    if (figures.backend) parts.push(figures.threads ? `${figures.backend}, ${figures.threads} threads` : figures.backend);
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
    history.replaceState(null, "", `#stream=${encodeURIComponent(id)}`);
  }
  renderSelection();
  refreshFrames();
}

function renderSelection() {
  for (const [id, row] of rows) {
    const selected = id === selectedId;
    row.tr.classList.toggle("selected", selected);
    row.frames.setAttribute("aria-pressed", String(selected));
  }
  setText($("frames-title"), selectedId ? `Newest frames of stream ${shortId(selectedId)}` : "Newest frames");
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
$("key-form").addEventListener("submit", useKey);
if (!sessionStorage.getItem(KEY_STORAGE)) askForKey(NEEDS_KEY);
every(STREAMS_EVERY_MS, refreshStreams);
every(FRAMES_EVERY_MS, refreshFrames);
