// @atlas-voice/client: talk to an atlas-voice server from a web page.
// docs/web-client.md is the guide; docs/protocol.md the protocol underneath.

export { connect, VoiceClient, outputDeviceSelectable, httpUrl } from "./client.js";
export {
  Microphone, MicrophoneError, listDevices, microphoneAvailable, captureWorkletSource,
} from "./capture.js";
export { Player } from "./playback.js";
export { Downsampler, CaptureCore, meterLevel, pcm16ToFloat } from "./dsp.js";
export {
  CloseCode, SUBPROTOCOL, BEARER_PREFIX, MAX_INPUT_TEXT_CHARS, MAX_TEXT_FRAME_BYTES,
  parseServerEvent,
} from "./protocol.js";
export {
  DEFAULT_RECONNECT, TERMINAL_CLOSE_CODES, backoffDelay, decideAfterClose,
} from "./reconnect.js";
export { deriveState } from "./state.js";
export { tokenTimes, refreshDelayMs } from "./token.js";

/** @typedef {import("./client.js").ConnectOptions} ConnectOptions */
/** @typedef {import("./client.js").VoiceEventMap} VoiceEventMap */
/** @typedef {import("./client.js").ClosedEvent} ClosedEvent */
/** @typedef {import("./client.js").Environment} Environment */
/** @typedef {import("./state.js").VoiceState} VoiceState */
/** @typedef {import("./reconnect.js").ReconnectPolicy} ReconnectPolicy */
/** @typedef {import("./capture.js").CaptureOptions} CaptureOptions */
/** @typedef {import("./capture.js").MicrophoneErrorCode} MicrophoneErrorCode */
/** @typedef {import("./protocol.js").ServerEvent} ServerEvent */
/** @typedef {import("./protocol.js").ClientMessage} ClientMessage */
/** @typedef {import("./protocol.js").ErrorCode} ErrorCode */
/** @typedef {import("./protocol.js").Usage} Usage */
/** @typedef {import("./protocol.js").ResponseDone} ResponseDone */
/** @typedef {import("./protocol.js").LatencyBreakdown} LatencyBreakdown */
