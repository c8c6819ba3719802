// The atlas-voice client protocol, version 1 (docs/protocol.md), as JSDoc types. The Rust
// types in crates/protocol are the source of truth; these mirror them for JavaScript and
// TypeScript apps.

/** WebSocket subprotocol of version 1. */
export const SUBPROTOCOL = "atlas-voice.v1";
/** Prefix of the subprotocol entry that carries the access token in a browser. */
export const BEARER_PREFIX = "bearer.";
/** Largest text frame the server accepts, in bytes. */
export const MAX_TEXT_FRAME_BYTES = 16384;
/** Longest `input.text` the server accepts, in characters. */
export const MAX_INPUT_TEXT_CHARS = 4000;
/** Longest `error` of a `tool.result`, in characters. */
export const MAX_TOOL_ERROR_CHARS = 1000;

/** WebSocket close codes the server uses (docs/protocol.md section 8). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  POLICY: 1008,
  INTERNAL: 1011,
  TOKEN_EXPIRED: 4401,
  BUDGET_EXHAUSTED: 4402,
  IDLE_TIMEOUT: 4408,
  REPLACED: 4409,
  MAX_DURATION: 4410,
});

/**
 * @typedef {"audio_chunk_invalid" | "invalid_message" | "unknown_message_type" |
 *   "message_too_large" | "session_not_started" | "session_already_started" |
 *   "unsupported_audio_format" | "rate_limited" | "unauthorized" | "forbidden" |
 *   "token_expired" | "too_many_sessions" | "too_many_attempts" | "draining" |
 *   "at_capacity" | "resume_failed" | "stt_failed" | "llm_failed" | "tts_failed" |
 *   "engines_busy" | "budget_exhausted" | "slow_consumer" | "idle_timeout" |
 *   "max_duration" | "internal"} ErrorCode
 */

/** @typedef {{ encoding: "pcm_s16le", sample_rate: number }} AudioFormat */

/**
 * @typedef {object} Limits
 * @property {number} max_duration_s
 * @property {number} [budget_usd] absent when the session budget is unlimited
 * @property {number} idle_timeout_s
 * @property {number} resume_window_s
 */

/**
 * @typedef {object} LatencyBreakdown
 * @property {number} [end_of_speech_to_final]
 * @property {number} [llm_first_token]
 * @property {number} [tts_first_audio]
 * @property {number} [to_first_audio]
 * @property {number} [tools] time the turn waited for tools (only in tool turns)
 */

/**
 * @typedef {{ type: "session.started", session_id: string, resume_token: string,
 *   limits: Limits, input_audio: AudioFormat, output_audio: AudioFormat }} SessionStarted
 * @typedef {{ type: "session.resumed", session_id: string, resume_token: string,
 *   limits: Limits, input_audio: AudioFormat, output_audio: AudioFormat,
 *   turns: number }} SessionResumed
 * @typedef {{ type: "transcript.partial", text: string }} TranscriptPartial
 * @typedef {{ type: "transcript.final", turn_id: number, text: string }} TranscriptFinal
 * @typedef {{ type: "response.started", turn_id: number }} ResponseStarted
 * @typedef {{ type: "response.text.delta", turn_id: number, text: string }} ResponseTextDelta
 * @typedef {{ type: "response.done", turn_id: number, interrupted: boolean,
 *   latency_ms: LatencyBreakdown }} ResponseDone
 * @typedef {{ type: "response.interrupted", turn_id: number }} ResponseInterrupted
 * @typedef {{ type: "usage", cost_usd: number | null, stt_seconds: number,
 *   llm_input_tokens: number, llm_output_tokens: number, tts_chars: number }} Usage
 * @typedef {{ type: "budget.warning", spent_usd: number, budget_usd: number }} BudgetWarning
 * @typedef {{ type: "session.ending",
 *   reason: "draining" | "max_duration" | "idle" | "budget" | "token_expiring",
 *   seconds_left: number }} SessionEnding
 * @typedef {{ type: "error", code: ErrorCode, message: string, fatal: boolean }} ErrorEvent
 * @typedef {{ type: "pong", id?: unknown }} Pong
 * @typedef {{ type: "tool.call", turn_id: number, call_id: string, name: string,
 *   arguments: Record<string, unknown>, timeout_ms: number }} ToolCall
 * @typedef {{ type: "tool.cancelled", call_id: string,
 *   reason: "timeout" | "interrupted" | "ended" }} ToolCancelled
 */

/**
 * Every event the server sends, told apart by `type`.
 * @typedef {SessionStarted | SessionResumed | TranscriptPartial | TranscriptFinal |
 *   ResponseStarted | ResponseTextDelta | ResponseDone | ResponseInterrupted | Usage |
 *   BudgetWarning | SessionEnding | ErrorEvent | Pong | ToolCall | ToolCancelled} ServerEvent
 */

/**
 * @typedef {object} SessionStart
 * @property {"session.start"} type
 * @property {AudioFormat} [input_audio]
 * @property {AudioFormat} [output_audio]
 * @property {string} [voice]
 * @property {string} [language]
 * @property {string} [conversation_id]
 * @property {string} [traceparent] W3C trace context continued by the session's trace
 * @property {{ name?: string, version?: string }} [client]
 */

/**
 * Every message a client sends as a text frame.
 * @typedef {SessionStart | { type: "input.commit" } | { type: "input.text", text: string } |
 *   { type: "response.cancel" } | { type: "auth.refresh", token: string } |
 *   { type: "ping", id?: unknown } | { type: "session.end" } |
 *   { type: "tool.result", call_id: string, result?: unknown, error?: string }} ClientMessage
 */

const EVENT_TYPES = new Set([
  "session.started", "session.resumed", "transcript.partial", "transcript.final",
  "response.started", "response.text.delta", "response.done", "response.interrupted",
  "usage", "budget.warning", "session.ending", "error", "pong", "tool.call", "tool.cancelled",
]);

/**
 * Parses a server text frame. Unknown event types and malformed frames give `null`: a newer
 * server may send events this client does not know (docs/protocol.md section 12).
 * @param {string} text
 * @returns {ServerEvent | null}
 */
export function parseServerEvent(text) {
  let value;
  try {
    value = JSON.parse(text);
  } catch {
    return null;
  }
  if (value === null || typeof value !== "object" || typeof value.type !== "string") return null;
  return EVENT_TYPES.has(value.type) ? /** @type {ServerEvent} */ (value) : null;
}
