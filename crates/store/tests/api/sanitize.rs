//! Text the database cannot hold, on real SQLite and PostgreSQL: a NUL in any text of a record
//! (a client tool's error, a model's reply, a transcript, a client field) is stored as U+FFFD,
//! where PostgreSQL used to refuse the whole record (SQLSTATE 22021) and leave the session
//! without a final record. Written directly, in a batch, or replayed from a spool file written
//! before the store sanitized anything.

use std::time::Duration;

use atlas_store::Snapshot;
use atlas_store::spool::Spool;
use uuid::Uuid;

use crate::helpers::*;

const A: &str = "11111111-1111-4111-8111-111111111111";

/// A finished two-turn session with NULs in its client fields, its models, its transcripts
/// and the model's reply, and in its tool calls: a client tool's error, a server tool's
/// arguments and result, a tool name at the 64-character bound, a call id at the 128-byte
/// bound.
fn session_with_nuls(seq: u64) -> Snapshot {
    let mut snap = snapshot(Uuid::new_v4(), A, seq, 2);
    let s = &mut snap.session;
    s.conversation_id = Some("conv\0".into());
    s.end_reason = Some("client_ended\0".into());
    s.llm_model = Some("claude\0haiku".into());
    s.client_name = Some("web\0".into());
    s.client_version = Some("1.2\0beta".into());
    snap.turns[0].user_text = "where\0s my order".into();
    snap.turns[0].assistant_text = "\0It shipped on Friday.\0".into();
    snap.turns[1].user_text = "\0".into();
    snap.turns[0].tools_ms = Some(1_250);
    let mut client = call(&snap, 1, "call_\0abc", "failed");
    client.kind = Some("client".into());
    client.name = format!("open_settings{}\0", "_".repeat(50));
    client.result = Some("error: the device said \0\0 and hung up".into());
    let mut server = call(&snap, 1, "toolu_01", "ok");
    server.arguments = Some("{\"order_id\":\"A-17\0\"}".into());
    server.result = Some("{\"status\":\"shipped\"}\0".into());
    let edge = call(&snap, 1, &format!("{}\0", "x".repeat(127)), "timed_out");
    snap.tool_calls = vec![client, server, edge];
    snap
}

/// `snap` as it must be stored: every NUL replaced, checked by hand (not only by
/// [`Snapshot::sanitize`], which is what is under test).
fn stored(snap: &Snapshot) -> Snapshot {
    let mut clean = snap.clone();
    assert!(clean.sanitize());
    let s = &clean.session;
    assert_eq!(s.client_name.as_deref(), Some("web\u{FFFD}"));
    assert_eq!(s.client_version.as_deref(), Some("1.2\u{FFFD}beta"));
    assert_eq!(s.conversation_id.as_deref(), Some("conv\u{FFFD}"));
    assert_eq!(
        clean.turns[0].assistant_text,
        "\u{FFFD}It shipped on Friday.\u{FFFD}"
    );
    assert_eq!(clean.turns[1].user_text, "\u{FFFD}");
    let c = &clean.tool_calls;
    assert_eq!(c[0].call_id, "call_\u{FFFD}abc");
    assert_eq!(
        c[0].result.as_deref(),
        Some("error: the device said \u{FFFD}\u{FFFD} and hung up")
    );
    assert_eq!(c[0].name.chars().count(), 64);
    assert!(c[0].name.ends_with('\u{FFFD}'));
    assert_eq!(
        c[1].arguments.as_deref(),
        Some("{\"order_id\":\"A-17\u{FFFD}\"}")
    );
    assert_eq!(
        c[1].result.as_deref(),
        Some("{\"status\":\"shipped\"}\u{FFFD}")
    );
    // The replacement takes three bytes where the NUL took one: the id is cut to stay within
    // the schema's 128 bytes.
    assert_eq!(c[2].call_id, "x".repeat(127));
    assert!(!clean.needs_sanitizing());
    clean
}

/// Checks that the database holds `clean`'s session, turns and tool calls, text for text.
async fn assert_stored(db: &Db, clean: &Snapshot) {
    let id = clean.session.id;
    let s = &clean.session;
    assert_eq!(
        db.texts(&format!(
            "select user_id, conversation_id, end_reason, stt_model, llm_model, tts_model, \
             price_catalog_version, client_name, client_version from voice_sessions \
             where cast(id as text) = '{id}'"
        ))
        .await,
        vec![vec![
            Some(s.user_id.clone()),
            s.conversation_id.clone(),
            s.end_reason.clone(),
            s.stt_model.clone(),
            s.llm_model.clone(),
            s.tts_model.clone(),
            s.price_catalog_version.clone(),
            s.client_name.clone(),
            s.client_version.clone(),
        ]],
        "the session row, with the replacement character where the NUL was"
    );
    assert_eq!(
        db.texts(&format!(
            "select user_id, user_text, assistant_text from voice_turns \
             where cast(session_id as text) = '{id}' order by turn_index"
        ))
        .await,
        clean
            .turns
            .iter()
            .map(|t| vec![
                Some(t.user_id.clone()),
                Some(t.user_text.clone()),
                Some(t.assistant_text.clone()),
            ])
            .collect::<Vec<_>>()
    );
    let calls: Vec<_> = db
        .tool_calls()
        .await
        .into_iter()
        .filter(|c| c.session_id == id)
        .collect();
    assert_eq!(calls, sorted(clean.tool_calls.clone()));
}

/// A NUL in any text of a record, written alone or in a batch, is stored as U+FFFD. (On
/// PostgreSQL this failed before the store sanitized text: SQLSTATE 22021, the record
/// quarantined, the session left without a final record.)
async fn nul_is_stored_as_the_replacement_character(db: Db) {
    let store = db.store().await;
    let snap = session_with_nuls(1);
    store
        .write(&snap)
        .await
        .expect("a NUL in a record's text never makes the database refuse it");
    let clean = stored(&snap);
    assert_stored(&db, &clean).await;
    assert_eq!(
        db.count(&format!(
            "select count(*) from voice_tool_calls where cast(session_id as text) = '{}' \
             and result like '%the device said%' and kind = 'client' and outcome = 'failed'",
            snap.session.id
        ))
        .await,
        1,
        "the client tool's error is kept, and found by what it says"
    );
    // A newer snapshot of the session, in a batch with another session's clean one: both are
    // written, none is refused.
    let mut newer = session_with_nuls(2);
    newer.session.id = snap.session.id;
    for t in &mut newer.turns {
        t.session_id = snap.session.id;
    }
    for c in &mut newer.tool_calls {
        c.session_id = snap.session.id;
    }
    newer.turns[1].assistant_text = "Anything else?\0".into();
    let other = snapshot(Uuid::new_v4(), A, 1, 1);
    let outcome = store
        .write_batch(&[newer.clone(), other.clone()])
        .await
        .unwrap();
    assert!(outcome.rejected.is_empty(), "{:?}", outcome.rejected);
    let newer_clean = stored(&newer);
    assert_eq!(
        newer_clean.turns[1].assistant_text,
        "Anything else?\u{FFFD}"
    );
    assert_stored(&db, &newer_clean).await;
    assert_stored(&db, &other).await;
    assert_eq!(db.count("select count(*) from voice_sessions").await, 2);
    store.close().await;
}

on_both_backends!(nul_is_stored_as_the_replacement_character);

/// A record spooled with NULs (by a version before this boundary, or before the database
/// came back) replays with the others instead of being quarantined.
async fn a_spooled_record_with_nul_replays(db: Db) {
    let store = db.store().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::new(dir.path().join("spool"));
    let snap = session_with_nuls(7);
    let good = snapshot(Uuid::new_v4(), A, 7, 1);
    spool.put(&snap).await.unwrap();
    spool.put(&good).await.unwrap();
    let r = spool
        .replay(&store, Duration::from_secs(10), usize::MAX)
        .await;
    assert!(r.failed.is_none(), "{:?}", r.failed);
    assert_eq!((r.written, r.quarantined, r.remaining), (2, 0, 0));
    assert_eq!(spool.quarantined().await, 0);
    assert!(spool.is_empty().await);
    assert_stored(&db, &stored(&snap)).await;
    assert_stored(&db, &good).await;
    store.close().await;
}

on_both_backends!(a_spooled_record_with_nul_replays);
