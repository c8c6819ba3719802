// The voice client: one conversation with an atlas-voice server over one WebSocket at a
// time, with microphone capture, reply playback, token refresh and reconnection.

import { Microphone } from "./capture.js";
import { Player } from "./playback.js";
import {
  BEARER_PREFIX, MAX_INPUT_TEXT_CHARS, MAX_TOOL_ERROR_CHARS, SUBPROTOCOL, parseServerEvent,
} from "./protocol.js";
import { DEFAULT_RECONNECT, backoffDelay, decideAfterClose } from "./reconnect.js";
import { deriveState } from "./state.js";
import { refreshDelayMs, tokenTimes } from "./token.js";

/** @typedef {import("./protocol.js").ServerEvent} ServerEvent */
/** @typedef {import("./protocol.js").ClientMessage} ClientMessage */
/** @typedef {import("./protocol.js").Limits} Limits */
/** @typedef {import("./state.js").VoiceState} VoiceState */
/** @typedef {import("./reconnect.js").ReconnectPolicy} ReconnectPolicy */
/** @typedef {import("./capture.js").MicrophoneError} MicrophoneError */

/**
 * Events of the server, keyed by their `type`.
 * @typedef {{ [K in ServerEvent["type"]]: Extract<ServerEvent, { type: K }> }} ServerEventMap
 */

/**
 * Why the client closed for good.
 * @typedef {object} ClosedEvent
 * @property {number | null} code the last close code from the server, `null` if none
 * @property {string} reason for people
 * @property {boolean} byClient `disconnect()` ended it
 * @property {"get_token_failed"} [cause] set when `getToken` threw and the client could not
 *   go on: at the first connection, or while reconnecting once the attempts or the session's
 *   resume window ran out; `reason` then carries the last error's message
 */

/**
 * Everything a `VoiceClient` reports, for `on(type, listener)`.
 * @typedef {ServerEventMap & {
 *   state: VoiceState,
 *   event: ServerEvent,
 *   level: number,
 *   reconnecting: { attempt: number, delayMs: number, resume: boolean },
 *   closed: ClosedEvent,
 *   "microphone.error": MicrophoneError,
 *   "token.error": { message: string },
 *   "token.refreshed": { expiresAt: number | null },
 * }} VoiceEventMap
 */

/**
 * What the client needs from its surroundings; the browser's by default, replaceable for
 * tests.
 * @typedef {object} Environment
 * @property {new (url: string, protocols: string[]) => WebSocket} WebSocket
 * @property {(fn: () => void, ms: number) => unknown} setTimeout
 * @property {(id: any) => void} clearTimeout
 * @property {() => number} now milliseconds since the epoch
 * @property {(rate: number, sink: { onPlaying: (playing: boolean) => void }) => PlayerLike} createPlayer
 * @property {(options: import("./capture.js").CaptureOptions, sink: MicrophoneSink) => Promise<MicrophoneLike>} openMicrophone
 * @property {(url: string) => Promise<boolean>} reachable whether the server answers HTTP at all
 */

/**
 * @typedef {{ enqueue(bytes: ArrayBuffer): void, flush(): void, close(): void,
 *   resume(): Promise<void>, setOutputDevice(id: string): Promise<void>,
 *   chunksPlayed: number }} PlayerLike
 * @typedef {{ setOpen(open: boolean): void, flush(id: number): void, close(): void,
 *   deviceId: string | null }} MicrophoneLike
 * @typedef {{ open: boolean, onChunk: (pcm: ArrayBuffer) => void,
 *   onLevel: (level: number) => void, onFlushed: (id: number) => void }} MicrophoneSink
 */

/**
 * @typedef {object} ConnectOptions
 * @property {string} url the voice endpoint, `wss://host/v1/voice` (`ws://` for local development)
 * @property {() => string | null | undefined | Promise<string | null | undefined>} getToken
 *   returns the user's current access token (a Supabase `session.access_token`). Called for
 *   every connection and again before the token expires, to send `auth.refresh`.
 * @property {boolean | import("./capture.js").CaptureOptions} [microphone] capture the
 *   microphone (default `true`); `false` for text-only use
 * @property {boolean} [playback] play the reply audio (default `true`)
 * @property {boolean} [muted] start muted (default `false`)
 * @property {boolean} [pushToTalk] send the microphone only between `startTalking()` and
 *   `stopTalking()` (default `false`: the server finds the end of each turn)
 * @property {string} [outputDeviceId] play on this output device where the browser allows it
 * @property {number} [outputSampleRate] reply audio rate: 8000, 16000, 24000 (default) or 48000
 * @property {string} [voice] synthesiser voice (the server's default when absent)
 * @property {string} [language] BCP-47 language of the user's speech
 * @property {string} [conversationId] the app's conversation id, recorded with the session
 * @property {string} [traceparent] a W3C trace context: the session's trace continues the app's
 * @property {{ name?: string, version?: string }} [client] recorded with the session
 * @property {Partial<ReconnectPolicy>} [reconnect] backoff (1, 2, 4, 8, 16 s; 5 attempts)
 * @property {Partial<Environment>} [environment] replaces browser facilities (tests)
 */

/** @returns {Environment} */
function browserEnvironment() {
  return {
    WebSocket: globalThis.WebSocket,
    setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
    clearTimeout: (id) => globalThis.clearTimeout(id),
    now: () => Date.now(),
    createPlayer: (rate, sink) => new Player(rate, sink),
    openMicrophone: (options, sink) => Microphone.open(options, sink),
    reachable: async (url) => {
      try {
        // Opaque, but it resolves only if the server answered.
        await fetch(httpUrl(url), { mode: "no-cors", cache: "no-store", credentials: "omit" });
        return true;
      } catch {
        return false;
      }
    },
  };
}

/**
 * The http(s) form of a ws(s) URL, without its query.
 * @param {string} url
 */
export function httpUrl(url) {
  const u = new URL(url);
  u.protocol = u.protocol === "wss:" ? "https:" : "http:";
  u.search = "";
  return u.toString();
}

/**
 * Starts a conversation: opens the microphone, connects and starts a session. Call it from a
 * user gesture (a click), so the browser lets the page play audio.
 * @param {ConnectOptions} options
 * @returns {VoiceClient}
 */
export function connect(options) {
  return new VoiceClient(options);
}

/** @typedef {{ ws: WebSocket, opened: boolean, resuming: boolean, session: boolean,
 *   lastFatal: string | null, draining: boolean, heardAt: number }} Link */

/** A protocol ping this often while connected; silence for 2.5 intervals counts as a drop. */
const HEARTBEAT_MS = 15000;

export class VoiceClient {
  /** @param {ConnectOptions} options */
  constructor(options) {
    if (!options || typeof options.getToken !== "function") {
      throw new TypeError("connect() needs { url, getToken }");
    }
    const url = new URL(options.url);
    if (url.protocol !== "ws:" && url.protocol !== "wss:") {
      throw new TypeError("the url must start with ws:// or wss://");
    }
    /** @private */ this.options = options;
    /** @private */ this.url = url.toString();
    /** @private @type {Environment} */
    this.env = { ...browserEnvironment(), ...options.environment };
    /** @private @type {ReconnectPolicy} */
    this.policy = { ...DEFAULT_RECONNECT, ...options.reconnect };
    /** @private @type {Map<string, Set<(ev: any) => void>>} */
    this.listeners = new Map();

    /** @private @type {"connecting" | "open" | "reconnecting" | "closed"} */
    this.link = "connecting";
    /** @private */ this.turnOpen = false;
    /** @private */ this.playing = false;
    /** @private @type {VoiceState} */
    this.current = "connecting";
    /** The state last emitted. @private @type {VoiceState | null} */
    this.announced = null;

    /** @private @type {Link | null} */
    this.conn = null;
    /** @private */ this.generation = 0;
    /** @private */ this.attempt = 0;
    /** @private @type {number | null} */
    this.detachedAt = null;
    /** @private @type {unknown} */
    this.reconnectTimer = null;
    /** @private @type {unknown} */
    this.refreshTimer = null;
    /** @private @type {unknown} */
    this.heartbeatTimer = null;
    /** @private @type {string | null} */
    this.token = null;
    /** @private @type {string | null} */
    this.resumeToken = null;
    /** @private */ this.lastCode = /** @type {number | null} */ (null);

    /** The current session's id, once started. @type {string | null} */
    this.sessionId = null;
    /** The session's limits, once started. @type {Limits | null} */
    this.limits = null;

    /** @private */ this.muted = !!options.muted;
    /** @private */ this.ptt = !!options.pushToTalk;
    /** @private */ this.talking = false;
    /** @private */ this.flushSeq = 0;
    /** @private @type {MicrophoneLike | null} */
    this.mic = null;
    /** @private */ this.micOptions =
      typeof options.microphone === "object" ? { ...options.microphone } : {};

    /** @private @type {PlayerLike | null} */
    this.player = null;
    if (options.playback !== false) {
      this.player = this.env.createPlayer(options.outputSampleRate ?? 24000, {
        onPlaying: (p) => {
          this.playing = p;
          this.update();
        },
      });
      // Inside the user's gesture, so autoplay policies let it start.
      this.player.resume().catch(() => {});
      if (options.outputDeviceId) {
        this.player.setOutputDevice(options.outputDeviceId).catch(() => {});
      }
    }
    if (options.microphone !== false) void this.openMicrophone();
    void this.open(false);
    // Listeners are attached after connect() returns: announce `connecting` just after.
    queueMicrotask(() => this.announce());
  }

  /** @private */
  closed() {
    return this.link === "closed";
  }

  /** The current state. */
  get state() {
    return this.current;
  }

  /** Whether the microphone is muted. */
  get isMuted() {
    return this.muted;
  }

  /** Whether push-to-talk is on. */
  get isPushToTalk() {
    return this.ptt;
  }

  /** The microphone in use (`null` before it is open or without one). */
  get inputDeviceId() {
    return this.mic ? this.mic.deviceId : null;
  }

  /**
   * Reply audio frames handed to the player so far (counted when scheduled, so frames later
   * dropped by an interruption count too); 0 without playback and once closed.
   */
  get chunksPlayed() {
    return this.player ? this.player.chunksPlayed : 0;
  }

  /**
   * Listens to an event; returns a function that stops listening.
   * @template {keyof VoiceEventMap} K
   * @param {K} type
   * @param {(event: VoiceEventMap[K]) => void} listener
   * @returns {() => void}
   */
  on(type, listener) {
    let set = this.listeners.get(type);
    if (!set) this.listeners.set(type, (set = new Set()));
    set.add(listener);
    return () => set.delete(listener);
  }

  /**
   * @private
   * @template {keyof VoiceEventMap} K
   * @param {K} type
   * @param {VoiceEventMap[K]} event
   */
  emit(type, event) {
    const set = this.listeners.get(type);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(event);
      } catch (e) {
        console.error(`atlas-voice: a "${type}" listener threw`, e);
      }
    }
  }

  /** @private */
  update() {
    this.current = deriveState({
      link: this.link,
      session: !!(this.conn && this.conn.session),
      turnOpen: this.turnOpen,
      playing: this.playing,
    });
    this.announce();
  }

  /**
   * Emits `state` when the current state is not the one last emitted.
   * @private
   */
  announce() {
    if (this.current === this.announced) return;
    this.announced = this.current;
    this.emit("state", this.current);
  }

  // ---- connection ------------------------------------------------------------------------

  /**
   * @private
   * @param {boolean} resume
   */
  async open(resume) {
    const generation = ++this.generation;
    /** @type {string | null | undefined} */
    let token;
    try {
      token = await this.options.getToken();
    } catch (e) {
      if (generation !== this.generation || this.link === "closed") return;
      const message = e instanceof Error ? e.message : String(e);
      this.emit("token.error", { message });
      this.tokenFailed(resume, message);
      return;
    }
    if (generation !== this.generation || this.link === "closed") return;
    if (!token) {
      this.finish(null, "no access token");
      return;
    }
    this.token = token;
    // Past the resume window the session is gone: start a new one instead.
    if (resume && !this.withinResumeWindow()) this.resumeToken = null;
    const resuming = resume && this.resumeToken !== null;
    let url = this.url;
    if (resuming) {
      const u = new URL(this.url);
      u.searchParams.set("resume", /** @type {string} */ (this.resumeToken));
      url = u.toString();
    }
    const ws = new this.env.WebSocket(url, [SUBPROTOCOL, BEARER_PREFIX + token]);
    ws.binaryType = "arraybuffer";
    /** @type {Link} */
    const conn = {
      ws, opened: false, resuming, session: false, lastFatal: null, draining: false,
      heardAt: this.env.now(),
    };
    this.conn = conn;
    ws.onopen = () => {
      if (this.conn !== conn) return;
      conn.opened = true;
      conn.heardAt = this.env.now();
      this.heartbeat(conn);
      const o = this.options;
      this.send({
        type: "session.start",
        input_audio: { encoding: "pcm_s16le", sample_rate: 16000 },
        output_audio: { encoding: "pcm_s16le", sample_rate: o.outputSampleRate ?? 24000 },
        ...(o.voice ? { voice: o.voice } : {}),
        ...(o.language ? { language: o.language } : {}),
        ...(o.conversationId ? { conversation_id: o.conversationId } : {}),
        ...(o.traceparent ? { traceparent: o.traceparent } : {}),
        client: o.client ?? { name: "@atlas-voice/client", version: "0.1.0" },
      });
    };
    ws.onmessage = (e) => {
      if (this.conn !== conn) return;
      conn.heardAt = this.env.now();
      if (typeof e.data === "string") this.onText(conn, e.data);
      else if (conn.session && this.player && e.data instanceof ArrayBuffer) {
        this.player.enqueue(e.data);
      }
    };
    ws.onclose = (e) => this.onClose(conn, e.code, e.reason);
  }

  /**
   * `getToken` threw. While reconnecting to a session that can still be resumed (inside its
   * resume window, attempts left), that is one failed attempt: the next follows the backoff,
   * since a `getToken` that needs the network fails during the same outage. Otherwise the
   * client is done.
   * @private
   * @param {boolean} resume whether this attempt was to resume the session
   * @param {string} message
   */
  tokenFailed(resume, message) {
    const retry = this.link === "reconnecting" && resume && this.withinResumeWindow() &&
      this.attempt < this.policy.maxAttempts;
    if (retry) this.schedule(true, false);
    else this.finish(this.lastCode, `getToken failed: ${message}`, "get_token_failed");
  }

  /**
   * Pings the server while the connection is open. A network that silently stops carrying
   * anything (no close, no error) would otherwise hold the client for minutes.
   * @private
   * @param {Link} conn
   */
  heartbeat(conn) {
    this.heartbeatTimer = this.env.setTimeout(() => {
      this.heartbeatTimer = null;
      if (this.conn !== conn) return;
      if (this.env.now() - conn.heardAt > HEARTBEAT_MS * 2.5) {
        conn.ws.onclose = null;
        conn.ws.close();
        this.onClose(conn, 1006, "no answer from the server");
        return;
      }
      this.send({ type: "ping" });
      this.heartbeat(conn);
    }, HEARTBEAT_MS);
  }

  /**
   * @private
   * @param {Link} conn
   * @param {string} text
   */
  onText(conn, text) {
    const ev = parseServerEvent(text);
    if (!ev) return;
    switch (ev.type) {
      case "session.started":
      case "session.resumed":
        conn.session = true;
        if (ev.type === "session.started") this.turnOpen = false;
        this.sessionId = ev.session_id;
        this.resumeToken = ev.resume_token;
        this.limits = ev.limits;
        this.attempt = 0;
        this.detachedAt = null;
        this.link = "open";
        this.scheduleRefresh();
        break;
      case "transcript.final":
      case "response.started":
        this.turnOpen = true;
        break;
      case "response.interrupted":
        if (this.player) this.player.flush();
        break;
      case "response.done":
        this.turnOpen = false;
        break;
      case "session.ending":
        if (ev.reason === "draining") conn.draining = true;
        break;
      case "error":
        if (ev.fatal) conn.lastFatal = ev.code;
        break;
    }
    this.update();
    this.emit(ev.type, /** @type {any} */ (ev));
    this.emit("event", ev);
  }

  /**
   * @private
   * @param {Link} conn
   * @param {number} code
   * @param {string} reason
   */
  onClose(conn, code, reason) {
    if (this.conn !== conn) return;
    this.conn = null;
    this.lastCode = code;
    this.clearRefresh();
    this.clearHeartbeat();
    if (this.link === "closed") return;
    const decision = decideAfterClose({
      code,
      opened: conn.opened,
      resuming: conn.resuming,
      hasSession: this.resumeToken !== null,
      lastFatal: conn.lastFatal,
      draining: conn.draining,
    });
    if (decision.action === "stop") {
      this.finish(code, reason || decision.reason);
      return;
    }
    // Reconnecting from here on (so stopping playback does not pass through `connecting`);
    // a reply cut by the lost connection never gets its response.done.
    this.link = "reconnecting";
    this.turnOpen = false;
    if (this.player) this.player.flush();
    this.update();
    switch (decision.action) {
      case "fresh":
        this.resumeToken = null;
        this.schedule(false, conn.lastFatal === "resume_failed");
        return;
      case "resume":
        this.detachedAt ??= this.env.now();
        this.schedule(true, false);
        return;
      case "probe": {
        const generation = this.generation;
        void this.env.reachable(this.url).then((up) => {
          if (generation !== this.generation || this.link === "closed") return;
          if (up) {
            // The server answered but refused the resume: the session is gone.
            this.resumeToken = null;
            this.schedule(false, true);
          } else {
            this.schedule(true, false);
          }
        });
        return;
      }
    }
  }

  /** @private */
  withinResumeWindow() {
    if (this.resumeToken === null) return false;
    const windowS = this.limits ? this.limits.resume_window_s : 60;
    return this.detachedAt === null || this.env.now() - this.detachedAt < windowS * 1000;
  }

  /**
   * @private
   * @param {boolean} resume
   * @param {boolean} now skip the backoff delay (a fresh session after a refused resume)
   */
  schedule(resume, now) {
    if (!resume) this.resumeToken = null;
    this.attempt += 1;
    if (this.attempt > this.policy.maxAttempts) {
      this.finish(this.lastCode, `could not reconnect after ${this.policy.maxAttempts} attempts`);
      return;
    }
    const delayMs = now ? 0 : backoffDelay(this.policy, this.attempt);
    this.link = "reconnecting";
    this.update();
    this.emit("reconnecting", { attempt: this.attempt, delayMs, resume });
    const generation = ++this.generation;
    this.reconnectTimer = this.env.setTimeout(() => {
      this.reconnectTimer = null;
      if (generation === this.generation && this.link !== "closed") void this.open(resume);
    }, delayMs);
  }

  /**
   * @private
   * @param {number | null} code
   * @param {string} reason
   * @param {ClosedEvent["cause"]} [cause]
   */
  finish(code, reason, cause) {
    this.stopEverything();
    this.emit("closed", { code, reason, byClient: false, ...(cause ? { cause } : {}) });
  }

  /** @private */
  stopEverything() {
    this.generation++;
    this.link = "closed";
    if (this.reconnectTimer !== null) this.env.clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    this.clearRefresh();
    this.clearHeartbeat();
    if (this.mic) this.mic.close();
    this.mic = null;
    if (this.player) this.player.close();
    this.player = null;
    this.playing = false;
    this.turnOpen = false;
    this.update();
  }

  /**
   * Ends the session (`session.end`) and stops everything, including a pending reconnect.
   * The client cannot be used again; `connect()` starts a new session.
   */
  disconnect() {
    if (this.link === "closed") return;
    const conn = this.conn;
    this.conn = null;
    if (conn) {
      if (conn.ws.readyState === 1) {
        conn.ws.send(JSON.stringify({ type: "session.end" }));
        conn.ws.close(1000, "session ended");
      } else {
        conn.ws.close();
      }
    }
    this.stopEverything();
    this.emit("closed", { code: 1000, reason: "disconnected", byClient: true });
  }

  /**
   * @private
   * @param {ClientMessage} msg
   */
  send(msg) {
    const conn = this.conn;
    if (!conn || conn.ws.readyState !== 1) return false;
    conn.ws.send(JSON.stringify(msg));
    return true;
  }

  /** @private */
  sessionOpen() {
    return !!(this.conn && this.conn.session && this.conn.ws.readyState === 1);
  }

  // ---- conversation ----------------------------------------------------------------------

  /**
   * Sends a typed user turn (`input.text`), answered like a spoken one.
   * @param {string} text at most 4,000 characters, not blank
   */
  sendText(text) {
    const trimmed = text.trim();
    if (trimmed.length === 0) throw new RangeError("the text is empty");
    if ([...trimmed].length > MAX_INPUT_TEXT_CHARS) {
      throw new RangeError(`the text is longer than ${MAX_INPUT_TEXT_CHARS} characters`);
    }
    if (!this.sessionOpen()) throw new Error("not connected: wait for the session to start");
    this.send({ type: "input.text", text: trimmed });
  }

  /**
   * Answers a `tool.call` of one of the server's client tools with what the tool produced
   * (`tool.result`). Answer every call before its `timeout_ms`; a `tool.cancelled` means the
   * answer is no longer wanted.
   * @param {string} callId the `call_id` of the `tool.call`
   * @param {unknown} result any JSON value
   */
  sendToolResult(callId, result) {
    if (typeof callId !== "string" || callId.length === 0) throw new TypeError("callId is required");
    if (result === undefined) throw new TypeError("result must be a JSON value");
    if (!this.sessionOpen()) throw new Error("not connected: the call can no longer be answered");
    this.send({ type: "tool.result", call_id: callId, result });
  }

  /**
   * Answers a `tool.call` with why the tool failed; the assistant may tell the person.
   * @param {string} callId the `call_id` of the `tool.call`
   * @param {string} message at most 1,000 characters
   */
  sendToolError(callId, message) {
    if (typeof callId !== "string" || callId.length === 0) throw new TypeError("callId is required");
    if ([...message].length > MAX_TOOL_ERROR_CHARS) {
      throw new RangeError(`the message is longer than ${MAX_TOOL_ERROR_CHARS} characters`);
    }
    if (!this.sessionOpen()) throw new Error("not connected: the call can no longer be answered");
    this.send({ type: "tool.result", call_id: callId, error: message });
  }

  /** Stops the reply in flight (`response.cancel`); playback stops at once. */
  cancelResponse() {
    if (this.player) this.player.flush();
    if (this.sessionOpen()) this.send({ type: "response.cancel" });
  }

  // ---- microphone ------------------------------------------------------------------------

  /** @private */
  gateOpen() {
    return !this.muted && (!this.ptt || this.talking);
  }

  /** @private */
  async openMicrophone() {
    try {
      const mic = await this.env.openMicrophone(this.micOptions, {
        open: this.gateOpen(),
        onChunk: (pcm) => {
          const conn = this.conn;
          // Live audio cannot wait: while the socket is backed up, frames are dropped.
          if (conn && conn.session && conn.ws.readyState === 1 && conn.ws.bufferedAmount < 65536) {
            conn.ws.send(pcm);
          }
        },
        onLevel: (level) => this.emit("level", level),
        onFlushed: (id) => {
          if (id === this.flushSeq && this.sessionOpen()) this.send({ type: "input.commit" });
        },
      });
      if (this.link === "closed") {
        mic.close();
        return;
      }
      if (this.mic) this.mic.close();
      this.mic = mic;
      mic.setOpen(this.gateOpen());
    } catch (e) {
      if (this.link !== "closed") this.emit("microphone.error", /** @type {MicrophoneError} */ (e));
    }
  }

  /**
   * Switches the microphone.
   * @param {string} deviceId from `listDevices()`; `""` for the default
   */
  async setInputDevice(deviceId) {
    this.micOptions.deviceId = deviceId || undefined;
    if (this.link === "closed" || this.options.microphone === false) return;
    if (this.mic) this.mic.close();
    this.mic = null;
    await this.openMicrophone();
  }

  /**
   * Plays the reply on this output device (`""` for the default). Rejects where the browser
   * cannot choose (see `outputDeviceSelectable()`).
   * @param {string} deviceId
   */
  async setOutputDevice(deviceId) {
    if (this.player) await this.player.setOutputDevice(deviceId);
  }

  /**
   * Mutes or unmutes the microphone (silence is sent while muted, so the session stays up).
   * @param {boolean} muted
   */
  setMuted(muted) {
    this.muted = muted;
    if (this.mic) this.mic.setOpen(this.gateOpen());
  }

  /**
   * Turns push-to-talk on or off.
   * @param {boolean} enabled
   */
  setPushToTalk(enabled) {
    this.ptt = enabled;
    this.talking = false;
    if (this.mic) this.mic.setOpen(this.gateOpen());
  }

  /** Push-to-talk: the button went down; the microphone is sent from now on. */
  startTalking() {
    if (!this.ptt) return;
    this.talking = true;
    if (this.mic) this.mic.setOpen(this.gateOpen());
  }

  /**
   * Push-to-talk: the button came up. The audio captured so far goes out first, then
   * `input.commit` ends the turn.
   */
  stopTalking() {
    if (!this.ptt || !this.talking) return;
    this.talking = false;
    this.flushSeq += 1;
    if (this.mic) {
      this.mic.setOpen(this.gateOpen());
      this.mic.flush(this.flushSeq);
    } else if (this.sessionOpen()) {
      this.send({ type: "input.commit" });
    }
  }

  // ---- access token ----------------------------------------------------------------------

  /** @private */
  scheduleRefresh() {
    this.clearRefresh();
    if (this.token === null) return;
    const delay = refreshDelayMs(this.token, this.env.now());
    if (delay === null) return;
    this.refreshTimer = this.env.setTimeout(() => {
      this.refreshTimer = null;
      void this.refreshAuth();
    }, delay);
  }

  /** @private */
  clearHeartbeat() {
    if (this.heartbeatTimer !== null) this.env.clearTimeout(this.heartbeatTimer);
    this.heartbeatTimer = null;
  }

  /** @private */
  clearRefresh() {
    if (this.refreshTimer !== null) this.env.clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
  }

  /**
   * Sends a fresh access token (`auth.refresh`). Without an argument it asks `getToken()`.
   * The client calls this by itself before the token expires; call it when the app learns
   * of a new token (Supabase `onAuthStateChange` with `TOKEN_REFRESHED`). Resolves to
   * whether a new token was sent.
   * @param {string} [token]
   * @returns {Promise<boolean>}
   */
  async refreshAuth(token) {
    if (this.link === "closed") return false;
    /** @type {string | null | undefined} */
    let next = token;
    if (next === undefined) {
      try {
        next = await this.options.getToken();
      } catch (e) {
        this.emit("token.error", { message: e instanceof Error ? e.message : String(e) });
        next = null;
      }
    }
    if (this.closed()) return false;
    const old = this.token;
    const fresh = !!next && next !== old &&
      (tokenTimes(next)?.exp ?? Infinity) >= (old ? tokenTimes(old)?.exp ?? 0 : 0);
    if (!fresh || !next) {
      // Nothing newer yet: ask again shortly, while the old token still counts.
      this.clearRefresh();
      this.refreshTimer = this.env.setTimeout(() => {
        this.refreshTimer = null;
        void this.refreshAuth();
      }, 5000);
      return false;
    }
    this.token = next;
    const sent = this.sessionOpen() && this.send({ type: "auth.refresh", token: next });
    if (sent) this.emit("token.refreshed", { expiresAt: tokenTimes(next)?.exp ?? null });
    this.scheduleRefresh();
    return sent;
  }
}

/** Whether `setOutputDevice()` can work in this browser. */
export function outputDeviceSelectable() {
  return Player.outputSelectable();
}
