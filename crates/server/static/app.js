// The built-in page, on the browser SDK (@atlas-voice/client, served from /sdk/ as it is in
// clients/web/src). State for tests and debugging: window.atlasState.
import {
  connect, listDevices, microphoneAvailable, outputDeviceSelectable,
} from "/sdk/index.js";

const $ = (id) => document.getElementById(id);

/** What the page shows, readable from tests. */
const state = (window.atlasState = {
  state: "idle", sessionId: null, sessions: [], resumed: false, transcripts: [], replies: [],
  costUsd: 0, budgetUsd: null, errors: [], notices: [], tokenRefreshes: 0, closed: null,
  get audioChunksPlayed() {
    return voice ? voice.chunksPlayed : 0;
  },
});

/** @type {import("/sdk/index.js").VoiceClient | null} */
let voice = null;
let devUser = null;
let replyEl = null;
let micOk = microphoneAvailable();

// A token pasted into an earlier version of this page was kept in localStorage; forget it.
localStorage.removeItem("atlas-token");

if (!micOk) $("insecure").hidden = false;
if (!outputDeviceSelectable()) $("speaker-label").hidden = true;

// ---- access token: handed over in the URL (#access_token=…), a development token, or pasted
async function getToken() {
  const handed = new URLSearchParams(location.hash.slice(1)).get("access_token");
  if (handed) return handed;
  const pasted = $("token").value.trim();
  if (pasted) return pasted;
  const r = await fetch("/dev/token", {
    method: "POST",
    headers: devUser ? { "content-type": "application/json" } : {},
    body: devUser ? JSON.stringify({ user_id: devUser }) : undefined,
  }).catch(() => null);
  if (r && r.ok) {
    const body = await r.json();
    devUser = body.user_id;
    return body.token;
  }
  $("token-bar").hidden = false;
  $("token").focus();
  throw new Error("paste a Supabase access token first");
}

// A newer pasted token replaces the session's one at once.
$("token").addEventListener("change", () => {
  const t = $("token").value.trim();
  if (voice && t) void voice.refreshAuth(t);
});

// ---- what the page shows
function setState(s) {
  state.state = s;
  $("state").textContent = s;
  $("state").dataset.state = s;
}

function notice(kind, text) {
  state.notices.push({ kind, text });
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = text;
  $("notices").prepend(li);
  while ($("notices").children.length > 4) $("notices").lastChild.remove();
}

function line(cls, who, text) {
  const li = document.createElement("li");
  li.className = cls;
  const w = document.createElement("span");
  w.className = "who";
  w.textContent = who + ":";
  const t = document.createElement("span");
  t.className = "text";
  t.textContent = text;
  li.append(w, " ", t);
  $("log").append(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

function money(v) {
  return "$" + v.toFixed(4);
}

function latencyText(l) {
  const parts = [];
  if (l.to_first_audio != null) parts.push(`first audio ${l.to_first_audio} ms`);
  if (l.end_of_speech_to_final != null) parts.push(`turn end ${l.end_of_speech_to_final} ms`);
  if (l.llm_first_token != null) parts.push(`LLM ${l.llm_first_token} ms`);
  if (l.tts_first_audio != null) parts.push(`TTS ${l.tts_first_audio} ms`);
  return parts.join(" · ");
}

function setRunning(running) {
  $("start").disabled = running;
  $("stop").disabled = !running;
  $("mute").disabled = !running || !micOk;
  $("cancel").disabled = !running;
  $("talk").disabled = !running || !micOk;
  $("text").disabled = !running;
  $("send").disabled = !running;
}

async function fillDevices() {
  const { inputs, outputs } = await listDevices().catch(() => ({ inputs: [], outputs: [] }));
  for (const [select, devices] of [[$("mic"), inputs], [$("speaker"), outputs]]) {
    const chosen = select.value;
    select.replaceChildren(new Option("Default", ""));
    devices.filter((d) => d.deviceId && d.deviceId !== "default").forEach((d, i) => {
      select.append(new Option(d.label || `Device ${i + 1}`, d.deviceId));
    });
    select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "";
  }
}
if (navigator.mediaDevices) navigator.mediaDevices.addEventListener?.("devicechange", fillDevices);
void fillDevices();

// ---- the conversation
function start() {
  setRunning(true);
  setState("connecting");
  state.closed = null;
  replyEl = null;
  const v = connect({
    url: `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/v1/voice`,
    getToken,
    microphone: micOk ? { deviceId: $("mic").value || undefined } : false,
    outputDeviceId: $("speaker").value || undefined,
    pushToTalk: $("ptt").checked,
    client: { name: "atlas-voice-web", version: "2" },
  });
  voice = v;
  const mine = (fn) => (ev) => {
    if (voice === v) fn(ev);
  };
  v.on("state", mine(setState));
  v.on("level", mine((level) => ($("level").value = level)));
  v.on("session.started", mine((ev) => {
    state.sessionId = ev.session_id;
    state.sessions.push(ev.session_id);
    state.resumed = false;
    state.budgetUsd = ev.limits.budget_usd ?? null;
    $("budget").textContent = ev.limits.budget_usd != null ? ` of $${ev.limits.budget_usd.toFixed(2)}` : "";
    $("session").textContent = `session ${ev.session_id.slice(0, 8)}`;
    void fillDevices(); // labels become readable once the microphone is allowed
  }));
  v.on("session.resumed", mine((ev) => {
    state.sessionId = ev.session_id;
    state.resumed = true;
    notice("info", "reconnected; the conversation continues");
  }));
  v.on("transcript.partial", mine((ev) => ($("partial").textContent = ev.text)));
  v.on("transcript.final", mine((ev) => {
    $("partial").textContent = "";
    state.transcripts.push(ev.text);
    line("you", "You", ev.text);
  }));
  v.on("response.started", mine(() => {
    replyEl = line("assistant", "Assistant", "");
    state.replies.push("");
  }));
  v.on("response.text.delta", mine((ev) => {
    if (replyEl) replyEl.querySelector(".text").textContent += ev.text;
    state.replies[state.replies.length - 1] += ev.text;
  }));
  v.on("response.done", mine((ev) => {
    if (!replyEl) return;
    if (ev.interrupted) {
      const cut = document.createElement("span");
      cut.className = "cut";
      cut.textContent = " (interrupted)";
      replyEl.append(cut);
    }
    const text = latencyText(ev.latency_ms);
    if (text) {
      const l = document.createElement("span");
      l.className = "latency";
      l.textContent = text;
      replyEl.append(l);
    }
    replyEl = null;
  }));
  v.on("usage", mine((ev) => {
    if (ev.cost_usd === null) {
      $("cost").textContent = "unknown";
    } else {
      state.costUsd = ev.cost_usd;
      $("cost").textContent = money(ev.cost_usd);
    }
  }));
  v.on("budget.warning", mine((ev) => {
    notice("warning", `${money(ev.spent_usd)} of the ${money(ev.budget_usd)} budget spent`);
  }));
  v.on("session.ending", mine((ev) => {
    const why = {
      draining: "the server is restarting; moving the conversation",
      max_duration: `the session ends in ${ev.seconds_left} s (maximum length)`,
      budget: "the budget is spent",
      idle: "the session is idle",
      token_expiring: "the sign-in is expiring",
    }[ev.reason] ?? ev.reason;
    notice("info", why);
  }));
  v.on("error", mine((ev) => {
    state.errors.push(ev.code);
    notice(ev.fatal ? "error" : "warning", ev.message);
  }));
  v.on("microphone.error", mine((e) => {
    micOk = false;
    setRunning(true);
    notice("error", `${e.message}; you can still type`);
  }));
  v.on("token.error", mine((e) => notice("error", e.message)));
  v.on("token.refreshed", mine(() => state.tokenRefreshes++));
  v.on("reconnecting", mine((ev) => {
    $("partial").textContent = "";
    replyEl = null;
    state.reconnects = (state.reconnects ?? 0) + 1;
    if (ev.attempt === 1) notice("info", "connection lost; reconnecting");
  }));
  v.on("closed", mine((ev) => {
    state.closed = ev;
    setState("closed");
    setRunning(false);
    $("level").value = 0;
    if (!ev.byClient) notice("error", `the conversation ended: ${ev.reason}`);
  }));
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", () => {
  if (voice) voice.disconnect();
});
$("mute").addEventListener("click", () => {
  if (!voice) return;
  const muted = !voice.isMuted;
  voice.setMuted(muted);
  $("mute").setAttribute("aria-pressed", String(muted));
  $("mute").textContent = muted ? "Unmute" : "Mute";
});
$("cancel").addEventListener("click", () => voice && voice.cancelResponse());
$("ptt").addEventListener("change", () => {
  $("talk").hidden = !$("ptt").checked;
  if (voice) voice.setPushToTalk($("ptt").checked);
});
$("mic").addEventListener("change", () => {
  if (voice) void voice.setInputDevice($("mic").value);
});
$("speaker").addEventListener("change", () => {
  if (voice) voice.setOutputDevice($("speaker").value).catch((e) => notice("error", e.message));
});

// Push-to-talk: hold the button (pointer, or Space / Enter while it has the focus).
const talk = $("talk");
const down = () => {
  if (!voice || talk.classList.contains("held")) return;
  talk.classList.add("held");
  talk.textContent = "Talking…";
  voice.startTalking();
};
const up = () => {
  if (!talk.classList.contains("held")) return;
  talk.classList.remove("held");
  talk.textContent = "Hold to talk";
  if (voice) voice.stopTalking();
};
talk.addEventListener("pointerdown", down);
talk.addEventListener("pointerup", up);
talk.addEventListener("pointerleave", up);
talk.addEventListener("keydown", (e) => {
  if ((e.key === " " || e.key === "Enter") && !e.repeat) {
    e.preventDefault();
    down();
  }
});
talk.addEventListener("keyup", (e) => {
  if (e.key === " " || e.key === "Enter") up();
});

$("text-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("text").value;
  if (!voice || !text.trim()) return;
  try {
    voice.sendText(text);
    $("text").value = "";
  } catch (err) {
    notice("error", err.message);
  }
});
