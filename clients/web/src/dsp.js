// Signal processing for microphone capture. Everything here is plain arithmetic with no
// browser API, so it runs unchanged in the AudioWorklet (see capture.js, which ships these
// classes into the worklet by their source text) and under node's test runner.
//
// The classes must not refer to anything outside their own bodies: capture.js rebuilds
// them inside the worklet from `Class.toString()`.

/**
 * Converts audio from the capture device's rate to a lower rate (16 kHz for the server)
 * with a proper anti-aliasing filter: a Kaiser-windowed sinc low-pass evaluated at each
 * output instant (polyphase, 256 phases), so nothing above the new Nyquist frequency folds
 * down into speech. Cut-off 7 kHz for 16 kHz output, stop band (−80 dB) from about 8 kHz.
 */
export class Downsampler {
  /**
   * @param {number} inRate input sample rate in Hz (e.g. 48000 or 44100)
   * @param {number} outRate output sample rate in Hz (e.g. 16000)
   */
  constructor(inRate, outRate) {
    if (!(inRate > 0 && outRate > 0)) throw new RangeError("sample rates must be positive");
    /** Input samples per output sample. */
    this.step = inRate / outRate;
    const phases = 256;
    const beta = 8;
    // Cut-off in cycles per input sample: 7/16 of the output rate (7 kHz at 16 kHz), or the
    // input's own band when upsampling.
    const fc = (0.4375 * Math.min(inRate, outRate)) / inRate;
    // Half-width in input samples: 18 zero crossings of the sinc on each side.
    const half = Math.max(2, Math.ceil(18 / (2 * fc)));
    /** @type {number} */
    this.half = half;
    this.phases = phases;
    const width = 2 * half;
    /** Row p holds the taps for an output instant p/phases past an input sample. */
    this.table = new Float32Array(phases * width);
    /** @param {number} x */
    const i0 = (x) => {
      let sum = 1;
      let term = 1;
      for (let k = 1; k < 50; k++) {
        term *= (x / (2 * k)) * (x / (2 * k));
        sum += term;
        if (term < sum * 1e-12) break;
      }
      return sum;
    };
    const i0beta = i0(beta);
    for (let p = 0; p < phases; p++) {
      const frac = p / phases;
      let sum = 0;
      const row = p * width;
      for (let j = 0; j < width; j++) {
        // Tap j weighs input sample (i - half + 1 + j) for an output at i + frac.
        const d = j - half + 1 - frac;
        const r = d / half;
        const w = Math.abs(r) >= 1 ? 0 : i0(beta * Math.sqrt(1 - r * r)) / i0beta;
        const x = 2 * fc * d;
        const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
        const v = 2 * fc * sinc * w;
        this.table[row + j] = v;
        sum += v;
      }
      for (let j = 0; j < width; j++) this.table[row + j] /= sum; // unity gain at DC
    }
    // History: `half` zeros so the first output is centred on the first input sample.
    this.buf = new Float32Array(Math.max(4096, width * 4));
    this.len = half - 1;
    this.pos = half - 1;
  }

  /**
   * Feeds input samples; returns the output samples that are now complete.
   * @param {Float32Array} input
   * @returns {Float32Array}
   */
  push(input) {
    if (this.len + input.length > this.buf.length) {
      const grown = new Float32Array(Math.max(this.buf.length * 2, this.len + input.length));
      grown.set(this.buf.subarray(0, this.len));
      this.buf = grown;
    }
    this.buf.set(input, this.len);
    this.len += input.length;
    const half = this.half;
    const width = 2 * half;
    const out = new Float32Array(Math.max(0, Math.ceil((this.len - half - this.pos) / this.step) + 1));
    let n = 0;
    while (Math.floor(this.pos) + half + 1 < this.len) {
      const i = Math.floor(this.pos);
      const p = Math.round((this.pos - i) * this.phases);
      // Rounding up to the next whole sample moves the window by one.
      const base = p === this.phases ? i + 1 : i;
      const row = (p === this.phases ? 0 : p) * width;
      let acc = 0;
      const start = base - half + 1;
      for (let j = 0; j < width; j++) acc += this.buf[start + j] * this.table[row + j];
      out[n++] = acc;
      this.pos += this.step;
    }
    // Keep only the history the next output needs.
    const keep = Math.floor(this.pos) - half + 1;
    if (keep > 0) {
      this.buf.copyWithin(0, keep, this.len);
      this.len -= keep;
      this.pos -= keep;
    }
    return out.subarray(0, n);
  }
}

/**
 * The capture pipeline of the worklet, without the worklet: downsampling, mute and
 * push-to-talk gate, 16-bit conversion, fixed-size chunks and a level per chunk.
 */
export class CaptureCore {
  /**
   * @param {number} inRate the AudioContext's sample rate
   * @param {number} outRate the rate sent to the server
   * @param {number} chunkSamples samples per chunk at `outRate` (1,600 = 100 ms at 16 kHz)
   * @param {(chunk: ArrayBuffer, level: number, flushId: number | null) => void} emit
   * @param {typeof Downsampler} Resampler the downsampler class (passed in so the worklet can
   *   hand over its own copy)
   */
  constructor(inRate, outRate, chunkSamples, emit, Resampler) {
    this.resampler = new Resampler(inRate, outRate);
    this.chunkSamples = chunkSamples;
    this.emit = emit;
    this.chunk = new Int16Array(chunkSamples);
    this.filled = 0;
    this.sumSquares = 0;
    /** When false, silence is sent instead of the microphone (mute, push-to-talk released). */
    this.open = true;
  }

  /**
   * Feeds one block of input (one render quantum, or more).
   * @param {Float32Array} input
   */
  push(input) {
    const out = this.resampler.push(input);
    for (let i = 0; i < out.length; i++) {
      const v = this.open ? Math.max(-1, Math.min(1, out[i])) : 0;
      this.sumSquares += v * v;
      this.chunk[this.filled++] = v < 0 ? Math.round(v * 0x8000) : Math.round(v * 0x7fff);
      if (this.filled === this.chunkSamples) this.send(null);
    }
  }

  /**
   * Sends what has been captured so far as a short chunk (at least 50 samples, padded with
   * silence: the server refuses frames under 100 bytes), tagged with `flushId`.
   * @param {number} flushId
   */
  flush(flushId) {
    if (this.filled < 50) {
      this.chunk.fill(0, this.filled, 50);
      this.filled = 50;
    }
    this.send(flushId);
  }

  /** @param {number | null} flushId */
  send(flushId) {
    const rms = Math.sqrt(this.sumSquares / this.filled);
    const pcm = this.chunk.slice(0, this.filled).buffer;
    this.chunk = new Int16Array(this.chunkSamples);
    this.filled = 0;
    this.sumSquares = 0;
    this.emit(pcm, rms, flushId);
  }
}

/**
 * Maps an RMS amplitude (0–1) to a meter level (0–1) on a 60 dB scale.
 * @param {number} rms
 * @returns {number}
 */
export function meterLevel(rms) {
  if (!(rms > 0)) return 0;
  const db = 20 * Math.log10(rms);
  return Math.max(0, Math.min(1, (db + 60) / 60));
}

/**
 * 16-bit little-endian PCM to float samples in [-1, 1).
 * @param {ArrayBuffer} bytes
 * @returns {Float32Array}
 */
export function pcm16ToFloat(bytes) {
  const pcm = new Int16Array(bytes, 0, bytes.byteLength >> 1);
  const out = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 0x8000;
  return out;
}
