// The chosen stream on Lookout's web page: its live view, its health and its event timeline.

import {
  $, ACTIVE_STATES, STATE_HINTS, analyticsShapes, api, bytes, clockTime, describeOptions, el, KEY_STORAGE,
  safeHttpUrl, setText, shortId,
} from "./page.js";

// what this module asks of the page: the chosen stream's id and its newest view from the API
const selection = { id: () => null, stream: () => undefined };

export function followSelection(id, stream) {
  selection.id = id;
  selection.stream = stream;
}

export function watching() {
  return live !== null;
}

// What an event says: a zone or line event names its object; a health event its cause.
function describeEvent(event) {
  if (event.zone === null || event.zone === undefined) {
    const words = event.kind.replaceAll("_", " ");
    const service = event.service ? ` (${event.service})` : "";
    const downtime = event.downtime_s ? ` after ${Math.round(event.downtime_s)} s` : "";
    const reason = event.reason ? `: ${event.reason}` : "";
    return `${words}${service}${downtime}${reason}`;
  }
  const what = event.kind === "crossed" ? `crossed ${event.zone} (${event.direction})` : `${event.kind} ${event.zone}`;
  return `${event.class_name} #${event.track_id} ${what}`;
}

// --- the selected stream's event timeline: zone, line and health events on a time axis ----------

const TIMELINE_LOADED = 200; // newest events loaded when a stream is chosen; the live feed adds more
const TIMELINE_LISTED = 50;
const TIMELINE_KEPT = 500; // the newest events the page holds; older ones leave the axis
const TIMELINE_MIN_SPAN_MS = 5 * 60 * 1000;
export const TIMELINE_EVERY_MS = 10000; // the axis ends at "now": it slides
const HEALTH_KINDS = new Set(["camera_offline", "camera_online", "service_restarted", "stream_failed", "stream_recovered"]);
const timeline = new Map(); // event id -> event, of the selected stream
let feed = null; // { id, abort, last } of the running event feed

function eventGroup(event) {
  return HEALTH_KINDS.has(event.kind) ? "health" : event.kind;
}

function timelineShown() {
  const kind = $("timeline-kind").value;
  const zone = $("timeline-zone").value;
  return [...timeline.values()]
    .filter((e) => (!kind || eventGroup(e) === kind) && (!zone || e.zone === zone))
    .sort((a, b) => b.id - a.id);
}

function addEvents(events) {
  for (const event of events) timeline.set(event.id, event);
  if (timeline.size > TIMELINE_KEPT) {
    const oldest = [...timeline.keys()].sort((a, b) => a - b).slice(0, timeline.size - TIMELINE_KEPT);
    for (const id of oldest) timeline.delete(id);
  }
  renderTimeline();
}

export function renderZoneChoices(stream) {
  const select = $("timeline-zone");
  const { zones, lines } = stream ? analyticsShapes(stream) : { zones: [], lines: [] };
  const names = new Set([...zones.map((z) => z.name), ...lines.map((l) => l.name)]);
  for (const event of timeline.values()) if (event.zone) names.add(event.zone);
  const wanted = ["", ...[...names].sort()];
  const have = [...select.options].map((o) => o.value);
  if (wanted.join("\n") === have.join("\n")) return;
  const chosen = select.value;
  select.replaceChildren(...wanted.map((name) => el("option", { value: name, text: name || "any" })));
  select.value = wanted.includes(chosen) ? chosen : "";
}

export function renderTimeline() {
  renderZoneChoices(selection.stream());
  const shown = timelineShown();
  const now = Date.now();
  const oldest = shown.length ? Math.min(...shown.map((e) => new Date(e.occurred_at).getTime())) : now;
  const from = Math.min(oldest, now - TIMELINE_MIN_SPAN_MS);
  const span = Math.max(1, now - from);
  setText($("timeline-from"), clockTime(new Date(from).toISOString()));
  setText($("timeline-to"), "now");
  // the axis and the list are drawn afresh: keep the keyboard's place on them
  const focused = document.activeElement && document.activeElement.closest("#timeline-card [data-event]");
  const place = focused ? [focused.closest("#timeline-axis") ? "axis" : "list", focused.dataset.event] : null;
  const axis = $("timeline-axis");
  axis.replaceChildren(...shown.map((event) => {
    const at = (new Date(event.occurred_at).getTime() - from) / span;
    const marker = el("button", {
      type: "button",
      class: `marker marker-${eventGroup(event)}`,
      title: `${clockTime(event.occurred_at)} · ${describeEvent(event)}`,
      "aria-label": `${clockTime(event.occurred_at)}: ${describeEvent(event)}`,
      "data-event": String(event.id),
      onclick: () => showEventFrame(event),
    });
    marker.style.left = `${(Math.min(1, Math.max(0, at)) * 100).toFixed(2)}%`;
    return marker;
  }));
  $("timeline-list").replaceChildren(...shown.slice(0, TIMELINE_LISTED).map(timelineItem));
  if (place) {
    const [where, id] = place;
    const again = where === "axis"
      ? axis.querySelector(`[data-event="${id}"]`)
      : $("timeline-list").querySelector(`[data-event="${id}"] button`);
    if (again) again.focus();
  }
  const total = timeline.size;
  setText($("timeline-status"), total
    ? `${shown.length} of ${total} events${feed && feed.live ? " · following live" : ""}`
    : "No events yet: draw a zone or a line below, or wait for the stream's health to change.");
}

function timelineItem(event) {
  const url = safeHttpUrl(event.image_url);
  const text = `${clockTime(event.occurred_at)} · ${describeEvent(event)}`;
  const thumb = url
    ? el("button", { type: "button", class: "thumb", onclick: () => showEventFrame(event) },
      el("img", { src: url, alt: `Frame of: ${text}`, width: 96, height: 72, loading: "lazy" }))
    : el("span", { class: `thumb thumb-none marker-${eventGroup(event)}`, "aria-hidden": "true" });
  if (url) thumb.setAttribute("aria-label", `Show the frame of: ${text}`);
  return el("li", { "data-event": String(event.id), class: `event-${eventGroup(event)}` }, thumb, el("span", { text }));
}

// "Jump to its frame": the event's annotated frame in the stream's viewer, in place of the live view.
export function showEventFrame(event) {
  const url = safeHttpUrl(event.image_url);
  const figure = $("event-frame");
  const text = `${clockTime(event.occurred_at)} · ${describeEvent(event)}`;
  if (url) $("event-frame-img").src = url;
  $("event-frame-img").alt = `Frame ${event.frame_seq ?? ""} of: ${text}`;
  $("event-frame-img").hidden = !url;
  setText($("event-frame-caption"), url ? `Frame ${event.frame_seq} · ${text}` : `${text} (no frame: a health event, or its frame was deleted)`);
  figure.hidden = false;
  $("event-frame-close").hidden = false;
  $("live-view").hidden = true;
  for (const node of document.querySelectorAll("[data-event].chosen")) node.classList.remove("chosen");
  for (const node of document.querySelectorAll(`[data-event="${event.id}"]`)) node.classList.add("chosen");
  $("stream-card").scrollIntoView({ block: "nearest" });
}

export function closeEventFrame() {
  $("event-frame").hidden = true;
  $("event-frame-close").hidden = true;
  $("live-view").hidden = live === null;
  for (const node of document.querySelectorAll("[data-event].chosen")) node.classList.remove("chosen");
}

// The live feed (GET /events/stream) read with fetch, since EventSource cannot send the API key.
// It resumes after the last event shown when the connection drops.
export async function followEvents(id, running) {
  if (feed && feed.id === id) {
    if (!running) feed.abort.abort(); // it has ended: no more events to follow
    return;
  }
  if (feed) feed.abort.abort();
  const abort = new AbortController();
  feed = { id, abort, last: null, live: false };
  const mine = feed;
  timeline.clear();
  renderTimeline();
  const recent = await api("GET", `/events?id=${encodeURIComponent(id)}&limit=${TIMELINE_LOADED}`).catch(() => null);
  if (abort.signal.aborted) return;
  if (recent) {
    addEvents(recent.items);
    if (recent.items.length) mine.last = recent.items[0].id;
  }
  while (running && !abort.signal.aborted) {
    try {
      const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY_STORAGE)}` };
      if (mine.last !== null) headers["Last-Event-ID"] = String(mine.last);
      const response = await fetch(`/events/stream?id=${encodeURIComponent(id)}`, { headers, signal: abort.signal });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      mine.live = true;
      renderTimeline();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const message = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = message.split("\n").find((line) => line.startsWith("data:"));
          if (!data) continue;
          const event = JSON.parse(data.slice(5));
          mine.last = event.id;
          addEvents([event]);
        }
      }
    } catch {
      // dropped or aborted: try again shortly, from the last event shown
    }
    mine.live = false;
    renderTimeline();
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

// --- the selected stream: its live view and its health --------------------------------------

let live = null; // { id } of the stream being watched

export async function watchLive() {
  const id = selection.id();
  const button = $("live-toggle");
  if (live !== null) {
    stopLive("Not watching.");
    return;
  }
  button.disabled = true;
  try {
    const ticket = await api("POST", `/streams/${encodeURIComponent(id)}/live`);
    if (id !== selection.id()) return;
    live = { id };
    const img = $("live-view");
    img.onerror = () => live && live.id === id && stopLive("The live view ended (the stream stopped or the API went away).");
    img.src = ticket.url;
    closeEventFrame();
    button.textContent = "Stop watching";
    button.setAttribute("aria-pressed", "true");
    setText($("live-status"), "Live: the annotated frames as the detector makes them.");
  } catch (error) {
    setText($("live-status"), `No live view: ${error.message}`);
  } finally {
    button.disabled = false;
  }
}

export function stopLive(why) {
  live = null;
  $("live-status").classList.remove("warn");
  const img = $("live-view");
  img.onerror = null;
  img.removeAttribute("src"); // ends the MJPEG response: the detector stops encoding for it
  img.hidden = true;
  $("live-toggle").textContent = "Watch live";
  $("live-toggle").setAttribute("aria-pressed", "false");
  setText($("live-status"), why);
}

// A live view whose frames stopped keeps its last picture: say so, from the stream's health, rather
// than let an old frame pass for live.
const STALE_AFTER_S = 10;

const STOPPED_STATUSES = new Set(["camera_unreachable", "lost"]);

function showLiveFreshness(services) {
  const troubled = Object.keys(services).sort()
    .filter((name) => STOPPED_STATUSES.has(services[name].status))
    .map((name) => `${name} ${services[name].status.replace("_", " ")}`);
  const age = services.ml && services.ml.figures ? services.ml.figures.newest_frame_age_s : null;
  if (age != null && age > STALE_AFTER_S) troubled.push(`newest frame ${Math.round(age)} s old`);
  const status = $("live-status");
  status.classList.toggle("warn", troubled.length > 0);
  setText(status, troubled.length
    ? `Paused: ${troubled.join(", ")}. The picture is the last frame, not live.`
    : "Live: the annotated frames as the detector makes them.");
}

function fact(term, value, title) {
  return [el("dt", { text: term }), el("dd", { text: value, title: title || value })];
}

export function renderStreamCard(stream) {
  const card = $("stream-card");
  card.hidden = !stream;
  $("timeline-card").hidden = !stream;
  if (!stream) return;
  setText($("stream-title"), `Stream ${shortId(stream.id)}`);
  const state = $("stream-state");
  state.className = `state state-${stream.state}`;
  setText(state, stream.state);
  state.title = STATE_HINTS[stream.state] || "";
  const workflowUrl = safeHttpUrl(stream.workflow_url);
  $("stream-workflow").hidden = workflowUrl === null;
  if (workflowUrl !== null && $("stream-workflow").href !== workflowUrl) $("stream-workflow").href = workflowUrl;
  const running = ACTIVE_STATES.has(stream.state);
  $("live-toggle").hidden = !running;
  if (!running) stopLive("The stream is stopping or has ended: no live view.");

  const services = (stream.health && stream.health.services) || {};
  const runner = (services.runner && services.runner.figures) || {};
  const ml = (services.ml && services.ml.figures) || {};
  const restarts = Object.entries(services).filter(([, s]) => s.restarts);
  // a service that lost the camera or the stream makes no frames, whatever its last heartbeat said
  const fps = (name) => (STOPPED_STATUSES.has(services[name]?.status) ? 0 : services[name]?.figures?.fps ?? 0);
  if (live !== null && running) showLiveFreshness(services);
  const kept = stream.storage;
  const backend = ml.backend
    ? `${ml.backend}${ml.engine === "shared" ? " · shared engine" : ml.threads ? ` · ${ml.threads} threads` : ""}`
    : "–";
  const facts = [
    ...fact("URL", stream.url_redacted),
    ...fact("Services", Object.keys(services).sort().map((n) => `${n} ${services[n].status.replace("_", " ")}`).join(" · ") || stream.health_unavailable || "–"),
    ...fact("Frames per second", Object.keys(services).length ? `${fps("runner")} read · ${fps("ml")} detected` : "–"),
    ...fact("Frames dropped", `${runner.frames_dropped || 0} runner · ${ml.frames_dropped || 0} ML`),
    ...fact("Newest frame", ml.newest_frame_age_s != null ? `${ml.newest_frame_age_s} s old` : "–"),
    ...fact("Restarts", restarts.length
      ? restarts.map(([name, s]) => `${name} ${s.restarts}`).join(" · ")
      : "none", restarts.map(([name, s]) => `${name}: ${s.last_restart_reason}`).join("\n") || "none"),
    ...fact("Backend", backend, ml.model_note || backend),
    ...fact("Storage", kept ? `${kept.frames} frames · ${bytes(kept.bytes)}` : "–"),
    ...fact("Options", describeOptions(stream.options || {})),
  ];
  $("stream-health").replaceChildren(...facts);
}
