//! The durable local spool: when the database cannot take a session record, the record is
//! written to a file and replayed later.
//!
//! Every snapshot gets its own file, `<session id>.<sequence>.json`, written under a unique
//! temporary name and renamed into place, so concurrent writers never share a file and a
//! crash never leaves half a record. Replays are idempotent and order-free: the database keeps
//! a row unless the snapshot replayed is newer ([`crate::Snapshot::seq`]). A record the
//! database refuses for good is moved to `quarantine/` with the error beside it, so it never
//! blocks the others.

use std::path::{Path, PathBuf};

use crate::{Snapshot, Store, StoreError};

/// A folder of spooled records.
#[derive(Clone, Debug)]
pub struct Spool {
    dir: PathBuf,
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct Replay {
    /// Records written (or superseded by a newer row) and removed from the spool.
    pub written: usize,
    /// Records moved to quarantine.
    pub quarantined: usize,
    /// Records left for the next attempt.
    pub remaining: usize,
    /// Why the replay stopped early (the database is unavailable), if it did.
    pub failed: Option<StoreError>,
}

/// Folder, under the spool, of records the database refused for good.
pub const QUARANTINE: &str = "quarantine";

/// Records written per database transaction during a replay.
const REPLAY_BATCH: usize = 100;

fn io(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("spool {}: {e}", path.display()))
}

impl Spool {
    /// A spool in `dir` (created when first needed).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Spool { dir: dir.into() }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The quarantine folder.
    pub fn quarantine_dir(&self) -> PathBuf {
        self.dir.join(QUARANTINE)
    }

    /// Saves `snap` durably in its own file (written to a unique temporary file, synced, then
    /// renamed into place).
    pub async fn put(&self, snap: &Snapshot) -> Result<(), StoreError> {
        let name = format!("{}.{:020}.json", snap.session.id, snap.seq);
        let body = serde_json::to_vec(snap).map_err(|e| StoreError::Io(e.to_string()))?;
        write_atomically(&self.dir, &name, &body).await
    }

    /// Moves `snap` to quarantine with `error` beside it.
    pub async fn quarantine(&self, snap: &Snapshot, error: &str) -> Result<(), StoreError> {
        let name = format!("{}.{:020}.json", snap.session.id, snap.seq);
        let body = serde_json::to_vec(snap).map_err(|e| StoreError::Io(e.to_string()))?;
        let dir = self.quarantine_dir();
        write_atomically(&dir, &format!("{name}.error"), error.as_bytes()).await?;
        write_atomically(&dir, &name, &body).await
    }

    /// Moves a spooled file that cannot be used to quarantine with `error` beside it.
    async fn quarantine_file(&self, path: &Path, error: &str) -> Result<(), StoreError> {
        let dir = self.quarantine_dir();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        write_atomically(&dir, &format!("{name}.error"), error.as_bytes()).await?;
        tokio::fs::rename(path, dir.join(&name))
            .await
            .map_err(|e| io(path, e))
    }

    /// Spooled records waiting.
    pub async fn len(&self) -> usize {
        self.files().await.len()
    }

    /// Whether nothing is waiting.
    pub async fn is_empty(&self) -> bool {
        self.len().await == 0
    }

    /// Records in quarantine.
    pub async fn quarantined(&self) -> usize {
        list_json(&self.quarantine_dir()).await.len()
    }

    async fn files(&self) -> Vec<PathBuf> {
        list_json(&self.dir).await
    }

    /// Writes up to `max` spooled records to `store` in batches, removing each once written.
    /// A record the database refuses for good, or a file that cannot be parsed, is
    /// quarantined; the replay stops at the first transient failure (the database is down)
    /// and leaves the rest for the next attempt.
    pub async fn replay(
        &self,
        store: &Store,
        write_timeout: std::time::Duration,
        max: usize,
    ) -> Replay {
        let mut result = Replay::default();
        let files = self.files().await;
        let total = files.len();
        let mut done = 0;
        for chunk in files.chunks(REPLAY_BATCH) {
            if done >= max {
                break;
            }
            let mut paths = Vec::with_capacity(chunk.len());
            let mut snaps = Vec::with_capacity(chunk.len());
            for path in chunk {
                match read(path).await {
                    Ok(s) => {
                        paths.push(path.clone());
                        snaps.push(s);
                    }
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "unreadable spool file quarantined");
                        if self.quarantine_file(path, &e).await.is_ok() {
                            result.quarantined += 1;
                        }
                    }
                }
            }
            let outcome = match tokio::time::timeout(write_timeout, store.write_batch(&snaps)).await
            {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => {
                    result.failed = Some(e);
                    break;
                }
                Err(_) => {
                    result.failed = Some(StoreError::Io(format!(
                        "database write timed out after {write_timeout:?}"
                    )));
                    break;
                }
            };
            let mut rejected: Vec<Option<StoreError>> = snaps.iter().map(|_| None).collect();
            for (i, e) in outcome.rejected {
                rejected[i] = Some(e);
            }
            for ((path, snap), rejected) in paths.iter().zip(&snaps).zip(rejected) {
                match rejected {
                    None => {
                        let _ = tokio::fs::remove_file(path).await;
                        result.written += 1;
                    }
                    Some(e) => {
                        tracing::error!(session_id = %snap.session.id, seq = snap.seq, error = %e.detail(),
                            "record refused by the database; quarantined");
                        if self.quarantine_file(path, &e.detail()).await.is_ok() {
                            result.quarantined += 1;
                        }
                    }
                }
            }
            done += chunk.len();
        }
        result.remaining = total.saturating_sub(result.written + result.quarantined);
        if result.written > 0 {
            tracing::info!(
                written = result.written,
                remaining = result.remaining,
                "spooled records replayed"
            );
        }
        result
    }
}

async fn read(path: &Path) -> Result<Snapshot, String> {
    let bytes = tokio::fs::read(path).await.map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| format!("not a session record: {e}"))
}

/// The `*.json` files of `dir` (temporary files start with a dot), sorted.
async fn list_json(dir: &Path) -> Vec<PathBuf> {
    let Ok(mut rd) = tokio::fs::read_dir(dir).await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while let Ok(Some(e)) = rd.next_entry().await {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json")
            && !p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Writes `body` to `dir/name` through a uniquely named temporary file, synced before the
/// rename, so readers see the whole file or nothing and concurrent writers never collide.
async fn write_atomically(dir: &Path, name: &str, body: &[u8]) -> Result<(), StoreError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| io(dir, e))?;
    let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let path = dir.join(name);
    let result = async {
        let mut f = tokio::fs::File::create(&tmp).await?;
        tokio::io::AsyncWriteExt::write_all(&mut f, body).await?;
        f.sync_all().await?;
        drop(f);
        tokio::fs::rename(&tmp, &path).await
    }
    .await;
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(io(&path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::snapshot;

    #[tokio::test]
    async fn concurrent_puts_of_one_session_each_land_whole() {
        let dir = tempfile_dir();
        let spool = Spool::new(&dir);
        let mut tasks = Vec::new();
        for seq in 1..=50 {
            let spool = spool.clone();
            tasks.push(tokio::spawn(async move {
                spool.put(&snapshot(uuid::Uuid::nil(), "u", seq, 0)).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let files = spool.files().await;
        assert_eq!(files.len(), 50);
        for f in &files {
            read(f).await.unwrap();
        }
        let leftovers = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .count();
        assert_eq!(leftovers, 0, "no temporary file is left behind");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("atlas-spool-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
