// parley's small web client: sign in, list threads, converse live over /ws, resume after any disconnect.
// Text is only ever set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
// crypto.randomUUID exists only in secure contexts (https, localhost); plain http elsewhere gets this.
const uid = () => (window.crypto && crypto.randomUUID ? crypto.randomUUID()
  : `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`);
const store = window.localStorage;
const state = {
  access: null, refresh: store.getItem("parley.refresh"), user: null,
  threads: [], current: null, lastSeq: {}, ws: null, wsOpen: false, retry: 0,
  runId: null, streaming: null, shown: new Set(),
};

async function api(path, options = {}, retried = false) {
  const headers = { "Content-Type": "application/json", ...(options.headers || {}) };
  if (state.access) headers.Authorization = `Bearer ${state.access}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401 && !retried && state.refresh && await refresh()) return api(path, options, true);
  if (response.status === 204) return null;
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
  return body;
}

function signedIn(body) {
  state.access = body.access_token;
  state.refresh = body.refresh_token;
  state.user = body.user;
  store.setItem("parley.refresh", state.refresh);
}

async function refresh() {
  try {
    const response = await fetch("/api/auth/refresh", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ refresh_token: state.refresh }),
    });
    if (!response.ok) throw new Error("expired");
    signedIn(await response.json());
    return true;
  } catch {
    signOut();
    return false;
  }
}

function signOut() {
  if (state.refresh) fetch("/api/auth/logout", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ refresh_token: state.refresh }) });
  store.removeItem("parley.refresh");
  Object.assign(state, { access: null, refresh: null, user: null, current: null });
  if (state.ws) state.ws.close(1000);
  show();
}

function show() {
  $("signin").hidden = !!state.access;
  $("app").hidden = !state.access;
  if (state.user) $("me").textContent = state.user.email;
}

// --- threads and history ----------------------------------------------------------------------------------
async function loadThreads() {
  state.threads = (await api("/api/threads?limit=50")).items;
  const list = $("threads");
  list.replaceChildren(...state.threads.map((thread) => {
    const item = document.createElement("li");
    item.textContent = thread.title;
    item.dataset.id = thread.id;
    item.classList.toggle("active", thread.id === state.current);
    item.addEventListener("click", () => openThread(thread.id));
    return item;
  }));
}

async function openThread(id) {
  state.current = id;
  state.shown.clear();
  $("messages").replaceChildren();
  if (!id) { $("thread-title").textContent = "New conversation"; return loadThreads(); }
  const thread = await api(`/api/threads/${id}`);
  $("thread-title").textContent = thread.title;
  state.lastSeq[id] = thread.last_seq;  // read before the history: anything newer arrives as an event
  for (const message of (await api(`/api/threads/${id}/messages?limit=100`)).items) addMessage(message);
  subscribe(id);
  loadThreads();
}

function line(kind, text) {
  const item = document.createElement("li");
  item.className = kind;
  item.textContent = text;
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function addMessage(message) {
  if (state.shown.has(message.id)) return;
  state.shown.add(message.id);
  line(message.role, message.content);
}

// --- the live connection ----------------------------------------------------------------------------------
async function connect() {
  if (!state.access || state.ws) return;
  setStatus("connecting");
  let ticket;
  try {
    ticket = (await api("/api/ws/ticket", { method: "POST" })).ticket;
  } catch {
    return reconnectLater();
  }
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws?ticket=${encodeURIComponent(ticket)}`);
  state.ws = ws;
  ws.onmessage = (frame) => onEvent(JSON.parse(frame.data));
  ws.onclose = () => { state.ws = null; state.wsOpen = false; reconnectLater(); };
}

function reconnectLater() {
  setStatus("reconnecting");
  const delay = Math.min(30000, 500 * 2 ** state.retry++);
  setTimeout(async () => {
    // Ask the beacon first: no point opening a socket the server would refuse (starting, draining).
    const beacon = await fetch("/ws/beacon").then((r) => r.json()).catch(() => null);
    if (beacon && beacon.websocket && beacon.websocket.accepting) connect(); else reconnectLater();
  }, delay);
}

function setStatus(text) { $("status").textContent = text; }

function send(type, payload) {
  if (!state.wsOpen) return false;
  state.ws.send(JSON.stringify({ type, id: uid().slice(0, 12), payload }));
  return true;
}

function subscribe(threadId) {
  send("subscribe", { thread_id: threadId, after_seq: state.lastSeq[threadId] || 0 });
}

function onEvent(event) {
  if (event.seq !== undefined) {
    if (event.seq <= (state.lastSeq[event.thread_id] || 0)) return;  // seen before a reconnect
    state.lastSeq[event.thread_id] = event.seq;
    if (event.thread_id !== state.current) return;
  }
  const payload = event.payload || {};
  switch (event.type) {
    case "connected":
      state.wsOpen = true;
      state.retry = 0;
      setStatus("live");
      if (state.current) subscribe(state.current);
      break;
    case "thread_created":
      state.current = payload.thread.id;
      state.lastSeq[state.current] = 0;
      $("thread-title").textContent = payload.thread.title;
      loadThreads();
      break;
    case "ack":
      if (payload.run_id) { state.runId = payload.run_id; $("stop").disabled = false; }
      if (payload.message_id) state.shown.add(payload.message_id);
      break;
    case "message_created": addMessage(payload.message); break;
    case "agent_started": state.streaming = null; break;
    case "agent_thinking": line("step", payload.text); break;
    case "tool_executing": line("step", `Using ${payload.tool}…`); break;
    case "tool_completed": line("step", payload.ok ? `${payload.tool} answered` : `${payload.tool} failed: ${payload.error}`); break;
    case "agent_delta":
      if (!state.streaming) state.streaming = line("assistant", "");
      state.streaming.textContent += payload.text;
      break;
    case "agent_completed":
      if (state.streaming) state.streaming.remove();
      state.streaming = null;
      addMessage(payload.message);
      runEnded();
      break;
    case "agent_error": line("error", payload.error.message); runEnded(); break;
    case "agent_cancelled": line("step", `Stopped: ${payload.reason}`); runEnded(); break;
    case "error": line("error", payload.message); break;
  }
}

function runEnded() { state.runId = null; $("stop").disabled = true; }

// --- wiring -----------------------------------------------------------------------------------------------
$("signin-form").addEventListener("submit", async (submit) => {
  submit.preventDefault();
  const form = new FormData(submit.target);
  const action = submit.submitter ? submit.submitter.value : "login";
  try {
    signedIn(await api(`/api/auth/${action}`, { method: "POST",
      body: JSON.stringify({ email: form.get("email"), password: form.get("password") }) }));
    $("signin-error").textContent = "";
    show();
    await openThread(null);
    connect();
  } catch (error) {
    $("signin-error").textContent = error.message;
  }
});

$("composer").addEventListener("submit", (submit) => {
  submit.preventDefault();
  const box = submit.target.elements.content;
  const content = box.value.trim();
  if (!content) return;
  const payload = { content, client_message_id: uid() };
  if (state.current) payload.thread_id = state.current;
  if (!send("user_message", payload)) return line("error", "Not connected yet; try again in a moment.");
  line("user", content);
  box.value = "";
});

$("composer").elements.content.addEventListener("keydown", (key) => {
  if (key.key === "Enter" && !key.shiftKey) { key.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (state.runId) send("stop_agent", { run_id: state.runId }); });
$("new-thread").addEventListener("click", () => openThread(null));
$("signout").addEventListener("click", signOut);

(async function start() {
  if (state.refresh && await refresh()) {
    show();
    await openThread(null);
    connect();
  } else {
    show();
  }
})();
