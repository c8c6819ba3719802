// A TypeScript app's use of the package, type-checked against the shipped declarations
// (`npm run check`): it resolves "@atlas-voice/client" through package.json's "exports".
import {
  connect,
  listDevices,
  microphoneAvailable,
  type ConnectOptions,
  type ServerEvent,
  type VoiceState,
} from "@atlas-voice/client";

declare const supabaseToken: () => Promise<string | undefined>;

const options: ConnectOptions = {
  url: "wss://voice.example.com/v1/voice",
  getToken: supabaseToken,
  pushToTalk: false,
  reconnect: { maxAttempts: 3 },
};
const voice = connect(options);
const stop: () => void = voice.on("state", (s: VoiceState) => console.log(s));
stop();
voice.on("transcript.final", (ev) => {
  const turn: number = ev.turn_id;
  const text: string = ev.text;
  console.log(turn, text);
});
voice.on("response.done", (ev) => {
  const firstAudio: number | undefined = ev.latency_ms.to_first_audio;
  console.log(firstAudio, ev.interrupted);
});
voice.on("usage", (ev) => console.log(ev.cost_usd === null ? "unknown" : ev.cost_usd.toFixed(4)));
voice.on("error", (ev) => console.log(ev.code, ev.fatal));
voice.on("closed", (ev) => console.log(ev.code, ev.reason, ev.byClient));
voice.on("closed", (ev) => {
  const cause: "get_token_failed" | undefined = ev.cause;
  console.log(cause);
});
voice.on("level", (level: number) => console.log(level));
voice.on("event", (ev: ServerEvent) => {
  if (ev.type === "budget.warning") console.log(ev.spent_usd, ev.budget_usd);
});
voice.on("tool.call", (ev) => {
  const args: Record<string, unknown> = ev.arguments;
  if (ev.name === "open_page") voice.sendToolResult(ev.call_id, { opened: args.page });
  else voice.sendToolError(ev.call_id, `unknown tool ${ev.name}`);
});
voice.sendText("hello");
voice.setMuted(true);
voice.setPushToTalk(true);
voice.startTalking();
voice.stopTalking();
voice.cancelResponse();
void voice.refreshAuth();
void voice.setInputDevice("");
void listDevices().then((d) => d.inputs.map((i) => i.label));
const played: number = voice.chunksPlayed;
console.log(microphoneAvailable(), voice.state, voice.sessionId, played);
voice.disconnect();

// @ts-expect-error: unknown event names are refused
voice.on("no.such.event", () => {});
// @ts-expect-error: listeners get the right payload
voice.on("transcript.final", (ev: { nope: number }) => console.log(ev));
