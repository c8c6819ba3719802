import { test } from "node:test";
import assert from "node:assert/strict";

import { connect } from "../src/index.js";
import { World, record } from "./harness.js";

const URL_ = "ws://voice.test/v1/voice";

function client(world, extra = {}) {
  const c = connect({ url: URL_, getToken: () => world.token(), environment: world.env, ...extra });
  const log = record(c);
  return { c, log };
}

/** A world and a client (options `extra`) whose session s1 (resume token r1) has started. */
async function started(w = new World(), extra = {}) {
  const { c, log } = client(w, extra);
  await w.start("s1", "r1");
  return { w, c, log };
}

/** The server drains: it announces the end and closes with 1001; the client waits 1 s. */
async function drain(w) {
  w.socket.event({ type: "session.ending", reason: "draining", seconds_left: 0 });
  w.socket.drop(1001, "server draining");
  await w.advance(1000);
}

const states = (log) => log.filter(([t]) => t === "state").map(([, s]) => s);

test("connects with the bearer subprotocol, starts a session and listens", async () => {
  const w = new World();
  const { c, log } = client(w);
  assert.equal(c.state, "connecting");
  await w.start();
  const s = w.socket;
  assert.deepEqual(s.protocols[0], "atlas-voice.v1");
  assert.match(s.protocols[1], /^bearer\.ey/);
  assert.equal(s.url.searchParams.get("resume"), null);
  const start = s.messages()[0];
  assert.equal(start.type, "session.start");
  assert.deepEqual(start.input_audio, { encoding: "pcm_s16le", sample_rate: 16000 });
  assert.deepEqual(start.output_audio, { encoding: "pcm_s16le", sample_rate: 24000 });
  assert.equal(c.state, "listening");
  assert.equal(c.sessionId, "s1");
  assert.deepEqual(states(log), ["connecting", "listening"]);
  // Microphone audio goes out only once the session has started.
  w.mics[0].sink.onChunk(new ArrayBuffer(3200));
  assert.equal(s.sent.filter((m) => m instanceof ArrayBuffer).length, 1);
});

test("the app's conversation id and trace context go in session.start", async () => {
  const traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  const { w } = await started(new World(), { conversationId: "conv-1", traceparent });
  const start = w.socket.messages()[0];
  assert.equal(start.conversation_id, "conv-1");
  assert.equal(start.traceparent, traceparent);
});

test("a listener attached right after connect() hears connecting, then listening", async () => {
  const w = new World();
  const c = connect({ url: URL_, getToken: () => w.token(), environment: w.env });
  const seen = [];
  c.on("state", (s) => seen.push(s));
  await w.settle();
  assert.deepEqual(seen, ["connecting"], "announced before the session starts");
  await w.start();
  assert.deepEqual(seen, ["connecting", "listening"]);
});

test("connecting is announced while getToken is still pending", async () => {
  const w = new World();
  let release;
  const c = connect({ url: URL_, environment: w.env, getToken: () => new Promise((r) => (release = r)) });
  const log = record(c);
  await w.settle();
  assert.deepEqual(states(log), ["connecting"]);
  assert.equal(w.sockets.length, 0, "no socket yet: the token is not there");
  release(w.token());
  await w.start();
  assert.deepEqual(states(log), ["connecting", "listening"]);
});

test("disconnect right after connect() announces closed only", async () => {
  const w = new World();
  const { c, log } = client(w);
  c.disconnect();
  await w.settle();
  assert.deepEqual(states(log), ["closed"]);
});

test("a drop while the reply plays goes from speaking straight to reconnecting", async () => {
  const { w, log } = await started();
  w.socket.event({ type: "response.started", turn_id: 1 });
  w.socket.audio();
  w.socket.drop(1006);
  assert.deepEqual(states(log), ["connecting", "listening", "thinking", "speaking", "reconnecting"]);
  await w.advance(1000);
  await w.start("s1", "r2", "session.resumed");
  assert.deepEqual(states(log).slice(-2), ["reconnecting", "listening"]);
});

test("the state follows the turn: thinking, speaking, interrupted, listening", async () => {
  const { w, c, log } = await started();
  const s = w.socket;
  s.event({ type: "transcript.final", turn_id: 1, text: "hi" });
  assert.equal(c.state, "thinking");
  s.event({ type: "response.started", turn_id: 1 });
  s.audio();
  assert.equal(c.state, "speaking");
  s.event({ type: "response.interrupted", turn_id: 1 });
  assert.equal(w.player.flushes, 1, "playback flushed on interruption");
  assert.equal(c.state, "thinking", "the turn is open until response.done");
  s.event({ type: "response.done", turn_id: 1, interrupted: true, latency_ms: {} });
  assert.equal(c.state, "listening");
  // A reply that finishes plays on after response.done until its audio has drained.
  s.event({ type: "transcript.final", turn_id: 2, text: "again" });
  s.event({ type: "response.started", turn_id: 2 });
  s.audio();
  s.event({ type: "response.done", turn_id: 2, interrupted: false, latency_ms: {} });
  assert.equal(c.state, "speaking");
  w.player.drained();
  assert.equal(c.state, "listening");
  assert.deepEqual(states(log), [
    "connecting", "listening", "thinking", "speaking", "thinking", "listening", "thinking",
    "speaking", "listening",
  ]);
});

test("non-fatal errors and budget warnings reach the app", async () => {
  const { w, c, log } = await started();
  w.socket.event({ type: "error", code: "engines_busy", message: "say it again", fatal: false });
  w.socket.event({ type: "budget.warning", spent_usd: 4, budget_usd: 5 });
  w.socket.event({ type: "no.such.event" });
  assert.deepEqual(log.filter(([t]) => t === "error").map(([, e]) => e.code), ["engines_busy"]);
  assert.equal(log.filter(([t]) => t === "budget.warning").length, 1);
  assert.equal(c.state, "listening");
});

test("disconnect ends the session and a new connect starts a fresh one at once", async () => {
  const w = new World();
  const first = client(w);
  await w.start("s1", "r1");
  const old = w.socket;
  first.c.disconnect();
  assert.deepEqual(old.messages().at(-1), { type: "session.end" });
  assert.equal(old.closedByClient.code, 1000);
  assert.equal(first.c.state, "closed");
  assert.ok(w.mics[0].closed && w.player.closed, "microphone and speaker released");
  // The server's close after session.end changes nothing.
  old.drop(1000, "session ended");
  assert.deepEqual(first.log.filter(([t]) => t === "closed").map(([, e]) => e.byClient), [true]);

  const second = client(w);
  await w.settle();
  assert.equal(w.sockets.length, 2, "connects at once");
  assert.equal(w.socket.url.searchParams.get("resume"), null, "no stale resume token");
  await w.start("s2", "r2");
  assert.equal(second.c.sessionId, "s2");
});

test("a cut connection resumes with the latest resume token and a fresh access token", async () => {
  const { w, c, log } = await started();
  w.socket.event({ type: "response.started", turn_id: 1 });
  w.socket.audio();
  const tokensBefore = w.tokens;
  w.socket.drop(1006);
  assert.equal(c.state, "reconnecting");
  assert.equal(w.player.flushes, 1, "the cut reply stops playing");
  assert.deepEqual(log.filter(([t]) => t === "reconnecting").map(([, e]) => e),
    [{ attempt: 1, delayMs: 1000, resume: true }]);
  await w.advance(999);
  assert.equal(w.sockets.length, 1, "waits for the backoff");
  await w.advance(1);
  assert.equal(w.sockets.length, 2);
  assert.equal(w.socket.url.searchParams.get("resume"), "r1");
  assert.equal(w.tokens, tokensBefore + 1, "getToken is asked again");
  await w.start("s1", "r2", "session.resumed");
  assert.equal(c.state, "listening");
  // The next cut uses the rotated token, and the backoff starts again at 1 s.
  w.socket.drop(1001, "heartbeat timeout");
  await w.advance(1000);
  assert.equal(w.socket.url.searchParams.get("resume"), "r2");
});

test("disconnect while reconnecting cancels the pending attempt", async () => {
  const { w, c, log } = await started();
  w.socket.drop(1006);
  assert.equal(c.state, "reconnecting");
  c.disconnect();
  assert.equal(c.state, "closed");
  await w.advance(60_000);
  assert.equal(w.sockets.length, 1, "no new connection after disconnect");
  assert.equal(log.filter(([t]) => t === "closed").length, 1);
});

test("disconnect while the token is being fetched opens nothing", async () => {
  const w = new World();
  let release;
  const c = connect({
    url: URL_, environment: w.env,
    getToken: () => new Promise((r) => (release = r)),
  });
  c.disconnect();
  release(w.token());
  await w.settle();
  assert.equal(w.sockets.length, 0);
});

test("reconnecting gives up after the fifth attempt on the 1, 2, 4, 8, 16 s schedule", async () => {
  const { w, c, log } = await started();
  w.reachableAnswer = false; // the network is down
  const began = w.time;
  w.socket.drop(1006);
  const opened = [];
  for (let i = 0; i < 5; i++) {
    const n = w.sockets.length;
    while (w.sockets.length === n) await w.advance(100);
    opened.push((w.time - began) / 1000);
    w.socket.drop(1006); // refused before the handshake
    await w.settle();
  }
  assert.deepEqual(opened, [1, 3, 7, 15, 31]);
  assert.ok(w.sockets.slice(1).every((s) => s.url.searchParams.get("resume") === "r1"));
  assert.equal(c.state, "closed");
  const closed = log.filter(([t]) => t === "closed").map(([, e]) => e);
  assert.equal(closed.length, 1);
  assert.match(closed[0].reason, /could not reconnect after 5 attempts/);
  assert.equal(w.probes, 5, "each refused resume checked whether the server answers");
});

test("terminal close codes stop without a retry", async () => {
  for (const code of [1000, 1008, 1011, 4401, 4402, 4408, 4409, 4410]) {
    const { w, c, log } = await started();
    w.socket.drop(code, "");
    await w.advance(60_000);
    assert.equal(w.sockets.length, 1, `code ${code} is not retried`);
    assert.equal(c.state, "closed");
    const closed = log.filter(([t]) => t === "closed").map(([, e]) => e);
    assert.equal(closed[0].code, code);
    assert.ok(closed[0].reason.length > 0);
  }
});

test("a drain resumes; refused (no Redis) it becomes a fresh session at once", async () => {
  const { w, c } = await started();
  await drain(w);
  assert.equal(w.socket.url.searchParams.get("resume"), "r1", "tries to resume elsewhere");
  // The other instance does not know the session: HTTP 404, which a browser sees as 1006
  // before the handshake; the server does answer HTTP, so the resume was refused.
  w.socket.drop(1006);
  await w.advance(0);
  assert.equal(w.probes, 1);
  assert.equal(w.sockets.length, 3, "a fresh attempt follows without a backoff");
  assert.equal(w.socket.url.searchParams.get("resume"), null);
  await w.start("s2", "r9");
  assert.equal(c.sessionId, "s2");
  assert.equal(c.state, "listening");
});

test("a drain with Redis resumes on the other instance", async () => {
  const { w, c } = await started();
  await drain(w);
  await w.start("s1", "r2", "session.resumed");
  assert.equal(c.sessionId, "s1");
  assert.equal(c.state, "listening");
});

test("a fatal resume_failed (the session ended meanwhile) starts a fresh session", async () => {
  const { w, c } = await started();
  w.socket.drop(1006);
  await w.advance(1000);
  w.socket.accept();
  w.socket.event({ type: "error", code: "resume_failed", message: "gone", fatal: true });
  w.socket.drop(1000, "session ended");
  await w.advance(0);
  assert.equal(w.sockets.length, 3);
  assert.equal(w.socket.url.searchParams.get("resume"), null);
  await w.start("s2", "r5");
  assert.equal(c.sessionId, "s2");
});

test("past the resume window the client starts fresh instead of resuming", async () => {
  const { w } = await started();
  w.reachableAnswer = false;
  w.socket.drop(1006);
  for (const wait of [1000, 2000, 4000, 8000]) {
    await w.advance(wait);
    w.socket.drop(1006);
    await w.settle();
  }
  // 15 s gone; the fifth attempt at 31 s is still inside 60 s and resumes.
  await w.advance(16000);
  assert.equal(w.socket.url.searchParams.get("resume"), "r1");
  const w2 = new World();
  const c2 = connect({
    url: URL_, getToken: () => w2.token(), environment: w2.env,
    reconnect: { initialDelayMs: 50_000, maxDelayMs: 50_000 },
  });
  await w2.start("s1", "r1");
  w2.reachableAnswer = false;
  w2.socket.drop(1006);
  await w2.advance(50_000);
  w2.socket.drop(1006);
  await w2.settle();
  await w2.advance(50_000);
  assert.equal(w2.socket.url.searchParams.get("resume"), null, "100 s > the 60 s window");
  assert.equal(c2.state, "reconnecting");
});

test("the token is refreshed before it expires, through getToken", async () => {
  const w = new World();
  let ttl = 40;
  const c = connect({ url: URL_, getToken: () => w.token(ttl), environment: w.env });
  const log = record(c);
  await w.start();
  const s = w.socket;
  // 40 s token: refreshed 10 s (a quarter of its life) before exp.
  await w.advance(29_999);
  assert.equal(s.messages().filter((m) => m.type === "auth.refresh").length, 0);
  await w.advance(1);
  let refreshes = s.messages().filter((m) => m.type === "auth.refresh");
  assert.equal(refreshes.length, 1);
  // ... and the new one in turn, 30 s later.
  ttl = 3600;
  await w.advance(30_000);
  refreshes = s.messages().filter((m) => m.type === "auth.refresh");
  assert.equal(refreshes.length, 2);
  // An hour-long token: a minute before it expires.
  await w.advance(3540_000 - 1);
  assert.equal(s.messages().filter((m) => m.type === "auth.refresh").length, 2);
  await w.advance(1);
  assert.equal(s.messages().filter((m) => m.type === "auth.refresh").length, 3);
  assert.equal(c.state, "listening");
  assert.equal(log.filter(([t]) => t === "token.refreshed").length, 3);
});

test("refreshAuth with a token from the app sends it at once; an unchanged one is not sent", async () => {
  const w = new World();
  const same = w.token();
  const c = connect({ url: URL_, getToken: () => same, environment: w.env });
  await w.start();
  assert.equal(await c.refreshAuth(), false, "getToken gave the same token");
  const fresh = w.token(7200);
  assert.equal(await c.refreshAuth(fresh), true);
  assert.deepEqual(w.socket.messages().filter((m) => m.type === "auth.refresh"),
    [{ type: "auth.refresh", token: fresh }]);
});

test("a failing getToken is reported and the client closes without a token", async () => {
  const w = new World();
  const c = connect({
    url: URL_, environment: w.env,
    getToken: async () => {
      throw new Error("signed out");
    },
  });
  const log = record(c);
  await w.settle();
  assert.equal(c.state, "closed");
  assert.deepEqual(log.filter(([t]) => t === "token.error").map(([, e]) => e.message), ["signed out"]);
  assert.deepEqual(log.filter(([t]) => t === "closed").map(([, e]) => e), [{
    code: null, reason: "getToken failed: signed out", byClient: false, cause: "get_token_failed",
  }]);
  assert.equal(w.sockets.length, 0);
});

/** A getToken that fails (as offline) while `failures` is above zero. */
function flakyToken(w) {
  const t = { failures: 0, calls: 0 };
  t.getToken = async () => {
    t.calls++;
    if (t.failures > 0) {
      t.failures--;
      throw new Error("offline");
    }
    return w.token();
  };
  return t;
}

test("a getToken failing during a reconnect is retried on the backoff and the session resumes", async () => {
  const w = new World();
  const t = flakyToken(w);
  const { c, log } = await started(w, { getToken: t.getToken });
  t.failures = 2;
  w.socket.drop(1006);
  await w.advance(1000); // attempt 1: getToken rejects
  await w.advance(2000); // attempt 2: rejects again
  assert.equal(c.state, "reconnecting");
  assert.equal(w.sockets.length, 1, "no connection without a token");
  await w.advance(4000); // attempt 3: a token
  assert.equal(w.sockets.length, 2);
  assert.equal(w.socket.url.searchParams.get("resume"), "r1", "the session is resumed");
  await w.start("s1", "r2", "session.resumed");
  assert.equal(c.state, "listening");
  assert.equal(c.sessionId, "s1");
  assert.deepEqual(log.filter(([k]) => k === "reconnecting").map(([, e]) => e), [
    { attempt: 1, delayMs: 1000, resume: true },
    { attempt: 2, delayMs: 2000, resume: true },
    { attempt: 3, delayMs: 4000, resume: true },
  ]);
  assert.deepEqual(log.filter(([k]) => k === "token.error").map(([, e]) => e.message),
    ["offline", "offline"]);
  assert.equal(log.filter(([k]) => k === "closed").length, 0);
});

test("a getToken failing on every reconnect attempt closes with get_token_failed", async () => {
  const w = new World();
  const t = flakyToken(w);
  const { c, log } = await started(w, { getToken: t.getToken });
  t.failures = Infinity;
  const began = w.time;
  w.socket.drop(1006);
  await w.advance(30_999);
  assert.equal(c.state, "reconnecting", "still trying: 4 attempts at 1, 3, 7 and 15 s");
  await w.advance(1);
  assert.equal(t.calls, 1 + 5, "the first connection, then the 5 attempts");
  assert.equal((w.time - began) / 1000, 31);
  assert.equal(c.state, "closed");
  assert.equal(w.sockets.length, 1);
  const closed = log.filter(([k]) => k === "closed").map(([, e]) => e);
  assert.deepEqual(closed, [{
    code: 1006, reason: "getToken failed: offline", byClient: false, cause: "get_token_failed",
  }]);
});

test("a getToken failing past the resume window closes with get_token_failed", async () => {
  const w = new World();
  const t = flakyToken(w);
  const c = connect({
    url: URL_, getToken: t.getToken, environment: w.env,
    reconnect: { initialDelayMs: 40_000, maxDelayMs: 40_000 },
  });
  const log = record(c);
  await w.start("s1", "r1"); // resume_window_s: 60
  t.failures = Infinity;
  w.socket.drop(1006);
  await w.advance(40_000);
  assert.equal(c.state, "reconnecting", "40 s: inside the window, tried again");
  await w.advance(40_000);
  assert.equal(c.state, "closed", "80 s: the session can no longer be resumed");
  assert.equal(t.calls, 1 + 2);
  const closed = log.filter(([k]) => k === "closed").map(([, e]) => e);
  assert.equal(closed.length, 1);
  assert.equal(closed[0].cause, "get_token_failed");
  assert.match(closed[0].reason, /offline/);
});

test("push-to-talk: silence until pressed; release flushes the audio, then input.commit", async () => {
  const w = new World();
  const { c } = client(w, { pushToTalk: true });
  await w.start();
  const mic = w.mics[0];
  assert.equal(mic.open, false, "closed gate until the button goes down");
  c.startTalking();
  assert.equal(mic.open, true);
  c.stopTalking();
  assert.equal(mic.open, false);
  assert.deepEqual(mic.flushes, [1]);
  assert.equal(w.socket.messages().filter((m) => m.type === "input.commit").length, 0,
    "not before the last audio is out");
  mic.sink.onFlushed(1);
  assert.equal(w.socket.messages().filter((m) => m.type === "input.commit").length, 1);
  c.setMuted(true);
  c.startTalking();
  assert.equal(mic.open, false, "muted wins over push-to-talk");
  c.setPushToTalk(false);
  c.setMuted(false);
  assert.equal(mic.open, true);
});

test("text input, cancel, and their validation", async () => {
  const w = new World();
  const { c } = client(w);
  assert.throws(() => c.sendText("hello"), /not connected/);
  await w.start();
  c.sendText("  what time is it?  ");
  assert.throws(() => c.sendText("   "), RangeError);
  assert.throws(() => c.sendText("x".repeat(4001)), RangeError);
  c.sendText("é".repeat(4000));
  c.cancelResponse();
  assert.deepEqual(w.socket.messages().slice(1).map((m) => m.type),
    ["input.text", "input.text", "response.cancel"]);
  assert.equal(w.socket.messages()[1].text, "what time is it?");
});

test("client tools: tool.call is delivered and answered with a result or an error", async () => {
  const w = new World();
  const { c, log } = client(w);
  assert.throws(() => c.sendToolResult("call_1", {}), /not connected/);
  await w.start();
  w.socket.event({
    type: "tool.call", turn_id: 1, call_id: "call_1", name: "open_page",
    arguments: { page: "settings" }, timeout_ms: 5000,
  });
  w.socket.event({ type: "tool.cancelled", call_id: "call_0", reason: "timeout" });
  const calls = log.filter(([t]) => t === "tool.call").map(([, e]) => e);
  assert.deepEqual(calls.map((e) => [e.name, e.arguments.page]), [["open_page", "settings"]]);
  assert.deepEqual(log.filter(([t]) => t === "tool.cancelled").map(([, e]) => e.reason), ["timeout"]);
  c.sendToolResult("call_1", { opened: true });
  c.sendToolError("call_2", "not available offline");
  assert.throws(() => c.sendToolResult("", 1), TypeError);
  assert.throws(() => c.sendToolResult("call_3", undefined), TypeError);
  assert.throws(() => c.sendToolError("call_3", "x".repeat(1001)), RangeError);
  const sent = w.socket.messages().slice(1);
  assert.deepEqual(sent, [
    { type: "tool.result", call_id: "call_1", result: { opened: true } },
    { type: "tool.result", call_id: "call_2", error: "not available offline" },
  ]);
});

test("switching the microphone replaces the capture; a failure is reported", async () => {
  const { w, c, log } = await started();
  await c.setInputDevice("usb-mic");
  assert.equal(w.mics.length, 2);
  assert.ok(w.mics[0].closed);
  assert.equal(c.inputDeviceId, "usb-mic");
  w.micFailure = Object.assign(new Error("no such microphone"), { code: "not_found" });
  await c.setInputDevice("gone");
  assert.deepEqual(log.filter(([t]) => t === "microphone.error").map(([, e]) => e.code), ["not_found"]);
  assert.equal(c.state, "listening", "the session goes on without a microphone");
});

test("bad options are refused", () => {
  assert.throws(() => connect({ url: "http://x/v1/voice", getToken: () => "t" }), TypeError);
  assert.throws(() => connect({ url: URL_ }), TypeError);
});

test("a connection that goes silent is given up after 2.5 heartbeats and resumed", async () => {
  const { w, c } = await started();
  await w.advance(60_000);
  assert.equal(w.sockets.length, 1, "pings answered: the connection stays");
  assert.ok(w.socket.messages().filter((m) => m.type === "ping").length >= 3);
  w.silent = true;
  const old = w.socket;
  await w.advance(30_000);
  assert.equal(old.closedByClient, null, "two unanswered pings are not yet a drop");
  await w.advance(15_000);
  assert.notEqual(old.closedByClient, null, "the third is: the dead socket is closed");
  await w.advance(1000);
  assert.equal(w.sockets.length, 2, "and the session resumed on a new one");
  assert.equal(w.socket.url.searchParams.get("resume"), "r1");
  assert.equal(c.state, "reconnecting");
});
