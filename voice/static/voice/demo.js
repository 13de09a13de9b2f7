/*
 * Intelia Voice demo page: a thin UI over VoiceClient (voice-client.js). No inline script anywhere:
 * configuration comes from data- attributes on #voice-demo, so the page runs under a strict CSP.
 * `window.voiceDemo` exposes the client and an event log for debugging and the browser tests.
 */

import { VoiceClient } from "./voice-client.js";

const root = document.getElementById("voice-demo");
const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  alert: $("alert"),
  expiring: $("expiring"),
  timerWrap: $("timer-wrap"),
  timer: $("timer"),
  signin: $("signin"),
  signinForm: $("signin-form"),
  token: $("token"),
  authMode: $("auth-mode"),
  connect: $("connect"),
  session: $("session"),
  mic: $("mic"),
  micLabel: $("mic-label"),
  level: $("level"),
  end: $("end"),
  conversation: $("conversation"),
  textForm: $("text-form"),
  textInput: $("text-input"),
  sources: $("sources"),
  sourcesEmpty: $("sources-empty"),
  latency: $("latency"),
  sessionId: $("session-id"),
  upstream: $("upstream"),
  resumed: $("resumed"),
  feedback: $("feedback"),
  feedbackForm: $("feedback-form"),
  feedbackTitle: $("feedback-title"),
  feedbackStatus: $("feedback-status"),
  feedbackSkip: $("feedback-skip"),
  restart: $("restart"),
  newSession: $("new-session"),
};

const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${root.dataset.wsPath}`;
const client = new VoiceClient({
  url: wsUrl,
  workletUrl: new URL(root.dataset.workletUrl, location.href).href,
  ticketUrl: new URL(root.dataset.ticketUrl, location.href).href,
});

const eventLog = [];
const state = {
  hadSession: false,
  feedbackSent: false,
  turns: 0,
  entries: new Map(), // item_id -> <li>
};
window.voiceDemo = { client, events: eventLog, state, snapshot: () => client.snapshot() };

// --- small helpers ----------------------------------------------------------------------------------
function setState(value) {
  root.dataset.state = value;
}

function setStatus(text) {
  ui.status.textContent = text;
}

function showAlert(text) {
  ui.alert.textContent = text;
  ui.alert.hidden = !text;
}

function show(el, visible) {
  el.hidden = !visible;
}

function formatClock(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  return `${String(Math.floor(s / 60)).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
}

function entry(itemId, role) {
  let li = itemId ? state.entries.get(itemId) : null;
  if (li) return li;
  li = document.createElement("li");
  li.className = `turn ${role}`;
  if (itemId) li.dataset.itemId = itemId;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const text = document.createElement("p");
  text.className = "text";
  const note = document.createElement("span");
  note.className = "note";
  li.append(who, text, note);
  ui.conversation.append(li);
  if (itemId) state.entries.set(itemId, li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

function setEntryText(li, text, { append = false } = {}) {
  const p = li.querySelector(".text");
  p.textContent = append ? p.textContent + text : text;
}

function setNote(li, text) {
  li.querySelector(".note").textContent = text;
}

// --- sign in --------------------------------------------------------------------------------------------
async function connect() {
  const token = ui.token.value.trim();
  if (!token) {
    showAlert("Paste an access token first.");
    ui.token.focus();
    return;
  }
  showAlert("");
  show(ui.feedback, false);
  show(ui.restart, false);
  ui.connect.disabled = true;
  setStatus("Connecting…");
  client.unlockAudio(); // inside the click: playback is allowed from now on
  try {
    await client.connect({ token, auth: ui.authMode.value });
  } catch (err) {
    // Refusals are shown by the "refused" listener; anything else here.
    if (!client.refusal && err && err.code !== "client_closed") {
      showAlert(err.message || "Could not connect.");
    }
  } finally {
    ui.connect.disabled = false;
  }
}

ui.signinForm.addEventListener("submit", (event) => {
  event.preventDefault();
  connect();
});

// --- session controls -------------------------------------------------------------------------------------
function renderMic(active) {
  ui.mic.setAttribute("aria-pressed", String(active));
  ui.mic.classList.toggle("active", active);
  ui.micLabel.textContent = active ? "Stop talking" : "Start talking";
}

ui.mic.addEventListener("click", async () => {
  if (client.micActive) {
    client.stopMic();
    return;
  }
  ui.mic.disabled = true;
  try {
    await client.startMic();
  } catch (err) {
    const denied = err && (err.name === "NotAllowedError" || err.name === "SecurityError");
    showAlert(denied ? "Microphone access was denied. Allow it in the browser to talk, or type instead."
                     : `The microphone could not be started (${err && err.message}).`);
  } finally {
    ui.mic.disabled = false;
  }
});

ui.end.addEventListener("click", () => {
  client.disconnect();
});

ui.textForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.textInput.value.trim();
  if (!text) return;
  client.unlockAudio();
  if (client.sendText(text)) {
    const li = entry(null, "user");
    setEntryText(li, text);
    ui.textInput.value = "";
  } else {
    showAlert("Not connected: the message was not sent.");
  }
});

// --- feedback ------------------------------------------------------------------------------------------------
function offerFeedback() {
  if (!state.hadSession || state.feedbackSent || !client.sessionId) {
    show(ui.restart, true);
    return;
  }
  ui.feedbackForm.reset();
  ui.feedbackStatus.textContent = "";
  show(ui.feedback, true);
  ui.feedbackTitle.focus();
}

ui.feedbackForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const data = new FormData(ui.feedbackForm);
  const rating = Number(data.get("rating"));
  if (!rating) {
    ui.feedbackStatus.textContent = "Choose a rating from 1 to 5 stars.";
    return;
  }
  ui.feedbackStatus.textContent = "Sending…";
  try {
    const result = await client.sendFeedback(rating, String(data.get("comment") || ""));
    if (result.ok) {
      state.feedbackSent = true;
      ui.feedbackStatus.textContent = "Thank you for your feedback!";
      ui.feedbackForm.hidden = true;
      show(ui.restart, true);
    } else {
      ui.feedbackStatus.textContent = `Feedback not recorded: ${result.message || "error"}.`;
    }
  } catch (err) {
    ui.feedbackStatus.textContent = `Feedback not recorded: ${err.message}.`;
  }
});

ui.feedbackSkip.addEventListener("click", () => {
  show(ui.feedback, false);
  show(ui.restart, true);
  ui.newSession.focus();
});

ui.newSession.addEventListener("click", () => {
  show(ui.restart, false);
  show(ui.feedback, false);
  ui.feedbackForm.hidden = false;
  show(ui.session, false);
  show(ui.signin, true);
  ui.token.focus();
});

// --- client events ---------------------------------------------------------------------------------------------
client.on("*", (detail, type) => {
  if (type === "level" || type === "tick") return;
  eventLog.push(type);
  if (eventLog.length > 5000) eventLog.splice(0, 1000);
});

client.on("status", ({ state: s }) => {
  setState(s);
  const labels = {
    connecting: "Connecting…",
    open: "Connected, preparing the session…",
    ready: "Connected",
    reconnecting: "Connection interrupted, reconnecting…",
    closed: "Not connected",
  };
  if (labels[s]) setStatus(labels[s]);
});

client.on("ready", (ready) => {
  if (!ready.resumed && root.dataset.sessionId !== ready.session_id) {
    // A new session: start from a clean slate (a resumed one keeps its conversation).
    ui.conversation.replaceChildren();
    ui.sources.replaceChildren();
    ui.latency.replaceChildren();
    ui.sourcesEmpty.textContent = "None used yet.";
    state.entries.clear();
  }
  state.hadSession = true;
  state.feedbackSent = false;
  ui.feedbackForm.hidden = false;
  showAlert("");
  show(ui.expiring, false);
  show(ui.signin, false);
  show(ui.feedback, false);
  show(ui.restart, false);
  show(ui.session, true);
  show(ui.timerWrap, true);
  ui.sessionId.textContent = ready.session_id;
  ui.upstream.textContent = ready.upstream;
  ui.resumed.textContent = ready.resumed ? "yes" : "no";
  root.dataset.sessionId = ready.session_id;
  root.dataset.resumed = String(!!ready.resumed);
  setStatus(ready.resumed ? "Reconnected: the conversation continues" : "Connected");
});

function settleLiveEntries(note) {
  for (const li of ui.conversation.querySelectorAll(".turn.live")) {
    li.classList.remove("live");
    setNote(li, note);
  }
  for (const li of ui.conversation.querySelectorAll("[aria-busy]")) li.removeAttribute("aria-busy");
}

client.on("resuming", ({ attempt }) => {
  setStatus(`Connection interrupted, reconnecting (attempt ${attempt})…`);
  root.dataset.resuming = String(attempt);
  settleLiveEntries("cut off by the reconnection");
});

client.on("draining", () => {
  setStatus("The server is restarting, moving the conversation…");
});

client.on("refused", (refusal) => {
  root.dataset.refusal = refusal.code;
  showAlert(refusal.userMessage);
});

client.on("closed", ({ refusal }) => {
  settleLiveEntries("");
  show(ui.timerWrap, false);
  renderMic(false);
  ui.level.value = 0;
  if (state.hadSession) {
    offerFeedback();
  } else {
    show(ui.signin, true);
  }
  if (!refusal) setStatus("Session ended");
});

client.on("tick", ({ remainingS }) => {
  ui.timer.textContent = formatClock(remainingS);
  ui.timer.setAttribute("datetime", `PT${remainingS}S`);
});

client.on("expiring", ({ seconds_left: left }) => {
  ui.expiring.textContent = `This session ends in ${left} seconds.`;
  show(ui.expiring, true);
  ui.timerWrap.classList.add("ending");
});

let levelFrame = 0;
client.on("level", ({ rms }) => {
  if (levelFrame) return;
  levelFrame = requestAnimationFrame(() => {
    levelFrame = 0;
    // Speech RMS is small: a square-root curve makes the meter readable.
    ui.level.value = Math.min(1, Math.sqrt(rms) * 1.5);
    ui.level.textContent = ui.level.value.toFixed(2);
  });
});

client.on("mic", ({ active }) => renderMic(active));
client.on("mic-error", ({ message }) => showAlert(`The microphone could not be restarted (${message}).`));

// Conversation: live user and assistant transcripts.
client.on("input_audio_buffer.speech_started", (e) => {
  const li = entry(e.item_id, "user");
  li.classList.add("live");
  setNote(li, "listening…");
  root.dataset.speech = "started";
});

client.on("input_audio_buffer.speech_stopped", (e) => {
  const li = entry(e.item_id, "user");
  setNote(li, "transcribing…");
  root.dataset.speech = "stopped";
});

client.on("conversation.item.input_audio_transcription.delta", (e) => {
  const li = entry(e.item_id, "user");
  const p = li.querySelector(".text");
  p.textContent = `${p.textContent}${p.textContent && e.delta && !e.delta.startsWith(" ") ? " " : ""}${e.delta || ""}`;
});

client.on("conversation.item.input_audio_transcription.completed", (e) => {
  const li = entry(e.item_id, "user");
  setEntryText(li, e.transcript || "");
  li.classList.remove("live");
  setNote(li, "");
});

function assistantDelta(e) {
  const li = entry(e.item_id, "assistant");
  li.setAttribute("aria-busy", "true");
  setEntryText(li, e.delta || "", { append: true });
}

function assistantDone(e) {
  const li = entry(e.item_id, "assistant");
  li.removeAttribute("aria-busy");
  if (e.transcript || e.text) setEntryText(li, e.transcript || e.text);
}

client.on("response.output_audio_transcript.delta", assistantDelta);
client.on("response.output_text.delta", assistantDelta);
client.on("response.output_audio_transcript.done", assistantDone);
client.on("response.output_text.done", assistantDone);

client.on("response.done", (e) => {
  state.turns += 1;
  for (const li of ui.conversation.querySelectorAll("[aria-busy]")) li.removeAttribute("aria-busy");
  const status = e.response && e.response.status;
  if (status === "failed") showAlert("The assistant could not answer this turn. Please try again.");
});

client.on("barge-in", ({ itemId, playedMs }) => {
  const li = state.entries.get(itemId);
  if (li) setNote(li, `interrupted after ${(playedMs / 1000).toFixed(1)} s`);
});

client.on("playback", ({ playing }) => {
  root.dataset.playing = String(playing);
});

client.on("sources", ({ sources, latency_ms: ms, injected }) => {
  ui.sources.replaceChildren();
  for (const source of sources || []) {
    const li = document.createElement("li");
    const title = document.createElement("span");
    title.className = "source-title";
    title.textContent = source.title;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `score ${Number(source.score).toFixed(2)}`;
    li.append(title, score);
    ui.sources.append(li);
  }
  const count = (sources || []).length;
  ui.sourcesEmpty.textContent = count
    ? `${injected ? "Used for the last answer" : "Found but not used"}${ms != null ? `, retrieved in ${Math.round(ms)} ms` : ""}.`
    : "No relevant source for the last question.";
});

client.on("latency", ({ ms, kind }) => {
  const li = document.createElement("li");
  li.textContent = `${ms} ms${kind === "text" ? " (typed question)" : ""}`;
  ui.latency.append(li);
});

client.on("gateway-error", (e) => {
  // Non-fatal errors (a refused event, feedback) are shown briefly; fatal ones arrive as "refused".
  if (e.code === "response_in_progress") setStatus("Please wait for the current answer.");
});

// --- a token in the address: #token=… (make run's URL: never sent to the server) or ?token=… -------------------
// Either is used once, then removed from the address bar and the history entry.
function takeTokenFromAddress() {
  const params = new URLSearchParams(location.search);
  const fragment = new URLSearchParams(location.hash.slice(1));
  const inFragment = fragment.has("token");
  const token = (inFragment ? fragment : params).get("token");
  const auth = (inFragment ? fragment : params).get("auth");
  if (auth && ["subprotocol", "ticket", "query"].includes(auth)) {
    ui.authMode.value = auth;
  }
  if (!token) return;
  params.delete("token");
  fragment.delete("token");
  fragment.delete("auth");
  const query = params.toString();
  const rest = inFragment ? fragment.toString() : location.hash.slice(1);
  history.replaceState(history.state, "", `${location.pathname}${query ? `?${query}` : ""}${rest ? `#${rest}` : ""}`);
  ui.token.value = token;
  if (["signed-out", "closed"].includes(root.dataset.state)) connect(); // never while a session runs
}

takeTokenFromAddress();
window.addEventListener("hashchange", takeTokenFromAddress); // a demo URL pasted into an open tab
root.dataset.loaded = "true";
