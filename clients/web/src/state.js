// The client's state as one value, derived from the connection and the turn in progress.

/**
 * `connecting`: opening the first connection. `listening`: the session is up and waiting for
 * the user. `thinking`: the user's turn is over, no reply audio plays yet. `speaking`: reply
 * audio is playing. `reconnecting`: the connection dropped and a new one is on its way.
 * `closed`: over (after `disconnect()` or a close that cannot be recovered).
 * @typedef {"connecting" | "listening" | "thinking" | "speaking" | "reconnecting" | "closed"} VoiceState
 */

/**
 * @typedef {object} StateInputs
 * @property {"connecting" | "open" | "reconnecting" | "closed"} link
 * @property {boolean} session a session is started on the current connection
 * @property {boolean} turnOpen a user turn has ended and its reply has not (transcript.final
 *   or a sent text, until response.done)
 * @property {boolean} playing reply audio is scheduled or playing
 */

/**
 * @param {StateInputs} s
 * @returns {VoiceState}
 */
export function deriveState(s) {
  if (s.link === "closed") return "closed";
  if (s.link === "reconnecting") return "reconnecting";
  if (s.link === "connecting" || !s.session) return "connecting";
  if (s.playing) return "speaking";
  if (s.turnOpen) return "thinking";
  return "listening";
}
