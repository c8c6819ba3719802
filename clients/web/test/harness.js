// A world for VoiceClient without a browser: a scripted WebSocket, virtual time, and stand-ins
// for the microphone and the speaker that record what the client asks of them.

export function jwt(claims) {
  const enc = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${enc({ alg: "HS256", typ: "JWT" })}.${enc(claims)}.sig`;
}

export class World {
  constructor() {
    this.time = 1_700_000_000_000;
    this.timers = [];
    this.nextTimer = 1;
    this.sockets = [];
    this.reachableAnswer = true;
    this.probes = 0;
    this.tokens = 0;
    this.player = null;
    this.mics = [];
    const world = this;

    class FakeSocket {
      constructor(url, protocols) {
        this.url = new URL(url);
        this.protocols = protocols;
        this.readyState = 0;
        this.sent = [];
        this.bufferedAmount = 0;
        this.closedByClient = null;
        world.sockets.push(this);
      }
      send(data) {
        if (this.readyState !== 1) throw new Error("send on a socket that is not open");
        const msg = typeof data === "string" ? JSON.parse(data) : data;
        this.sent.push(msg);
        // A live server answers pings; a dead network (world.silent) does not.
        if (msg.type === "ping" && !world.silent) queueMicrotask(() => this.event({ type: "pong" }));
      }
      close(code, reason) {
        this.closedByClient = { code, reason };
        this.readyState = 3;
      }
      // Server side.
      accept() {
        this.readyState = 1;
        this.onopen?.({});
      }
      event(ev) {
        this.onmessage?.({ data: JSON.stringify(ev) });
      }
      audio(bytes = 4800) {
        this.onmessage?.({ data: new ArrayBuffer(bytes) });
      }
      drop(code = 1006, reason = "") {
        this.readyState = 3;
        this.onclose?.({ code, reason });
      }
      messages() {
        return this.sent.filter((m) => !(m instanceof ArrayBuffer));
      }
    }

    this.env = {
      WebSocket: FakeSocket,
      setTimeout: (fn, ms) => {
        const id = this.nextTimer++;
        this.timers.push({ id, at: this.time + ms, fn });
        return id;
      },
      clearTimeout: (id) => {
        this.timers = this.timers.filter((t) => t.id !== id);
      },
      now: () => this.time,
      createPlayer: (rate, sink) => {
        this.player = {
          rate, sink, chunksPlayed: 0, flushes: 0, closed: false, playing: false,
          enqueue() {
            this.chunksPlayed++;
            if (!this.playing) {
              this.playing = true;
              sink.onPlaying(true);
            }
          },
          flush() {
            this.flushes++;
            if (this.playing) {
              this.playing = false;
              sink.onPlaying(false);
            }
          },
          drained() {
            this.playing = false;
            sink.onPlaying(false);
          },
          close() {
            this.closed = true;
          },
          resume: async () => {},
          setOutputDevice: async () => {},
        };
        return this.player;
      },
      openMicrophone: async (options, sink) => {
        if (this.micFailure) throw this.micFailure;
        const mic = {
          options, sink, open: sink.open, flushes: [], closed: false, deviceId: options.deviceId ?? "default",
          setOpen(open) {
            this.open = open;
          },
          flush(id) {
            this.flushes.push(id);
          },
          close() {
            this.closed = true;
          },
        };
        this.mics.push(mic);
        return mic;
      },
      reachable: async () => {
        this.probes++;
        return this.reachableAnswer;
      },
    };
  }

  /** A token for the client: `exp` `ttlS` from now. */
  token(ttlS = 3600) {
    this.tokens++;
    const iat = Math.floor(this.time / 1000);
    return jwt({ sub: "u", iat, exp: iat + ttlS, n: this.tokens });
  }

  get socket() {
    return this.sockets.at(-1);
  }

  /** Lets promises settle. */
  async settle() {
    for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
  }

  /** Advances virtual time by `ms`, firing due timers in order. */
  async advance(ms) {
    const end = this.time + ms;
    for (;;) {
      await this.settle();
      this.timers.sort((a, b) => a.at - b.at);
      const next = this.timers[0];
      if (!next || next.at > end) break;
      this.timers.shift();
      this.time = next.at;
      next.fn();
    }
    this.time = end;
  }

  /** The server side of a successful session start on the newest socket. */
  async start(sessionId = "s1", resumeToken = "r1", type = "session.started") {
    await this.settle();
    this.socket.accept();
    this.socket.event({
      type,
      session_id: sessionId,
      resume_token: resumeToken,
      limits: { max_duration_s: 1800, budget_usd: 5, idle_timeout_s: 600, resume_window_s: 60 },
      input_audio: { encoding: "pcm_s16le", sample_rate: 16000 },
      output_audio: { encoding: "pcm_s16le", sample_rate: 24000 },
      ...(type === "session.resumed" ? { turns: 1 } : {}),
    });
  }
}

/** Records every event a client emits, in order. */
export function record(client) {
  const log = [];
  for (const type of ["state", "reconnecting", "closed", "error", "budget.warning",
    "microphone.error", "token.error", "token.refreshed", "transcript.final", "session.started", "session.resumed",
    "tool.call", "tool.cancelled"]) {
    client.on(type, (ev) => log.push([type, ev]));
  }
  return log;
}
