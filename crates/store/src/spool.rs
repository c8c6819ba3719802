//! The durable local spool: when the database cannot take a session record, the record is
//! written to a file (one per session, replaced atomically by newer snapshots) and replayed
//! later. Replays are idempotent because the database rows are keyed by session id.

use std::path::PathBuf;

use crate::{Snapshot, Store, StoreError};

/// A folder of spooled records.
#[derive(Clone, Debug)]
pub struct Spool {
    dir: PathBuf,
}

/// What a replay did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// Records written and removed from the spool.
    pub written: usize,
    /// Records left for the next attempt.
    pub remaining: usize,
}

impl Spool {
    /// A spool in `dir` (created when first needed).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Spool { dir: dir.into() }
    }

    /// The folder.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Saves `snap`, replacing an older snapshot of the same session. The write goes to a
    /// temporary file first and is renamed into place, so a crash never leaves half a record.
    pub async fn put(&self, snap: &Snapshot) -> Result<(), StoreError> {
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|e| StoreError::Io(format!("spool {}: {e}", self.dir.display())))?;
        let body = serde_json::to_vec(snap).map_err(|e| StoreError::Io(e.to_string()))?;
        let id = snap.session.id;
        let tmp = self.dir.join(format!(".{id}.json.tmp"));
        let path = self.dir.join(format!("{id}.json"));
        tokio::fs::write(&tmp, &body)
            .await
            .map_err(|e| StoreError::Io(format!("spool {}: {e}", tmp.display())))?;
        if let Ok(f) = tokio::fs::File::open(&tmp).await {
            let _ = f.sync_all().await;
        }
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(|e| StoreError::Io(format!("spool {}: {e}", path.display())))?;
        Ok(())
    }

    /// Removes a session's spooled snapshot (a newer one reached the database directly, so
    /// the spooled one must never be replayed over it).
    pub async fn remove(&self, session_id: uuid::Uuid) {
        let _ = tokio::fs::remove_file(self.dir.join(format!("{session_id}.json"))).await;
    }

    /// Spooled records waiting.
    pub async fn len(&self) -> usize {
        self.files().await.len()
    }

    /// Whether nothing is waiting.
    pub async fn is_empty(&self) -> bool {
        self.len().await == 0
    }

    async fn files(&self) -> Vec<PathBuf> {
        let Ok(mut dir) = tokio::fs::read_dir(&self.dir).await else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while let Ok(Some(e)) = dir.next_entry().await {
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

    /// Writes every spooled record to `store`, removing each once written. A file that cannot
    /// be parsed is moved aside (`.bad`) rather than retried forever.
    pub async fn replay(&self, store: &Store, write_timeout: std::time::Duration) -> Replay {
        let mut result = Replay::default();
        for path in self.files().await {
            let snap = match tokio::fs::read(&path)
                .await
                .ok()
                .and_then(|b| serde_json::from_slice::<Snapshot>(&b).ok())
            {
                Some(s) => s,
                None => {
                    tracing::error!(path = %path.display(), "unreadable spool file moved aside");
                    let _ = tokio::fs::rename(&path, path.with_extension("bad")).await;
                    continue;
                }
            };
            match tokio::time::timeout(write_timeout, store.write(&snap)).await {
                Ok(Ok(())) => {
                    let _ = tokio::fs::remove_file(&path).await;
                    result.written += 1;
                }
                _ => {
                    // The database is still unavailable: try the rest next time.
                    tracing::debug!("spool replay deferred");
                    result.remaining += 1;
                    break;
                }
            }
        }
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
