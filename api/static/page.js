// What every part of Lookout's web page shares: the API client, the API key, DOM helpers, formats.
// Everything from the API is put on the page as text (textContent, attributes), never as HTML, so a
// stream's URL or an error reason cannot inject markup.

export const ACTIVE_STATES = new Set(["init_startup", "in_startup_processing", "runner_started", "ml_started"]);
export const ENDED_STATES = new Set(["inactive", "inactive_error"]); // what the API lists after the running ones
export const STATE_HINTS = {
  init_startup: "Accepted by the API",
  in_startup_processing: "Lifecycle workflow started",
  runner_started: "Runner is reading frames",
  ml_started: "Running: frames are being detected",
  init_shutdown: "Shutdown requested",
  in_shutdown_processing: "Waiting for the services to stop",
  inactive: "Stopped cleanly",
  inactive_error: "Stopped because of an error",
};

export const $ = (id) => document.getElementById(id);

export const KEY_STORAGE = "lookout.apiKey";
export const NEEDS_KEY = "This page needs an API key (`lookout keys create`, or the one in .lookout/api-key).";

// --- talking to the API ------------------------------------------------------------------------

export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

export async function api(method, path, body) {
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

export function askForKey(why) {
  const card = $("key-card");
  card.hidden = false;
  setText($("key-status"), why || "This page needs an API key.");
  $("api-key").focus();
}

// --- small DOM helpers -------------------------------------------------------------------------

export function el(tag, props = {}, ...children) {
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

export function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

export function shortId(id) {
  return id.slice(0, 8);
}

export function clockTime(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleTimeString();
}

export function safeHttpUrl(url) {
  if (!url) return null; // new URL(null) would be this page's "/null"
  try {
    const parsed = new URL(url, location.href);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch {
    return null;
  }
}

export function describeOptions(options) {
  const parts = [];
  if (options.fps != null) parts.push(`${options.fps} fps`);
  if (options.confidence != null) parts.push(`confidence ≥ ${options.confidence}`);
  if (options.classes && options.classes.length) parts.push(options.classes.join(", "));
  if (options.imgsz != null) parts.push(`${options.imgsz} px`);
  if (options.backend) parts.push(options.backend);
  if (options.model) parts.push(`model ${options.model}`);
  if (options.motion_gating) parts.push("motion gating");
  const shapes = [...(options.zones || []).map((z) => `zone ${z.name}`), ...(options.lines || []).map((l) => `line ${l.name}`)];
  if (shapes.length) parts.push(shapes.join(", "));
  if (options.webhook_url) parts.push("webhook");
  return parts.length ? parts.join(" · ") : "defaults";
}

export function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let unit = 0;
  while (n >= 1024 && unit < units.length - 1) {
    n /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${n} B` : `${n.toFixed(1)} ${units[unit]}`;
}

export function duration(seconds) {
  if (seconds < 120) return `${Math.round(seconds)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} days`;
}

export function analyticsShapes(stream) {
  const options = stream.options || {};
  return { zones: options.zones || [], lines: options.lines || [] };
}

