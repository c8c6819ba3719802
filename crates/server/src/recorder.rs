//! Writes session records without ever blocking a session: snapshots go through a bounded
//! queue to one background task that writes them to the database, or to the spool when the
//! database cannot take them; the spool is replayed every few seconds and at start-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use atlas_store::migrate;
use atlas_store::spool::Spool;
use atlas_store::{Snapshot, Store};

/// Handle for submitting records.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Snapshot>,
    spool: Spool,
    store: Store,
    /// Whether the last database write succeeded (for `/readyz`).
    healthy: Arc<AtomicBool>,
}

/// Deadline for one database write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the spool is retried.
const REPLAY_EVERY: Duration = Duration::from_secs(5);

impl Recorder {
    /// Connects, applies migrations when `migrate` is set (retrying in the background if the
    /// database is down), and starts the writer. The server starts even with the database
    /// down: records are spooled until it returns.
    pub async fn start(
        url: &str,
        spool_dir: &std::path::Path,
        migrate: bool,
        shutdown: CancellationToken,
    ) -> Result<(Recorder, tokio::task::JoinHandle<()>), atlas_store::StoreError> {
        let store = Store::connect(url).await?;
        let spool = Spool::new(spool_dir);
        let (tx, rx) = mpsc::channel(1024);
        let healthy = Arc::new(AtomicBool::new(true));
        let recorder = Recorder {
            tx,
            spool: spool.clone(),
            store: store.clone(),
            healthy: healthy.clone(),
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
        let task = tokio::spawn(run(store, spool, rx, healthy, migrated, shutdown));
        Ok((recorder, task))
    }

    /// Queues a snapshot; never waits. If the queue is full the snapshot goes to the spool.
    pub fn submit(&self, snap: Snapshot) {
        if let Err(
            mpsc::error::TrySendError::Full(snap) | mpsc::error::TrySendError::Closed(snap),
        ) = self.tx.try_send(snap)
        {
            let spool = self.spool.clone();
            tokio::spawn(async move {
                if let Err(e) = spool.put(&snap).await {
                    tracing::error!(error = %e, "record could not be spooled");
                }
            });
        }
    }

    /// Whether the database answers (readiness).
    pub async fn ready(&self) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_secs(1), self.store.ping()).await,
            Ok(Ok(()))
        )
    }

    /// Whether the last write reached the database.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
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

async fn run(
    store: Store,
    spool: Spool,
    mut rx: mpsc::Receiver<Snapshot>,
    healthy: Arc<AtomicBool>,
    mut migrated: bool,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(REPLAY_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            snap = rx.recv() => {
                let Some(snap) = snap else { break };
                send(write_or_spool(&store, &spool, &healthy, migrated, snap)).await;
            }
            _ = tick.tick() => {
                if !migrated {
                    migrated = matches!(
                        tokio::time::timeout(Duration::from_secs(10), send(apply_migrations(&store))).await,
                        Ok(Ok(()))
                    );
                }
                if migrated && !send(spool.is_empty()).await {
                    let r = send(spool.replay(&store, WRITE_TIMEOUT)).await;
                    healthy.store(r.remaining == 0, Ordering::Relaxed);
                }
            }
            _ = shutdown.cancelled() => {
                // Shutting down: queued records go to the local spool (fast and durable) and
                // reach the database on the next start.
                while let Ok(snap) = rx.try_recv() {
                    if let Err(e) = send(spool.put(&snap)).await {
                        tracing::error!(error = %e, "record could not be spooled");
                    }
                }
                break;
            }
        }
    }
}

async fn write_or_spool(
    store: &Store,
    spool: &Spool,
    healthy: &AtomicBool,
    migrated: bool,
    snap: Snapshot,
) {
    let written = migrated
        && matches!(
            tokio::time::timeout(WRITE_TIMEOUT, send(store.write(&snap))).await,
            Ok(Ok(()))
        );
    healthy.store(written, Ordering::Relaxed);
    if written {
        // An older snapshot of this session may be waiting in the spool: it must not be
        // replayed over the newer one.
        send(spool.remove(snap.session.id)).await;
    } else {
        tracing::warn!(session_id = %snap.session.id, "database unavailable; record spooled");
        crate::metrics::record_spooled();
        if let Err(e) = send(spool.put(&snap)).await {
            tracing::error!(error = %e, "record could not be spooled");
        }
    }
}
