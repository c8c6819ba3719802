//! Converts Whisper from the CTranslate2 format the model packages ship (the faster-whisper
//! format) to the ggml file whisper.cpp loads.
//!
//! CTranslate2 `model.bin` (little-endian): `u32` version, string spec name, `u32` revision,
//! `u32` variable count; per variable a string name, `u8` rank, rank × `u32` dims, `u8` dtype,
//! `u32` byte count and the raw bytes; then `u32` alias count and alias pairs. Strings are a
//! `u16` length and bytes including a NUL.
//!
//! The ggml file is whisper.cpp's legacy format: magic, eleven `i32` hyper-parameters, the
//! 80 × 201 mel filterbank (Slaney, as librosa computes it), the byte-level vocabulary, then
//! each tensor under its original Whisper name. Matrices are stored as f16; vectors, the
//! convolution biases and the positional embeddings as f32. In CTranslate2's Whisper spec the
//! self-attention `linear_0` is the fused query/key/value projection; in cross-attention
//! `linear_0` is the query, `linear_1` the fused key/value and `linear_2` the output.

use std::collections::HashMap;
use std::io::Write;

use half::f16;

/// The conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The model file is not what the converter expects.
    #[error("model file: {0}")]
    Model(String),
    /// The tokenizer file is not what the converter expects.
    #[error("tokenizer.json: {0}")]
    Tokenizer(String),
    /// Writing the output failed.
    #[error("writing: {0}")]
    Io(#[from] std::io::Error),
}

const GGML_MAGIC: u32 = 0x6767_6d6c;

struct Var<'a> {
    dims: Vec<usize>,
    dtype: u8,
    data: &'a [u8],
}

impl Var<'_> {
    fn len(&self) -> usize {
        self.dims.iter().product()
    }

    fn scalar_i32(&self) -> Result<i32, ConvertError> {
        match (self.dtype, self.data) {
            (2, [a, b]) => Ok(i16::from_le_bytes([*a, *b]) as i32),
            (3, [a, b, c, d]) => Ok(i32::from_le_bytes([*a, *b, *c, *d])),
            (1, [a]) => Ok(*a as i8 as i32),
            _ => Err(ConvertError::Model("expected an integer scalar".into())),
        }
    }

    /// Values as f32, for `start..end` of the flattened tensor.
    fn f32_range(&self, start: usize, end: usize) -> Result<Vec<f32>, ConvertError> {
        match self.dtype {
            0 => Ok(self.data[start * 4..end * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            4 => Ok(self.data[start * 2..end * 2]
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            5 => Ok(self.data[start * 2..end * 2]
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            d => Err(ConvertError::Model(format!(
                "weights of dtype {d} (quantized) are not supported"
            ))),
        }
    }

    /// Little-endian f16 bytes for `start..end`.
    fn f16_range(&self, start: usize, end: usize) -> Result<Vec<u8>, ConvertError> {
        if self.dtype == 4 {
            return Ok(self.data[start * 2..end * 2].to_vec());
        }
        Ok(self
            .f32_range(start, end)?
            .into_iter()
            .flat_map(|v| f16::from_f32(v).to_le_bytes())
            .collect())
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ConvertError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| ConvertError::Model("truncated".into()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, ConvertError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ConvertError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ConvertError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Result<String, ConvertError> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        let b = b.strip_suffix(&[0]).unwrap_or(b);
        String::from_utf8(b.to_vec()).map_err(|_| ConvertError::Model("name is not UTF-8".into()))
    }
}

fn dtype_size(dtype: u8) -> Result<usize, ConvertError> {
    match dtype {
        0 | 3 => Ok(4),
        1 => Ok(1),
        2 | 4 | 5 => Ok(2),
        d => Err(ConvertError::Model(format!("unknown dtype {d}"))),
    }
}

fn parse_ct2(buf: &[u8]) -> Result<HashMap<String, Var<'_>>, ConvertError> {
    let mut r = Reader { buf, pos: 0 };
    let version = r.u32()?;
    if !(5..=6).contains(&version) {
        return Err(ConvertError::Model(format!(
            "CTranslate2 format version {version} is not supported (expected 5 or 6)"
        )));
    }
    let spec = r.string()?;
    if spec != "WhisperSpec" {
        return Err(ConvertError::Model(format!(
            "expected a Whisper model, found {spec}"
        )));
    }
    let _revision = r.u32()?;
    let count = r.u32()? as usize;
    let mut vars = HashMap::with_capacity(count);
    for _ in 0..count {
        let name = r.string()?;
        let rank = r.u8()? as usize;
        let dims = (0..rank)
            .map(|_| r.u32().map(|d| d as usize))
            .collect::<Result<Vec<_>, _>>()?;
        let dtype = r.u8()?;
        let bytes = r.u32()? as usize;
        let data = r.take(bytes)?;
        let expected = dims.iter().product::<usize>() * dtype_size(dtype)?;
        if expected != bytes {
            return Err(ConvertError::Model(format!(
                "{name}: {bytes} bytes for dims {dims:?}"
            )));
        }
        vars.insert(name, Var { dims, dtype, data });
    }
    Ok(vars)
}

/// GPT-2's byte ↔ printable character table, inverted: character → byte.
fn unicode_to_byte() -> HashMap<char, u8> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .map(|(b, c)| (char::from_u32(c).expect("valid char"), b as u8))
        .collect()
}

/// The regular (non-special) tokens as bytes, in id order: ids below `<|endoftext|>`.
fn vocabulary(tokenizer_json: &[u8]) -> Result<Vec<Vec<u8>>, ConvertError> {
    let tok: serde_json::Value = serde_json::from_slice(tokenizer_json)
        .map_err(|e| ConvertError::Tokenizer(e.to_string()))?;
    let vocab = tok["model"]["vocab"]
        .as_object()
        .ok_or_else(|| ConvertError::Tokenizer("no model.vocab".into()))?;
    let eot = tok["added_tokens"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["content"] == "<|endoftext|>"))
        .and_then(|t| t["id"].as_u64())
        .or_else(|| vocab.get("<|endoftext|>").and_then(|v| v.as_u64()))
        .ok_or_else(|| ConvertError::Tokenizer("no <|endoftext|> token".into()))?
        as usize;
    let table = unicode_to_byte();
    let mut tokens: Vec<Option<Vec<u8>>> = vec![None; eot];
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| ConvertError::Tokenizer("non-numeric id".into()))?
            as usize;
        if id >= eot {
            continue;
        }
        let bytes = text
            .chars()
            .map(|c| table.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| ConvertError::Tokenizer(format!("token {id} is not byte-level")))?;
        tokens[id] = Some(bytes);
    }
    tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.ok_or_else(|| ConvertError::Tokenizer(format!("token id {i} missing"))))
        .collect()
}

/// Whisper's mel filterbank: `n_mels` × (`n_fft`/2 + 1), Slaney scale and normalisation
/// (librosa's defaults), row-major.
pub fn mel_filters(sample_rate: f64, n_fft: usize, n_mels: usize) -> Vec<f32> {
    const F_SP: f64 = 200.0 / 3.0;
    const MIN_LOG_HZ: f64 = 1000.0;
    let min_log_mel = MIN_LOG_HZ / F_SP;
    let logstep = 6.4f64.ln() / 27.0;
    let hz_to_mel = |f: f64| {
        if f >= MIN_LOG_HZ {
            min_log_mel + (f / MIN_LOG_HZ).ln() / logstep
        } else {
            f / F_SP
        }
    };
    let mel_to_hz = |m: f64| {
        if m >= min_log_mel {
            MIN_LOG_HZ * (logstep * (m - min_log_mel)).exp()
        } else {
            F_SP * m
        }
    };
    let n_bins = n_fft / 2 + 1;
    let fmax = sample_rate / 2.0;
    let fftfreqs: Vec<f64> = (0..n_bins)
        .map(|k| fmax * k as f64 / (n_bins - 1) as f64)
        .collect();
    let (mel_lo, mel_hi) = (hz_to_mel(0.0), hz_to_mel(fmax));
    let mel_f: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(mel_lo + (mel_hi - mel_lo) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let mut weights = vec![0f32; n_mels * n_bins];
    for i in 0..n_mels {
        let enorm = 2.0 / (mel_f[i + 2] - mel_f[i]);
        for (k, &f) in fftfreqs.iter().enumerate() {
            let lower = (f - mel_f[i]) / (mel_f[i + 1] - mel_f[i]);
            let upper = (mel_f[i + 2] - f) / (mel_f[i + 2] - mel_f[i + 1]);
            let w = lower.min(upper).max(0.0) as f32;
            weights[i * n_bins + k] = w * enorm as f32;
        }
    }
    weights
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    F16,
    F32,
    /// f32, stored as an `[n, 1]` column.
    Column,
}
use Kind::{F16, F32};
const WHOLE: Option<(usize, usize)> = None;

struct Emitter<'v, 'a, W: Write> {
    w: Writer<W>,
    vars: &'v HashMap<String, Var<'a>>,
    written: usize,
}

impl<W: Write> Emitter<'_, '_, W> {
    /// Writes `src` (or rows `part.0` of `part.1` equal parts of it) as `name`.
    fn put(
        &mut self,
        name: &str,
        src: &str,
        part: Option<(usize, usize)>,
        kind: Kind,
    ) -> Result<(), ConvertError> {
        let v = self
            .vars
            .get(src)
            .ok_or_else(|| ConvertError::Model(format!("variable {src} missing")))?;
        let (start, end, mut dims) = match part {
            None => (0, v.len(), v.dims.clone()),
            Some((i, n)) => {
                if v.dims.is_empty() || v.dims[0] % n != 0 {
                    return Err(ConvertError::Model(format!("{src} cannot be split in {n}")));
                }
                let rows = v.dims[0] / n;
                let row_len = v.len() / v.dims[0];
                let mut dims = v.dims.clone();
                dims[0] = rows;
                (i * rows * row_len, (i + 1) * rows * row_len, dims)
            }
        };
        if kind == Kind::Column {
            dims.push(1);
        }
        let data = if kind == F16 {
            v.f16_range(start, end)?
        } else {
            v.f32_range(start, end)?
                .into_iter()
                .flat_map(|x| x.to_le_bytes())
                .collect()
        };
        self.w.tensor(name, &dims, kind != F16, &data)?;
        self.written += 1;
        Ok(())
    }

    fn layer_norm(&mut self, name: &str, src: &str) -> Result<(), ConvertError> {
        self.put(
            &format!("{name}.weight"),
            &format!("{src}/gamma"),
            WHOLE,
            F32,
        )?;
        self.put(&format!("{name}.bias"), &format!("{src}/beta"), WHOLE, F32)
    }

    fn linear(&mut self, name: &str, src: &str) -> Result<(), ConvertError> {
        self.put(
            &format!("{name}.weight"),
            &format!("{src}/weight"),
            WHOLE,
            F16,
        )?;
        self.put(&format!("{name}.bias"), &format!("{src}/bias"), WHOLE, F32)
    }

    /// Writes rows `part.0` of `part.1` equal parts of the fused projection `src` as the
    /// projection `name`: its weight and, when `bias`, its bias.
    fn fused_part(
        &mut self,
        name: &str,
        src: &str,
        part: (usize, usize),
        bias: bool,
    ) -> Result<(), ConvertError> {
        self.put(
            &format!("{name}.weight"),
            &format!("{src}/weight"),
            Some(part),
            F16,
        )?;
        if bias {
            self.put(
                &format!("{name}.bias"),
                &format!("{src}/bias"),
                Some(part),
                F32,
            )?;
        }
        Ok(())
    }
}

struct Writer<W: Write> {
    out: W,
}

impl<W: Write> Writer<W> {
    fn i32(&mut self, v: i32) -> std::io::Result<()> {
        self.out.write_all(&v.to_le_bytes())
    }

    /// One tensor; `dims` in PyTorch order (outermost first).
    fn tensor(
        &mut self,
        name: &str,
        dims: &[usize],
        f32_data: bool,
        data: &[u8],
    ) -> std::io::Result<()> {
        self.i32(dims.len() as i32)?;
        self.i32(name.len() as i32)?;
        self.i32(if f32_data { 0 } else { 1 })?;
        for d in dims.iter().rev() {
            self.i32(*d as i32)?;
        }
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(data)
    }
}

/// Converts a CTranslate2 Whisper model (`model_bin`, with `tokenizer.json`) and writes the
/// ggml file to `out`. Returns the number of tensors written.
pub fn ct2_to_ggml(
    model_bin: &[u8],
    tokenizer_json: &[u8],
    out: impl Write,
) -> Result<usize, ConvertError> {
    let vars = parse_ct2(model_bin)?;
    let get = |name: &str| {
        vars.get(name)
            .ok_or_else(|| ConvertError::Model(format!("variable {name} missing")))
    };
    let tokens = vocabulary(tokenizer_json)?;

    let embeddings = get("decoder/embeddings/weight")?;
    let enc_pos = get("encoder/position_encodings/encodings")?;
    let dec_pos = get("decoder/position_encodings/encodings")?;
    let conv1 = get("encoder/conv1/weight")?;
    if embeddings.dims.len() != 2
        || enc_pos.dims.len() != 2
        || dec_pos.dims.len() != 2
        || conv1.dims.len() != 3
    {
        return Err(ConvertError::Model("unexpected tensor ranks".into()));
    }
    let count_layers = |prefix: &str| {
        (0..)
            .take_while(|i| vars.contains_key(&format!("{prefix}/layer_{i}/ffn/linear_0/weight")))
            .count()
    };
    let n_audio_layer = count_layers("encoder");
    let n_text_layer = count_layers("decoder");
    if n_audio_layer == 0 || n_text_layer == 0 {
        return Err(ConvertError::Model("no transformer layers".into()));
    }
    let n_vocab = embeddings.dims[0];
    let n_audio_state = enc_pos.dims[1];
    let n_text_state = dec_pos.dims[1];
    let n_mels = conv1.dims[1];
    let hparams = [
        n_vocab as i32,
        enc_pos.dims[0] as i32,
        n_audio_state as i32,
        get("encoder/num_heads")?.scalar_i32()?,
        n_audio_layer as i32,
        dec_pos.dims[0] as i32,
        n_text_state as i32,
        get("decoder/num_heads")?.scalar_i32()?,
        n_text_layer as i32,
        n_mels as i32,
        1, // f16
    ];
    if tokens.len() >= n_vocab {
        return Err(ConvertError::Tokenizer(format!(
            "{} regular tokens for a model of {n_vocab}",
            tokens.len()
        )));
    }

    let mut w = Writer {
        out: std::io::BufWriter::with_capacity(1 << 20, out),
    };
    w.out.write_all(&GGML_MAGIC.to_le_bytes())?;
    for h in hparams {
        w.i32(h)?;
    }
    let n_bins = 201;
    let filters = mel_filters(16_000.0, 400, n_mels);
    w.i32(n_mels as i32)?;
    w.i32(n_bins)?;
    for v in filters {
        w.out.write_all(&v.to_le_bytes())?;
    }
    w.i32(tokens.len() as i32)?;
    for t in &tokens {
        w.i32(t.len() as i32)?;
        w.out.write_all(t)?;
    }

    let mut e = Emitter {
        w,
        vars: &vars,
        written: 0,
    };
    e.put(
        "encoder.positional_embedding",
        "encoder/position_encodings/encodings",
        WHOLE,
        F32,
    )?;
    for conv in ["conv1", "conv2"] {
        e.put(
            &format!("encoder.{conv}.weight"),
            &format!("encoder/{conv}/weight"),
            WHOLE,
            F16,
        )?;
        // whisper.cpp keeps the convolution biases as [n, 1].
        e.put(
            &format!("encoder.{conv}.bias"),
            &format!("encoder/{conv}/bias"),
            WHOLE,
            Kind::Column,
        )?;
    }
    for (side, n_layers) in [("encoder", n_audio_layer), ("decoder", n_text_layer)] {
        for i in 0..n_layers {
            let b = format!("{side}.blocks.{i}");
            let c = format!("{side}/layer_{i}");
            e.layer_norm(
                &format!("{b}.attn_ln"),
                &format!("{c}/self_attention/layer_norm"),
            )?;
            let qkv = format!("{c}/self_attention/linear_0");
            e.fused_part(&format!("{b}.attn.query"), &qkv, (0, 3), true)?;
            e.fused_part(&format!("{b}.attn.key"), &qkv, (1, 3), false)?;
            e.fused_part(&format!("{b}.attn.value"), &qkv, (2, 3), true)?;
            e.linear(
                &format!("{b}.attn.out"),
                &format!("{c}/self_attention/linear_1"),
            )?;
            if side == "decoder" {
                let a = format!("{c}/attention");
                e.layer_norm(&format!("{b}.cross_attn_ln"), &format!("{a}/layer_norm"))?;
                e.linear(&format!("{b}.cross_attn.query"), &format!("{a}/linear_0"))?;
                let kv = format!("{a}/linear_1");
                e.fused_part(&format!("{b}.cross_attn.key"), &kv, (0, 2), false)?;
                e.fused_part(&format!("{b}.cross_attn.value"), &kv, (1, 2), true)?;
                e.linear(&format!("{b}.cross_attn.out"), &format!("{a}/linear_2"))?;
            }
            e.layer_norm(&format!("{b}.mlp_ln"), &format!("{c}/ffn/layer_norm"))?;
            e.linear(&format!("{b}.mlp.0"), &format!("{c}/ffn/linear_0"))?;
            e.linear(&format!("{b}.mlp.2"), &format!("{c}/ffn/linear_1"))?;
        }
    }
    e.layer_norm("encoder.ln_post", "encoder/layer_norm")?;
    e.put(
        "decoder.positional_embedding",
        "decoder/position_encodings/encodings",
        WHOLE,
        F32,
    )?;
    e.put(
        "decoder.token_embedding.weight",
        "decoder/embeddings/weight",
        WHOLE,
        F16,
    )?;
    e.layer_norm("decoder.ln", "decoder/layer_norm")?;
    let written = e.written;
    let mut w = e.w;
    w.out.flush()?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: usize = 4;
    const MELS: usize = 80;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&((s.len() + 1) as u16).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    /// A tiny CTranslate2 Whisper model: one layer each side, f16 weights.
    fn model(skip: Option<&str>) -> Vec<u8> {
        let mut vars: Vec<(String, Vec<usize>)> = vec![
            ("encoder/conv1/weight".into(), vec![STATE, MELS, 3]),
            ("encoder/conv1/bias".into(), vec![STATE]),
            ("encoder/conv2/weight".into(), vec![STATE, STATE, 3]),
            ("encoder/conv2/bias".into(), vec![STATE]),
            (
                "encoder/position_encodings/encodings".into(),
                vec![6, STATE],
            ),
            (
                "decoder/position_encodings/encodings".into(),
                vec![5, STATE],
            ),
            ("decoder/embeddings/weight".into(), vec![7, STATE]),
        ];
        let ln = |p: &str| {
            vec![
                (format!("{p}/gamma"), vec![STATE]),
                (format!("{p}/beta"), vec![STATE]),
            ]
        };
        let lin = |p: &str, o: usize, i: usize| {
            vec![
                (format!("{p}/weight"), vec![o, i]),
                (format!("{p}/bias"), vec![o]),
            ]
        };
        for side in ["encoder", "decoder"] {
            let c = format!("{side}/layer_0");
            vars.extend(ln(&format!("{c}/self_attention/layer_norm")));
            vars.extend(lin(
                &format!("{c}/self_attention/linear_0"),
                3 * STATE,
                STATE,
            ));
            vars.extend(lin(&format!("{c}/self_attention/linear_1"), STATE, STATE));
            vars.extend(ln(&format!("{c}/ffn/layer_norm")));
            vars.extend(lin(&format!("{c}/ffn/linear_0"), 4 * STATE, STATE));
            vars.extend(lin(&format!("{c}/ffn/linear_1"), STATE, 4 * STATE));
            if side == "decoder" {
                vars.extend(ln(&format!("{c}/attention/layer_norm")));
                vars.extend(lin(&format!("{c}/attention/linear_0"), STATE, STATE));
                vars.extend(lin(&format!("{c}/attention/linear_1"), 2 * STATE, STATE));
                vars.extend(lin(&format!("{c}/attention/linear_2"), STATE, STATE));
            }
            vars.extend(ln(&format!("{side}/layer_norm")));
        }
        vars.retain(|(n, _)| Some(n.as_str()) != skip);
        let mut out = Vec::new();
        out.extend_from_slice(&6u32.to_le_bytes());
        string(&mut out, "WhisperSpec");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&((vars.len() + 2) as u32).to_le_bytes());
        for (name, dims) in &vars {
            string(&mut out, name);
            out.push(dims.len() as u8);
            for d in dims {
                out.extend_from_slice(&(*d as u32).to_le_bytes());
            }
            out.push(4);
            let n: usize = dims.iter().product();
            out.extend_from_slice(&((n * 2) as u32).to_le_bytes());
            for i in 0..n {
                out.extend_from_slice(&f16::from_f32(i as f32 / 8.0).to_le_bytes());
            }
        }
        for side in ["encoder", "decoder"] {
            string(&mut out, &format!("{side}/num_heads"));
            out.push(0);
            out.push(2);
            out.extend_from_slice(&2u32.to_le_bytes());
            out.extend_from_slice(&2i16.to_le_bytes());
        }
        out.extend_from_slice(&0u32.to_le_bytes());
        out
    }

    const TOKENIZER: &str = r#"{"model":{"vocab":{"!":0,"Ġa":1,"Ã©":2,"<|endoftext|>":3}},
        "added_tokens":[{"id":3,"content":"<|endoftext|>"}]}"#;

    fn i32_at(b: &[u8], at: usize) -> i32 {
        i32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn a_model_converts_to_the_ggml_layout() {
        let mut out = Vec::new();
        let tensors = ct2_to_ggml(&model(None), TOKENIZER.as_bytes(), &mut out).unwrap();
        // 2 conv × 2 + 2 positional + token embedding + 2 final norms × 2
        // + encoder block 15 + decoder block 24.
        assert_eq!(tensors, 4 + 2 + 1 + 4 + 15 + 24);
        assert_eq!(
            u32::from_le_bytes(out[0..4].try_into().unwrap()),
            GGML_MAGIC
        );
        let hparams: Vec<i32> = (0..11).map(|i| i32_at(&out, 4 + 4 * i)).collect();
        assert_eq!(hparams, vec![7, 6, 4, 2, 1, 5, 4, 2, 1, 80, 1]);
        let mut at = 48;
        assert_eq!((i32_at(&out, at), i32_at(&out, at + 4)), (80, 201));
        at += 8 + 80 * 201 * 4;
        // Byte-level tokens become raw bytes: "Ġa" is " a", "Ã©" is the UTF-8 of "é".
        assert_eq!(i32_at(&out, at), 3);
        at += 4;
        let mut tokens = Vec::new();
        for _ in 0..3 {
            let len = i32_at(&out, at) as usize;
            tokens.push(out[at + 4..at + 4 + len].to_vec());
            at += 4 + len;
        }
        assert_eq!(
            tokens,
            vec![b"!".to_vec(), b" a".to_vec(), "é".as_bytes().to_vec()]
        );
        // First tensor: the encoder's positional embedding, f32, dims reversed.
        assert_eq!((i32_at(&out, at), i32_at(&out, at + 8)), (2, 0));
        assert_eq!(
            (i32_at(&out, at + 12), i32_at(&out, at + 16)),
            (STATE as i32, 6)
        );
        let name_len = i32_at(&out, at + 4) as usize;
        assert_eq!(
            &out[at + 20..at + 20 + name_len],
            b"encoder.positional_embedding"
        );
        let first = at + 20 + name_len;
        assert_eq!(
            f32::from_le_bytes(out[first + 4..first + 8].try_into().unwrap()),
            0.125
        );
    }

    #[test]
    fn fused_projections_are_split() {
        let mut out = Vec::new();
        ct2_to_ggml(&model(None), TOKENIZER.as_bytes(), &mut out).unwrap();
        let find = |name: &str| {
            let pos = out
                .windows(name.len())
                .position(|w| w == name.as_bytes())
                .unwrap();
            pos + name.len()
        };
        // The key projection is rows STATE..2*STATE of the fused weight: its first value is
        // element STATE*STATE of the ramp the test model stores.
        let key = find("encoder.blocks.0.attn.key.weight");
        let v = f16::from_le_bytes([out[key], out[key + 1]]).to_f32();
        assert_eq!(v, (STATE * STATE) as f32 / 8.0);
        let value_bias = find("decoder.blocks.0.cross_attn.value.bias");
        let v = f32::from_le_bytes(out[value_bias..value_bias + 4].try_into().unwrap());
        assert_eq!(v, STATE as f32 / 8.0);
        assert!(
            out.windows(b"attn.key.bias".len())
                .all(|w| w != b"attn.key.bias")
        );
    }

    #[test]
    fn broken_inputs_are_refused_with_the_reason() {
        let err = ct2_to_ggml(
            &model(Some("decoder/layer_norm/beta")),
            TOKENIZER.as_bytes(),
            Vec::new(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("decoder/layer_norm/beta missing"),
            "{err}"
        );
        let full = model(None);
        let err =
            ct2_to_ggml(&full[..full.len() / 2], TOKENIZER.as_bytes(), Vec::new()).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        let err = ct2_to_ggml(&full, br#"{"model":{}}"#, Vec::new()).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
        let mut other = full.clone();
        other[6..17].copy_from_slice(b"OtherSpec!!");
        let err = ct2_to_ggml(&other, TOKENIZER.as_bytes(), Vec::new()).unwrap_err();
        assert!(
            err.to_string().contains("expected a Whisper model"),
            "{err}"
        );
    }

    #[test]
    fn mel_filters_are_normalised_triangles() {
        let f = mel_filters(16_000.0, 400, 80);
        assert_eq!(f.len(), 80 * 201);
        for m in 0..80 {
            let row = &f[m * 201..(m + 1) * 201];
            assert!(row.iter().all(|&w| w >= 0.0));
            let peak = row.iter().cloned().fold(0.0f32, f32::max);
            assert!(peak > 0.0, "filter {m} is empty");
            // Slaney normalisation: area (in Hz) of each triangle ≈ 1.
            let area: f32 = row.iter().sum::<f32>() * 40.0;
            assert!((0.5..1.5).contains(&area), "filter {m} area {area}");
        }
        // Filters rise in frequency.
        let argmax = |m: usize| {
            let row = &f[m * 201..(m + 1) * 201];
            (0..201).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap()
        };
        assert!(argmax(10) < argmax(40) && argmax(40) < argmax(79));
    }
}
