import { test } from "node:test";
import assert from "node:assert/strict";

import { CaptureCore, Downsampler, meterLevel } from "../src/dsp.js";

/** A sine of `freq` Hz at `rate`, `seconds` long, amplitude 0.5. */
function sine(freq, rate, seconds) {
  const out = new Float32Array(Math.round(rate * seconds));
  for (let i = 0; i < out.length; i++) out[i] = 0.5 * Math.sin((2 * Math.PI * freq * i) / rate);
  return out;
}

/** Runs `input` through in render quanta of 128 samples, as the AudioWorklet does. */
function downsample(input, inRate, outRate) {
  const d = new Downsampler(inRate, outRate);
  const parts = [];
  for (let i = 0; i < input.length; i += 128) parts.push(d.push(input.subarray(i, i + 128)));
  const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function rmsDb(samples) {
  // Skip the first 20 ms: the filter's start-up.
  const s = samples.subarray(Math.round(samples.length * 0.1));
  let sum = 0;
  for (const v of s) sum += v * v;
  return 10 * Math.log10(sum / s.length);
}

const reference = 20 * Math.log10(0.5 / Math.SQRT2);

/** The page's old filter: the average of the input samples inside each output sample. */
function averaging(input, inRate, outRate) {
  const ratio = inRate / outRate;
  const out = [];
  for (let pos = 0; pos + ratio <= input.length; pos += ratio) {
    let sum = 0;
    let n = 0;
    for (let i = Math.floor(pos); i < Math.floor(pos + ratio); i++) {
      sum += input[i];
      n++;
    }
    out.push(sum / n);
  }
  return Float32Array.from(out);
}

for (const inRate of [48000, 44100]) {
  test(`${inRate} Hz → 16 kHz keeps speech frequencies at full level and the rate exact`, () => {
    for (const freq of [300, 1000, 3000, 6000]) {
      const out = downsample(sine(freq, inRate, 1), inRate, 16000);
      // All of it but the filter's delay (its half-width: under 1.5 ms).
      assert.ok(out.length <= 16000 && out.length >= 16000 - 24, `${out.length} samples for 1 s`);
      const db = rmsDb(out) - reference;
      assert.ok(Math.abs(db) < 0.2, `${freq} Hz comes out at ${db.toFixed(2)} dB`);
    }
  });

  test(`${inRate} Hz → 16 kHz removes what would fold down below 8 kHz`, () => {
    for (const freq of [9000, 10000, 12000, 15000, 20000]) {
      const out = downsample(sine(freq, inRate, 1), inRate, 16000);
      const db = rmsDb(out) - reference;
      assert.ok(db < -60, `${freq} Hz leaks through at ${db.toFixed(1)} dB`);
    }
  });
}

test("the old averaging let 12 kHz fold down to 4 kHz almost unattenuated", () => {
  // Why the filter changed: with averaging, a 12 kHz whistle became a loud 4 kHz tone.
  const db = rmsDb(averaging(sine(12000, 48000, 1), 48000, 16000)) - reference;
  assert.ok(db > -12, `averaging attenuates 12 kHz by ${db.toFixed(1)} dB`);
});

test("capture sends 100 ms chunks of 16-bit PCM with their level", () => {
  const chunks = [];
  const core = new CaptureCore(48000, 16000, 1600, (pcm, rms, flushId) => {
    chunks.push({ pcm: new Int16Array(pcm), rms, flushId });
  }, Downsampler);
  const input = sine(1000, 48000, 0.35);
  for (let i = 0; i < input.length; i += 128) core.push(input.subarray(i, i + 128));
  assert.equal(chunks.length, 3);
  for (const c of chunks) {
    assert.equal(c.pcm.length, 1600);
    assert.equal(c.flushId, null);
  }
  // Amplitude 0.5 → peaks near 16,384, RMS 0.354 (−9 dBFS).
  const peak = Math.max(...chunks[2].pcm.map(Math.abs));
  assert.ok(peak > 16000 && peak < 16500, `peak ${peak}`);
  assert.ok(Math.abs(chunks[2].rms - 0.3536) < 0.01, `rms ${chunks[2].rms}`);
  assert.ok(Math.abs(meterLevel(chunks[2].rms) - 0.85) < 0.01);

  // A flush sends the rest at once (at least 50 samples: the server's 100-byte minimum).
  core.flush(7);
  const last = chunks.at(-1);
  assert.equal(last.flushId, 7);
  assert.ok(last.pcm.length >= 50 && last.pcm.length < 1600, `${last.pcm.length}`);
  core.flush(8);
  assert.equal(chunks.at(-1).pcm.length, 50, "an empty flush is padded to 50 samples");
  assert.ok(chunks.at(-1).pcm.every((v) => v === 0));
});

test("a closed gate (mute, push-to-talk up) sends silence at the same pace", () => {
  const chunks = [];
  const core = new CaptureCore(48000, 16000, 1600, (pcm, rms) => {
    chunks.push({ pcm: new Int16Array(pcm), rms });
  }, Downsampler);
  core.open = false;
  const input = sine(1000, 48000, 0.25);
  for (let i = 0; i < input.length; i += 128) core.push(input.subarray(i, i + 128));
  assert.equal(chunks.length, 2);
  assert.ok(chunks.every((c) => c.rms === 0 && c.pcm.every((v) => v === 0)));
  assert.equal(meterLevel(0), 0);
});

test("bad rates are refused", () => {
  assert.throws(() => new Downsampler(0, 16000), RangeError);
  assert.throws(() => new Downsampler(48000, -1), RangeError);
});
