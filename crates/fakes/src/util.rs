//! Small helpers: ids, time formatting, token estimates, query parsing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A random UUID (v4) in its hyphenated form, as Deepgram uses for request ids.
pub(crate) fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A random id with a provider prefix and no hyphens, e.g. `msg_0f1e…`, `chatcmpl-…`.
pub(crate) fn prefixed_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Current UTC time as RFC 3339 with milliseconds, e.g. `2025-01-31T12:00:00.123Z`.
pub(crate) fn rfc3339_now() -> String {
    rfc3339(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

fn rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs() as i64;
    let millis = since_epoch.subsec_millis();
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Token estimate used for prompt usage: `ceil(chars / 4)`.
pub(crate) fn estimate_tokens(chars: usize) -> u64 {
    chars.div_ceil(4) as u64
}

/// Parses a query string into decoded `(key, value)` pairs (`+` is a space, `%XX` escapes).
pub(crate) fn parse_query(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// FNV-1a over `data`, continuing from `hash`.
pub(crate) fn fnv1a(mut hash: u64, data: &[u8]) -> u64 {
    for &b in data {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// FNV-1a offset basis.
pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// RMS level of s16le samples in dBFS (`-inf` for digital silence).
pub(crate) fn rms_dbfs(pcm: &[u8]) -> f32 {
    let n = pcm.len() / 2;
    if n == 0 {
        return f32::NEG_INFINITY;
    }
    let sum: i64 = pcm
        .chunks_exact(2)
        .map(|b| {
            let s = i64::from(i16::from_le_bytes([b[0], b[1]]));
            s * s
        })
        .sum();
    let rms = (sum as f64 / n as f64).sqrt() / 32768.0;
    (20.0 * rms.log10()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        // 2024-02-29T23:59:59.5Z (leap day)
        assert_eq!(
            rfc3339(Duration::from_millis(1_709_251_199_500)),
            "2024-02-29T23:59:59.500Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn query_parsing_decodes() {
        assert_eq!(
            parse_query("a=1&b=x%20y+z&flag&c=%zz"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y z".into()),
                ("flag".into(), "".into()),
                ("c".into(), "%zz".into()),
            ]
        );
        assert_eq!(parse_query("x=%4"), vec![("x".into(), "%4".into())]);
    }

    #[test]
    fn token_estimate_rounds_up() {
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(1), 1);
        assert_eq!(estimate_tokens(4), 1);
        assert_eq!(estimate_tokens(5), 2);
    }

    #[test]
    fn dbfs_of_full_scale_square_is_zero() {
        let pcm: Vec<u8> = (0..160)
            .flat_map(|i| if i % 2 == 0 { i16::MAX } else { -i16::MAX }.to_le_bytes())
            .collect();
        assert!(rms_dbfs(&pcm).abs() < 0.01);
        assert_eq!(rms_dbfs(&[0; 320]), f32::NEG_INFINITY);
    }
}
