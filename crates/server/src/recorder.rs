//! Writes session records without ever blocking a session.
//!
//! Snapshots get a sequence number when submitted and go through a bounded queue to one
//! writer task, which writes whatever is queued in one transaction (only the newest snapshot
//! of each session), at most one transaction per [`COMMIT_EVERY`] (group commit), or spools
//! it when the database cannot take it. The database keeps a row
//! unless the snapshot is newer, so nothing written out of order (spilled to the spool when
//! the queue is full, replayed later) can replace a newer record.
//!
//! Failures are told apart by the database's error code ([`atlas_store::StoreError::is_permanent`]): a
//! record the database refuses for good is quarantined (moved aside with the error, counted,
//! logged once) and never blocks the others; any other failure marks the database down, and
//! the writer spools new records without trying it until a replay of the spool, retried with
//! backoff, gets through. The writer keeps the database state for `/readyz` and the metrics,
//! so readiness never costs a database round trip.
//!
//! On shutdown the write in flight, the records still queued and the spool get
//! [`FLUSH_DB_BUDGET`] together to reach the database; whatever has not by then is spooled
//! (nothing queued is dropped), and the writer waits for spills still in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use atlas_store::migrate;
use atlas_store::spool::Spool;
use atlas_store::{Snapshot, Store};

/// Handle for submitting records.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Snapshot>,
    spool: Spool,
    health: Arc<Health>,
    /// Spills to the spool made while the queue was full.
    spills: TaskTracker,
}

/// The writer's view of the database, shared with readiness and metrics.
struct Health {
    /// Whether the last attempt reached the database.
    db_up: AtomicBool,
    /// Records waiting in the spool (counted at each replay, plus spills since).
    spooled: AtomicUsize,
    /// Above this many spooled records the instance stops reporting ready.
    spool_max: usize,
}

impl Health {
    fn set_db_up(&self, up: bool) {
        self.db_up.store(up, Ordering::Relaxed);
        crate::metrics::database_up(up);
    }

    fn set_spooled(&self, n: usize) {
        self.spooled.store(n, Ordering::Relaxed);
        crate::metrics::spool_records(n);
    }

    fn add_spooled(&self, n: usize) {
        let now = self.spooled.fetch_add(n, Ordering::Relaxed) + n;
        crate::metrics::spool_records(now);
        crate::metrics::records_spooled(n);
    }
}

/// What `/readyz` reports about records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RecordsHealth {
    /// Whether the last database attempt succeeded.
    pub database_up: bool,
    /// Records waiting in the spool.
    pub spooled_records: usize,
    /// The spool's readiness limit (`ATLAS_SPOOL_MAX_RECORDS`).
    pub spool_max_records: usize,
}

impl RecordsHealth {
    /// Whether the instance can take sessions as far as records go: the database answers,
    /// or the spool still has room to carry the records until it does.
    pub fn can_take_sessions(&self) -> bool {
        self.database_up || self.spooled_records < self.spool_max_records
    }
}

/// Deadline for one database write (a batch).
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the spool is replayed while the database is up.
const REPLAY_EVERY: Duration = Duration::from_secs(5);
/// First and longest wait before trying a database that failed again.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Records replayed per round (the writer returns to live records between rounds).
const REPLAY_ROUND: usize = 1_000;
/// Snapshots taken from the queue per write.
const BATCH: usize = 256;
/// Group commit: a write starts at most this long after the previous one started, taking
/// what was queued meanwhile. A burst of records (many sessions ending or checkpointing
/// together) costs one transaction, one fsync and one parse of each statement per interval
/// instead of one per record; a record never waits longer than this.
const COMMIT_EVERY: Duration = Duration::from_millis(50);
/// At shutdown, how long the records left may wait for the database before they are spooled.
pub const FLUSH_DB_BUDGET: Duration = Duration::from_secs(2);

/// The sequence of the next snapshot: microseconds since the epoch, strictly increasing in
/// this process. Per session this orders snapshots as they were submitted; across instances
/// (a session resumed elsewhere after a drain) it follows the clock, which moves on by far
/// more than the clocks of two instances disagree between a drain and the resume.
/// Bits of the sequence below the ownership epoch: microseconds since 1970 fit in 52 bits
/// until the year 2112.
const EPOCH_SHIFT: u32 = 52;
/// Epochs above this share the top value (their snapshots are ordered by time alone); the
/// sequence stays within PostgreSQL's `bigint`.
const MAX_EPOCH: u64 = (1 << (63 - EPOCH_SHIFT)) - 1;

/// The sequence of a snapshot written at ownership `epoch` and time sequence `time_seq`.
fn fenced_seq(epoch: u64, time_seq: u64) -> u64 {
    (epoch.min(MAX_EPOCH) << EPOCH_SHIFT) | (time_seq & ((1 << EPOCH_SHIFT) - 1))
}

fn next_seq() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(0);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

impl Recorder {
    /// Connects, applies migrations when `migrate` is set (retrying in the background if the
    /// database is down), and starts the writer. The server starts even with the database
    /// down: records are spooled until it returns.
    pub async fn start(
        url: &str,
        spool_dir: &std::path::Path,
        spool_max: usize,
        migrate: bool,
        shutdown: CancellationToken,
    ) -> Result<(Recorder, tokio::task::JoinHandle<()>), atlas_store::StoreError> {
        let store = Store::connect(url).await?;
        let spool = Spool::new(spool_dir);
        let (tx, rx) = mpsc::channel(1024);
        let health = Arc::new(Health {
            db_up: AtomicBool::new(true),
            spooled: AtomicUsize::new(0),
            spool_max,
        });
        health.set_spooled(send(spool.len()).await);
        let spills = TaskTracker::new();
        let recorder = Recorder {
            tx,
            spool: spool.clone(),
            health: health.clone(),
            spills: spills.clone(),
        };
        let migrated = if migrate {
            match tokio::time::timeout(Duration::from_secs(10), apply_migrations(&store)).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "migrations failed; will retry");
                    false
                }
                Err(_) => {
                    tracing::error!("database unreachable for migrations; will retry");
                    false
                }
            }
        } else {
            true
        };
        health.set_db_up(migrated);
        let writer = Writer {
            store,
            spool,
            health,
            migrated,
            backoff: BACKOFF_MIN,
            // Replay what a previous run left at once.
            next_attempt: Instant::now(),
            shutdown,
            flush_deadline: None,
        };
        let task = tokio::spawn(writer.run(rx, spills));
        Ok((recorder, task))
    }

    /// Numbers the snapshot and queues it; never waits. If the queue is full (or the writer
    /// has stopped) the snapshot goes straight to the spool.
    ///
    /// On submission `snap.seq` holds the writer's ownership epoch of the session (0 without
    /// scale-out); it becomes the high bits of the sequence, so a row written by a later owner
    /// is never replaced by a snapshot of an owner that lost the session (fenced like every
    /// other write for it), whatever the clocks say.
    ///
    /// Text the database cannot hold (a NUL) is made storable here already, with the store's
    /// own [`Snapshot::sanitize`], so that the spool and the quarantine hold what the database
    /// will; the store's write path remains the boundary every write passes (spooled records
    /// of older versions included). Nothing is copied when there is nothing to replace.
    pub fn submit(&self, mut snap: Snapshot) {
        snap.seq = fenced_seq(snap.seq, next_seq());
        snap.sanitize();
        if let Err(
            mpsc::error::TrySendError::Full(snap) | mpsc::error::TrySendError::Closed(snap),
        ) = self.tx.try_send(snap)
        {
            let spool = self.spool.clone();
            let health = self.health.clone();
            self.spills.spawn(async move {
                match spool.put(&snap).await {
                    Ok(()) => health.add_spooled(1),
                    Err(e) => tracing::error!(error = %e, "record could not be spooled"),
                }
            });
        }
    }

    /// The records side of readiness, from the writer's last attempt (no round trip).
    pub fn health(&self) -> RecordsHealth {
        RecordsHealth {
            database_up: self.health.db_up.load(Ordering::Relaxed),
            spooled_records: self.health.spooled.load(Ordering::Relaxed),
            spool_max_records: self.health.spool_max,
        }
    }
}

/// Boxes a future as `Send` at its call site, which sidesteps the compiler's trouble with
/// proving `Send` for sqlx futures through generic lifetimes inside a spawned task.
fn send<'a, T>(
    f: impl std::future::Future<Output = T> + Send + 'a,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>> {
    Box::pin(f)
}

async fn apply_migrations(store: &Store) -> Result<(), atlas_store::StoreError> {
    let migrations = migrate::embedded(store.backend());
    let applied = send(migrate::up(store, &migrations, false)).await?;
    if !applied.is_empty() {
        tracing::info!(count = applied.len(), "database migrated");
    }
    Ok(())
}

/// When a write of `queued` records may start, if not at once: [`COMMIT_EVERY`] after the
/// previous write started, unless the batch is already full.
fn write_due(last_write: Option<Instant>, queued: usize, now: Instant) -> Option<Instant> {
    let due = last_write? + COMMIT_EVERY;
    (queued < BATCH && now < due).then_some(due)
}

/// The writer task's state.
struct Writer {
    store: Store,
    spool: Spool,
    health: Arc<Health>,
    migrated: bool,
    backoff: Duration,
    /// When the spool is replayed next (and, while the database is down, tried again).
    next_attempt: Instant,
    shutdown: CancellationToken,
    /// Set when shutdown begins: the end of [`FLUSH_DB_BUDGET`].
    flush_deadline: Option<Instant>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Snapshot>, spills: TaskTracker) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut last_write: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                n = rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    if let Some(due) = write_due(last_write, batch.len(), Instant::now()) {
                        tokio::select! {
                            _ = tokio::time::sleep_until(due) => {}
                            _ = self.shutdown.cancelled() => {}
                        }
                        while batch.len() < BATCH && let Ok(snap) = rx.try_recv() {
                            batch.push(snap);
                        }
                    }
                    last_write = Some(Instant::now());
                    self.deliver(std::mem::take(&mut batch)).await;
                    if Instant::now() >= self.next_attempt {
                        self.maintain().await;
                    }
                }
                _ = tokio::time::sleep_until(self.next_attempt) => self.maintain().await,
            }
        }
        // Shutting down: nothing new is queued; what is left is written or spooled.
        rx.close();
        let mut rest = Vec::new();
        while rx.recv_many(&mut rest, 1024).await > 0 {}
        self.flush(rest).await;
        spills.close();
        spills.wait().await;
        tracing::info!(
            spooled = self.health.spooled.load(Ordering::Relaxed),
            "recorder stopped"
        );
    }

    /// The moment shutdown stops waiting for the database.
    fn flush_deadline(&mut self) -> Instant {
        *self
            .flush_deadline
            .get_or_insert_with(|| Instant::now() + FLUSH_DB_BUDGET)
    }

    fn db_usable(&self) -> bool {
        self.migrated && self.health.db_up.load(Ordering::Relaxed)
    }

    fn db_up(&mut self) {
        if !self.health.db_up.load(Ordering::Relaxed) {
            tracing::info!("database reachable again");
        }
        self.health.set_db_up(true);
        self.backoff = BACKOFF_MIN;
    }

    fn db_down(&mut self, error: &dyn std::fmt::Display) {
        if self.health.db_up.load(Ordering::Relaxed) {
            tracing::warn!(error = %error, "database unavailable; records are spooled");
        } else {
            tracing::debug!(error = %error, "database still unavailable");
        }
        self.health.set_db_up(false);
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Writes a batch of live snapshots, or spools it.
    async fn deliver(&mut self, batch: Vec<Snapshot>) {
        if self.db_usable() {
            let store = self.store.clone();
            let mut write = std::pin::pin!(tokio::time::timeout(
                WRITE_TIMEOUT,
                store.write_batch(&batch)
            ));
            let result = tokio::select! {
                r = &mut write => Some(r),
                _ = self.shutdown.cancelled() => None,
            };
            // Shutting down mid-write: the write may finish within the shutdown budget;
            // a stalled one is abandoned and its records spooled.
            let result = match result {
                Some(r) => Some(r),
                None => tokio::time::timeout_at(self.flush_deadline(), write)
                    .await
                    .ok(),
            };
            match result {
                Some(Ok(Ok(outcome))) => {
                    self.db_up();
                    self.quarantine(&batch, outcome).await;
                    return;
                }
                Some(Ok(Err(e))) => self.db_down(&e),
                Some(Err(_)) => self.db_down(&"database write timed out"),
                None => {}
            }
        }
        self.spool_all(&batch).await;
    }

    /// Quarantines the records of `batch` the database refused for good.
    async fn quarantine(&self, batch: &[Snapshot], outcome: atlas_store::BatchOutcome) {
        crate::metrics::records_written(batch.len() - outcome.rejected.len());
        for (i, e) in outcome.rejected {
            let snap = &batch[i];
            tracing::error!(session_id = %snap.session.id, seq = snap.seq, error = %e.detail(),
                "record refused by the database; quarantined");
            crate::metrics::records_quarantined(1);
            if let Err(q) = send(self.spool.quarantine(snap, &e.detail())).await {
                tracing::error!(error = %q, "record could not be quarantined");
            }
        }
    }

    async fn spool_all(&self, batch: &[Snapshot]) {
        // Only the newest snapshot of each session matters.
        let mut newest: std::collections::HashMap<uuid::Uuid, &Snapshot> =
            std::collections::HashMap::new();
        for s in batch {
            let slot = newest.entry(s.session.id).or_insert(s);
            if slot.seq < s.seq {
                *slot = s;
            }
        }
        let mut spooled = 0;
        for s in newest.into_values() {
            match send(self.spool.put(s)).await {
                Ok(()) => spooled += 1,
                Err(e) => tracing::error!(error = %e, "record could not be spooled"),
            }
        }
        self.health.add_spooled(spooled);
    }

    /// Applies pending migrations, replays the spool and, while the database is down, probes
    /// it; schedules the next attempt.
    async fn maintain(&mut self) {
        let shutdown = self.shutdown.clone();
        tokio::select! {
            _ = self.maintain_inner() => {}
            _ = shutdown.cancelled() => {}
        }
    }

    async fn maintain_inner(&mut self) {
        if !self.migrated {
            match tokio::time::timeout(Duration::from_secs(10), apply_migrations(&self.store)).await
            {
                Ok(Ok(())) => {
                    self.migrated = true;
                    self.db_up();
                }
                Ok(Err(e)) => return self.db_down(&e),
                Err(_) => return self.db_down(&"migrations timed out"),
            }
        }
        let waiting = send(self.spool.len()).await;
        self.health.set_spooled(waiting);
        if waiting == 0 {
            if !self.health.db_up.load(Ordering::Relaxed) {
                match tokio::time::timeout(WRITE_TIMEOUT, self.store.ping()).await {
                    Ok(Ok(())) => self.db_up(),
                    Ok(Err(e)) => return self.db_down(&e),
                    Err(_) => return self.db_down(&"database ping timed out"),
                }
            }
            self.next_attempt = Instant::now() + REPLAY_EVERY;
            return;
        }
        let r = send(self.spool.replay(&self.store, WRITE_TIMEOUT, REPLAY_ROUND)).await;
        crate::metrics::records_written(r.written);
        crate::metrics::records_quarantined(r.quarantined);
        self.health.set_spooled(r.remaining);
        match r.failed {
            Some(e) => self.db_down(&e),
            None => {
                self.db_up();
                // More left (the round was bounded): carry on soon, after live records.
                self.next_attempt = Instant::now()
                    + if r.remaining > 0 {
                        Duration::ZERO
                    } else {
                        REPLAY_EVERY
                    };
            }
        }
    }

    /// Shutdown: writes `rest`, then replays the spool, as far as the database answers within
    /// [`FLUSH_DB_BUDGET`]; spools what is left of `rest`.
    async fn flush(&mut self, rest: Vec<Snapshot>) {
        let deadline = self.flush_deadline();
        if !rest.is_empty() {
            let mut written = false;
            if self.db_usable() {
                let store = self.store.clone();
                match tokio::time::timeout_at(deadline, store.write_batch(&rest)).await {
                    Ok(Ok(outcome)) => {
                        self.quarantine(&rest, outcome).await;
                        written = true;
                    }
                    Ok(Err(e)) => self.db_down(&e),
                    Err(_) => self.db_down(&"database write timed out at shutdown"),
                }
            }
            if !written {
                self.spool_all(&rest).await;
            }
        }
        // Leave as little as possible in the spool for the next start.
        if self.db_usable() && self.health.spooled.load(Ordering::Relaxed) > 0 {
            let replay = self.spool.replay(&self.store, WRITE_TIMEOUT, usize::MAX);
            if let Ok(r) = tokio::time::timeout_at(deadline, send(replay)).await {
                crate::metrics::records_written(r.written);
                crate::metrics::records_quarantined(r.quarantined);
                self.health.set_spooled(r.remaining);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_owner_s_snapshots_outrank_a_stale_owner_s() {
        let stale_later_clock = fenced_seq(1, next_seq() + 10_000_000);
        let new_owner = fenced_seq(2, next_seq());
        assert!(new_owner > stale_later_clock);
        assert!(fenced_seq(MAX_EPOCH + 5, 1) <= i64::MAX as u64);
        assert_eq!(fenced_seq(0, 42), 42);
    }

    #[test]
    fn writes_are_grouped_at_most_one_per_interval() {
        let t0 = Instant::now();
        assert_eq!(
            write_due(None, 1, t0),
            None,
            "the first write starts at once"
        );
        let soon = t0 + Duration::from_millis(5);
        assert_eq!(
            write_due(Some(t0), 1, soon),
            Some(t0 + COMMIT_EVERY),
            "a record right after a write waits for the next interval"
        );
        assert_eq!(
            write_due(Some(t0), BATCH, soon),
            None,
            "a full batch goes at once"
        );
        assert_eq!(write_due(Some(t0), 1, t0 + COMMIT_EVERY), None);
        assert_eq!(write_due(Some(t0), 3, t0 + 2 * COMMIT_EVERY), None);
    }

    #[test]
    fn sequences_strictly_increase_across_threads() {
        let handles: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..10_000).map(|_| next_seq()).collect::<Vec<_>>()))
            .collect();
        let mut all: Vec<u64> = Vec::new();
        for h in handles {
            let v = h.join().unwrap();
            assert!(v.windows(2).all(|w| w[0] < w[1]), "per thread in order");
            all.extend(v);
        }
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "no sequence is handed out twice");
    }
}
