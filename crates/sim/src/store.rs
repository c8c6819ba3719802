//! The shared store as the session sees it (scale-out): the semantics of the Redis scripts in
//! `crates/server/src/cluster.rs` — admission under the user's limit, the two-step claim
//! (pending, then committed by the resuming client's handshake), the fence every write passes
//! (refused only on a higher epoch; a lost entry is re-asserted), leases with TTLs — over a
//! clock in milliseconds, with the faults Redis has: losing everything, being unreachable.

use std::collections::{BTreeMap, HashMap};

/// One session's entry.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Owner epoch.
    pub epoch: u64,
    /// Owning instance.
    pub owner: usize,
    /// A pending claim: epoch, instance, deadline (ms).
    pub claim: Option<(u64, usize, u64)>,
    /// Published state (an index into the simulation's published states).
    pub state: Option<usize>,
    /// Released: a tombstone keeping only the epoch.
    pub ended: bool,
    /// Re-created by a write after the store lost it, not yet reported by a lease refresh
    /// (whose owner must then publish its state and tokens again).
    pub lost: bool,
}

/// A fenced write's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// Done.
    Done,
    /// Done after re-asserting an entry the store had lost.
    Reasserted,
    /// A higher epoch owns the session.
    Stale,
}

/// A lease refresh's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refresh {
    /// Extended (`true`: re-asserted after data loss).
    Extended(bool),
    /// Stale.
    Stale,
    /// The lease lapsed and the places are taken.
    NoPlace,
}

/// The simulated Redis.
#[derive(Debug, Default)]
pub struct Store {
    /// Sessions by id.
    pub sessions: HashMap<u64, Entry>,
    /// Leases: session → expiry (ms), one user.
    pub leases: BTreeMap<u64, u64>,
    /// Resume tokens → session.
    pub tokens: HashMap<String, u64>,
    /// The user's spend today.
    pub spend: u64,
    /// When the store last lost its data (ms).
    pub lost_at: Option<u64>,
}

impl Store {
    fn prune(&mut self, now: u64) {
        self.leases.retain(|_, exp| *exp > now);
    }

    /// A new session under the limit.
    pub fn admit(&mut self, sid: u64, instance: usize, max: usize, ttl: u64, now: u64) -> bool {
        self.prune(now);
        if self.leases.len() >= max {
            return false;
        }
        self.leases.insert(sid, now + ttl);
        self.sessions.insert(
            sid,
            Entry {
                epoch: 1,
                owner: instance,
                claim: None,
                state: None,
                ended: false,
                lost: false,
            },
        );
        true
    }

    /// First step of a resume: `Err(true)` no place, `Err(false)` unknown.
    pub fn claim(
        &mut self,
        token: &str,
        instance: usize,
        max: usize,
        ttl: u64,
        claim_ttl: u64,
        now: u64,
    ) -> Result<(u64, u64, usize, bool), bool> {
        let sid = *self.tokens.get(token).ok_or(false)?;
        if self.sessions.get(&sid).is_none_or(|e| e.ended) {
            return Err(false);
        }
        self.prune(now);
        if !self.leases.contains_key(&sid) && self.leases.len() >= max {
            return Err(true);
        }
        self.leases.insert(sid, now + ttl);
        let e = self.sessions.get_mut(&sid).ok_or(false)?;
        let epoch = e.epoch.max(e.claim.map_or(0, |c| c.0)) + 1;
        e.claim = Some((epoch, instance, now + claim_ttl));
        Ok((sid, epoch, e.owner, e.state.is_some()))
    }

    /// Second step: the client's handshake is done.
    pub fn commit(
        &mut self,
        sid: u64,
        epoch: u64,
        instance: usize,
        now: u64,
    ) -> Option<Option<usize>> {
        let e = self.sessions.get_mut(&sid)?;
        match e.claim {
            Some((c, i, until)) if c == epoch && i == instance && until >= now => {
                e.epoch = epoch;
                e.owner = instance;
                e.claim = None;
                Some(e.state)
            }
            _ => None,
        }
    }

    /// The claim's client left before its handshake.
    pub fn abandon(&mut self, sid: u64, epoch: u64, instance: usize) {
        if let Some(e) = self.sessions.get_mut(&sid)
            && e.claim.is_some_and(|(c, i, _)| c == epoch && i == instance)
        {
            e.claim = None;
        }
    }

    /// The fence.
    pub fn fence(&mut self, sid: u64, epoch: u64, instance: usize) -> Write {
        match self.sessions.get_mut(&sid) {
            Some(e) if e.epoch > epoch => Write::Stale,
            Some(e) => {
                if e.epoch < epoch {
                    e.epoch = epoch;
                    e.owner = instance;
                }
                Write::Done
            }
            None => {
                self.sessions.insert(
                    sid,
                    Entry {
                        epoch,
                        owner: instance,
                        claim: None,
                        state: None,
                        ended: false,
                        lost: true,
                    },
                );
                Write::Reasserted
            }
        }
    }

    /// Lease refresh.
    pub fn refresh(
        &mut self,
        sid: u64,
        epoch: u64,
        instance: usize,
        max: usize,
        ttl: u64,
        now: u64,
    ) -> Refresh {
        let w = self.fence(sid, epoch, instance);
        if w == Write::Stale {
            return Refresh::Stale;
        }
        self.prune(now);
        if !self.leases.contains_key(&sid) && self.leases.len() >= max {
            return Refresh::NoPlace;
        }
        self.leases.insert(sid, now + ttl);
        // Whichever write re-created the entry, the refresh reports it (once).
        let lost = self
            .sessions
            .get_mut(&sid)
            .is_some_and(|e| std::mem::take(&mut e.lost));
        Refresh::Extended(lost)
    }

    /// Frees the session's place; its entry becomes a tombstone with its epoch.
    pub fn release(&mut self, sid: u64, epoch: u64, instance: usize) -> Write {
        let w = self.fence(sid, epoch, instance);
        if w != Write::Stale {
            self.leases.remove(&sid);
            if let Some(e) = self.sessions.get_mut(&sid) {
                e.ended = true;
                e.claim = None;
                e.state = None;
                e.lost = false;
            }
        }
        w
    }

    /// Redis restarted without persistence.
    pub fn lose_everything(&mut self, now: u64) {
        *self = Store {
            lost_at: Some(now),
            ..Store::default()
        };
    }
}
