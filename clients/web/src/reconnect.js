// When and how to reconnect after a connection ends: pure decisions, unit-tested without a
// network. docs/protocol.md sections 3.4, 3.5 and 8 are the rules this encodes.

import { CloseCode } from "./protocol.js";

/**
 * @typedef {object} ReconnectPolicy
 * @property {number} initialDelayMs delay before the first attempt (1,000)
 * @property {number} maxDelayMs cap on the delay (30,000)
 * @property {number} maxAttempts attempts before giving up (5)
 */

/** The schedule the Rust client uses: 1, 2, 4, 8, 16 s (capped at 30 s), 5 attempts. */
export const DEFAULT_RECONNECT = Object.freeze({
  initialDelayMs: 1000,
  maxDelayMs: 30000,
  maxAttempts: 5,
});

/**
 * Delay before attempt `attempt` (from 1): initial × 2^(attempt − 1), capped.
 * @param {ReconnectPolicy} policy
 * @param {number} attempt
 */
export function backoffDelay(policy, attempt) {
  const factor = 2 ** Math.max(0, attempt - 1);
  return Math.min(policy.initialDelayMs * factor, policy.maxDelayMs);
}

/** Close codes after which the session is over, each with the reason the app is told. */
/** @type {ReadonlyMap<number, string>} */
const TERMINAL_REASONS = new Map([
  [CloseCode.POLICY, "the server ended the session (protocol violation)"],
  [CloseCode.INTERNAL, "the server could not continue the session"],
  [CloseCode.TOKEN_EXPIRED, "the access token expired"],
  [CloseCode.BUDGET_EXHAUSTED, "the budget is spent"],
  [CloseCode.IDLE_TIMEOUT, "the session was idle for too long"],
  [CloseCode.REPLACED, "the session continues on another connection"],
  [CloseCode.MAX_DURATION, "the session reached its maximum duration"],
]);

/** Close codes after which the session is over and a new one must be the user's choice. */
/** @type {readonly number[]} */
export const TERMINAL_CLOSE_CODES = Object.freeze([...TERMINAL_REASONS.keys()]);

/**
 * What the client knew when a connection ended.
 * @typedef {object} CloseInfo
 * @property {number} code the WebSocket close code (1005/1006 when there was none)
 * @property {boolean} opened whether this WebSocket's handshake succeeded
 * @property {boolean} resuming whether this connection was opened with a resume token
 * @property {boolean} hasSession whether a session exists that could be resumed (a resume
 *   token from `session.started` / `session.resumed`)
 * @property {string | null} lastFatal the code of the last fatal `error` on this connection
 * @property {boolean} draining whether `session.ending` `draining` came before the close
 */

/**
 * @typedef {{ action: "stop", reason: string } |
 *   { action: "resume" } |
 *   { action: "fresh" } |
 *   { action: "probe" }} CloseDecision
 * `probe`: a resume was refused before the handshake. Browsers hide the HTTP status, so the
 * client checks whether the server answers at all: if it does, the resume was refused (the
 * session is gone) and a fresh session follows; if not, the network is down and resuming
 * goes on.
 */

/**
 * Decides what follows the end of a connection that the app did not end itself.
 * @param {CloseInfo} c
 * @returns {CloseDecision}
 */
export function decideAfterClose(c) {
  if (c.lastFatal === "resume_failed") return { action: "fresh" };
  if (c.code === CloseCode.NORMAL) return { action: "stop", reason: "the session ended" };
  if (TERMINAL_CLOSE_CODES.includes(c.code)) {
    return { action: "stop", reason: terminalReason(c.code) };
  }
  if (!c.hasSession) return { action: "fresh" };
  if (c.resuming && !c.opened) return { action: "probe" };
  // 1001 after `draining`: the session was handed over (with Redis) or is gone (without);
  // a resume tells which, and a refusal leads to a fresh session through `probe`.
  return { action: "resume" };
}

/** @param {number} code */
export function terminalReason(code) {
  return TERMINAL_REASONS.get(code) ?? `the connection closed (${code})`;
}
