//! Records that hold under pressure, on real PostgreSQL and SQLite: a record the database
//! refuses for good is quarantined while the others replay; snapshots written out of order
//! never replace a newer one; shutdown with a stalled database loses nothing; readiness
//! without a database round trip.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use atlas_server::recorder::Recorder;
use atlas_store::Snapshot;
use atlas_store::spool::Spool;
use atlas_testkit::PgDb;
use atlas_testkit::store::{self, TestDb as Db};

use crate::helpers::*;

/// A session of one user with `turns` turns at sequence `seq`: its final record when `ended`,
/// else a checkpoint of it still running.
fn snapshot(id: uuid::Uuid, seq: u64, ended: bool, turns: i32) -> Snapshot {
    let mut snap = store::snapshot(id, "0b3a1c52-8d6e-4f61-9a4f-2f5f7d1e9c01", seq, turns);
    let s = &mut snap.session;
    s.conversation_id = Some("conv".into());
    s.duration_ms = i64::from(turns) * 1000;
    s.stt_seconds = f64::from(turns);
    if !ended {
        s.ended_at = None;
        s.end_reason = None;
    }
    snap
}

/// A proxy in front of the local PostgreSQL, to stall or cut it.
async fn postgres_proxy() -> Proxy {
    Proxy::start(SocketAddr::from(([127, 0, 0, 1], 5432)))
        .await
        .unwrap()
}

async fn start_recorder(
    url: &str,
    spool: &Path,
) -> (Recorder, tokio::task::JoinHandle<()>, CancellationToken) {
    let stop = CancellationToken::new();
    let (r, task) = Recorder::start(url, spool, 100_000, true, stop.clone())
        .await
        .unwrap();
    (r, task, stop)
}

/// Polls `f` every 50 ms for up to `secs` seconds until it holds.
async fn until<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn files(dir: &Path, suffix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(suffix) && !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// 50 good records and one the database refuses for good sit in the spool; the replay writes
/// the 50 and quarantines the one, with its error.
async fn poison_is_quarantined_while_the_rest_replay(db: Db, poison: Snapshot, error_hint: &str) {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::new(dir.path().join("spool"));
    let mut ids = Vec::new();
    for i in 0..50 {
        let id = uuid::Uuid::new_v4();
        ids.push(id);
        spool.put(&snapshot(id, 10 + i, true, 2)).await.unwrap();
    }
    spool.put(&poison).await.unwrap();
    let (_recorder, task, stop) = start_recorder(&db.url(), spool.dir()).await;
    let replayed = until(20, || async { spool.is_empty().await }).await;
    assert!(replayed, "the spool drains; left: {}", spool.len().await);
    let rows = db.sessions().await;
    assert_eq!(rows.len(), 50, "every good record is written");
    assert!(rows.iter().all(|r| r.1 && r.2 == 2 && r.3 == 2), "{rows:?}");
    let q = spool.quarantine_dir();
    let quarantined = files(&q, ".json");
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert!(quarantined[0].starts_with(&poison.session.id.to_string()));
    let error = std::fs::read_to_string(q.join(format!("{}.error", quarantined[0]))).unwrap();
    assert!(error.contains(error_hint), "{error}");
    // Nothing is retried: a later round leaves the quarantine and the rows as they are.
    stop.cancel();
    task.await.unwrap();
    assert_eq!(files(&q, ".json").len(), 1);
    assert_eq!(db.sessions().await.len(), 50);
}

#[tokio::test]
async fn postgres_a_poison_record_is_quarantined_while_50_others_replay() {
    // A turn of a session that does not exist: PostgreSQL refuses it (SQLSTATE 23503, a
    // foreign key) however often it is tried. (A NUL in text no longer poisons a record: the
    // store's sanitising boundary replaces it.)
    let mut poison = snapshot(uuid::Uuid::new_v4(), 1, true, 1);
    poison.turns[0].session_id = uuid::Uuid::new_v4();
    poison_is_quarantined_while_the_rest_replay(Db::postgres().await, poison, "23503").await;
}

#[tokio::test]
async fn sqlite_a_poison_record_is_quarantined_while_50_others_replay() {
    // A turn of a session that does not exist: a foreign-key violation.
    let mut poison = snapshot(uuid::Uuid::new_v4(), 1, true, 1);
    poison.turns[0].session_id = uuid::Uuid::new_v4();
    poison_is_quarantined_while_the_rest_replay(Db::sqlite(), poison, "FOREIGN KEY").await;
}

/// The queue overflows: some snapshots are spilled to the spool, some written directly, in no
/// particular order. Session A's checkpoints spill and its final record goes through the
/// queue; session B's checkpoints go through the queue and its final record spills. Both end
/// with their final record.
async fn a_final_record_is_never_replaced_by_an_older_checkpoint(db: Db) {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let (recorder, task, stop) = start_recorder(&db.url(), &spool_dir).await;
    let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    // Without yielding, nothing drains the 1,024-slot queue: fill it with B's checkpoints.
    for turn in 0..1024 {
        recorder.submit(snapshot(b, 0, false, turn % 3));
    }
    // The queue is full: A's checkpoints and B's final record spill to the spool.
    for turn in 0..20 {
        recorder.submit(snapshot(a, 0, false, turn % 3));
    }
    recorder.submit(snapshot(b, 0, true, 3));
    // Once the queue has drained, A's final record goes through it.
    let b_written = until(20, || async {
        db.sessions().await.iter().any(|r| r.0 == b.to_string())
    })
    .await;
    assert!(b_written);
    recorder.submit(snapshot(a, 0, true, 3));
    let spool = Spool::new(&spool_dir);
    let settled = until(30, || async {
        let rows = db.sessions().await;
        spool.is_empty().await && rows.len() == 2 && rows.iter().all(|r| r.1)
    })
    .await;
    let rows = db.sessions().await;
    assert!(settled, "{rows:?}, spooled {}", spool.len().await);
    for r in &rows {
        assert_eq!(
            (r.1, r.2, r.3),
            (true, 3, 3),
            "the final record stands: {r:?}"
        );
    }
    // A later replay round changes nothing.
    stop.cancel();
    task.await.unwrap();
    assert_eq!(db.sessions().await, rows);
}

#[tokio::test]
async fn postgres_queue_overflow_never_replaces_a_final_record() {
    a_final_record_is_never_replaced_by_an_older_checkpoint(Db::postgres().await).await;
}

#[tokio::test]
async fn sqlite_queue_overflow_never_replaces_a_final_record() {
    a_final_record_is_never_replaced_by_an_older_checkpoint(Db::sqlite()).await;
}

#[tokio::test]
async fn shutdown_with_a_stalled_database_loses_nothing() {
    let db = Db::postgres().await;
    let proxy = postgres_proxy().await;
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let (recorder, task, stop) = start_recorder(&db.url_via(proxy.addr), &spool_dir).await;
    let ids: Vec<uuid::Uuid> = (0..50).map(|_| uuid::Uuid::new_v4()).collect();
    // Half the sessions checkpoint while the database answers.
    for id in &ids[..25] {
        recorder.submit(snapshot(*id, 0, false, 1));
    }
    assert!(until(20, || async { db.sessions().await.len() == 25 }).await);
    // The database stalls: connections stay open, nothing comes back.
    proxy.stall();
    for id in &ids {
        recorder.submit(snapshot(*id, 0, true, 2));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = tokio::time::Instant::now();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the writer stops within its budget although the database hangs")
        .unwrap();
    let took = started.elapsed();
    assert!(
        took <= atlas_server::recorder::FLUSH_DB_BUDGET + Duration::from_secs(1),
        "{took:?}"
    );
    // Rows ended + records spooled = sessions, each exactly once.
    proxy.resume();
    let ended: std::collections::BTreeSet<String> = db
        .sessions()
        .await
        .into_iter()
        .filter(|r| r.1)
        .map(|r| r.0)
        .collect();
    let spooled: std::collections::BTreeSet<String> = files(&spool_dir, ".json")
        .into_iter()
        .map(|n| n.split('.').next().unwrap().to_owned())
        .collect();
    let all: std::collections::BTreeSet<String> = ids.iter().map(|i| i.to_string()).collect();
    let accounted: std::collections::BTreeSet<String> = ended.union(&spooled).cloned().collect();
    assert_eq!(
        accounted,
        all,
        "ended rows {} + spooled {}",
        ended.len(),
        spooled.len()
    );
    // The next start replays the spool: every session ends with its final record, and each
    // spooled file is removed once its record is written (just after the batch commits).
    let (_r, task, stop) = start_recorder(&db.url(), &spool_dir).await;
    assert!(
        until(20, || async {
            let rows = db.sessions().await;
            rows.len() == 50 && rows.iter().all(|r| r.1 && r.3 == 2)
        })
        .await
    );
    assert!(until(5, || async { files(&spool_dir, ".json").is_empty() }).await);
    stop.cancel();
    task.await.unwrap();
}

async fn readyz(app: &TestApp) -> (u16, serde_json::Value) {
    let resp = app.get("/readyz").await;
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// Starts a session for `user` and ends it at once; returns the connection, for the caller to
/// keep open.
async fn end_a_session(app: &TestApp, user: &str) -> atlas_client::Connection {
    let (conn, _) = app.start(user, 24_000).await;
    conn.sender
        .send(&atlas_protocol::ClientMessage::SessionEnd)
        .await
        .unwrap();
    conn
}

#[tokio::test]
async fn readiness_rides_out_a_database_outage_while_the_spool_has_room() {
    let db = PgDb::new().await;
    let proxy = postgres_proxy().await;
    let url = db.url_via(proxy.addr);
    let app = spawn_app_with(fast_fakes(), move |c| {
        c.database_url = url;
        c.spool_max_records = 2;
    })
    .await;
    let (status, body) = readyz(&app).await;
    assert_eq!(
        (status, body["database"].as_str()),
        (200, Some("up")),
        "{body}"
    );
    // A stalled database does not slow readiness down: no round trip per request.
    proxy.stall();
    for _ in 0..20 {
        let t = tokio::time::Instant::now();
        let (status, _) = readyz(&app).await;
        assert_eq!(status, 200);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
    proxy.resume();
    proxy.cut();
    // A session ends while the database is down: its record is spooled, the instance stays
    // ready (the spool has room) and says the database is down.
    let _u1 = end_a_session(&app, "u1").await;
    let down = until(10, || async {
        let (s, b) = readyz(&app).await;
        s == 200 && b["database"] == "down" && b["spooled_records"] == 1
    })
    .await;
    assert!(down, "{}", readyz(&app).await.1);
    let metrics = app.get_text("/metrics").await;
    // (The metrics registry is shared by every test in this process: names only.)
    assert!(metrics.contains("atlas_database_up"), "{metrics}");
    assert!(metrics.contains("atlas_spool_records"));
    // A second one fills the spool to its limit: now the instance is out of rotation.
    let _u2 = end_a_session(&app, "u2").await;
    let full = until(10, || async { readyz(&app).await.0 == 503 }).await;
    let (_, body) = readyz(&app).await;
    assert!(full, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ATLAS_SPOOL_MAX_RECORDS"),
        "{body}"
    );
    // The database returns: the spool is replayed and the instance is ready again.
    proxy.restore();
    let back = until(40, || async {
        let (s, b) = readyz(&app).await;
        s == 200 && b["database"] == "up" && b["spooled_records"] == 0
    })
    .await;
    assert!(back, "{}", readyz(&app).await.1);
}
