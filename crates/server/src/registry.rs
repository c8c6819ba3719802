//! Live sessions of this instance: per-user admission (atomic, detached sessions included),
//! the total-capacity cap, and the resume directory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::handoff::Connection;

/// Why a new session was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmitError {
    /// The user already has the maximum number of sessions.
    TooManySessions,
    /// The instance holds its maximum number of sessions.
    AtCapacity,
}

/// A live session of this instance, as a resume reaches it.
#[derive(Clone)]
pub struct ResumeEntry {
    /// The session.
    pub session_id: String,
    /// Its owner; only they may resume it.
    pub user_id: String,
    /// Hands a new connection (or a newer claim) to the session.
    pub attach: mpsc::Sender<Connection>,
}

impl std::fmt::Debug for ResumeEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumeEntry")
            .field("session_id", &self.session_id)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    per_user: HashMap<String, u32>,
    /// Spend per user for the current UTC day: (day number, micro-dollars).
    spend: HashMap<String, (u64, u64)>,
    /// The day the spend map was last pruned of earlier days.
    spend_day: u64,
    total: usize,
    detached: usize,
    /// Live sessions by id.
    live: HashMap<String, ResumeEntry>,
    /// Resume tokens → session id (without scale-out; with it, Redis keeps them).
    tokens: HashMap<String, String>,
}

/// The registry; shared by all connections.
pub struct Registry {
    inner: Mutex<Inner>,
    max_per_user: u32,
    max_total: usize,
}

/// A session's place in the registry; dropping it frees the place.
pub struct SessionPermit {
    registry: Arc<Registry>,
    user_id: String,
    detached: bool,
}

impl std::fmt::Debug for SessionPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPermit")
            .field("user_id", &self.user_id)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// A registry admitting `max_per_user` sessions per user and `max_total` in all.
    pub fn new(max_per_user: u32, max_total: usize) -> Arc<Self> {
        Arc::new(Registry {
            inner: Mutex::new(Inner::default()),
            max_per_user,
            max_total,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the session gauges (called with the lock held, after a change).
    fn publish(inner: &Inner) {
        crate::metrics::sessions(inner.total, inner.detached);
    }

    /// Admits a new session for `user_id`, or says why not. Check and increment happen
    /// under one lock, so concurrent attempts can never exceed the cap.
    pub fn admit(self: &Arc<Self>, user_id: &str) -> Result<SessionPermit, AdmitError> {
        self.admit_checked(user_id, true)
    }

    /// Admits a session that already holds its user's place elsewhere in the cluster (a
    /// resume arriving from another instance): only this instance's capacity is checked.
    pub fn admit_moved(self: &Arc<Self>, user_id: &str) -> Result<SessionPermit, AdmitError> {
        self.admit_checked(user_id, false)
    }

    fn admit_checked(
        self: &Arc<Self>,
        user_id: &str,
        per_user: bool,
    ) -> Result<SessionPermit, AdmitError> {
        let mut inner = self.lock();
        if inner.total >= self.max_total {
            return Err(AdmitError::AtCapacity);
        }
        let count = inner.per_user.entry(user_id.to_owned()).or_insert(0);
        if per_user && *count >= self.max_per_user {
            return Err(AdmitError::TooManySessions);
        }
        *count += 1;
        inner.total += 1;
        Self::publish(&inner);
        Ok(SessionPermit {
            registry: self.clone(),
            user_id: user_id.to_owned(),
            detached: false,
        })
    }

    /// Sessions of this instance (attached and detached).
    pub fn active(&self) -> usize {
        self.lock().total
    }

    /// Sessions waiting for a resume.
    pub fn detached(&self) -> usize {
        self.lock().detached
    }

    /// Sessions of `user_id`.
    pub fn sessions_of(&self, user_id: &str) -> u32 {
        self.lock().per_user.get(user_id).copied().unwrap_or(0)
    }

    /// Adds `micros` to `user_id`'s spend today.
    pub fn add_spend(&self, user_id: &str, micros: u64) {
        if micros == 0 {
            return;
        }
        let today = utc_day();
        let mut inner = self.lock();
        prune_spend(&mut inner, today);
        let entry = inner.spend.entry(user_id.to_owned()).or_insert((today, 0));
        if entry.0 != today {
            *entry = (today, 0);
        }
        entry.1 = entry.1.saturating_add(micros);
    }

    /// Sets `user_id`'s spend today to the cluster-wide total (scale-out mode).
    pub fn set_spent_today(&self, user_id: &str, micros: u64) {
        let today = utc_day();
        let mut inner = self.lock();
        prune_spend(&mut inner, today);
        inner.spend.insert(user_id.to_owned(), (today, micros));
    }

    /// What `user_id` has spent today on this instance, in micro-dollars.
    pub fn spent_today(&self, user_id: &str) -> u64 {
        let today = utc_day();
        self.lock()
            .spend
            .get(user_id)
            .filter(|(day, _)| *day == today)
            .map_or(0, |(_, m)| *m)
    }

    /// Makes a live session reachable for resumes.
    pub fn register_session(&self, session_id: &str, entry: ResumeEntry) {
        self.lock().live.insert(session_id.to_owned(), entry);
    }

    /// The session is over here: no resume reaches it any more. Call it after closing the
    /// session's attach queue: an entry whose queue is open belongs to a later copy of the same
    /// session on this instance (continued here while a stale copy was still ending) and stays.
    pub fn remove_session(&self, session_id: &str) {
        let mut inner = self.lock();
        if inner
            .live
            .get(session_id)
            .is_some_and(|e| !e.attach.is_closed())
        {
            return;
        }
        inner.live.remove(session_id);
        inner.tokens.retain(|_, sid| sid != session_id);
    }

    /// Makes `token` resume `session_id`.
    pub fn register_token(&self, token: &str, session_id: &str) {
        self.lock()
            .tokens
            .insert(token.to_owned(), session_id.to_owned());
    }

    /// Forgets `token`.
    pub fn remove_token(&self, token: &str) {
        self.lock().tokens.remove(token);
    }

    /// The live session `session_id`, if it belongs to `user_id`.
    pub fn find_session(&self, session_id: &str, user_id: &str) -> Option<ResumeEntry> {
        self.lock()
            .live
            .get(session_id)
            .filter(|e| e.user_id == user_id)
            .cloned()
    }

    /// The session `token` resumes, if it exists and belongs to `user_id`.
    pub fn find_resume(&self, token: &str, user_id: &str) -> Option<ResumeEntry> {
        let inner = self.lock();
        let sid = inner.tokens.get(token)?;
        inner
            .live
            .get(sid)
            .filter(|e| e.user_id == user_id)
            .cloned()
    }
}

/// Forgets earlier days' spend once per day.
fn prune_spend(inner: &mut Inner, today: u64) {
    if inner.spend_day != today {
        inner.spend.retain(|_, (day, _)| *day == today);
        inner.spend_day = today;
    }
}

fn utc_day() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400)
}

impl SessionPermit {
    /// Marks the session detached (awaiting resume) or attached again.
    pub fn set_detached(&mut self, detached: bool) {
        if self.detached != detached {
            self.detached = detached;
            let mut inner = self.registry.lock();
            if detached {
                inner.detached += 1;
            } else {
                inner.detached -= 1;
            }
            Registry::publish(&inner);
        }
    }
}

impl Drop for SessionPermit {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        if self.detached {
            inner.detached -= 1;
        }
        inner.total -= 1;
        if let Some(c) = inner.per_user.get_mut(&self.user_id) {
            *c -= 1;
            if *c == 0 {
                inner.per_user.remove(&self.user_id);
            }
        }
        Registry::publish(&inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_user_and_total_caps() {
        let r = Registry::new(2, 3);
        let a1 = r.admit("a").unwrap();
        let _a2 = r.admit("a").unwrap();
        assert_eq!(r.admit("a").unwrap_err(), AdmitError::TooManySessions);
        let _b1 = r.admit("b").unwrap();
        assert_eq!(r.admit("c").unwrap_err(), AdmitError::AtCapacity);
        drop(a1);
        assert_eq!(r.sessions_of("a"), 1);
        let _a3 = r.admit("a").unwrap();
        assert_eq!(r.active(), 3);
    }

    #[test]
    fn detached_sessions_still_count() {
        let r = Registry::new(1, 10);
        let mut p = r.admit("a").unwrap();
        p.set_detached(true);
        assert_eq!(r.detached(), 1);
        assert_eq!(r.admit("a").unwrap_err(), AdmitError::TooManySessions);
        drop(p);
        assert_eq!((r.active(), r.detached()), (0, 0));
        assert!(r.admit("a").is_ok());
    }

    #[test]
    fn concurrent_admission_never_exceeds_the_cap() {
        let r = Registry::new(3, 1000);
        let permits: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..50).map(|_| s.spawn(|| r.admit("u").ok())).collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(permits.len(), 3);
    }
}
