//! WAV input and output (16-bit PCM, mono; other layouts are mixed down or refused clearly).

use std::path::Path;

/// Reads a WAV file as 16-bit mono samples and its sample rate.
pub fn read(path: &Path) -> anyhow::Result<(Vec<i16>, u32)> {
    use anyhow::Context;
    let mut reader = hound::WavReader::open(path)
        .with_context(|| format!("cannot open {} as a WAV file", path.display()))?;
    let spec = reader.spec();
    if spec.sample_format != hound::SampleFormat::Int || spec.bits_per_sample != 16 {
        anyhow::bail!(
            "{} is {}-bit {:?}; convert it to 16-bit PCM (e.g. sox in.wav -b 16 out.wav)",
            path.display(),
            spec.bits_per_sample,
            spec.sample_format
        );
    }
    let channels = spec.channels.max(1) as usize;
    let all: Vec<i16> = reader
        .samples::<i16>()
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot read samples of {}", path.display()))?;
    let mono = if channels == 1 {
        all
    } else {
        all.chunks(channels)
            .map(|f| (f.iter().map(|&s| i32::from(s)).sum::<i32>() / channels as i32) as i16)
            .collect()
    };
    Ok((mono, spec.sample_rate))
}

/// Writes 16-bit mono samples at `rate` as a WAV file.
pub fn write(path: &Path, samples: &[i16], rate: u32) -> anyhow::Result<()> {
    use anyhow::Context;
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec)
        .with_context(|| format!("cannot create {}", path.display()))?;
    for &s in samples {
        w.write_sample(s)?;
    }
    w.finalize()?;
    Ok(())
}
