// Microphone capture: getUserMedia → AudioWorklet (16 kHz, 100 ms chunks of 16-bit PCM).

import { CaptureCore, Downsampler, meterLevel } from "./dsp.js";

/** The worklet module, built from the same classes the unit tests exercise. */
const WORKLET_SOURCE = `
const Downsampler = (${Downsampler.toString()});
const CaptureCore = (${CaptureCore.toString()});
class AtlasCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions;
    this.core = new CaptureCore(sampleRate, o.outRate, o.chunkSamples,
      (pcm, rms, flushId) => this.port.postMessage({ pcm, rms, flushId }, [pcm]), Downsampler);
    this.core.open = o.open;
    this.port.onmessage = (e) => {
      if (e.data.type === "gate") this.core.open = e.data.open;
      else if (e.data.type === "flush") this.core.flush(e.data.id);
    };
  }
  process(inputs) {
    const input = inputs[0];
    if (input && input.length > 0) {
      let mono = input[0];
      if (input.length > 1) {
        mono = new Float32Array(input[0].length);
        for (const ch of input) for (let i = 0; i < ch.length; i++) mono[i] += ch[i] / input.length;
      }
      this.core.push(mono);
    }
    return true;
  }
}
registerProcessor("atlas-capture", AtlasCapture);
`;

/**
 * Why the microphone could not be used.
 * `insecure_context`: the page is not on https:// or localhost, so the browser offers no
 * microphone. `permission_denied`, `not_found` (no such device), `unavailable` (anything
 * else, e.g. the device is in use).
 * @typedef {"insecure_context" | "permission_denied" | "not_found" | "unavailable"} MicrophoneErrorCode
 */

export class MicrophoneError extends Error {
  /**
   * @param {MicrophoneErrorCode} code
   * @param {string} message
   */
  constructor(code, message) {
    super(message);
    this.name = "MicrophoneError";
    /** @type {MicrophoneErrorCode} */
    this.code = code;
  }
}

/** Whether this page may use the microphone at all (https:// or localhost). */
export function microphoneAvailable() {
  return typeof window !== "undefined" && window.isSecureContext === true &&
    !!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia);
}

/**
 * @typedef {object} CaptureOptions
 * @property {string} [deviceId] the input device (from `listDevices()`); the default when absent
 * @property {string} [workletUrl] load the capture worklet from this URL instead of an
 *   in-memory module (for pages whose Content-Security-Policy forbids `blob:` scripts; serve
 *   the text of `captureWorkletSource()`)
 */

/** The capture worklet's module text (to serve it yourself, see `workletUrl`). */
export function captureWorkletSource() {
  return WORKLET_SOURCE;
}

/**
 * A running microphone capture.
 */
export class Microphone {
  /**
   * Opens the microphone and starts capturing.
   * @param {CaptureOptions} options
   * @param {{ open: boolean, onChunk: (pcm: ArrayBuffer) => void,
   *   onLevel: (level: number) => void, onFlushed: (id: number) => void }} sink
   * @returns {Promise<Microphone>}
   */
  static async open(options, sink) {
    if (!microphoneAvailable()) {
      throw new MicrophoneError(
        "insecure_context",
        "the microphone is only available on a secure page: open it over https:// or on localhost",
      );
    }
    /** @type {MediaStream} */
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        audio: {
          deviceId: options.deviceId ? { exact: options.deviceId } : undefined,
          channelCount: 1,
          echoCancellation: true,
          noiseSuppression: true,
          autoGainControl: true,
        },
      });
    } catch (e) {
      const name = e instanceof Error ? e.name : "";
      if (name === "NotAllowedError" || name === "SecurityError") {
        throw new MicrophoneError("permission_denied", "microphone access was denied");
      }
      if (name === "NotFoundError" || name === "OverconstrainedError") {
        throw new MicrophoneError("not_found", "no such microphone");
      }
      throw new MicrophoneError("unavailable", `the microphone cannot be used: ${String(e)}`);
    }
    const ctx = new AudioContext();
    try {
      let url = options.workletUrl;
      let blobUrl = null;
      if (!url) {
        blobUrl = URL.createObjectURL(new Blob([WORKLET_SOURCE], { type: "text/javascript" }));
        url = blobUrl;
      }
      try {
        await ctx.audioWorklet.addModule(url);
      } finally {
        if (blobUrl) URL.revokeObjectURL(blobUrl);
      }
      const source = ctx.createMediaStreamSource(stream);
      const node = new AudioWorkletNode(ctx, "atlas-capture", {
        processorOptions: { outRate: 16000, chunkSamples: 1600, open: sink.open },
      });
      node.port.onmessage = (e) => {
        sink.onChunk(e.data.pcm);
        sink.onLevel(meterLevel(e.data.rms));
        if (e.data.flushId !== null) sink.onFlushed(e.data.flushId);
      };
      source.connect(node);
      await ctx.resume();
      const track = stream.getAudioTracks()[0];
      return new Microphone(ctx, node, stream, track ? track.getSettings().deviceId ?? null : null);
    } catch (e) {
      stream.getTracks().forEach((t) => t.stop());
      void ctx.close();
      throw new MicrophoneError("unavailable", `audio capture failed: ${String(e)}`);
    }
  }

  /**
   * @param {AudioContext} ctx
   * @param {AudioWorkletNode} node
   * @param {MediaStream} stream
   * @param {string | null} deviceId
   */
  constructor(ctx, node, stream, deviceId) {
    this.ctx = ctx;
    this.node = node;
    this.stream = stream;
    /** The device in use. */
    this.deviceId = deviceId;
  }

  /**
   * Opens or closes the gate: closed, the worklet sends silence (mute, push-to-talk up).
   * @param {boolean} open
   */
  setOpen(open) {
    this.node.port.postMessage({ type: "gate", open });
  }

  /**
   * Sends what has been captured so far right away; `onFlushed(id)` follows the chunk.
   * @param {number} id
   */
  flush(id) {
    this.node.port.postMessage({ type: "flush", id });
  }

  close() {
    this.stream.getTracks().forEach((t) => t.stop());
    this.node.port.onmessage = null;
    void this.ctx.close();
  }
}

/**
 * The audio devices, for a device picker. Labels are empty until the user has allowed the
 * microphone once.
 * @returns {Promise<{ inputs: MediaDeviceInfo[], outputs: MediaDeviceInfo[] }>}
 */
export async function listDevices() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) {
    return { inputs: [], outputs: [] };
  }
  const all = await navigator.mediaDevices.enumerateDevices();
  return {
    inputs: all.filter((d) => d.kind === "audioinput"),
    outputs: all.filter((d) => d.kind === "audiooutput"),
  };
}
