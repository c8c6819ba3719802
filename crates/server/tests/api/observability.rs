//! Health, readiness, metrics: present, and with bounded labels only.

use std::time::Duration;

use atlas_client::{ConnectOptions, Incoming, TokenCarrier, connect};
use atlas_protocol::ClientMessage;

use crate::helpers::*;

#[tokio::test]
async fn metrics_count_sessions_audio_and_refusals_without_identities() {
    let app = spawn_app().await;
    let (mut conn, session_id) = app.start("metrics-user-42", 24_000).await;
    let question = with_silence(speech("question_16k.wav"), 1.0);
    stream(&conn, question, 4.0);
    collect_until(&mut conn, Duration::from_secs(20), is_done(1)).await;
    conn.sender.send(&ClientMessage::SessionEnd).await.unwrap();
    collect_until(&mut conn, Duration::from_secs(5), |i| {
        matches!(i, Incoming::Closed { .. })
    })
    .await;
    // A refusal, with the token in the query string.
    let mut o = ConnectOptions::new(app.url(), "not-a-valid-token");
    o.carrier = TokenCarrier::Query;
    assert!(connect(&o).await.is_err());

    let body = reqwest::get(format!("http://{}/metrics", app.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "atlas_audio_frames_in_total",
        "atlas_audio_bytes_out_total",
        "atlas_sessions_ended_total{reason=\"client_ended\"}",
        "atlas_connections_refused_total{reason=\"invalid\"}",
        "atlas_stage_latency_seconds_bucket{stage=\"first_audio\"",
        "atlas_turns_total{outcome=\"completed\"}",
        "atlas_sessions_active",
    ] {
        assert!(body.contains(needle), "missing {needle} in\n{body}");
    }
    assert!(!body.contains("metrics-user-42"));
    assert!(!body.contains(&session_id));
    assert!(!body.contains("not-a-valid-token"));
}
