//! `atlas-voice loadtest` end to end: the fakes, a server and the simulated clients in one
//! process on loopback, and the failure path against an address where nothing listens.

use std::path::Path;
use std::process::Command;

fn question() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/audio/question_16k.wav")
        .display()
        .to_string()
}

#[test]
fn a_spawned_run_measures_latency_frames_and_playback() {
    let out = Command::new(env!("CARGO_BIN_EXE_atlas-voice"))
        .args([
            "loadtest",
            "--spawn",
            "--sessions",
            "3",
            "--chunk-ms",
            "20",
            "--ramp-ms",
            "100",
            "--json",
            "--input",
            &question(),
        ])
        .env("RUST_LOG", "warn")
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON summary");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["replies"], 3, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    // The 3.9 s question plus 2 s of silence in 20 ms frames, for each of the three clients.
    let (samples, rate) = atlas_client::wav::read(Path::new(&question())).unwrap();
    let frames = (samples.len() + 2 * rate as usize).div_ceil(rate as usize / 50);
    assert_eq!(v["frames_sent"], 3 * frames as u64, "{v}");
    // The server heard every frame and the metric was readable.
    assert_eq!(v["server_dropped_frames"], 0.0, "{v}");
    // Nothing answers before the fakes' fixed latencies have passed.
    let p50 = v["voice_to_voice_ms"]["p50"].as_f64().unwrap();
    assert!(p50 >= v["fakes_floor_ms"].as_f64().unwrap(), "{v}");
    assert!(v["reply_frames"].as_u64().unwrap() >= 3, "{v}");
    assert!(v["reply_underruns"].as_u64().is_some(), "{v}");
    assert!(v["loadgen_cpu_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["server_peak_rss_kib"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn a_run_against_nothing_fails_and_says_why() {
    // Bind and drop a listener to get a loopback port where nothing listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(env!("CARGO_BIN_EXE_atlas-voice"))
        .args([
            "loadtest",
            "--url",
            &format!("ws://127.0.0.1:{port}/v1/voice"),
            "--token",
            "not-a-token",
            "--sessions",
            "2",
            "--input",
            &question(),
        ])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("0 replies, 2 errors"), "{stdout}");
    assert!(stdout.contains("error:"), "{stdout}");
    assert!(stderr.contains("no session got a reply"), "{stderr}");
    // Without /metrics the dropped-frame count is reported as unknown, not as zero.
    assert!(stdout.contains("unknown (no /metrics)"), "{stdout}");
}

/// Runs the accounting check (`loadtest --spawn --mix`) and returns its JSON summary; with
/// `preemptive`, the server starts replies on stable words (the fake recogniser sends them
/// 60 ms into the silence).
fn accounting_check(
    sessions: usize,
    database_url: Option<&str>,
    preemptive: bool,
) -> serde_json::Value {
    let sessions = sessions.to_string();
    let mut args = vec![
        "loadtest",
        "--spawn",
        "--mix",
        "--sessions",
        &sessions,
        "--ramp-ms",
        "25",
        "--json",
    ];
    if let Some(url) = database_url {
        args.extend(["--database-url", url]);
    }
    let input = question();
    args.extend(["--input", &input]);
    if preemptive {
        args.extend(["--stt-stable-ms", "60"]);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_atlas-voice"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .env(
            "ATLAS_PREEMPTIVE_REPLIES",
            if preemptive { "2" } else { "0" },
        )
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "a JSON summary: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert!(
        out.status.success(),
        "{v}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    v
}

/// What every accounting check must show: each session took the early-ending paths, has its
/// final record, and the providers' bill and the records agree to the token.
fn assert_agrees(v: &serde_json::Value, sessions: u64) {
    assert_eq!(v["session_errors"], 0, "{v}");
    assert_eq!(v["disagreements"], serde_json::json!([]), "{v}");
    assert_eq!(v["records"]["ended"], sessions, "{v}");
    // Replies were cut (barge-in, typed turns, endings), and model streams were left early.
    assert!(
        v["interrupted_replies"].as_u64().unwrap() >= sessions,
        "{v}"
    );
    assert!(
        v["fakes"]["llm_cut_requests"].as_u64().unwrap() >= sessions,
        "{v}"
    );
    // Four model requests per session at least: two spoken turns, two typed ones.
    assert!(
        v["fakes"]["llm_requests"].as_u64().unwrap() >= 4 * sessions,
        "{v}"
    );
    let equal = |a: &str, b: &str| {
        assert_eq!(v["fakes"][a], v["records"][b], "{a} vs {b}: {v}");
    };
    equal("llm_input_tokens", "llm_input_tokens");
    equal("tts_chars", "tts_chars");
    // Output: all text that reached the server is billed; a cut stream's last event may have
    // been on its way (sent and billed by the provider, never read).
    let missed = v["fakes"]["llm_output_tokens"].as_i64().unwrap()
        - v["records"]["llm_output_tokens"].as_i64().unwrap();
    assert!(
        (0..=v["fakes"]["llm_cut_last_tokens"].as_i64().unwrap()).contains(&missed),
        "{v}"
    );
    let stt = v["fakes"]["stt_audio_seconds"].as_f64().unwrap();
    assert!(
        (stt - v["records"]["stt_seconds"].as_f64().unwrap()).abs() < 1e-3,
        "{v}"
    );
}

#[test]
fn the_accounting_check_agrees_to_the_token_on_sqlite() {
    let v = accounting_check(24, None, false);
    assert_agrees(&v, 24);
}

#[test]
fn the_accounting_check_agrees_to_the_token_with_preemptive_replies() {
    let v = accounting_check(24, None, true);
    assert_agrees(&v, 24);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_accounting_check_agrees_to_the_token_on_postgres() {
    let db = atlas_testkit::PgDb::new().await;
    let url = db.url();
    let v = tokio::task::spawn_blocking(move || accounting_check(24, Some(&url), false))
        .await
        .unwrap();
    assert_agrees(&v, 24);
}
