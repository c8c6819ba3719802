// atlas-voice web client: no build step, no dependencies.
// Protocol: docs/protocol.md. State for tests and debugging: window.atlasState.
"use strict";

const OUTPUT_RATE = 24000;
const TERMINAL_CLOSES = new Set([1000, 1008, 4401, 4402, 4408, 4409, 4410]);
const BACKOFF = { initial: 1000, max: 30000, attempts: 5 };

const state = (window.atlasState = {
  state: "idle", sessionId: null, resumeToken: null, resumed: false,
  transcripts: [], replies: [], audioChunksPlayed: 0, costUsd: 0, errors: [],
});

const $ = (id) => document.getElementById(id);
let ws = null;
let token = null;
let mic = null;          // { ctx, node, stream }
let player = null;       // { ctx, next, sources }
let attempts = 0;
let stopping = false;
let replyEl = null;

function setState(s) {
  state.state = s;
  $("state").textContent = s;
  $("state").dataset.state = s;
}

async function getToken() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("access_token");
  if (fromHash) return fromHash;
  const dev = await fetch("/dev/token", { method: "POST" }).catch(() => null);
  if (dev && dev.ok) return (await dev.json()).token;
  // Production: a Supabase session token, pasted or handed over by the host app.
  $("token-bar").hidden = false;
  const typed = $("token").value.trim() || localStorage.getItem("atlas-token");
  if (!typed) throw new Error("paste a Supabase access token first");
  localStorage.setItem("atlas-token", typed);
  return typed;
}

function line(cls, text) {
  const el = document.createElement("div");
  el.className = "turn " + cls;
  el.textContent = text;
  $("log").insertBefore(el, $("partial"));
  return el;
}

// ---- playback: a small jitter buffer of scheduled AudioBuffers, flushed on interruption
function ensurePlayer() {
  if (player) return player;
  const ctx = new AudioContext({ sampleRate: OUTPUT_RATE });
  player = { ctx, next: 0, sources: new Set() };
  return player;
}

function play(arrayBuffer) {
  const p = ensurePlayer();
  const pcm = new Int16Array(arrayBuffer);
  if (pcm.length === 0) return;
  const buf = p.ctx.createBuffer(1, pcm.length, OUTPUT_RATE);
  const ch = buf.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 0x8000;
  const src = p.ctx.createBufferSource();
  src.buffer = buf;
  src.connect(p.ctx.destination);
  const at = Math.max(p.ctx.currentTime + 0.06, p.next); // 60 ms jitter buffer
  src.start(at);
  p.next = at + buf.duration;
  p.sources.add(src);
  src.onended = () => p.sources.delete(src);
  state.audioChunksPlayed++;
}

function flushPlayback() {
  if (!player) return;
  for (const s of player.sources) { try { s.stop(); } catch (_) {} }
  player.sources.clear();
  player.next = 0;
}

// ---- microphone: AudioWorklet → 16 kHz 100 ms chunks → WebSocket
async function startMic() {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
  });
  const ctx = new AudioContext();
  await ctx.audioWorklet.addModule("/worklet.js");
  const source = ctx.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(ctx, "capture-processor");
  node.port.onmessage = (e) => {
    if (ws && ws.readyState === WebSocket.OPEN && state.sessionId) ws.send(e.data);
  };
  source.connect(node);
  mic = { ctx, node, stream };
}

function stopMic() {
  if (!mic) return;
  mic.stream.getTracks().forEach((t) => t.stop());
  mic.ctx.close();
  mic = null;
}

// ---- connection with reconnect and resume
function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const resume = state.resumeToken ? "?resume=" + encodeURIComponent(state.resumeToken) : "";
  ws = new WebSocket(`${proto}//${location.host}/v1/voice${resume}`, ["atlas-voice.v1", "bearer." + token]);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => {
    ws.send(JSON.stringify({
      type: "session.start",
      input_audio: { encoding: "pcm_s16le", sample_rate: 16000 },
      output_audio: { encoding: "pcm_s16le", sample_rate: OUTPUT_RATE },
      client: { name: "atlas-voice-web", version: "1" },
    }));
  };
  ws.onmessage = (e) => (typeof e.data === "string" ? onEvent(JSON.parse(e.data)) : play(e.data));
  ws.onclose = (e) => onClose(e.code, e.reason);
}

function onEvent(ev) {
  switch (ev.type) {
    case "session.started":
    case "session.resumed":
      state.sessionId = ev.session_id;
      state.resumeToken = ev.resume_token;
      if (ev.type === "session.resumed") state.resumed = true;
      attempts = 0;
      setState("connected");
      break;
    case "transcript.partial":
      $("partial").textContent = ev.text;
      break;
    case "transcript.final":
      $("partial").textContent = "";
      state.transcripts.push(ev.text);
      line("you", ev.text);
      break;
    case "response.started":
      replyEl = line("assistant", "");
      state.replies.push("");
      break;
    case "response.text.delta":
      if (replyEl) replyEl.textContent += ev.text;
      state.replies[state.replies.length - 1] += ev.text;
      break;
    case "response.interrupted":
      flushPlayback();
      if (replyEl) replyEl.classList.add("cut");
      break;
    case "response.done":
      if (ev.latency_ms && ev.latency_ms.to_first_audio != null)
        $("latency").textContent = `first audio ${ev.latency_ms.to_first_audio} ms`;
      break;
    case "usage":
      if (ev.cost_usd != null) { state.costUsd = ev.cost_usd; $("cost").textContent = "$" + ev.cost_usd.toFixed(4); }
      else $("cost").textContent = "unknown";
      break;
    case "error":
      state.errors.push(ev.code);
      if (ev.fatal) line("meta", `error: ${ev.message}`);
      break;
    case "session.ending":
      line("meta", `session ending (${ev.reason})`);
      break;
  }
}

function onClose(code, reason) {
  ws = null;
  if (stopping || TERMINAL_CLOSES.has(code)) {
    setState("closed");
    stopMic();
    $("start").disabled = false;
    $("stop").disabled = true;
    return;
  }
  attempts++;
  if (attempts > BACKOFF.attempts || !state.resumeToken) {
    setState("error");
    line("meta", "connection lost; could not reconnect");
    stopMic();
    $("start").disabled = false;
    return;
  }
  const delay = Math.min(BACKOFF.initial * 2 ** (attempts - 1), BACKOFF.max);
  setState("reconnecting");
  flushPlayback();
  setTimeout(connect, delay);
}

$("start").onclick = async () => {
  $("start").disabled = true;
  stopping = false;
  try {
    token = await getToken();
    ensurePlayer();
    await player.ctx.resume();
    await startMic();
    setState("connecting");
    connect();
    $("stop").disabled = false;
  } catch (err) {
    setState("error");
    line("meta", String(err.message || err));
    $("start").disabled = false;
  }
};

$("stop").onclick = () => {
  stopping = true;
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "session.end" }));
  stopMic();
  flushPlayback();
};
