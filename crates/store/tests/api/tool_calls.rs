//! Tool-call records (`voice_tool_calls`) and the tool time of turns (`voice_turns.tools_ms`)
//! on real SQLite and PostgreSQL: round trip, the snapshot-sequence rule, the checks that
//! mirror the server's bounds, row-level security, and the migration from the schema before
//! them with data in place.

use atlas_store::migrate::{self, State};
use atlas_store::{Backend, Snapshot, schema};
use uuid::Uuid;

use crate::helpers::*;

const A: &str = "11111111-1111-4111-8111-111111111111";
const B: &str = "22222222-2222-4222-8222-222222222222";

/// The version of the migration that adds the tool-call records.
const TOOL_CALLS_VERSION: &str = "20261202000000";

/// A two-turn session whose first turn called three tools, one of each shape: a server tool
/// kept with its content, a client tool that timed out, an unknown tool refused before
/// running (no kind) whose name is 64 multibyte characters.
fn session_with_calls(user: &str, seq: u64) -> Snapshot {
    let mut snap = snapshot(Uuid::new_v4(), user, seq, 2);
    snap.turns[0].tools_ms = Some(1_340);
    let mut kept = call(&snap, 1, "toolu_01A09q90qw90lq917835lq9", "ok");
    kept.arguments = Some(r#"{"order_id":"A-17"}"#.into());
    kept.result = Some(r#"{"status":"shipped","eta":"Friday"}"#.into());
    let mut client = call(&snap, 1, "call_abc123", "timed_out");
    client.kind = Some("client".into());
    client.name = "open_settings".into();
    client.arguments_bytes = 2;
    client.duration_ms = 1_000;
    let mut unknown = call(&snap, 1, "call_def456", "invalid");
    unknown.kind = None;
    unknown.name = "é".repeat(64);
    unknown.duration_ms = 0;
    unknown.arguments_bytes = 0;
    snap.tool_calls = vec![kept, client, unknown];
    snap
}

async fn tool_calls_round_trip(db: Db) {
    let store = db.store().await;
    let mine = session_with_calls(A, 1);
    let theirs = session_with_calls(B, 1);
    store
        .write_batch(&[mine.clone(), theirs.clone()])
        .await
        .unwrap();
    let expected = sorted([mine.tool_calls.clone(), theirs.tool_calls.clone()].concat());
    assert_eq!(db.tool_calls().await, expected);
    let turns = db.turn_tools_ms().await;
    let id = mine.session.id.to_string();
    assert!(turns.contains(&(id.clone(), 1, Some(1_340))), "{turns:?}");
    assert!(turns.contains(&(id, 2, None)), "{turns:?}");
    // Writing the same snapshot again changes nothing and adds nothing.
    store.write(&mine).await.unwrap();
    assert_eq!(db.tool_calls().await, expected);
    // Deleting a user's sessions deletes their tool calls with them.
    db.sql(&format!("delete from voice_sessions where user_id = '{A}'"))
        .await;
    assert_eq!(db.tool_calls().await, sorted(theirs.tool_calls.clone()));
    store.close().await;
}

on_both_backends!(tool_calls_round_trip);

/// A tool call is replaced only by a newer snapshot of its session, like the session row and
/// the turns: a stale snapshot (an older checkpoint replayed from the spool, or a stale owner's)
/// neither changes a call nor adds one.
async fn a_stale_snapshot_never_replaces_a_newer_call(db: Db) {
    let store = db.store().await;
    let mut newer = snapshot(Uuid::new_v4(), A, 5, 1);
    newer.turns[0].tools_ms = Some(300);
    newer.tool_calls = vec![call(&newer, 1, "call_1", "ok")];
    store.write(&newer).await.unwrap();
    let stored = db.tool_calls().await;
    assert_eq!(stored, newer.tool_calls);

    // An older snapshot in which the call was still running (then cancelled), and a call the
    // newer snapshot does not know.
    let mut stale = newer.clone();
    stale.seq = 4;
    stale.turns[0].tools_ms = Some(9);
    stale.tool_calls[0].outcome = "cancelled".into();
    stale.tool_calls[0].duration_ms = 9;
    stale
        .tool_calls
        .push(call(&stale, 1, "call_stale", "failed"));
    store.write(&stale).await.unwrap();
    // The same sequence again is not newer either.
    let mut same = stale.clone();
    same.seq = 5;
    store.write(&same).await.unwrap();
    assert_eq!(db.tool_calls().await, stored, "the newer call stands");
    assert_eq!(
        db.turn_tools_ms().await,
        vec![(newer.session.id.to_string(), 1, Some(300))]
    );

    // A newer snapshot replaces the call and adds its new one.
    let mut newest = stale.clone();
    newest.seq = 6;
    newest.tool_calls[0].outcome = "failed".into();
    newest.tool_calls[0].result = Some("HTTP 500".into());
    store.write(&newest).await.unwrap();
    assert_eq!(db.tool_calls().await, sorted(newest.tool_calls.clone()));

    // Of several snapshots of one session in a batch only the newest is written, whatever the
    // order.
    let mut later = newest.clone();
    later.seq = 8;
    later.tool_calls[1].outcome = "ok".into();
    let mut earlier = newest.clone();
    earlier.seq = 7;
    earlier.tool_calls[1].outcome = "timed_out".into();
    earlier.tool_calls.push(call(&earlier, 1, "call_7", "ok"));
    store.write_batch(&[later.clone(), earlier]).await.unwrap();
    assert_eq!(db.tool_calls().await, sorted(later.tool_calls.clone()));
    store.close().await;
}

on_both_backends!(a_stale_snapshot_never_replaces_a_newer_call);

/// A snapshot naming one call (or one turn) twice is written, not refused or retried forever:
/// the later entry stands, as a later snapshot would replace the earlier row. (PostgreSQL
/// refuses one upsert that touches a row twice, with an error that is no data error.)
async fn a_call_named_twice_keeps_the_later_entry(db: Db) {
    let store = db.store().await;
    let mut snap = snapshot(Uuid::new_v4(), A, 1, 2);
    let first = call(&snap, 1, "call_0", "timed_out");
    let other = call(&snap, 1, "call_1", "ok");
    let mut again = call(&snap, 2, "call_0", "ok");
    again.duration_ms = 7;
    snap.tool_calls = vec![first, other.clone(), again.clone()];
    let mut turn = snap.turns[1].clone();
    turn.tools_ms = Some(7);
    snap.turns.push(turn);
    store.write(&snap).await.unwrap();
    assert_eq!(db.tool_calls().await, sorted(vec![other, again]));
    assert_eq!(
        db.turn_tools_ms().await,
        vec![
            (snap.session.id.to_string(), 1, None),
            (snap.session.id.to_string(), 2, Some(7))
        ]
    );
    store.close().await;
}

on_both_backends!(a_call_named_twice_keeps_the_later_entry);

/// The table's checks mirror the server's bounds: a row outside them is refused for good (the
/// recorder quarantines such a record rather than retrying it), a row at the edge is kept.
async fn checks_mirror_the_bounds(db: Db) {
    let store = db.store().await;
    type Edit = fn(&mut atlas_store::ToolCallRecord);
    let refused: [(&str, Edit); 9] = [
        ("unknown outcome", |c| c.outcome = "exploded".into()),
        ("unknown kind", |c| c.kind = Some("builtin".into())),
        ("negative duration", |c| c.duration_ms = -1),
        ("negative argument size", |c| c.arguments_bytes = -1),
        ("negative turn", |c| c.turn_index = -1),
        ("empty call id", |c| c.call_id = String::new()),
        ("call id over 128 bytes", |c| c.call_id = "é".repeat(65)),
        ("name over 64 characters", |c| c.name = "n".repeat(65)),
        ("a session that does not exist", |c| {
            c.session_id = Uuid::new_v4()
        }),
    ];
    for (what, edit) in refused {
        let mut snap = snapshot(Uuid::new_v4(), A, 1, 1);
        let mut c = call(&snap, 1, "call_1", "ok");
        edit(&mut c);
        snap.tool_calls.push(c);
        let err = store.write(&snap).await.expect_err(what);
        assert!(err.is_permanent(), "{what}: {err:?}");
        assert_eq!(
            db.count(&format!(
                "select count(*) from voice_sessions where cast(id as text) = '{}'",
                snap.session.id
            ))
            .await,
            0,
            "{what}: nothing of the record is written"
        );
    }
    let mut turn = snapshot(Uuid::new_v4(), A, 1, 1);
    turn.turns[0].tools_ms = Some(-5);
    assert!(store.write(&turn).await.unwrap_err().is_permanent());

    // At the edges: 128 bytes of call id, 64 two-byte characters of name, every outcome and
    // kind, nothing negative.
    let mut edge = snapshot(Uuid::new_v4(), A, 1, 1);
    let outcomes = [
        "ok",
        "failed",
        "timed_out",
        "invalid",
        "over_limit",
        "cancelled",
    ];
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let mut c = call(&edge, 1, &format!("{i}{}", "x".repeat(127)), outcome);
        c.name = "é".repeat(64);
        c.kind = [Some("server"), Some("client"), None][i % 3].map(str::to_owned);
        c.duration_ms = 0;
        c.arguments_bytes = 0;
        edge.tool_calls.push(c);
    }
    edge.turns[0].tools_ms = Some(0);
    store.write(&edge).await.unwrap();
    assert_eq!(db.tool_calls().await, sorted(edge.tool_calls.clone()));
    store.close().await;
}

on_both_backends!(checks_mirror_the_bounds);

/// Runs `sql` (a count) as `role` with the claims of `sub`, in a transaction of its own; None
/// when refused.
async fn as_user(pool: &sqlx::PgPool, role: &str, sub: &str, sql: &str) -> Option<i64> {
    let mut tx = pool.begin().await.unwrap();
    let claims = format!(r#"{{"sub":"{sub}","role":"{role}"}}"#);
    sqlx::query(&format!("set local role {role}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("select set_config('request.jwt.claims', $1, true)")
        .bind(claims)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(&mut *tx)
        .await
        .ok()
}

#[tokio::test]
async fn postgres_row_level_security_isolates_tool_calls() {
    let db = Db::postgres().await;
    let store = db.store().await;
    for user in [A, A, B] {
        store.write(&session_with_calls(user, 1)).await.unwrap();
    }
    let pool = sqlx::PgPool::connect(&db.url()).await.unwrap();
    const COUNT: &str = "select count(*) from voice_tool_calls";
    const OTHERS: &str = "select count(*) from voice_tool_calls where user_id <> \
                          (select auth.uid())::text";
    assert_eq!(
        as_user(&pool, "authenticated", A, COUNT).await,
        Some(6),
        "A: own"
    );
    assert_eq!(
        as_user(&pool, "authenticated", B, COUNT).await,
        Some(3),
        "B: own"
    );
    assert_eq!(as_user(&pool, "authenticated", B, OTHERS).await, Some(0));
    assert_eq!(
        as_user(&pool, "anon", A, COUNT).await,
        None,
        "anon reads nothing"
    );
    assert_eq!(as_user(&pool, "service_role", A, COUNT).await, Some(9));
    // Users cannot write: not their own rows, not others'.
    for sql in [
        "with u as (update voice_tool_calls set outcome = 'ok' returning 1) select count(*) from u",
        "with d as (delete from voice_tool_calls returning 1) select count(*) from d",
        "with i as (insert into voice_tool_calls (session_id, turn_index, call_id, user_id, \
         name, arguments_bytes, duration_ms, outcome) select session_id, 9, 'forged', user_id, \
         'x', 0, 0, 'ok' from voice_tool_calls limit 1 returning 1) select count(*) from i",
    ] {
        assert_eq!(as_user(&pool, "authenticated", A, sql).await, None, "{sql}");
    }
    assert_eq!(db.count(COUNT).await, 9, "nothing was changed");
    pool.close().await;
    store.close().await;
}

/// A database at the schema before tool calls, holding sessions and turns, takes the new
/// migration: the old rows stay as they were (with no tool time), the new snapshot of an old
/// session writes its tool calls, and the result matches a database built from scratch.
async fn migrating_from_the_previous_schema_keeps_the_data(db: Db) {
    let all = migrate::embedded(db.backend());
    let (before, after): (Vec<_>, Vec<_>) = all
        .iter()
        .cloned()
        .partition(|m| m.version.as_str() < TOOL_CALLS_VERSION);
    let after: Vec<String> = after.into_iter().map(|m| m.version).collect();
    assert_eq!(after.first().map(String::as_str), Some(TOOL_CALLS_VERSION));
    let store = db.store_with(&before).await;
    let old = Uuid::new_v4();
    // Rows as the previous version wrote them (its column lists, no tools_ms).
    let (id, ts) = match db.backend() {
        Backend::Sqlite => (format!("'{old}'"), "'2026-11-27T08:00:00.000Z'"),
        Backend::Postgres => (format!("'{old}'::uuid"), "'2026-11-27T08:00:00Z'"),
    };
    db.sql(&format!(
        "insert into voice_sessions (id, user_id, started_at, ended_at, turns, record_seq, updated_at) \
         values ({id}, '{A}', {ts}, null, 2, 3, {ts});\
         insert into voice_turns (session_id, turn_index, user_id, user_text, assistant_text, interrupted, created_at) \
         values ({id}, 1, '{A}', 'q1', 'a1', false, {ts}), ({id}, 2, '{A}', 'q2', 'a2', true, {ts});"
    ))
    .await;

    let applied = migrate::up(&store, &all, false).await.unwrap();
    assert_eq!(applied, after);
    let states = migrate::status(&store, &all).await.unwrap();
    assert!(
        states.iter().all(|s| s.state == State::Applied),
        "{states:?}"
    );
    assert_eq!(
        db.turn_tools_ms().await,
        vec![(old.to_string(), 1, None), (old.to_string(), 2, None)]
    );
    assert_eq!(
        db.count(
            "select count(*) from voice_turns where user_text in ('q1', 'q2') and interrupted = (turn_index = 2)"
        )
        .await,
        2
    );
    // The session's next snapshot (newer than the stored sequence 3) records its tool calls.
    let mut next = snapshot(old, A, 4, 3);
    next.turns[2].tools_ms = Some(42);
    next.tool_calls = vec![call(&next, 3, "call_after_upgrade", "ok")];
    store.write(&next).await.unwrap();
    assert_eq!(db.tool_calls().await, next.tool_calls);
    // No drift from a database built from the migrations alone.
    let live = schema::introspect(&store).await.unwrap();
    let expected = schema::expected(&db.url(), &all).await.unwrap();
    assert_eq!(schema::diff(&expected, &live), Vec::<String>::new());
    assert!(live.columns["voice_tool_calls"].contains_key("outcome"));
    assert!(live.columns["voice_turns"].contains_key("tools_ms"));
    assert!(
        live.indexes
            .contains("voice_tool_calls.voice_tool_calls_user_created_idx")
    );
    if db.backend() == Backend::Postgres {
        assert!(
            live.policies
                .contains("voice_tool_calls: voice_tool_calls: owners read"),
            "{:?}",
            live.policies
        );
    }
    // Applying again does nothing.
    assert!(migrate::up(&store, &all, false).await.unwrap().is_empty());
    store.close().await;
}

on_both_backends!(migrating_from_the_previous_schema_keeps_the_data);

/// The Postgres migration is idempotent as the lint requires: run again by hand (as
/// `supabase db push` might after a partial apply), it changes nothing and fails nothing.
#[tokio::test]
async fn postgres_the_migration_runs_twice() {
    let db = Db::postgres().await;
    let store = db.store().await;
    store.write(&session_with_calls(A, 1)).await.unwrap();
    let m = migrate::embedded(Backend::Postgres)
        .into_iter()
        .find(|m| m.version == TOOL_CALLS_VERSION)
        .unwrap();
    db.sql(&m.sql).await;
    assert_eq!(db.count("select count(*) from voice_tool_calls").await, 3);
    store.close().await;
}
