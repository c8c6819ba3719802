//! G.711 μ-law, the audio encoding of Twilio Media Streams (`audio/x-mulaw`, 8000 Hz, mono),
//! to and from 16-bit linear PCM.
//!
//! Each μ-law byte is the complement of a sign bit, a 3-bit segment (exponent) and a 4-bit
//! step within the segment. Decoding is a lookup in a table computed at compile time, equal
//! code for code to the classic reference decoder (as in CPython's `audioop`). Encoding is the
//! classic 16-bit biased conversion (bias 0x84, magnitudes clipped to 32635), symmetric in
//! sign; encoding then decoding is off by at most half a step of the segment, about 3% of the
//! magnitude. (The Sun reference encoder drops two bits with an arithmetic shift first, so it
//! rounds some negative samples one step further from zero; both are valid G.711.)
//!
//! There are two codes for zero, 0xFF and 0x7F (+0 and −0); the encoder writes 0xFF for 0
//! and 0x7F for the smallest negative samples, both of which decode to 0.

/// Added to a magnitude before encoding, so that every segment starts at a power of two.
const BIAS: i32 = 0x84;

/// The largest magnitude the encoder represents; larger ones are clipped to it.
const CLIP: i32 = 32635;

/// The linear value of every μ-law code.
const DECODE: [i16; 256] = {
    let mut table = [0i16; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = decode_code(code as u8);
        code += 1;
    }
    table
};

/// The linear value of one μ-law code.
const fn decode_code(code: u8) -> i16 {
    let code = !code;
    let exponent = (code >> 4) & 0x07;
    let mantissa = (code & 0x0F) as i32;
    let magnitude = (((mantissa << 3) + BIAS) << exponent) - BIAS;
    // At most (15 << 3 + 0x84) << 7 - 0x84 = 32124: it fits.
    if (code & 0x80) == 0 {
        magnitude as i16
    } else {
        -magnitude as i16
    }
}

/// The μ-law code for one linear sample.
fn encode_sample(sample: i16) -> u8 {
    let sample = i32::from(sample);
    let sign: u8 = if sample < 0 { 0x80 } else { 0 };
    let biased = sample.abs().min(CLIP) + BIAS;
    // `biased` is in 0x84..=0x7FFF, so `biased >> 7` is in 1..=255 and its highest set bit is
    // the segment.
    let exponent = (biased >> 7).checked_ilog2().unwrap_or(0);
    let mantissa = ((biased >> (exponent + 3)) & 0x0F) as u8;
    !(sign | ((exponent as u8) << 4) | mantissa)
}

/// Decodes `ulaw` and appends the samples to `out`.
pub fn decode(ulaw: &[u8], out: &mut Vec<i16>) {
    out.extend(ulaw.iter().map(|&code| DECODE[usize::from(code)]));
}

/// Encodes `pcm` and appends the codes to `out`.
pub fn encode(pcm: &[i16], out: &mut Vec<u8>) {
    out.extend(pcm.iter().map(|&sample| encode_sample(sample)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(code: u8) -> i16 {
        let mut out = Vec::new();
        decode(&[code], &mut out);
        out[0]
    }

    fn encoded(sample: i16) -> u8 {
        let mut out = Vec::new();
        encode(&[sample], &mut out);
        out[0]
    }

    #[test]
    fn known_codes_decode_to_known_values() {
        assert_eq!(decoded(0xFF), 0);
        assert_eq!(decoded(0x7F), 0);
        assert_eq!(decoded(0x00), -32124);
        assert_eq!(decoded(0x80), 32124);
        // The first step of each sign, and a mid-range code (CPython's audioop agrees).
        assert_eq!(decoded(0xFE), 8);
        assert_eq!(decoded(0x7E), -8);
        assert_eq!(decoded(0xCE), 988);
        assert_eq!(decoded(0x4E), -988);
    }

    #[test]
    fn known_samples_encode_to_known_codes() {
        assert_eq!(encoded(0), 0xFF);
        assert_eq!(encoded(1000), 0xCE);
        assert_eq!(encoded(-1000), 0x4E);
        assert_eq!(encoded(i16::MAX), 0x80);
        assert_eq!(encoded(i16::MIN), 0x00);
        assert_eq!(encoded(32124), 0x80);
        assert_eq!(encoded(-32124), 0x00);
    }

    #[test]
    fn every_code_survives_a_round_trip_but_negative_zero() {
        let codes: Vec<u8> = (0..=255).collect();
        let mut pcm = Vec::new();
        decode(&codes, &mut pcm);
        let mut again = Vec::new();
        encode(&pcm, &mut again);
        for (&code, &back) in codes.iter().zip(&again) {
            if code == 0x7F {
                assert_eq!(back, 0xFF, "-0 comes back as +0");
            } else {
                assert_eq!(back, code, "{code:#04x}");
            }
        }
    }

    #[test]
    fn decoding_is_monotonic_in_each_half() {
        // 0x00 is the most negative and 0x7F is −0; 0xFF is +0 and 0x80 the most positive.
        for code in 0x00..0x7F {
            assert!(decoded(code) < decoded(code + 1), "{code:#04x}");
        }
        for code in 0x80..0xFF {
            assert!(decoded(code) > decoded(code + 1), "{code:#04x}");
        }
    }

    #[test]
    fn encoding_is_monotonic() {
        let mut previous = i16::MIN;
        for sample in i16::MIN..=i16::MAX {
            let back = decoded(encoded(sample));
            assert!(back >= previous, "{sample}");
            previous = back;
        }
    }

    #[test]
    fn the_round_trip_error_is_at_most_half_a_step() {
        // The step in the segment of |x| + 0x84 is at most (|x| + 0x84) / 16; the decoder
        // lands in its middle.
        for sample in -CLIP..=CLIP {
            let sample = sample as i16;
            let error = (i32::from(decoded(encoded(sample))) - i32::from(sample)).abs();
            assert!(
                error * 32 <= i32::from(sample).abs() + BIAS,
                "{sample}: {error}"
            );
        }
    }

    #[test]
    fn a_sine_survives_with_telephone_quality() {
        let pcm: Vec<i16> = (0..8000)
            .map(|n| {
                let t = f64::from(n) / 8000.0;
                (12_000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()).round() as i16
            })
            .collect();
        let mut ulaw = Vec::new();
        encode(&pcm, &mut ulaw);
        assert_eq!(ulaw.len(), pcm.len());
        let mut back = vec![7i16];
        decode(&ulaw, &mut back);
        assert_eq!(back.len(), pcm.len() + 1, "decode appends");
        let back = &back[1..];

        let signal: f64 = pcm.iter().map(|&s| f64::from(s).powi(2)).sum();
        let noise: f64 = pcm
            .iter()
            .zip(back)
            .map(|(&s, &b)| (f64::from(s) - f64::from(b)).powi(2))
            .sum();
        let snr_db = 10.0 * (signal / noise).log10();
        // μ-law's signal-to-quantisation-noise ratio is about 38 dB over its range.
        assert!(snr_db > 33.0, "SNR {snr_db:.1} dB");
        for (&s, &b) in pcm.iter().zip(back) {
            let error = (i32::from(s) - i32::from(b)).abs();
            assert!(error * 32 <= i32::from(s).abs() + BIAS, "{s} -> {b}");
        }
    }
}
