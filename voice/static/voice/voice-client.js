/*
 * Intelia Voice — browser client for the realtime voice gateway (`/v1/ws/voice`).
 *
 * Plain ES module, no build step, no dependency. `VoiceClient` is the framework-free equivalent of a
 * React `useVoiceRealtime` hook: it owns the WebSocket, the microphone capture (AudioWorklet, 24 kHz
 * pcm16, 40 ms frames), the playback jitter buffer, barge-in truncation, automatic resume after a server
 * restart or a network drop, and turns refusals into user-facing messages. See docs/CLIENT.md.
 *
 *   import { VoiceClient } from "/static/voice/voice-client.js";
 *   const voice = new VoiceClient({ workletUrl: "/static/voice/pcm-worklet.js" });
 *   voice.on("ready", (e) => ...);           // gateway.session.ready (also after a resume)
 *   voice.on("refused", (e) => show(e.userMessage));
 *   await voice.connect({ token: jwt });     // subprotocol auth by default
 *   await voice.startMic();                  // from a click handler (user gesture)
 *   voice.sendText("How warm for day-old chicks?");
 */

export const SUBPROTOCOL = "intelia.v1";
export const SAMPLE_RATE = 24000;
export const BYTES_PER_MS = 48; // 24 kHz pcm16 mono
export const FRAME_SAMPLES = 960; // 40 ms
const TRAILING_SILENCE_FRAMES = 20; // 800 ms: more than the server VAD's silence_duration_ms (500)

/** Close codes after which the client resumes the same session by itself. */
// 1011: uvicorn's keepalive ping timeout (the server gave up on a link that went quiet; the session lives on).
export const RESUMABLE_CLOSE_CODES = new Set([4012, 1012, 1011, 1006, 1001]);
/** Close codes that are a decision about this user: never retried automatically. */
export const POLICY_CLOSE_CODES = new Set([4401, 4403, 4402, 4409, 4429, 4503, 4408, 4010, 4008, 1009]);

const CLOSE_CODE_ERRORS = {
  4401: "unauthorized",
  4403: "plan_not_allowed",
  4402: "budget_exhausted",
  4409: "concurrent_session",
  4429: "rate_limited",
  4503: "feature_disabled",
  4408: "session_timeout",
  4502: "upstream_unavailable",
  4500: "internal_error",
  4010: "terminated",
  4008: "frame_rate_exceeded",
  4009: "frame_too_large",
  1009: "frame_too_large",
};

function minutes(seconds) {
  return Math.max(1, Math.ceil((Number(seconds) || 0) / 60));
}

/**
 * The sentence shown to the user for a gateway error code (`gateway.error.code`).
 * `error` is the gateway.error event (for retry_after, max durations); `session` the last ready event.
 */
export function userMessageFor(code, error = {}, session = null) {
  switch (code) {
    case "plan_not_allowed":
      return "Voice is reserved for the Elite and Intelia plans.";
    case "not_in_rollout":
      return "Voice is not available for your account yet: it is being opened progressively.";
    case "rate_limited": {
      const retry = error.retry_after;
      return retry
        ? `You have reached the hourly limit of voice sessions, try again in ${minutes(retry)} min.`
        : "You have reached the hourly limit of voice sessions, try again later.";
    }
    case "budget_exhausted":
      return "The voice budget for this month has been reached. Voice will be available again next month.";
    case "feature_disabled":
      return "Voice is temporarily unavailable. Please try again later.";
    case "concurrent_session":
      return "You already have a voice session open (another tab or device). Close it, then try again.";
    case "session_timeout": {
      const max = session && session.max_duration_s ? ` (${minutes(session.max_duration_s)} min)` : "";
      return `The session reached its maximum length${max}. Start a new session to continue.`;
    }
    case "unauthorized":
      return "Your sign-in has expired or is invalid. Please sign in again.";
    case "resume_forbidden":
      return "This conversation belongs to another account; a new session is needed.";
    case "upstream_unavailable":
    case "upstream_error":
      return "The voice service is unavailable right now. Please retry in a moment.";
    case "terminated":
      return "This voice session was ended by an operator.";
    case "frame_rate_exceeded":
    case "frame_too_large":
      return "The connection sent too much data and was closed. Please start again.";
    case "internal_error":
      return "Something went wrong on our side. Please retry in a moment.";
    case "network":
      return "The connection to the voice service was lost.";
    default:
      return (error && error.message) || "The voice session ended unexpectedly.";
  }
}

function base64FromBytes(bytes) {
  let binary = "";
  const chunk = 0x8000;
  for (let i = 0; i < bytes.length; i += chunk) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + chunk));
  }
  return btoa(binary);
}

function bytesFromBase64(b64) {
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function pcm16ToFloat32(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const count = bytes.byteLength >> 1;
  const out = new Float32Array(count);
  for (let i = 0; i < count; i++) out[i] = view.getInt16(i * 2, true) / 0x8000;
  return out;
}

function defaultWsUrl() {
  const loc = globalThis.location;
  if (!loc) return "ws://127.0.0.1:8000/v1/ws/voice";
  return `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}/v1/ws/voice`;
}

function httpBaseOf(wsUrl) {
  const url = new URL(wsUrl);
  url.protocol = url.protocol === "wss:" ? "https:" : "http:";
  return url.origin;
}

function now() {
  return globalThis.performance ? performance.now() : Date.now();
}

export class VoiceClient {
  /**
   * @param {object} options
   * @param {string} [options.url] WebSocket URL (default: same origin `/v1/ws/voice`)
   * @param {string} [options.workletUrl] URL of pcm-worklet.js (default: next to this module)
   * @param {string} [options.ticketUrl] ticket endpoint (default: `<http origin>/v1/voice/ticket`)
   * @param {number} [options.initialBufferMs=100] playback buffering before the first sample plays
   * @param {number} [options.maxBufferMs=800] adaptive jitter buffer: each underrun (the answer's audio ran
   *   dry mid-answer) doubles the buffering before playback goes on, up to this, for the rest of the session
   *   (on a 2 % loss, 300 ms RTT link a fixed 100 ms left 3-4 silences per answer: docs/RELIABILITY.md)
   * @param {number} [options.maxResumeAttempts=15]
   * @param {number} [options.resumeBaseDelayMs=400] backoff base: 1st retry within 250 ms, then 800 ms,
   *   1.6 s, then every 2 s (±25 % jitter, capped by resumeMaxDelayMs): ~30 s of outage are covered and a
   *   link that comes back is used within ~2 s
   * @param {object} [options.audioConstraints] getUserMedia audio constraints
   */
  constructor(options = {}) {
    this.options = {
      url: options.url || null,
      workletUrl: options.workletUrl || new URL("./pcm-worklet.js", import.meta.url).href,
      ticketUrl: options.ticketUrl || null,
      initialBufferMs: options.initialBufferMs ?? 100,
      maxBufferMs: options.maxBufferMs ?? 800,
      maxResumeAttempts: options.maxResumeAttempts ?? 15,
      resumeBaseDelayMs: options.resumeBaseDelayMs ?? 400,
      resumeMaxDelayMs: options.resumeMaxDelayMs ?? 2000,
      audioConstraints: options.audioConstraints || {
        channelCount: 1,
        echoCancellation: true,
        noiseSuppression: true,
        autoGainControl: true,
      },
    };
    this._listeners = new Map();
    this.state = "idle"; // idle | connecting | open | ready | reconnecting | closed
    this.ws = null;
    this.session = null; // last gateway.session.ready
    this.sessionId = null;
    this.resumeToken = null;
    this.lastError = null; // last gateway.error before a close
    this.refusal = null;
    this.counters = {
      framesSent: 0,
      audioChunksReceived: 0,
      audioMsReceived: 0,
      audioMsPlayed: 0,
      reconnects: 0,
      bargeIns: 0,
      underruns: 0, // an answer's audio ran dry mid-answer (a silence the user heard)
      underrunMs: 0, // how long those silences lasted
    };
    this.level = 0; // microphone RMS 0..1 (last 40 ms frame)
    this.micActive = false;
    this._captureWanted = false;
    this._auth = null;
    this._resumeAttempts = 0;
    this._resumeTimer = null;
    this._intentionalClose = false;
    this._ctx = null;
    this._capture = null; // {stream, source, node, sink}
    this._workletLoaded = false;
    // Playback.
    this._items = new Map(); // item_id -> {receivedMs, playedMs (finalised), segments: [], cancelled}
    this._pending = []; // chunks waiting for the initial buffer: {itemId, samples}
    this._pendingMs = 0;
    this._bufferMs = this.options.initialBufferMs; // grows after underruns (adaptive jitter buffer)
    this._underrunAt = null; // playhead where the audio ran dry, until playback goes on
    this._playhead = 0; // AudioContext time where the next chunk starts
    this._sources = new Set();
    this._currentItem = null;
    this._cancelledResponses = new Set();
    this._speechStoppedAt = null;
    this._textSentAt = null;
    this._latencyPending = false;
    this._userSpeaking = false;
    this._tickTimer = null;
  }

  // --- events ---------------------------------------------------------------------------------------
  /** Subscribe to an event type ("*" for all); returns an unsubscribe function. */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    const set = this._listeners.get(type);
    if (set) set.delete(fn);
  }

  emit(type, detail = {}) {
    for (const key of [type, "*"]) {
      const set = this._listeners.get(key);
      if (!set) continue;
      for (const fn of [...set]) {
        try {
          fn(detail, type);
        } catch (err) {
          console.error("voice listener failed", err);
        }
      }
    }
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.emit("status", { state });
  }

  // --- connection -------------------------------------------------------------------------------------
  /**
   * Open a session. `auth`: "subprotocol" (default: the JWT travels in Sec-WebSocket-Protocol),
   * "ticket" (POST /v1/voice/ticket first, then ?ticket=) or "query" (?token=, for tools only).
   * Resolves with the gateway.session.ready event; rejects with {code, userMessage} when refused.
   */
  connect({ url, token, auth = "subprotocol", resumeToken = null } = {}) {
    if (!token) return Promise.reject(new Error("a token is required"));
    if (!["subprotocol", "ticket", "query"].includes(auth)) {
      return Promise.reject(new Error(`unknown auth mode ${auth}`));
    }
    this._auth = { url: url || this.options.url || defaultWsUrl(), token, auth };
    this._bufferMs = this.options.initialBufferMs; // a new session starts with a fresh estimate of the link
    this._intentionalClose = false;
    this._resumeAttempts = 0;
    this.refusal = null;
    this.resumeToken = resumeToken;
    return this._open(resumeToken);
  }

  async _socketUrlAndProtocols(resumeToken) {
    const { url, token, auth } = this._auth;
    const target = new URL(url, globalThis.location ? location.href : undefined);
    const protocols = [SUBPROTOCOL];
    if (auth === "subprotocol") {
      protocols.push(`bearer.${token}`);
    } else if (auth === "query") {
      target.searchParams.set("token", token);
    } else {
      const ticketUrl = this.options.ticketUrl || `${httpBaseOf(target.href)}/v1/voice/ticket`;
      const response = await fetch(ticketUrl, {
        method: "POST",
        headers: { Authorization: `Bearer ${token}` },
        credentials: "omit",
        cache: "no-store",
      });
      if (response.status === 401) {
        const err = new Error("unauthorized");
        err.code = "unauthorized";
        throw err;
      }
      if (!response.ok) throw new Error(`ticket request failed (${response.status})`);
      const body = await response.json();
      target.searchParams.set("ticket", body.ticket);
    }
    if (resumeToken) target.searchParams.set("resume", resumeToken);
    return { href: target.href, protocols };
  }

  _open(resumeToken) {
    this._setState(resumeToken && this.sessionId ? "reconnecting" : "connecting");
    return new Promise((resolve, reject) => {
      let settled = false;
      const settle = (fn, value) => {
        if (!settled) {
          settled = true;
          fn(value);
        }
      };
      this._socketUrlAndProtocols(resumeToken)
        .then(({ href, protocols }) => {
          if (this._intentionalClose) {
            settle(reject, Object.assign(new Error("disconnected"), { code: "client_closed" }));
            return;
          }
          const ws = new WebSocket(href, protocols);
          this.ws = ws;
          this.lastError = null;
          ws.onopen = () => {
            if (ws === this.ws) this._setState("open");
          };
          ws.onmessage = (msg) => {
            if (ws !== this.ws) return;
            let event;
            try {
              event = JSON.parse(msg.data);
            } catch {
              return;
            }
            this._onServerEvent(event);
            if (event.type === "gateway.session.ready") settle(resolve, event);
          };
          ws.onclose = (close) => {
            if (ws !== this.ws) {
              // A socket we already let go of (disconnect(), or replaced): just settle its promise.
              settle(reject, Object.assign(new Error("closed"), { code: "client_closed", closeCode: close.code }));
              return;
            }
            const outcome = this._onClose(close.code, close.reason);
            if (outcome && outcome.refusal) {
              settle(reject, Object.assign(new Error(outcome.refusal.userMessage), outcome.refusal));
            } else if (outcome && outcome.resuming) {
              // The promise follows the resumed connection.
              outcome.resuming.then((ready) => settle(resolve, ready), (err) => settle(reject, err));
            } else {
              settle(reject, Object.assign(new Error("closed"), { code: "closed", closeCode: close.code }));
            }
          };
        })
        .catch((err) => {
          // The ticket request failed (network or 401).
          if (err && err.code === "unauthorized") {
            const refusal = this._refuse("unauthorized", 4401, { message: "Authentication required" });
            settle(reject, Object.assign(new Error(refusal.userMessage), refusal));
            return;
          }
          const outcome = this._onClose(1006, String(err && err.message));
          if (outcome && outcome.resuming) {
            outcome.resuming.then((ready) => settle(resolve, ready), (e) => settle(reject, e));
          } else if (outcome && outcome.refusal) {
            settle(reject, Object.assign(new Error(outcome.refusal.userMessage), outcome.refusal));
          } else {
            settle(reject, err);
          }
        });
    });
  }

  /** Close the session on purpose (no resume). */
  disconnect(code = 1000) {
    this._intentionalClose = true;
    clearTimeout(this._resumeTimer);
    this._resumeTimer = null;
    this.stopMic();
    this._stopPlayback();
    this._stopTicker();
    const ws = this.ws;
    this.ws = null;
    if (ws && ws.readyState <= WebSocket.OPEN) {
      try {
        ws.close(code);
      } catch {
        /* already closing */
      }
    }
    this._setState("closed");
    this.emit("closed", { code, reason: "client", resuming: false, sessionId: this.sessionId });
  }

  get isReady() {
    return this.state === "ready" && this.ws && this.ws.readyState === WebSocket.OPEN;
  }

  _send(event) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(event));
    return true;
  }

  _refuse(code, closeCode, error) {
    const refusal = {
      code,
      closeCode,
      message: (error && error.message) || "",
      retryAfter: error && error.retry_after != null ? error.retry_after : null,
      userMessage: userMessageFor(code, error || {}, this.session),
    };
    this.refusal = refusal;
    this.emit("refused", refusal);
    return refusal;
  }

  /** Decide what a close means: a refusal, a resume, or a plain end. */
  _onClose(code, reason) {
    this.ws = null;
    const wasCapturing = this._captureWanted;
    this._releaseCapture();
    this._stopPlayback();
    this._stopTicker();
    if (this._intentionalClose) return null;
    const error = this.lastError;
    const errorCode = error && error.code;
    const resumable = RESUMABLE_CLOSE_CODES.has(code) || errorCode === "draining";
    const canResume = resumable && this.resumeToken && this._resumeAttempts < this.options.maxResumeAttempts;
    if (canResume && !(errorCode && errorCode !== "draining" && POLICY_CLOSE_CODES.has(code))) {
      this._captureWanted = wasCapturing;
      this._resumeAttempts += 1;
      const attempt = this._resumeAttempts;
      // A draining server asks every client to move at once: the first retry is only jittered (so a
      // restart does not land all of them on the other instances in the same millisecond); later retries
      // back off exponentially (800 ms, 1.6 s, then every 2 s by default: resumeMaxDelayMs).
      const backoff = Math.min(this.options.resumeMaxDelayMs, this.options.resumeBaseDelayMs * 2 ** (attempt - 1));
      const delay = Math.round(attempt === 1 ? Math.random() * 250 : backoff * (0.75 + Math.random() * 0.5));
      this._setState("reconnecting");
      this.emit("resuming", { attempt, delayMs: delay, closeCode: code, sessionId: this.sessionId });
      const resuming = new Promise((resolve, reject) => {
        this._resumeTimer = setTimeout(() => {
          this._resumeTimer = null;
          this.counters.reconnects += 1;
          this._open(this.resumeToken).then(resolve, reject);
        }, delay);
      });
      resuming.catch(() => {});
      return { resuming };
    }
    this._captureWanted = false;
    this._setState("closed");
    let refusal = null;
    if (errorCode && errorCode !== "draining") {
      refusal = this._refuse(errorCode, code, error);
    } else if (CLOSE_CODE_ERRORS[code]) {
      refusal = this._refuse(CLOSE_CODE_ERRORS[code], code, { message: reason });
    } else if (code !== 1000) {
      refusal = this._refuse(resumable ? "network" : "closed", code, { message: reason });
    }
    this.emit("closed", { code, reason, resuming: false, refusal, sessionId: this.sessionId });
    return { refusal };
  }

  // --- server events ----------------------------------------------------------------------------------
  _onServerEvent(event) {
    const type = event.type;
    switch (type) {
      case "gateway.session.ready":
        this._onReady(event);
        break;
      case "gateway.session.draining":
        if (event.resume_token) this.resumeToken = event.resume_token;
        this.emit("draining", event);
        break;
      case "gateway.session.expiring":
        this.emit("expiring", event);
        break;
      case "gateway.error":
        this.lastError = event;
        this.emit("gateway-error", event);
        break;
      case "gateway.rag.context":
        this.emit("sources", event);
        break;
      case "gateway.feedback.received":
        this.emit("feedback", { ok: true, event });
        break;
      case "input_audio_buffer.speech_started":
        this._userSpeaking = true;
        this._onSpeechStarted(event);
        break;
      case "input_audio_buffer.speech_stopped":
        this._userSpeaking = false;
        this._speechStoppedAt = now();
        this._latencyPending = true;
        break;
      case "response.created": {
        const id = event.response && event.response.id;
        this.emit("response", { id });
        break;
      }
      case "response.output_audio.delta":
        this._onAudioDelta(event);
        break;
      case "response.output_audio.done":
        this._flushPending();
        break;
      case "response.done":
        this._flushPending();
        break;
      default:
        break;
    }
    this.emit(type, event);
    this.emit("event", event);
  }

  _onReady(event) {
    const resumedSession = this.sessionId && event.session_id === this.sessionId;
    this.session = event;
    this.sessionId = event.session_id;
    this.resumeToken = event.resume_token || this.resumeToken;
    this.lastError = null;
    this._resumeAttempts = 0;
    this._userSpeaking = false;
    this._setState("ready");
    this._startTicker(event);
    this.emit("ready", event);
    if (event.resumed || resumedSession) this.emit("resumed", event);
    if (this._captureWanted && !this.micActive) {
      this.startMic().catch((err) => this.emit("mic-error", { error: err, message: String(err) }));
    }
  }

  _startTicker(ready) {
    this._stopTicker();
    const deadline = now() + (Number(ready.remaining_s) || 0) * 1000;
    this._deadline = deadline;
    const tick = () => this.emit("tick", { remainingS: Math.max(0, Math.round((deadline - now()) / 1000)) });
    tick();
    this._tickTimer = setInterval(tick, 1000);
  }

  _stopTicker() {
    if (this._tickTimer) clearInterval(this._tickTimer);
    this._tickTimer = null;
  }

  /** Seconds left in the session (from the last ready event). */
  get remainingS() {
    return this._deadline ? Math.max(0, Math.round((this._deadline - now()) / 1000)) : null;
  }

  // --- microphone ----------------------------------------------------------------------------------------
  async _audioContext() {
    if (!this._ctx) {
      const Ctx = globalThis.AudioContext || globalThis.webkitAudioContext;
      this._ctx = new Ctx({ latencyHint: "interactive" });
    }
    if (this._ctx.state === "suspended") {
      try {
        await this._ctx.resume();
      } catch {
        /* resumed on the next user gesture */
      }
    }
    return this._ctx;
  }

  /** Call from a user gesture (click) so playback is allowed before the first answer. */
  unlockAudio() {
    return this._audioContext();
  }

  /** Start streaming the microphone (getUserMedia + AudioWorklet). */
  async startMic() {
    this._captureWanted = true;
    if (this.micActive) return;
    const ctx = await this._audioContext();
    if (!this._workletLoaded) {
      await ctx.audioWorklet.addModule(this.options.workletUrl);
      this._workletLoaded = true;
    }
    const stream = await navigator.mediaDevices.getUserMedia({ audio: this.options.audioConstraints });
    if (!this._captureWanted) {
      stream.getTracks().forEach((t) => t.stop());
      return;
    }
    const source = ctx.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(ctx, "pcm-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { targetRate: SAMPLE_RATE, frameSamples: FRAME_SAMPLES },
    });
    // A muted sink keeps the node pulled by the graph without echoing the microphone.
    const sink = ctx.createGain();
    sink.gain.value = 0;
    source.connect(node);
    node.connect(sink).connect(ctx.destination);
    node.port.onmessage = (msg) => this._onFrame(msg.data);
    this._capture = { stream, source, node, sink };
    this.micActive = true;
    this.emit("mic", { active: true, sampleRate: ctx.sampleRate });
  }

  /**
   * Stop the microphone (the session stays open). If the user was mid-sentence, a short silence is sent
   * so the server's VAD ends the turn and answers what was said (instead of waiting forever).
   */
  stopMic() {
    this._captureWanted = false;
    const wasActive = this.micActive;
    this._releaseCapture();
    if (wasActive && this._userSpeaking && this.state === "ready") {
      const silence = base64FromBytes(new Uint8Array(FRAME_SAMPLES * 2));
      for (let i = 0; i < TRAILING_SILENCE_FRAMES; i++) {
        if (this._send({ type: "input_audio_buffer.append", audio: silence })) this.counters.framesSent += 1;
      }
    }
  }

  _releaseCapture() {
    const capture = this._capture;
    this._capture = null;
    if (capture) {
      capture.node.port.onmessage = null;
      try {
        capture.source.disconnect();
        capture.node.disconnect();
        capture.sink.disconnect();
      } catch {
        /* already disconnected */
      }
      capture.stream.getTracks().forEach((t) => t.stop());
    }
    if (this.micActive) {
      this.micActive = false;
      this.level = 0;
      this.emit("level", { rms: 0 });
      this.emit("mic", { active: false });
    }
  }

  _onFrame(data) {
    if (!data || data.type !== "frame") return;
    this.level = data.rms;
    this.emit("level", { rms: data.rms });
    if (this.state !== "ready") return; // not connected (or resuming): this audio is dropped
    const audio = base64FromBytes(new Uint8Array(data.pcm));
    if (this._send({ type: "input_audio_buffer.append", audio })) this.counters.framesSent += 1;
  }

  // --- playback ---------------------------------------------------------------------------------------------
  _item(itemId) {
    let item = this._items.get(itemId);
    if (!item) {
      item = { receivedMs: 0, playedMs: 0, segments: [], cancelled: false };
      this._items.set(itemId, item);
      if (this._items.size > 32) this._items.delete(this._items.keys().next().value);
    }
    return item;
  }

  _onAudioDelta(event) {
    if (this._cancelledResponses.has(event.response_id)) return;
    const item = this._item(event.item_id);
    if (item.cancelled) return;
    const bytes = bytesFromBase64(event.delta || "");
    const ms = bytes.byteLength / BYTES_PER_MS;
    this.counters.audioChunksReceived += 1;
    this.counters.audioMsReceived += ms;
    item.receivedMs += ms;
    if (this._latencyPending) {
      this._latencyPending = false;
      const from = this._speechStoppedAt ?? this._textSentAt;
      if (from != null) {
        this.emit("latency", {
          ms: Math.round(now() - from),
          itemId: event.item_id,
          kind: this._speechStoppedAt != null ? "speech" : "text",
        });
      }
      this._speechStoppedAt = null;
      this._textSentAt = null;
    }
    const samples = pcm16ToFloat32(bytes);
    if (!samples.length) return;
    if (!this._ctx) {
      // No audio context yet (no user gesture): create one; it may stay suspended until a click.
      this._audioContext();
    }
    const playing = this._sources.size > 0 && this._currentItem === event.item_id;
    if (playing) {
      this._schedule(event.item_id, samples);
      return;
    }
    if (!this._pending.length && this._currentItem === event.item_id && item.segments.length && this._ctx) {
      // This answer was playing and its audio ran dry: the link is worse than the buffer assumed.
      this.counters.underruns += 1;
      this._underrunAt = this._playhead;
      this._bufferMs = Math.min(this.options.maxBufferMs, this._bufferMs * 2);
    }
    this._pending.push({ itemId: event.item_id, samples });
    this._pendingMs += ms;
    if (this._pendingMs >= this._bufferMs) this._flushPending();
  }

  _flushPending() {
    if (!this._pending.length || !this._ctx) return;
    const ctx = this._ctx;
    this._playhead = Math.max(this._playhead, ctx.currentTime + 0.02);
    if (this._underrunAt != null) {
      this.counters.underrunMs += Math.max(0, this._playhead - this._underrunAt) * 1000;
      this._underrunAt = null;
    }
    const pending = this._pending;
    this._pending = [];
    this._pendingMs = 0;
    for (const chunk of pending) this._schedule(chunk.itemId, chunk.samples);
  }

  _schedule(itemId, samples) {
    const ctx = this._ctx;
    if (!ctx) return;
    const buffer = ctx.createBuffer(1, samples.length, SAMPLE_RATE); // resampled by the context
    buffer.copyToChannel(samples, 0);
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(ctx.destination);
    if (this._playhead < ctx.currentTime + 0.005) {
      this._playhead = ctx.currentTime + 0.02; // underrun: restart slightly ahead
    }
    const start = this._playhead;
    const duration = buffer.duration;
    this._playhead += duration;
    const item = this._item(itemId);
    const segment = { start, duration, source, done: false };
    item.segments.push(segment);
    if (this._currentItem !== itemId) {
      this._currentItem = itemId;
      this.emit("playback", { playing: true, itemId });
    }
    source.onended = () => {
      this._sources.delete(source);
      if (!segment.done) {
        segment.done = true;
        const played = duration * 1000;
        item.playedMs += played;
        this.counters.audioMsPlayed += played;
      }
      if (this._sources.size === 0 && !this._pending.length) {
        this.emit("playback", { playing: false, itemId, playedMs: Math.round(item.playedMs) });
      }
    };
    this._sources.add(source);
    source.start(start);
  }

  /** Milliseconds of an assistant item actually heard so far. */
  playedMs(itemId) {
    const item = this._items.get(itemId);
    if (!item) return 0;
    const t = this._ctx ? this._ctx.currentTime : 0;
    let ms = item.playedMs;
    for (const seg of item.segments) {
      if (!seg.done) ms += Math.max(0, Math.min(seg.duration, t - seg.start)) * 1000;
    }
    return ms;
  }

  /** Whether assistant audio is playing (or buffered to play). */
  get isPlaying() {
    return this._sources.size > 0 || this._pending.length > 0;
  }

  _stopPlayback() {
    const t = this._ctx ? this._ctx.currentTime : 0;
    for (const item of this._items.values()) {
      for (const seg of item.segments) {
        if (seg.done) continue;
        seg.done = true;
        const played = Math.max(0, Math.min(seg.duration, t - seg.start)) * 1000;
        item.playedMs += played;
        this.counters.audioMsPlayed += played;
        seg.source.onended = null;
        try {
          seg.source.stop();
        } catch {
          /* not started */
        }
      }
      item.segments = [];
    }
    this._sources.clear();
    this._pending = [];
    this._pendingMs = 0;
    this._underrunAt = null;
    if (this._ctx) this._playhead = this._ctx.currentTime;
  }

  _onSpeechStarted(event) {
    const itemId = this._currentItem;
    if (!this.isPlaying || !itemId) return; // nothing playing: no barge-in (skip truncate)
    const item = this._item(itemId);
    const played = Math.floor(Math.min(this.playedMs(itemId), item.receivedMs));
    this._stopPlayback();
    item.cancelled = true; // late deltas of this item are dropped
    this.counters.bargeIns += 1;
    this._send({ type: "conversation.item.truncate", item_id: itemId, content_index: 0, audio_end_ms: played });
    this.emit("playback", { playing: false, itemId, playedMs: played, interrupted: true });
    this.emit("barge-in", { itemId, playedMs: played, userItemId: event.item_id });
  }

  // --- text and feedback ------------------------------------------------------------------------------------
  /** A typed user turn: conversation.item.create then response.create. */
  sendText(text) {
    const value = String(text || "").trim();
    if (!value) return false;
    if (this.isPlaying && this._currentItem) {
      // Typing over an answer interrupts it, like speaking would.
      this._onSpeechStarted({ item_id: null });
    }
    const ok = this._send({
      type: "conversation.item.create",
      item: { type: "message", role: "user", content: [{ type: "input_text", text: value }] },
    });
    if (!ok) return false;
    this._send({ type: "response.create" });
    this._textSentAt = now();
    this._speechStoppedAt = null;
    this._latencyPending = true;
    return true;
  }

  /** Cancel the current answer (keeps the session). */
  cancelResponse() {
    if (this.isPlaying && this._currentItem) this._onSpeechStarted({ item_id: null });
    return this._send({ type: "response.cancel" });
  }

  /**
   * Rate the session 1..5 with an optional comment. Over the WebSocket while it is open
   * (answered by gateway.feedback.received or gateway.error invalid_feedback), else over HTTP.
   */
  async sendFeedback(rating, comment = "") {
    const body = { rating: Number(rating) };
    if (comment) body.comment = String(comment).slice(0, 2000);
    if (this.isReady) {
      return new Promise((resolve) => {
        const done = (result) => {
          offOk();
          offErr();
          clearTimeout(timer);
          resolve(result);
        };
        const offOk = this.on("gateway.feedback.received", () => done({ ok: true }));
        const offErr = this.on("gateway-error", (e) => {
          if (e.code === "invalid_feedback") done({ ok: false, message: e.message });
        });
        const timer = setTimeout(() => done({ ok: false, message: "no answer" }), 5000);
        this._send({ type: "gateway.feedback", ...body });
      });
    }
    if (!this.sessionId || !this._auth) return { ok: false, message: "no session" };
    const base = httpBaseOf(new URL(this._auth.url, globalThis.location ? location.href : undefined).href);
    const response = await fetch(`${base}/v1/voice/sessions/${this.sessionId}/feedback`, {
      method: "POST",
      headers: { Authorization: `Bearer ${this._auth.token}`, "Content-Type": "application/json" },
      body: JSON.stringify(body),
      credentials: "omit",
    });
    const result = { ok: response.ok };
    if (!response.ok) {
      try {
        result.message = (await response.json()).message;
      } catch {
        result.message = `HTTP ${response.status}`;
      }
    }
    this.emit("feedback", result);
    return result;
  }

  /** A snapshot for tests and debugging. */
  snapshot() {
    return {
      state: this.state,
      sessionId: this.sessionId,
      resumed: this.session ? !!this.session.resumed : null,
      micActive: this.micActive,
      level: this.level,
      playing: this.isPlaying,
      counters: { ...this.counters, audioMsPlayed: Math.round(this._audioMsPlayedLive()),
        underrunMs: Math.round(this.counters.underrunMs) },
      bufferMs: this._bufferMs,
      refusal: this.refusal,
    };
  }

  _audioMsPlayedLive() {
    let live = this.counters.audioMsPlayed;
    const t = this._ctx ? this._ctx.currentTime : 0;
    for (const item of this._items.values()) {
      for (const seg of item.segments) {
        if (!seg.done) live += Math.max(0, Math.min(seg.duration, t - seg.start)) * 1000;
      }
    }
    return live;
  }
}

export default VoiceClient;
