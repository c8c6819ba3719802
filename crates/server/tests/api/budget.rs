//! Cost metering and budgets against the fakes and the built-in price catalog.

use std::time::Duration;

use atlas_client::Incoming;
use atlas_protocol::{ErrorCode, ServerEvent, Usage};

use crate::helpers::*;

/// nova-3 $0.0048/min, claude-haiku-4-5 $1/$5 per MTok, tts-1 $15/MChar, in micro-dollars.
fn expected_micros(u: &Usage) -> u64 {
    let stt_ms = (u.stt_seconds * 1000.0) as u64;
    let stt = (stt_ms * 4_800 + 30_000) / 60_000;
    let llm =
        (u.llm_input_tokens * 1_000_000 + u.llm_output_tokens * 5_000_000 + 500_000) / 1_000_000;
    let tts = u.tts_chars * 15;
    stt + llm + tts
}

/// Asks the spoken question; returns what came until the reply's usage event.
async fn answered_with_usage(conn: &mut atlas_client::Connection) -> Vec<Incoming> {
    ask(conn);
    let mut items = collect_until(conn, Duration::from_secs(20), is_done(1)).await;
    items.extend(until_usage(conn).await);
    items
}

fn usages(items: &[Incoming]) -> Vec<Usage> {
    items
        .iter()
        .filter_map(|i| match event(i) {
            Some(ServerEvent::Usage(u)) => Some(u.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn usage_events_carry_the_catalog_cost_of_what_was_used() {
    let app = spawn_app().await;
    let (mut conn, _) = app.start("payer", 24_000).await;
    let items = answered_with_usage(&mut conn).await;
    let usage = usages(&items).pop().unwrap();
    assert!(usage.llm_input_tokens > 0 && usage.llm_output_tokens > 0 && usage.tts_chars > 0);
    let cost = usage.cost_usd.expect("every model is in the catalog");
    let micros = (cost * 1_000_000.0).round() as u64;
    // STT seconds in the event are rounded; allow a micro-dollar either way.
    assert!(
        micros.abs_diff(expected_micros(&usage)) <= 1,
        "{micros} vs {}",
        expected_micros(&usage)
    );
}

#[tokio::test]
async fn an_unpriced_model_with_a_budget_refuses_to_start_and_names_the_fix() {
    let fakes = atlas_fakes::Fakes::start(fast_fakes(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = atlas_server::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..atlas_server::Config::default()
    };
    config.use_provider_urls(
        fakes.deepgram_url(),
        fakes.anthropic_url(),
        fakes.openai_url(),
    );
    config.jwt_secret = Some(secrecy::SecretString::from(SECRET));
    config.database_url = format!("sqlite://{}/atlas.db", dir.path().display());
    config.spool_dir = dir.path().join("spool");
    config.tts_model = "gpt-4o-mini-tts-2099-01-01x".into();
    config.session_budget_usd = 0.0001;
    let err = atlas_server::Application::build(config.clone())
        .await
        .err()
        .expect("refuses to start")
        .to_string();
    assert!(
        err.contains("tts openai/gpt-4o-mini-tts-2099-01-01x"),
        "{err}"
    );
    assert!(err.contains("ATLAS_PRICE_CATALOG"), "{err}");
    assert!(err.contains("ATLAS_ALLOW_UNPRICED=true"), "{err}");
    // A daily budget alone is a budget too.
    config.session_budget_usd = 0.0;
    config.user_daily_budget_usd = Some(1.0);
    assert!(
        atlas_server::Application::build(config.clone())
            .await
            .is_err()
    );
    // Without any budget there is nothing to enforce: it starts.
    config.user_daily_budget_usd = None;
    assert!(
        atlas_server::Application::build(config.clone())
            .await
            .is_ok()
    );
    // Priced by a catalog override file: it starts with the budget.
    let catalog = dir.path().join("prices.toml");
    let text = atlas_server::catalog::BUILT_IN.replace(
        "[tts.openai]\n",
        "[tts.openai]\n\"gpt-4o-mini-tts-2099-01-01x\" = { per_mchar = 12.0 }\n",
    );
    std::fs::write(&catalog, text).unwrap();
    config.price_catalog = Some(catalog);
    config.session_budget_usd = 0.0001;
    assert!(atlas_server::Application::build(config).await.is_ok());
}

/// A server whose model has no price, allowed by the operator's opt-in.
async fn with_an_unpriced_model() -> TestApp {
    spawn_app_with(fast_fakes(), |c| {
        c.llm_model = "claude-unreleased".into();
        c.allow_unpriced = true;
    })
    .await
}

#[tokio::test]
async fn the_unpriced_opt_in_is_shown_in_readiness_and_metrics() {
    let app = with_an_unpriced_model().await;
    let body = app.get_json("/readyz").await;
    assert_eq!(body["unpriced_models_allowed"], true, "{body}");
    assert_eq!(
        body["unpriced_models"],
        serde_json::json!(["llm anthropic/claude-unreleased"])
    );
    let metrics = app.get_text("/metrics").await;
    assert!(
        metrics.contains("atlas_unpriced_models_allowed"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_unknown_model_makes_the_cost_unknown_not_zero() {
    let app = with_an_unpriced_model().await;
    let (mut conn, _) = app.start("payer", 24_000).await;
    let items = answered_with_usage(&mut conn).await;
    assert_eq!(usages(&items).pop().unwrap().cost_usd, None);
}

#[tokio::test]
async fn a_tiny_budget_warns_then_ends_the_session_before_overspending() {
    let app = spawn_app_with(fast_fakes(), |c| {
        c.session_budget_usd = 0.008;
        c.budget_warn_fraction = 0.25;
        c.llm_max_tokens = 100;
    })
    .await;
    let (mut conn, _) = app.start("thrifty", 24_000).await;
    ask(&conn);
    let items = collect_until(&mut conn, Duration::from_secs(20), is_done(1)).await;
    let warning = collect_until(&mut conn, Duration::from_secs(5), |i| {
        matches!(event(i), Some(ServerEvent::BudgetWarning { .. }))
    })
    .await;
    let Some(ServerEvent::BudgetWarning {
        spent_usd,
        budget_usd,
    }) = warning.last().and_then(event)
    else {
        unreachable!()
    };
    assert_eq!(*budget_usd, 0.008);
    assert!(*spent_usd >= 0.002 && *spent_usd < 0.008, "{spent_usd}");
    assert!(
        items
            .iter()
            .any(|i| matches!(event(i), Some(ServerEvent::ResponseStarted { turn_id: 1 })))
    );
    // The next reply would exceed the budget: the session ends before it starts.
    ask(&conn);
    let items = until_closed(&mut conn, Duration::from_secs(20)).await;
    assert!(
        !items
            .iter()
            .any(|i| matches!(event(i), Some(ServerEvent::ResponseStarted { turn_id: 2 }))),
        "{:#?}",
        summary(&items)
    );
    assert!(items.iter().any(|i| matches!(
        event(i),
        Some(ServerEvent::SessionEnding {
            reason: atlas_protocol::EndingReason::Budget,
            ..
        })
    )));
    assert!(items.iter().any(|i| matches!(
        event(i),
        Some(ServerEvent::Error {
            code: ErrorCode::BudgetExhausted,
            fatal: true,
            ..
        })
    )));
    assert!(closed_with(&items, 4402));
    let spent = usages(&items).pop().and_then(|u| u.cost_usd).unwrap();
    assert!(spent <= 0.008, "never spends past the budget: {spent}");
    assert_eq!(
        app.fakes.recorded().llm_requests.len(),
        1,
        "no LLM work was started for turn 2"
    );
}

#[tokio::test]
async fn the_daily_budget_holds_across_sessions() {
    // One reply is estimated at about $0.0066 (100 output tokens, 400 characters of speech);
    // $0.008 a day affords the first reply (about $0.007 with the audio) but not a second.
    let app = spawn_app_with(fast_fakes(), |c| {
        c.user_daily_budget_usd = Some(0.008);
        c.llm_max_tokens = 100;
    })
    .await;
    let (mut conn, _) = app.start("daily", 24_000).await;
    ask(&conn);
    collect_until(&mut conn, Duration::from_secs(20), is_done(1)).await;
    // The second question in the same session would exceed the day's budget.
    ask(&conn);
    let items = until_closed(&mut conn, Duration::from_secs(20)).await;
    assert!(closed_with(&items, 4402), "{:#?}", summary(&items));
    // A new session of the same user is refused before the upgrade; another user is not.
    match atlas_client::connect(&atlas_client::ConnectOptions::new(
        app.url(),
        app.token("daily"),
    ))
    .await
    {
        Err(atlas_client::ClientError::Refused {
            status: 429, code, ..
        }) => assert_eq!(code, "budget_exhausted"),
        other => panic!("expected a refusal: {other:?}"),
    }
    assert!(
        atlas_client::connect(&atlas_client::ConnectOptions::new(
            app.url(),
            app.token("other")
        ))
        .await
        .is_ok()
    );
}

#[tokio::test]
async fn a_chat_server_that_reports_no_usage_is_measured_instead() {
    let app = spawn_app_with(fast_fakes(), |c| {
        c.llm = atlas_server::config::LlmKind::Openai;
        c.llm_model = "gpt-4o-mini".into();
        c.openai_include_usage = false;
    })
    .await;
    let (mut conn, _) = app.start("payer", 24_000).await;
    let items = answered_with_usage(&mut conn).await;
    let recorded = app.fakes.recorded();
    assert_eq!(recorded.llm_requests[0].0, atlas_fakes::Target::OpenAiChat);
    assert!(recorded.llm_requests[0].1.get("stream_options").is_none());
    let usage = usages(&items).pop().unwrap();
    // The reply is about 118 characters: about 30 tokens.
    assert!(
        (20..=40).contains(&usage.llm_output_tokens),
        "{}",
        usage.llm_output_tokens
    );
    assert!(usage.llm_input_tokens > 10);
    assert!(usage.cost_usd.is_some());
}
