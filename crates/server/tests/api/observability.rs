//! Health, readiness, metrics: present, and with bounded labels only.

use std::time::Duration;

use atlas_client::{ConnectOptions, TokenCarrier, connect};
use atlas_protocol::ClientMessage;

use crate::helpers::*;

#[tokio::test]
async fn metrics_count_sessions_audio_and_refusals_without_identities() {
    let app = spawn_app().await;
    let (mut conn, session_id) = app.start("metrics-user-42", 24_000).await;
    ask(&conn);
    collect_until(&mut conn, Duration::from_secs(20), is_done(1)).await;
    end_session(&mut conn).await;
    // A refusal, with the token in the query string.
    let mut o = ConnectOptions::new(app.url(), "not-a-valid-token");
    o.carrier = TokenCarrier::Query;
    assert!(connect(&o).await.is_err());

    let body = app.get_text("/metrics").await;
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

/// A writer that keeps everything logged in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// A current-thread runtime: the thread-local subscriber below sees every task.
#[tokio::test(flavor = "current_thread")]
async fn tokens_never_reach_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .json()
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let app = spawn_app().await;
    let good = app.token("log-user");
    let mut o = ConnectOptions::new(app.url(), good.clone());
    o.carrier = TokenCarrier::Query;
    let mut conn = connect(&o).await.unwrap();
    conn.sender
        .send(&start_message(16_000, 24_000))
        .await
        .unwrap();
    let refresh = app.token("log-user");
    conn.sender
        .send(&ClientMessage::AuthRefresh {
            token: refresh.clone(),
        })
        .await
        .unwrap();
    end_session(&mut conn).await;
    let mut bad = ConnectOptions::new(
        app.url(),
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2VjcmV0LXNpZ25hdHVyZQ",
    );
    bad.carrier = TokenCarrier::Query;
    assert!(connect(&bad).await.is_err());
    app.shutdown.cancel();
    let _ = app.server.await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("session started"),
        "the capture works: {logs}"
    );
    assert!(logs.contains("connection refused"));
    for secret in [
        good.as_str(),
        refresh.as_str(),
        "c2VjcmV0LXNpZ25hdHVyZQ",
        SECRET,
        "fake-key",
    ] {
        let signature = secret.rsplit('.').next().unwrap();
        assert!(!logs.contains(signature), "a secret leaked into the logs");
    }
}

#[tokio::test]
async fn the_page_is_served_and_dev_tokens_exist_only_in_dev_mode() {
    let prod = spawn_app().await;
    let page = prod.get("/").await;
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("/app.js"));
    // The page and every module of the SDK it runs on, served byte for byte as they are in
    // the repository.
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = vec![(
        "/app.js".to_owned(),
        repo.join("crates/server/static/app.js"),
    )];
    for entry in std::fs::read_dir(repo.join("clients/web/src")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        files.push((format!("/sdk/{name}"), path));
    }
    assert!(files.len() > 5, "{files:?}");
    for (url, file) in files {
        let r = prod.get(&url).await;
        assert_eq!(r.status(), 200, "{url} is served");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/javascript")
        );
        assert_eq!(
            r.text().await.unwrap(),
            std::fs::read_to_string(&file).unwrap(),
            "{url} is {}",
            file.display()
        );
    }
    for missing in ["/sdk/nope.js", "/sdk/..%2Fapp.js", "/worklet.js"] {
        let r = prod.get(missing).await;
        assert_eq!(r.status(), 404, "{missing}");
    }
    let refused = prod.post_dev_token(None).await;
    assert_eq!(refused.status(), 404, "no development tokens in production");

    let dev = spawn_app_with(fast_fakes(), |c| {
        c.dev = true;
        c.dev_token_ttl_s = 120;
    })
    .await;
    let body: serde_json::Value = dev.post_dev_token(None).await.json().await.unwrap();
    let token = body["token"].as_str().unwrap();
    assert_eq!(body["expires_in"], 120);
    // The token it hands out opens a session.
    assert!(
        atlas_client::connect(&ConnectOptions::new(dev.url(), token))
            .await
            .is_ok()
    );
    // A fresh token for the same user (the page's token refresh).
    let user = body["user_id"].as_str().unwrap();
    let again: serde_json::Value = dev
        .post_dev_token(Some(&serde_json::json!({ "user_id": user })))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["user_id"], user);
    use base64::Engine as _;
    let payload = again["token"].as_str().unwrap().split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], user);
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        120
    );
    for bad in [
        serde_json::json!({ "user_id": "admin" }),
        serde_json::json!({ "user_id": "x".repeat(10_000) }),
        serde_json::json!({ "user": "a" }),
    ] {
        let r = dev.post_dev_token(Some(&bad)).await;
        assert_eq!(r.status(), 400, "{bad}");
    }
}

/// Every `atlas_…` metric a PromQL expression of the dashboard queries (with a histogram's
/// `_bucket`, `_sum` or `_count` suffix, as `/metrics` names its series).
fn dashboard_metrics(dashboard: &serde_json::Value) -> std::collections::BTreeSet<String> {
    fn walk(v: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(q)) => {
                            let mut rest = q.as_str();
                            while let Some(at) = rest.find("atlas_") {
                                let name: String = rest[at..]
                                    .chars()
                                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                                    .collect();
                                rest = &rest[at + name.len()..];
                                out.insert(name);
                            }
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(dashboard, &mut out);
    out
}

/// `deploy/grafana/atlas-voice.json` queries only metrics the server exports: after a spoken
/// turn, a model that fails mid-stream and a refused connection, each of them has a series
/// in `/metrics`.
#[tokio::test]
async fn the_grafana_dashboard_queries_only_exported_metrics() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/grafana/atlas-voice.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(dashboard["uid"], "atlas-voice");
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 8, "{} panels", panels.len());
    for p in panels {
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "{}",
            p["title"]
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
    }
    let queried = dashboard_metrics(&dashboard);
    for needed in [
        "atlas_sessions_active",
        "atlas_turns_total",
        "atlas_stage_latency_seconds_bucket",
        "atlas_provider_errors_total",
        "atlas_spend_microdollars_total",
    ] {
        assert!(queried.contains(needed), "the dashboard shows {needed}");
    }

    let app = spawn_app().await;
    app.fakes.inject(
        atlas_fakes::Target::Anthropic,
        atlas_fakes::Fault::MidStreamError,
    );
    let (mut conn, _) = app.start("dashboard", 24_000).await;
    for turn in 1..=2 {
        ask(&conn);
        collect_until(&mut conn, Duration::from_secs(20), is_done(turn)).await;
    }
    end_session(&mut conn).await;
    let mut o = ConnectOptions::new(app.url(), "not-a-valid-token");
    o.carrier = TokenCarrier::Query;
    assert!(connect(&o).await.is_err());

    // The record writer reports on the database once the session's final record is written.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body = app.get_text("/metrics").await;
        let exported: std::collections::BTreeSet<&str> = body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let missing: Vec<&String> = queried
            .iter()
            .filter(|name| !exported.contains(name.as_str()))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dashboard queries {missing:?}, which /metrics does not export:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
