// piccolod operator portal: plain JavaScript, no dependencies, no build step.
//
// The page asks GET /api/v1/auth/session which screen to show (setup, login or
// the dashboard), loads a snapshot of the runtime over the REST API and keeps
// it current with Server-Sent Events (GET /api/v1/events).  Every change to
// the DOM goes through textContent and attributes: nothing received is ever
// parsed as HTML.  State-changing requests carry the session's CSRF token in
// X-CSRF-Token.  See docs/portal.md.

"use strict";

const API = "/api/v1";

/** Topics the dashboard reacts to (the state stream). */
const STATE_TOPICS = [
  "persistence.lock_state",
  "supervisor.child_state",
  "health.component",
  "cluster.leadership",
  "jobs.progress",
  "jobs.finished",
  "apps.state",
  "services.route",
  "persistence.export_result",
];

/** Topics known to this page; the server adds its own list in <meta name="piccolod-topics">. */
const KNOWN_TOPICS = new Set([
  ...STATE_TOPICS,
  "persistence.volume_state",
  "persistence.control_commit",
  "persistence.control_health",
  "persistence.export_result",
  "device",
  "remote.config",
  "audit",
  "fsm.transition",
  "controller.reconciled",
  "telemetry.sample",
  "mdns.name",
]);

const LOG_LIMIT = 300;
const RECENT_JOBS = 5;
const RESYNC_DEBOUNCE_MS = 250;

// --------------------------------------------------------------------------
// Small DOM helpers

const $ = (id) => document.getElementById(id);

/** An element with attributes and children (strings become text nodes). */
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "class") node.className = value;
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function show(node, visible) {
  node.hidden = !visible;
}

function setText(node, text) {
  const value = text === null || text === undefined ? "" : String(text);
  if (node.textContent !== value) node.textContent = value;
}

function setError(node, message) {
  setText(node, message || "");
  show(node, Boolean(message));
}

function clockTime(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "";
  return new Date(seconds * 1000).toLocaleTimeString([], { hour12: false });
}

function percent(fraction) {
  const value = Math.max(0, Math.min(1, Number(fraction) || 0));
  return `${Math.round(value * 100)} %`;
}

// --------------------------------------------------------------------------
// HTTP

class ApiError extends Error {
  constructor(status, problem) {
    const detail = (problem && (problem.detail || problem.title)) || `HTTP ${status}`;
    super(detail);
    this.status = status;
    this.problem = problem || {};
    this.type = String(this.problem.type || "").split("/").pop();
  }
}

const csrf = { token: null };

async function fetchCsrf() {
  const answer = await request("GET", "/auth/csrf");
  csrf.token = answer.csrf_token || null;
  return csrf.token;
}

/**
 * One API call: JSON in and out.  Unsafe methods carry the CSRF token; a
 * refusal for a missing or stale token refreshes it once and retries.
 */
async function request(method, path, body, retried = false) {
  const headers = { Accept: "application/json" };
  const unsafe = !["GET", "HEAD", "OPTIONS"].includes(method);
  if (unsafe) {
    if (csrf.token === null && !isPublicWrite(path)) await fetchCsrf().catch(() => null);
    if (csrf.token) headers["X-CSRF-Token"] = csrf.token;
  }
  const init = { method, headers, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(API + path, init);
  noteServerTime(response);
  let data = null;
  const type = response.headers.get("content-type") || "";
  if (type.includes("json")) data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new ApiError(response.status, data);
    if (error.status === 403 && error.type === "csrf" && unsafe && !retried) {
      csrf.token = null;
      await fetchCsrf();
      return request(method, path, body, true);
    }
    // A 401 "unauthorized" is a missing or ended session; "wrong-password"
    // and "wrong-recovery-key" are 401s too, but the session is fine.
    if (error.status === 401 && error.type === "unauthorized" && !isPublicWrite(path)) {
      sessionLost();
    }
    throw error;
  }
  return data;
}

/** Server time minus page time (seconds), from the Date header: sessions expire on server time. */
const clock = { skew: 0 };

function noteServerTime(response) {
  const date = Date.parse(response.headers.get("date") || "");
  if (!Number.isNaN(date)) clock.skew = (date - Date.now()) / 1000;
}

function serverNow() {
  return Date.now() / 1000 + clock.skew;
}

function isPublicWrite(path) {
  return (
    path === "/auth/login" ||
    path === "/auth/setup" ||
    path === "/auth/recovery-key/reset" ||
    path.startsWith("/storage/restore")
  );
}

function explain(error) {
  if (!(error instanceof ApiError)) return "piccolod cannot be reached. Is it running?";
  if (error.status === 429) {
    const wait = Number(error.problem.retry_after);
    return wait > 0 ? `Too many attempts: try again in ${Math.ceil(wait)} s.` : error.message;
  }
  if (error.type === "wrong-password") return "Wrong password.";
  if (error.type === "wrong-recovery-key") return "Wrong recovery key.";
  if (error.status === 401) return "Wrong password or recovery key.";
  return error.message;
}

// --------------------------------------------------------------------------
// The runtime as the page knows it

const state = {
  screen: "loading",
  lock: "unknown",
  nodeId: "",
  health: new Map(), // component -> {level, message, required}
  overall: "unknown",
  children: new Map(), // name -> {state, restarts, last_error}
  leadership: new Map(), // resource -> {role, leader_id, leader_address, term}
  apps: new Map(), // name -> {state, detail, ports: Map(listener -> {port, protocol})}
  jobs: new Map(), // id -> job
  logPaused: false,
  logCount: 0,
};

// --------------------------------------------------------------------------
// Screens

const SCREENS = ["loading", "setup", "recovery", "login", "dashboard"];

function showScreen(name) {
  state.screen = name;
  for (const screen of SCREENS) show($(`screen-${screen}`), screen === name);
  show($("bar-status"), name === "dashboard");
  const focus = {
    setup: "setup-password",
    login: "login-password",
    recovery: "recovery-ack",
  }[name];
  if (focus) $(focus).focus();
}

function notice(message) {
  setError($("notice"), message);
}

async function boot() {
  readServerTopics();
  bindForms();
  await route();
}

/** Show the screen the session calls for. */
async function route() {
  let session;
  try {
    session = await request("GET", "/auth/session");
  } catch (error) {
    notice(explain(error));
    showScreen("loading");
    setTimeout(route, 2000);
    return;
  }
  notice("");
  setLock(session.state || "unknown");
  if (!session.initialized && session.state === "uninitialized") {
    stopStreams();
    showScreen("setup");
  } else if (!session.authenticated) {
    stopStreams();
    showScreen("login");
  } else {
    watchExpiry(session);
    await enterDashboard();
  }
}

/**
 * The event stream outlives the session on the server, so the page checks
 * the session when it is due to end (idle or absolute timeout) and then
 * shows the login screen; every request the page makes moves that time.
 */
let expiryTimer = null;

function watchExpiry(session) {
  clearTimeout(expiryTimer);
  expiryTimer = null;
  const ends = Math.min(session.idle_expires_at ?? Infinity, session.expires_at ?? Infinity);
  if (!Number.isFinite(ends)) return;
  const wait = Math.max(1, ends - serverNow() + 1);
  expiryTimer = setTimeout(checkSession, Math.min(wait * 1000, 2 ** 31 - 1));
}

async function checkSession() {
  expiryTimer = null;
  if (state.screen !== "dashboard") return;
  try {
    const session = await request("GET", "/auth/session");
    if (session.authenticated) watchExpiry(session);
    else sessionLost();
  } catch {
    expiryTimer = setTimeout(checkSession, 30000);
  }
}

function sessionLost() {
  clearTimeout(expiryTimer);
  expiryTimer = null;
  if (state.screen !== "dashboard") return;
  csrf.token = null;
  stopStreams();
  showScreen("login");
  setError($("login-error"), "Your session ended: log in again.");
}

// --------------------------------------------------------------------------
// Forms

function bindForms() {
  $("setup-form").addEventListener("submit", onSetup);
  $("restore-form").addEventListener("submit", onRestore);
  $("backup-button").addEventListener("click", onBackup);
  $("password-form").addEventListener("submit", onPasswordChange);
  $("recovery-rotate").addEventListener("click", () => $("recovery-dialog").showModal());
  $("recovery-dialog").addEventListener("close", onRecoveryDialog);
  $("login-form").addEventListener("submit", onLogin);
  $("reset-form").addEventListener("submit", onReset);
  $("unlock-form").addEventListener("submit", onUnlock);
  $("lock-button").addEventListener("click", () => $("lock-dialog").showModal());
  $("lock-dialog").addEventListener("close", onLockDialog);
  $("logout").addEventListener("click", onLogout);
  $("recovery-ack").addEventListener("change", (e) => {
    $("recovery-done").disabled = !e.target.checked;
  });
  $("recovery-done").addEventListener("click", () => {
    $("recovery-words").replaceChildren();
    enterDashboard();
  });
  $("recovery-copy").addEventListener("click", onCopyRecovery);
  for (const radio of document.querySelectorAll('input[name="unlock-with"]')) {
    radio.addEventListener("change", onUnlockChoice);
  }
  $("events-form").addEventListener("submit", (e) => {
    e.preventDefault();
    applyFilter();
  });
  $("events-pause").addEventListener("click", onPause);
  $("events-clear").addEventListener("click", () => {
    $("events-log").replaceChildren();
    state.logCount = 0;
    setText($("events-count"), "");
  });
}

async function busy(form, work) {
  const buttons = form.querySelectorAll("button");
  for (const button of buttons) button.disabled = true;
  form.setAttribute("aria-busy", "true");
  try {
    return await work();
  } finally {
    for (const button of buttons) button.disabled = false;
    form.removeAttribute("aria-busy");
  }
}

async function onSetup(event) {
  event.preventDefault();
  const password = $("setup-password").value;
  const error = $("setup-error");
  if (password.length < 8) return setError(error, "The password needs at least 8 characters.");
  if (password !== $("setup-confirm").value) return setError(error, "The passwords differ.");
  setError(error, "");
  await busy(event.target, async () => {
    try {
      const answer = await request("POST", "/auth/setup", { password });
      csrf.token = answer.csrf_token || null;
      watchExpiry(answer);
      $("setup-form").reset();
      setLock(answer.state || "unlocked");
      showRecovery(answer.recovery_key || "");
    } catch (e) {
      if (e instanceof ApiError && e.status === 409) return route();
      setError(error, explain(e));
    }
  });
}

/** Files up to this size are hashed in the page (Web Crypto digests a whole buffer at once). */
const HASH_LIMIT = 256 * 1024 * 1024;

/**
 * SHA-256 of a file in hex, or null where Web Crypto is missing (plain HTTP
 * off localhost) or the file is too large to hold in memory at once: the
 * box's manifest check covers every file either way.
 */
async function sha256Hex(file) {
  if (!(window.crypto && crypto.subtle) || file.size > HASH_LIMIT) return null;
  const digest = await crypto.subtle.digest("SHA-256", await file.arrayBuffer());
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Restore this fresh box from a backup: open an upload, send the file in
 * chunks of the server's size (resuming from what it has after a refusal
 * of an offset), finish; the server checks and imports it, storage is then
 * locked and the old password logs in.
 */
async function onRestore(event) {
  event.preventDefault();
  const file = $("restore-file").files[0];
  const error = $("restore-error");
  if (!file) return setError(error, "Choose the backup file first.");
  setError(error, "");
  await busy(event.target, async () => {
    const bar = $("restore-bar");
    try {
      const sha256 = await sha256Hex(file);
      const body = sha256 ? { size: file.size, sha256 } : { size: file.size };
      const opened = await request("POST", "/storage/restore", body);
      const path = `/storage/restore/${encodeURIComponent(opened.upload)}`;
      show($("restore-progress"), true);
      let offset = 0;
      while (offset < file.size) {
        const chunk = file.slice(offset, offset + opened.chunk_size);
        const response = await fetch(`${API}${path}?offset=${offset}`, {
          method: "PUT",
          headers: { "Content-Type": "application/octet-stream", Accept: "application/json" },
          body: chunk,
          credentials: "same-origin",
          cache: "no-store",
        });
        const answer = await response.json().catch(() => null);
        if (response.status === 409 && answer && Number.isInteger(answer.received)) {
          offset = answer.received;
          continue;
        }
        if (!response.ok) throw new ApiError(response.status, answer);
        offset = answer.received;
        bar.value = offset / file.size;
        setText($("restore-percent"), percent(offset / file.size));
      }
      await request("POST", `${path}/finish`);
      $("restore-form").reset();
      show($("restore-progress"), false);
      $("restore").open = false;
      await route();
      setError($("login-status"), "Restored. Log in with the administrator password of the box you backed up.");
    } catch (e) {
      show($("restore-progress"), false);
      setError(error, explain(e));
    }
  });
}

async function loadBackups() {
  let answer;
  try {
    answer = await request("GET", "/exports");
  } catch (error) {
    if (error instanceof ApiError && [403, 404, 503].includes(error.status)) answer = { exports: [] };
    else throw error;
  }
  const items = (answer.exports || []).map((b) =>
    h(
      "li",
      { class: "row", "data-backup": b.name },
      h(
        "div",
        { class: "row-head" },
        h("a", { href: `${API}/exports/${encodeURIComponent(b.kind)}/${encodeURIComponent(b.name)}`, download: b.name, text: `${b.kind} backup` }),
        h("span", { class: "muted num", text: `${(b.size / 1024).toFixed(0)} KiB` }),
      ),
      h("p", { class: "muted wrap", text: new Date(b.created_at * 1000).toLocaleString() }),
    ),
  );
  $("backups-list").replaceChildren(...items);
  setText($("backups-count"), items.length ? String(items.length) : "");
  show($("backups-empty"), items.length === 0);
}

async function onBackup() {
  const button = $("backup-button");
  const error = $("backup-error");
  setError(error, "");
  button.disabled = true;
  try {
    await request("POST", "/exports/control");
    await loadBackups();
  } catch (e) {
    setError(error, explain(e));
  } finally {
    button.disabled = false;
  }
}

function showRecovery(key) {
  const words = key.split(/\s+/).filter(Boolean);
  $("recovery-words").replaceChildren(...words.map((word) => h("li", { text: word })));
  $("recovery-ack").checked = false;
  $("recovery-done").disabled = true;
  showScreen("recovery");
}

async function onCopyRecovery() {
  const words = [...$("recovery-words").children].map((li) => li.textContent).join(" ");
  try {
    await navigator.clipboard.writeText(words);
    setText($("recovery-copy"), "Copied");
  } catch {
    const range = document.createRange();
    range.selectNodeContents($("recovery-words"));
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    setText($("recovery-copy"), "Selected: copy with your keyboard");
  }
}

async function onLogin(event) {
  event.preventDefault();
  const field = $("login-password");
  const error = $("login-error");
  if (!field.value) return setError(error, "Enter the password.");
  setError(error, "");
  setError($("login-status"), "");
  await busy(event.target, async () => {
    try {
      const answer = await request("POST", "/auth/login", { password: field.value });
      csrf.token = answer.csrf_token || null;
      field.value = "";
      watchExpiry(answer);
      setLock(answer.state || state.lock);
      await enterDashboard();
    } catch (e) {
      setError(error, explain(e));
      field.select();
    }
  });
}

async function onReset(event) {
  event.preventDefault();
  const words = $("reset-recovery").value.trim().split(/\s+/).filter(Boolean);
  const password = $("reset-password").value;
  const error = $("reset-error");
  if (words.length !== 24) return setError(error, "The recovery key has 24 words.");
  if (password.length < 8) return setError(error, "The password needs at least 8 characters.");
  if (password !== $("reset-confirm").value) return setError(error, "The passwords differ.");
  setError(error, "");
  await busy(event.target, async () => {
    try {
      await request("POST", "/auth/recovery-key/reset", {
        recovery_key: words.join(" "),
        new_password: password,
      });
      $("reset-form").reset();
      $("forgot").open = false;
      setError($("login-error"), "");
      setError($("login-status"), "The password was changed: log in with the new one.");
      $("login-password").focus();
    } catch (e) {
      setError(error, explain(e));
    }
  });
}

function onUnlockChoice() {
  const recovery = document.querySelector('input[name="unlock-with"]:checked').value === "recovery";
  show($("unlock-password-field"), !recovery);
  show($("unlock-recovery-field"), recovery);
}

async function onUnlock(event) {
  event.preventDefault();
  const recovery = document.querySelector('input[name="unlock-with"]:checked').value === "recovery";
  const value = recovery ? $("unlock-recovery").value.trim().replace(/\s+/g, " ") : $("unlock-password").value;
  const error = $("unlock-error");
  if (!value) return setError(error, recovery ? "Enter the 24 words." : "Enter the password.");
  setError(error, "");
  await busy(event.target, async () => {
    try {
      const body = recovery ? { recovery_key: value } : { password: value };
      const answer = await request("POST", "/storage/unlock", body);
      $("unlock-form").reset();
      onUnlockChoice();
      setLock(answer.state || "unlocked");
      scheduleResync();
    } catch (e) {
      setError(error, explain(e));
    }
  });
}

async function onPasswordChange(event) {
  event.preventDefault();
  const error = $("password-error");
  const status = $("password-status");
  const password = $("password-new").value;
  setError(status, "");
  if (password.length < 8) return setError(error, "The new password needs at least 8 characters.");
  if (password !== $("password-confirm").value) return setError(error, "The new passwords differ.");
  setError(error, "");
  await busy(event.target, async () => {
    try {
      const answer = await request("POST", "/auth/password", {
        old_password: $("password-old").value,
        new_password: password,
      });
      if (answer.csrf_token) csrf.token = answer.csrf_token;
      $("password-form").reset();
      const ended = answer.sessions_revoked || 0;
      setError(status, `The password was changed${ended ? `; ${ended} other session(s) ended` : ""}.`);
    } catch (e) {
      setError(error, explain(e));
    }
  });
}

async function onRecoveryDialog() {
  if ($("recovery-dialog").returnValue !== "rotate") return;
  const button = $("recovery-rotate");
  button.disabled = true;
  try {
    const answer = await request("POST", "/auth/recovery-key");
    showRecovery(answer.recovery_key || "");
  } catch (e) {
    notice(`Could not replace the recovery key: ${explain(e)}`);
  } finally {
    button.disabled = false;
  }
}

async function onLockDialog() {
  if ($("lock-dialog").returnValue !== "lock") return;
  const button = $("lock-button");
  button.disabled = true;
  try {
    const answer = await request("POST", "/storage/lock");
    setLock(answer.state || "locked");
  } catch (e) {
    notice(`Could not lock: ${explain(e)}`);
  } finally {
    button.disabled = false;
  }
}

async function onLogout() {
  try {
    await request("POST", "/auth/logout");
  } catch {
    // The session is gone either way.
  }
  csrf.token = null;
  stopStreams();
  await route();
}

// --------------------------------------------------------------------------
// Dashboard: snapshot, then live updates

async function enterDashboard() {
  showScreen("dashboard");
  if (csrf.token === null) await fetchCsrf().catch(() => null);
  openStream();
}

/** Load every view from the REST API (after the state stream is open). */
async function resync() {
  const tasks = [loadDetail(), loadJobs(), loadApps(), loadStorage(), loadBackups()];
  const results = await Promise.allSettled(tasks);
  const failed = results.find((r) => r.status === "rejected");
  if (failed && !(failed.reason instanceof ApiError && failed.reason.status === 401)) {
    notice(`Some views could not be loaded: ${explain(failed.reason)}`);
  } else {
    notice("");
  }
}

let resyncTimer = null;
function scheduleResync() {
  if (resyncTimer !== null) return;
  resyncTimer = setTimeout(() => {
    resyncTimer = null;
    resync();
  }, RESYNC_DEBOUNCE_MS);
}

async function loadStorage() {
  const status = await request("GET", "/storage/status");
  setLock(status.state, status);
}

async function loadDetail() {
  const detail = await request("GET", "/health/detail");
  state.nodeId = detail.node_id || "";
  setText($("node-id"), state.nodeId);
  state.overall = detail.overall || "unknown";
  state.health = new Map((detail.components || []).map((c) => [c.component, c]));
  state.children = new Map((detail.children || []).map((c) => [c.name, c]));
  state.leadership = new Map((detail.leadership || []).map((l) => [l.resource, l]));
  renderHealth();
  renderChildren();
  renderLeadership();
}

async function loadJobs() {
  try {
    const answer = await request("GET", "/jobs");
    state.jobs = new Map((answer.jobs || []).map((j) => [j.id, j]));
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) throw error;
    state.jobs = new Map();
  }
  renderJobs();
}

/**
 * Apps from GET /api/v1/apps, else the apps.list command; none when neither
 * exists.  While storage is locked (423) the apps last seen stay listed, with
 * the states their events report.
 */
async function loadApps() {
  let apps = null;
  if (state.lock === "locked") {
    apps = KEEP;
  } else if (appsRoute === "command") {
    apps = await appsFromCommand();
  } else {
    try {
      apps = (await request("GET", "/apps")).apps;
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      if (error.status === 404 || error.status === 405) {
        appsRoute = "command"; // this daemon has no GET /api/v1/apps
        apps = await appsFromCommand();
      } else if (error.status !== 423) {
        throw error;
      } else {
        apps = KEEP;
      }
    }
  }
  if (apps === KEEP) {
    renderApps();
    return;
  }
  const next = new Map();
  for (const app of apps || []) {
    const status = app.status || {};
    const old = state.apps.get(app.name);
    const ports = old ? old.ports : new Map();
    const listeners = new Map(((app.spec && app.spec.listeners) || []).map((l) => [l.name, l]));
    for (const [listener, allocation] of Object.entries(status.ports || app.ports || {})) {
      const port = allocation && (allocation.public || allocation.public_port);
      if (port && !ports.has(listener)) {
        const spec = listeners.get(listener) || {};
        ports.set(listener, { port, protocol: spec.protocol || "http" });
      }
    }
    next.set(app.name, {
      state: status.state || app.state || (app.enabled === false ? "stopped" : "pending"),
      detail: status.message || app.detail || "",
      ports,
    });
  }
  state.apps = next;
  renderApps();
}

const KEEP = Symbol("keep the apps last seen");
let appsRoute = "rest";

async function appsFromCommand() {
  try {
    const answer = await request("POST", "/commands/apps.list", {});
    return (answer.result && answer.result.apps) || [];
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    if (error.status === 423) return KEEP;
    if ([403, 404, 503].includes(error.status)) return null;
    throw error;
  }
}

// --------------------------------------------------------------------------
// Live updates

/**
 * One stream per page (browsers allow six connections per host over
 * HTTP/1.1, so every open tab counts): it asks for the dashboard's topics
 * and the log's filter together; each event updates the dashboard, the log
 * or both.
 */
const stream = { source: null, retry: 1000, logPatterns: null };

function stopStreams() {
  if (stream.source) stream.source.close();
  stream.source = null;
  setLink("offline");
}

function eventSource(patterns) {
  return new EventSource(`${API}/events?topics=${encodeURIComponent(patterns.join(","))}`, {
    withCredentials: true,
  });
}

/** What the stream asks for: the dashboard's topics plus the log's patterns (16 at most). */
function streamPatterns(logPatterns) {
  if (logPatterns.includes("#")) return ["#"];
  const extra = STATE_TOPICS.filter((t) => !logPatterns.some((p) => matches(p, t)));
  const all = [...logPatterns, ...extra];
  return all.length > 16 ? ["#"] : all;
}

/** (Re)open the stream; the dashboard resyncs once it is open. */
function openStream() {
  if (stream.source) stream.source.close();
  if (stream.logPatterns === null) stream.logPatterns = parseFilter($("events-topics").value);
  const patterns = streamPatterns(stream.logPatterns);
  const source = eventSource(patterns);
  stream.source = source;
  setLink("connecting");
  source.addEventListener("open", () => {
    stream.retry = 1000;
    setLink("live");
    // The stream is open: from now on no change is missed, so the snapshot
    // (loaded after) plus the events (applied as they come) are complete.
    scheduleResync();
  });
  for (const topic of KNOWN_TOPICS) {
    if (patterns.some((p) => matches(p, topic))) {
      source.addEventListener(topic, (message) => onMessage(topic, message));
    }
  }
  source.addEventListener("gap", (m) => logControl("gap", m));
  source.addEventListener("dropped", (m) => logControl("dropped", m));
  source.addEventListener("error", () => {
    if (stream.source !== source) return;
    if (source.readyState === EventSource.CLOSED) {
      // Refused (the session ended, or the server went away): find out which.
      setLink("offline");
      stream.source = null;
      const wait = stream.retry;
      stream.retry = Math.min(30000, wait * 2);
      setTimeout(() => {
        if (state.screen === "dashboard" && stream.source === null) recheck();
      }, wait);
    } else {
      setLink("connecting"); // the browser reconnects, resuming with Last-Event-ID
    }
  });
}

async function recheck() {
  try {
    const session = await request("GET", "/auth/session");
    if (!session.authenticated) return sessionLost();
    openStream();
  } catch {
    setTimeout(() => {
      if (state.screen === "dashboard" && stream.source === null) recheck();
    }, stream.retry);
  }
}

function onMessage(topic, message) {
  let envelope;
  try {
    envelope = JSON.parse(message.data);
  } catch {
    return;
  }
  if (STATE_TOPICS.includes(topic)) applyEvent(topic, envelope);
  if (stream.logPatterns.some((p) => matches(p, topic))) logEvent(topic, envelope);
}

function applyEvent(topic, envelope) {
  const event = envelope.event || {};
  switch (topic) {
    case "persistence.lock_state":
      setLock(event.state);
      if (event.state === "unlocked" || event.state === "locked") scheduleResync();
      break;
    case "persistence.export_result":
      loadBackups().catch(() => null);
      break;
    case "supervisor.child_state": {
      const old = state.children.get(event.child) || { name: event.child };
      state.children.set(event.child, {
        ...old,
        state: event.state,
        restarts: event.restarts ?? old.restarts,
        last_error: event.error ?? (event.state === "running" ? old.last_error : null),
      });
      renderChildren();
      break;
    }
    case "health.component":
      state.health.set(event.component, {
        component: event.component,
        level: event.level_label || levelName(event.level),
        message: event.message,
        required: event.required,
      });
      state.overall = worstLevel();
      renderHealth();
      break;
    case "cluster.leadership":
      state.leadership.set(event.resource, { ...event });
      renderLeadership();
      break;
    case "jobs.progress":
    case "jobs.finished": {
      const old = state.jobs.get(event.job_id) || { id: event.job_id, name: event.job_class };
      const job = { ...old, job_class: event.job_class, state: event.state };
      if (topic === "jobs.progress") {
        job.progress = event.progress;
        job.message = event.message;
      } else {
        job.error = event.error;
        job.finished_at = envelope.time;
        if (event.state === "succeeded") job.progress = 1;
      }
      state.jobs.set(event.job_id, job);
      renderJobs();
      break;
    }
    case "apps.state": {
      const old = state.apps.get(event.app) || { ports: new Map() };
      state.apps.set(event.app, { ...old, state: event.state, detail: event.detail || "" });
      renderApps();
      break;
    }
    case "services.route": {
      const old = state.apps.get(event.app) || { state: "pending", detail: "", ports: new Map() };
      if (event.withdrawn) old.ports.delete(event.listener);
      else old.ports.set(event.listener, { port: event.port, protocol: event.protocol });
      state.apps.set(event.app, old);
      renderApps();
      break;
    }
    default:
      break;
  }
}

const LEVELS = ["ok", "warn", "error"];

function levelName(level) {
  if (typeof level === "number") return LEVELS[level] || "error";
  return String(level || "unknown");
}

function worstLevel() {
  let worst = -1;
  for (const component of state.health.values()) {
    worst = Math.max(worst, LEVELS.indexOf(levelName(component.level)));
  }
  return worst < 0 ? "unknown" : LEVELS[worst];
}

function setLink(linkState) {
  const node = $("link-state");
  node.dataset.state = linkState;
  setText($("link-text"), { live: "live", connecting: "reconnecting…", offline: "offline" }[linkState]);
}

// --------------------------------------------------------------------------
// The event log (its own stream, with the user's topic filter)

const TOPIC_SEGMENT = /^[A-Za-z0-9_-]+$/;

/** The filter's patterns, checked as the server checks them; throws on a bad one. */
function parseFilter(text) {
  const patterns = text.split(",").map((p) => p.trim()).filter(Boolean);
  if (patterns.length === 0) return ["#"];
  if (patterns.length > 16) throw new Error("At most 16 patterns.");
  for (const pattern of patterns) {
    const segments = pattern.split(".");
    segments.forEach((segment, index) => {
      const ok =
        segment === "*" ||
        (segment === "#" && index === segments.length - 1) ||
        TOPIC_SEGMENT.test(segment);
      if (!ok) throw new Error(`"${pattern}" is not a topic pattern.`);
    });
  }
  return patterns;
}

function matches(pattern, topic) {
  const want = pattern.split(".");
  const have = topic.split(".");
  for (let i = 0; i < want.length; i += 1) {
    if (want[i] === "#") return true;
    if (i >= have.length || (want[i] !== "*" && want[i] !== have[i])) return false;
  }
  return want.length === have.length;
}

/** Apply the filter form: the log shows only what matches (the stream reopens). */
function applyFilter() {
  const error = $("events-error");
  try {
    stream.logPatterns = parseFilter($("events-topics").value);
  } catch (e) {
    setError(error, e.message);
    return;
  }
  setError(error, "");
  if (state.screen === "dashboard") openStream();
}

function onPause() {
  state.logPaused = !state.logPaused;
  const button = $("events-pause");
  button.setAttribute("aria-pressed", String(state.logPaused));
  setText(button, state.logPaused ? "Resume" : "Pause");
}

function summarize(topic, envelope) {
  const e = envelope.event || {};
  switch (topic) {
    case "persistence.lock_state":
      return `storage ${e.previous || "?"} → ${e.state}${e.reason ? ` (${e.reason})` : ""}`;
    case "supervisor.child_state":
      return `${e.child}: ${e.previous} → ${e.state}${e.error ? ` (${e.error})` : ""}`;
    case "health.component":
      return `${e.component}: ${levelName(e.level)}${e.message ? ` — ${e.message}` : ""}`;
    case "cluster.leadership":
      return `${e.resource}: ${e.previous} → ${e.role} (term ${e.term})`;
    case "jobs.progress":
      return `${e.job_class} ${e.job_id}: ${e.state} ${percent(e.progress)}${e.message ? ` — ${e.message}` : ""}`;
    case "jobs.finished":
      return `${e.job_class} ${e.job_id}: ${e.state}${e.error ? ` (${e.error})` : ""}`;
    case "apps.state":
      return `${e.app}: ${e.state}${e.detail ? ` — ${e.detail}` : ""}`;
    case "services.route":
      return `${e.app}/${e.listener} ${e.withdrawn ? "withdrawn from" : "on"} port ${e.port}`;
    case "audit":
      return `${e.subject} ${e.action}: ${e.outcome}${e.resource ? ` on ${e.resource}` : ""}`;
    case "persistence.volume_state":
      return `volume ${e.volume_id}: ${e.state}${e.detail ? ` (${e.detail})` : ""}`;
    case "persistence.control_commit":
      return `control store revision ${e.revision}${(e.tables || []).length ? ` (${e.tables.join(", ")})` : ""}`;
    case "persistence.control_health":
      return `control store check ${e.ok ? "ok" : "FAILED"}${e.detail ? `: ${e.detail}` : ""}`;
    case "persistence.export_result":
      return `${e.kind} export ${e.ok ? "written" : "failed"}${e.ok ? `: ${e.path}` : e.detail ? `: ${e.detail}` : ""}`;
    case "device":
      return `${e.device} ${e.action}${e.detail ? ` (${e.detail})` : ""}`;
    case "fsm.transition":
      return `${e.machine}: ${e.previous} → ${e.state} (${e.trigger})`;
    case "controller.reconciled":
      return `${e.controller} ${e.reconcile_key}: ${e.ok ? "ok" : `error: ${e.error}`}`;
    case "mdns.name":
      return `${e.kind} ${e.requested}${e.claimed !== e.requested ? ` claimed as ${e.claimed}` : ""}`;
    case "remote.config":
      return `remote access ${e.enabled ? "enabled" : "disabled"} (revision ${e.revision})`;
    default: {
      const text = JSON.stringify(e);
      return text.length > 160 ? `${text.slice(0, 157)}…` : text;
    }
  }
}

function logEvent(topic, envelope) {
  if (state.logPaused) return;
  const actual = envelope.topic || topic;
  appendLog(
    h(
      "li",
      { class: "entry", "data-topic": actual },
      h("time", { text: clockTime(envelope.time), datetime: new Date((envelope.time || 0) * 1000).toISOString() }),
      h("span", { class: "topic", text: actual }),
      h(
        "details",
        {},
        h("summary", { text: summarize(actual, envelope) }),
        h("pre", { text: JSON.stringify(envelope, null, 2) }),
      ),
    ),
  );
}

function logControl(kind, message) {
  let data = {};
  try {
    data = JSON.parse(message.data);
  } catch {
    // keep the empty object
  }
  const text =
    kind === "gap"
      ? "Some events are no longer available (gap); showing what the server still holds."
      : `${data.dropped || "Some"} events were dropped: the page could not keep up.`;
  appendLog(h("li", { class: "entry control", "data-topic": kind }, h("span", { class: "topic", text: kind }), h("span", { text })));
  scheduleResync();
}

function appendLog(node) {
  const log = $("events-log");
  log.prepend(node);
  while (log.childElementCount > LOG_LIMIT) log.lastElementChild.remove();
  state.logCount += 1;
  setText($("events-count"), `${state.logCount}`);
}

function readServerTopics() {
  const meta = document.querySelector('meta[name="piccolod-topics"]');
  for (const topic of (meta ? meta.content : "").split(",")) {
    if (topic.trim()) KNOWN_TOPICS.add(topic.trim());
  }
  const list = $("events-topic-list");
  const prefixes = new Set([...KNOWN_TOPICS].filter((t) => t.includes(".")).map((t) => `${t.split(".")[0]}.*`));
  const options = ["#", ...[...prefixes].sort(), ...[...KNOWN_TOPICS].sort()];
  list.replaceChildren(...options.map((value) => h("option", { value })));
}

// --------------------------------------------------------------------------
// Rendering

const LOCK_TEXT = {
  uninitialized: "not set up",
  locked: "locked",
  preunlock: "unlocking…",
  unlocked: "unlocked",
  unknown: "unknown",
};

function setLock(lockState, status) {
  const value = lockState || "unknown";
  state.lock = value;
  for (const id of ["lock-badge", "storage-state"]) $(id).dataset.state = value;
  setText($("lock-state"), value);
  setText($("storage-state"), value);
  const detail =
    {
      locked: "Apps are stopped and the data is encrypted until storage is unlocked.",
      unlocked: "The data is readable by piccolod and its apps.",
      preunlock: "Opening the keyset, the control store and the volumes…",
      uninitialized: "piccolod is not set up yet.",
    }[value] || "";
  let extra = "";
  if (status && status.retry_after > 0) extra = ` Next unlock attempt in ${Math.ceil(status.retry_after)} s.`;
  setText($("storage-detail"), detail + extra);
  show($("storage-unlocked"), value === "unlocked");
  show($("unlock-form"), value === "locked");
  $("storage-card").dataset.state = value;
  document.title = value === "unknown" ? "piccolod" : `piccolod · ${LOCK_TEXT[value] || value}`;
}

function stateCell(value) {
  return h("td", {}, h("span", { class: "state", "data-state": value || "unknown", text: value || "unknown" }));
}

function fillTable(table, rows) {
  table.tBodies[0].replaceChildren(...rows);
}

function renderHealth() {
  const overall = $("health-overall");
  overall.dataset.state = state.overall;
  setText(overall, state.overall);
  const rows = [...state.health.values()]
    .sort((a, b) => a.component.localeCompare(b.component))
    .map((c) =>
      h(
        "tr",
        { "data-component": c.component },
        h("th", { scope: "row", text: c.component }, c.required ? h("span", { class: "tag", text: "required" }) : null),
        stateCell(levelName(c.level)),
        h("td", { class: "wrap", text: c.message || "" }),
      ),
    );
  fillTable($("health-table"), rows);
}

function renderChildren() {
  const rows = [...state.children.values()]
    .sort((a, b) => a.name.localeCompare(b.name))
    .map((c) =>
      h(
        "tr",
        { "data-child": c.name },
        h("th", { scope: "row", text: c.name }),
        stateCell(c.state),
        h("td", { class: "num", text: c.restarts ?? 0 }),
        h("td", { class: "wrap", text: c.last_error || "" }),
      ),
    );
  fillTable($("children-table"), rows);
}

function renderLeadership() {
  const rows = [...state.leadership.values()]
    .sort((a, b) => a.resource.localeCompare(b.resource))
    .map((l) => {
      const self = l.leader_id && l.leader_id === state.nodeId;
      const leader = self ? "this node" : l.leader_address || l.leader_id || "—";
      return h(
        "tr",
        { "data-resource": l.resource },
        h("th", { scope: "row", text: l.resource }),
        stateCell(l.role),
        h("td", { class: "wrap", text: leader }),
        h("td", { class: "num", text: l.term ?? "" }),
      );
    });
  fillTable($("leader-table"), rows);
}

function appLink(port, protocol) {
  const host = window.location.hostname.includes(":") ? `[${window.location.hostname}]` : window.location.hostname;
  if (protocol === "http" || protocol === "websocket") {
    const url = `http://${host}:${port}/`;
    return h("a", { href: url, target: "_blank", rel: "noopener noreferrer", text: `:${port}` });
  }
  return h("span", { class: "muted", text: `${host}:${port}` });
}

function renderApps() {
  const names = [...state.apps.keys()].sort();
  const items = names.map((name) => {
    const app = state.apps.get(name);
    const links = [...app.ports.entries()]
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([listener, p]) => h("li", {}, h("span", { class: "muted", text: `${listener} ` }), appLink(p.port, p.protocol)));
    return h(
      "li",
      { class: "row", "data-app": name },
      h("div", { class: "row-head" }, h("strong", { text: name }), h("span", { class: "state", "data-state": app.state, text: app.state })),
      app.detail ? h("p", { class: "muted wrap", text: app.detail }) : null,
      links.length ? h("ul", { class: "links", "aria-label": `${name} ports` }, links) : null,
    );
  });
  $("apps-list").replaceChildren(...items);
  setText($("apps-count"), names.length ? String(names.length) : "");
  const empty = $("apps-empty");
  setText(empty, state.lock === "locked" ? "No apps while storage is locked" : "No apps");
  show(empty, names.length === 0);
}

function renderJobs() {
  const jobs = [...state.jobs.values()];
  const active = jobs
    .filter((j) => ["queued", "running", "waiting_retry", "retrying"].includes(j.state))
    .sort((a, b) => (a.submitted_at || 0) - (b.submitted_at || 0));
  const recent = jobs
    .filter((j) => ["succeeded", "failed", "cancelled"].includes(j.state) && j.job_class !== "telemetry")
    .sort((a, b) => (b.finished_at || 0) - (a.finished_at || 0))
    .slice(0, RECENT_JOBS);
  // Forget what is neither shown nor running, so that the map stays small.
  const keep = new Set([...active, ...recent].map((j) => j.id));
  for (const id of state.jobs.keys()) if (!keep.has(id)) state.jobs.delete(id);
  const items = [...active, ...recent].map((job) => {
    const label = `${job.name || job.job_class} ${job.id}`;
    const done = !["queued", "running", "waiting_retry", "retrying"].includes(job.state);
    return h(
      "li",
      { class: `row${done ? " done" : ""}`, "data-job": job.id, "data-name": job.name || job.job_class },
      h("div", { class: "row-head" }, h("strong", { text: job.name || job.job_class }), h("span", { class: "state", "data-state": job.state, text: job.state })),
      h(
        "div",
        { class: "progress" },
        h("progress", { max: "1", value: String(Math.max(0, Math.min(1, Number(job.progress) || 0))), "aria-label": `${label} progress` }),
        h("span", { class: "num", text: percent(job.progress) }),
      ),
      job.message || job.error ? h("p", { class: "muted wrap", text: job.error || job.message }) : null,
    );
  });
  $("jobs-list").replaceChildren(...items);
  setText($("jobs-count"), active.length ? `${active.length} running` : "");
  show($("jobs-empty"), items.length === 0);
}

boot();
