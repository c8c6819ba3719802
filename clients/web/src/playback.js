// Reply playback: each binary frame becomes an AudioBuffer scheduled right after the
// previous one, behind a small jitter buffer; an interruption stops everything at once.

import { pcm16ToFloat } from "./dsp.js";

/** How far ahead of "now" playback starts after a gap, in seconds. */
const JITTER_BUFFER_S = 0.08;

export class Player {
  /**
   * @param {number} sampleRate the session's output rate
   * @param {{ onPlaying: (playing: boolean) => void }} sink
   */
  constructor(sampleRate, sink) {
    this.rate = sampleRate;
    this.sink = sink;
    /** @type {AudioContext} */
    this.ctx = new AudioContext({ sampleRate, latencyHint: "interactive" });
    /** @type {Set<AudioBufferSourceNode>} */
    this.sources = new Set();
    this.next = 0;
    this.playing = false;
    /** Frames scheduled since the start (for tests and diagnostics). */
    this.chunksPlayed = 0;
  }

  /** Whether the browser can route playback to a chosen output device. */
  static outputSelectable() {
    return typeof AudioContext !== "undefined" && "setSinkId" in AudioContext.prototype;
  }

  /** Starts the audio clock; call from a user gesture (autoplay policies). */
  resume() {
    return this.ctx.resume();
  }

  /**
   * Plays on the given output device (`""` for the default). Throws where the browser
   * cannot choose (see `outputSelectable()`).
   * @param {string} deviceId
   */
  async setOutputDevice(deviceId) {
    const ctx = /** @type {AudioContext & { setSinkId?: (id: string) => Promise<void> }} */ (this.ctx);
    if (!ctx.setSinkId) throw new Error("this browser cannot choose the audio output device");
    await ctx.setSinkId(deviceId);
  }

  /**
   * Queues one frame of 16-bit PCM.
   * @param {ArrayBuffer} bytes
   */
  enqueue(bytes) {
    const samples = pcm16ToFloat(bytes);
    if (samples.length === 0) return;
    const buf = this.ctx.createBuffer(1, samples.length, this.rate);
    buf.getChannelData(0).set(samples);
    const src = this.ctx.createBufferSource();
    src.buffer = buf;
    src.connect(this.ctx.destination);
    const at = Math.max(this.ctx.currentTime + JITTER_BUFFER_S, this.next);
    src.start(at);
    this.next = at + buf.duration;
    this.sources.add(src);
    src.onended = () => {
      this.sources.delete(src);
      if (this.sources.size === 0) this.setPlaying(false);
    };
    this.chunksPlayed++;
    this.setPlaying(true);
  }

  /** Drops everything queued or playing (barge-in, `response.cancel`, reconnect). */
  flush() {
    for (const s of this.sources) {
      s.onended = null;
      try {
        s.stop();
      } catch {
        // never started
      }
    }
    this.sources.clear();
    this.next = 0;
    this.setPlaying(false);
  }

  /** @param {boolean} playing */
  setPlaying(playing) {
    if (playing !== this.playing) {
      this.playing = playing;
      this.sink.onPlaying(playing);
    }
  }

  close() {
    this.flush();
    void this.ctx.close();
  }
}
