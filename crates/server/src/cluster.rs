//! Scale-out coordination through Redis (`REDIS_URL`): the per-user session limit across
//! instances, fenced ownership of each session, its replicated resume state, and the daily
//! budget across instances.
//!
//! **One owner at a time.** Creating a session is one atomic script. Taking it over by a resume
//! token (on any instance, the owner's own included) is a two-step hand-over: the upgrade
//! *claims* it (a pending claim with the next epoch and a short deadline, which changes
//! nothing for the owner), and only when the resuming client has completed its
//! `session.start` does the new owner *commit* the claim, which makes its epoch the session's
//! and returns the latest published state. A claim that is never committed expires and the
//! session stays with its owner; of racing claims only the latest can commit. Every write an
//! instance makes for a session — lease refresh, resume state, tokens, spend, release — runs a
//! script that first checks the writer's epoch: a higher epoch in the store (a positive sign
//! of another owner) refuses it, so an owner that lost its session can neither serve (it
//! learns at its next write and closes the connection with 4409) nor write.
//!
//! **Losing Redis's data is not losing the session.** A write that finds the session's entry
//! gone (a restart without persistence, a failover, an eviction) re-asserts it with the
//! writer's epoch instead of concluding that another owner took it; the lease refresh says so
//! and the session publishes its state and its tokens again. "Moved" is concluded only from a
//! higher epoch, never from absence.
//!
//! **Sessions survive their instance.** The owner publishes the session's state after every
//! turn and on detach; after a crash, a resume on any instance claims it with history, usage
//! and budget intact.
//!
//! Keys (under `ATLAS_REDIS_PREFIX`, default `atlas`):
//! - `{p}:leases:{user}` — sorted set: session id → lease expiry (Unix ms, Redis's clock).
//!   Admission drops expired leases and admits while the set is below the limit; owners refresh
//!   every third of the TTL; a lapsed lease is taken back only under the limit. A session whose
//!   lease could not be refreshed for its whole TTL ends on its instance before Redis would
//!   give its place away.
//! - `{p}:session:{id}` — hash: `user`, `owner` (instance), `epoch`, `state` (JSON), and a
//!   pending claim (`claim` epoch, `claimer` instance, `claim_until` ms), kept for a lease plus
//!   a resume window after the last refresh.
//! - `{p}:token:{token}` — the session a resume token leads to.
//! - `{p}:spend:{user}:{day}` — micro-dollars spent on that UTC day (expires after two days).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

/// Deadline for any Redis call: a person is waiting.
const CALL_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long a claim waits for its client's `session.start` (the start timeout and a margin).
pub const CLAIM_TTL: Duration =
    Duration::from_secs(atlas_core::session::prestart::START_TIMEOUT.as_secs() + 5);

/// A Redis problem.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Redis did not answer in time.
    #[error("redis timed out")]
    Timeout,
    /// Redis refused or failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A stored value could not be read.
    #[error("bad stored state: {0}")]
    Decode(String),
}

// Every script reads the time from Redis, so instances with skewed clocks agree on leases.
// `now` in milliseconds.
const NOW: &str =
    "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n";

// A new session: a place under the user's limit, and ownership at epoch 1.
// KEYS: leases, session. ARGV: session id, max, lease ttl ms, instance, session ttl ms, user.
const ADMIT: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 4)
redis.call('HSET', KEYS[2], 'user', ARGV[6], 'owner', ARGV[4], 'epoch', 1)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
";

// Resume, first step (on any instance, the owner's included): a pending claim with an epoch
// above every epoch and claim so far, valid for the handshake; the owner is not touched. A
// lease that lapsed (its instance died) is taken back only under the user's limit.
// KEYS: token. ARGV: user, max, lease ttl ms, instance, session ttl ms, key prefix, claim ttl ms.
// Returns {0} unknown, {-1} no place, {1, session id, claim epoch, owner, 1 if a state was
// published else 0}.
const CLAIM: &str = r"
local sid = redis.call('GET', KEYS[1])
if not sid then return {0} end
local hk = ARGV[6] .. ':session:' .. sid
local h = redis.call('HMGET', hk, 'user', 'owner', 'epoch', 'claim')
if not h[1] or h[1] ~= ARGV[1] then return {0} end
local lk = ARGV[6] .. ':leases:' .. ARGV[1]
redis.call('ZREMRANGEBYSCORE', lk, '-inf', now)
if not redis.call('ZSCORE', lk, sid) and redis.call('ZCARD', lk) >= tonumber(ARGV[2]) then
  return {-1}
end
redis.call('ZADD', lk, now + tonumber(ARGV[3]), sid)
redis.call('PEXPIRE', lk, tonumber(ARGV[3]) * 4)
local claim = math.max(tonumber(h[3]) or 0, tonumber(h[4]) or 0) + 1
redis.call('HSET', hk, 'claim', claim, 'claimer', ARGV[4], 'claim_until', now + tonumber(ARGV[7]))
redis.call('PEXPIRE', hk, ARGV[5])
local published = 0
if redis.call('HSTRLEN', hk, 'state') > 0 then published = 1 end
return {1, sid, claim, h[2] or '', published}
";

// Resume, second step: the client completed its handshake; the claim (still the latest, not
// expired) becomes the session's epoch and this instance its owner.
// KEYS: session. ARGV: claim epoch, instance, session ttl ms, '1' to return the state.
// Returns {0} lost (expired, overtaken, or the session ended), {1, state or ''}.
const COMMIT: &str = r"
local h = redis.call('HMGET', KEYS[1], 'claim', 'claimer', 'claim_until')
if not h[1] or h[1] ~= ARGV[1] or h[2] ~= ARGV[2] or tonumber(h[3]) < now then return {0} end
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'owner', ARGV[2])
redis.call('HDEL', KEYS[1], 'claim', 'claimer', 'claim_until')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[4] ~= '1' then return {1, ''} end
return {1, redis.call('HGET', KEYS[1], 'state') or ''}
";

// A claim whose client went away before its handshake: the session stays with its owner.
// KEYS: session. ARGV: claim epoch, instance.
const ABANDON: &str = r"
local h = redis.call('HMGET', KEYS[1], 'claim', 'claimer')
if h[1] == ARGV[1] and h[2] == ARGV[2] then
  redis.call('HDEL', KEYS[1], 'claim', 'claimer', 'claim_until')
end
return 1
";

// The fence every write passes. A higher epoch in the store is another owner: refused. A
// missing entry is data Redis lost: the writer re-asserts it (`reasserted` = 1) and marks it
// `lost` until the next lease refresh reports it, whichever write came first. A lower one
// is an older owner's re-assertion after such a loss: this writer's epoch replaces it.
// ARGV: epoch, user, instance, session ttl ms; each script's own arguments follow.
const FENCE: &str = r"
local stored = tonumber(redis.call('HGET', KEYS[1], 'epoch'))
local mine = tonumber(ARGV[1])
if stored and stored > mine then return -1 end
local reasserted = 0
if not stored then
  redis.call('HSET', KEYS[1], 'user', ARGV[2], 'owner', ARGV[3], 'epoch', mine, 'lost', 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  reasserted = 1
elseif stored < mine then
  redis.call('HSET', KEYS[1], 'owner', ARGV[3], 'epoch', mine)
end
";

// Lease refresh. KEYS: session, leases. ARGV: (fence), session id, lease ttl ms, max.
// Returns 1, 2 re-asserted after data loss, -1 stale, -2 lapsed without a place.
const REFRESH: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if not redis.call('ZSCORE', KEYS[2], ARGV[5]) and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[7]) then
  return -2
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[5])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[6]) * 4)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
-- Whichever write re-created the entry, the refresh reports it (once), so the owner
-- publishes its state and tokens again.
if redis.call('HDEL', KEYS[1], 'lost') == 1 then reasserted = 1 end
return 1 + reasserted
";

// KEYS: session. ARGV: (fence), state.
const PUBLISH: &str = r"
redis.call('HSET', KEYS[1], 'state', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

// KEYS: session, token. ARGV: (fence), session id, token ttl ms.
const REGISTER_TOKEN: &str = r"
redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[6])
return 1
";

// KEYS: session, token. ARGV: (fence), session id.
const RETIRE_TOKEN: &str = r"
if redis.call('GET', KEYS[2]) == ARGV[5] then redis.call('DEL', KEYS[2]) end
return 1
";

// KEYS: session, spend. ARGV: (fence), micros. Returns the day's total.
const ADD_SPEND: &str = r"
local total = redis.call('INCRBY', KEYS[2], ARGV[5])
redis.call('EXPIRE', KEYS[2], 172800)
return total
";

// The session ended for good: its place is freed and its entry becomes a tombstone that
// keeps only the epoch, for as long as an entry lives. A stale owner that has not learned it
// lost the session meets that epoch (a positive sign) rather than an absence it would take
// for lost data and re-assert; a claim finds no user and resumes nothing.
// KEYS: session, leases. ARGV: (fence), session id.
const RELEASE: &str = r"
redis.call('ZREM', KEYS[2], ARGV[5])
redis.call('HDEL', KEYS[1], 'user', 'owner', 'state', 'claim', 'claimer', 'claim_until', 'lost')
redis.call('HSET', KEYS[1], 'ended', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

/// Ownership of one session by this instance: its id and epoch. Every write for the session
/// carries it and is refused once another claim bumped the epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owned {
    /// The session.
    pub session_id: String,
    /// Its owner.
    pub user_id: String,
    /// The epoch of this instance's claim.
    pub epoch: u64,
}

/// A fenced write's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fenced<T> {
    /// Done.
    Done(T),
    /// Another claim owns the session now; nothing was written.
    Stale,
}

/// What a claim found.
#[derive(Debug)]
pub enum Claim {
    /// The token resumes nothing (unknown, expired, or another user's).
    Unknown,
    /// The session's lease lapsed and the user's places are taken.
    NoPlace,
    /// Claimed, pending the client's handshake ([`Cluster::commit`]).
    Pending {
        /// The ownership this instance gets when it commits the claim.
        claim: Owned,
        /// The instance that owns it now (this one for a local resume).
        owner: String,
        /// Whether the owner published a state another instance can continue from.
        published: bool,
    },
}

/// How a lease refresh went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refreshed {
    /// Extended.
    Extended,
    /// The store had lost the session's entry; it was re-asserted (publish state and tokens
    /// again).
    Reasserted,
    /// The lease had lapsed and the user's places are taken meanwhile.
    NoPlace,
}

/// What a session needs to continue on another instance.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResumeState {
    /// Session id (kept).
    pub session_id: String,
    /// Owner; only they may resume.
    pub user_id: String,
    /// Start of the session.
    pub started_wall: chrono::DateTime<chrono::Utc>,
    /// Conversation, turns and the ledger.
    pub carried: atlas_core::session::Carried,
    /// The turns' records (the final record is written by the last owner).
    pub turn_records: Vec<atlas_store::TurnRecord>,
    /// Tool calls so far, for the record.
    #[serde(default)]
    pub tool_records: Vec<atlas_store::ToolCallRecord>,
    /// Application conversation id.
    pub conversation_id: Option<String>,
    /// Client description.
    pub client: Option<atlas_protocol::ClientInfo>,
    /// The session's trace as a W3C `traceparent`, while tracing is on: the next owner's
    /// session span continues it, so a session is one trace wherever it runs (and one the
    /// sampler left out stays left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// The instance's handle on the shared state.
pub struct Cluster {
    conn: ConnectionManager,
    prefix: String,
    /// This instance's id.
    pub instance: String,
    lease_ttl: Duration,
    /// How long a session's shared record outlives its last refresh: a lease and a resume
    /// window, so a crashed owner's session can be resumed for the whole window.
    session_ttl: Duration,
    /// How long a resume token is kept (the longest session plus a resume window).
    token_ttl: Duration,
    max_per_user: u32,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn timed<T>(
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, ClusterError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Err(_) => Err(ClusterError::Timeout),
        Ok(r) => Ok(r?),
    }
}

impl Cluster {
    /// Connects lazily: the server starts while Redis is down (and refuses new sessions).
    pub fn connect(
        url: &str,
        prefix: &str,
        lease_ttl: Duration,
        resume_window: Duration,
        max_duration: Duration,
        max_per_user: u32,
    ) -> Result<Cluster, ClusterError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Cluster {
            conn,
            prefix: prefix.to_owned(),
            instance: uuid::Uuid::new_v4().to_string(),
            lease_ttl,
            session_ttl: lease_ttl + resume_window,
            token_ttl: max_duration + resume_window,
            max_per_user,
        })
    }

    /// How long a lease lasts without a refresh.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    fn script(body: &str) -> redis::Script {
        redis::Script::new(&format!("{NOW}{body}"))
    }

    fn fenced(body: &str) -> redis::Script {
        redis::Script::new(&format!("{NOW}{FENCE}{body}"))
    }

    fn ms(d: Duration) -> u64 {
        d.as_millis() as u64
    }

    /// Admits a new session for `user_id` if the user holds fewer live leases than the
    /// limit, and makes this instance its owner.
    pub async fn admit(
        &self,
        user_id: &str,
        session_id: &str,
    ) -> Result<Option<Owned>, ClusterError> {
        let mut conn = self.conn.clone();
        let ok: i64 = timed(
            Self::script(ADMIT)
                .key(self.key(&["leases", user_id]))
                .key(self.key(&["session", session_id]))
                .arg(session_id)
                .arg(self.max_per_user)
                .arg(Self::ms(self.lease_ttl))
                .arg(&self.instance)
                .arg(Self::ms(self.session_ttl))
                .arg(user_id)
                .invoke_async(&mut conn),
        )
        .await?;
        Ok((ok == 1).then(|| Owned {
            session_id: session_id.to_owned(),
            user_id: user_id.to_owned(),
            epoch: 1,
        }))
    }

    /// Claims the session behind a resume token for `user_id`, pending the client's
    /// handshake: nothing changes for the owner until [`commit`](Self::commit).
    pub async fn claim(&self, token: &str, user_id: &str) -> Result<Claim, ClusterError> {
        let mut conn = self.conn.clone();
        let v: redis::Value = timed(
            Self::script(CLAIM)
                .key(self.key(&["token", token]))
                .arg(user_id)
                .arg(self.max_per_user)
                .arg(Self::ms(self.lease_ttl))
                .arg(&self.instance)
                .arg(Self::ms(self.session_ttl))
                .arg(&self.prefix)
                .arg(Self::ms(CLAIM_TTL))
                .invoke_async(&mut conn),
        )
        .await?;
        let (code, rest) = split_code(v)?;
        match code {
            0 => Ok(Claim::Unknown),
            -1 => Ok(Claim::NoPlace),
            _ => {
                let (session_id, epoch, owner, published): (String, u64, String, i64) =
                    redis::from_redis_value(redis::Value::Array(rest)).map_err(decode)?;
                Ok(Claim::Pending {
                    claim: Owned {
                        session_id,
                        user_id: user_id.to_owned(),
                        epoch,
                    },
                    owner,
                    published: published == 1,
                })
            }
        }
    }

    /// Completes a hand-over once the resuming client's handshake is done: the claim becomes
    /// the session's epoch. `None`: the claim was overtaken or expired, or the session ended
    /// (its owner keeps it, or nobody does); otherwise the latest published state.
    pub async fn commit(
        &self,
        claim: &Owned,
    ) -> Result<Option<Option<Box<ResumeState>>>, ClusterError> {
        let Some(state) = self.commit_inner(claim, true).await? else {
            return Ok(None);
        };
        if state.is_empty() {
            return Ok(Some(None));
        }
        let state = serde_json::from_str(&state).map_err(decode)?;
        Ok(Some(Some(Box::new(state))))
    }

    /// [`Cluster::commit`] for a session that runs on this instance already (its state is
    /// here, not read back): whether the hand-over completed.
    pub async fn commit_here(&self, claim: &Owned) -> Result<bool, ClusterError> {
        Ok(self.commit_inner(claim, false).await?.is_some())
    }

    async fn commit_inner(
        &self,
        claim: &Owned,
        with_state: bool,
    ) -> Result<Option<String>, ClusterError> {
        let mut conn = self.conn.clone();
        let v: redis::Value = timed(
            Self::script(COMMIT)
                .key(self.key(&["session", &claim.session_id]))
                .arg(claim.epoch)
                .arg(&self.instance)
                .arg(Self::ms(self.session_ttl))
                .arg(if with_state { "1" } else { "0" })
                .invoke_async(&mut conn),
        )
        .await?;
        let (code, rest) = split_code(v)?;
        if code != 1 {
            return Ok(None);
        }
        let (state,): (String,) =
            redis::from_redis_value(redis::Value::Array(rest)).map_err(decode)?;
        Ok(Some(state))
    }

    /// Gives a claim up (its client left before the handshake): the owner keeps the session.
    pub async fn abandon(&self, claim: &Owned) -> Result<(), ClusterError> {
        let mut conn = self.conn.clone();
        let _: i64 = timed(
            Self::script(ABANDON)
                .key(self.key(&["session", &claim.session_id]))
                .arg(claim.epoch)
                .arg(&self.instance)
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(())
    }

    /// Runs the fenced script `body`: the fence's arguments, then those `args` adds.
    async fn run_fenced<T: redis::FromRedisValue>(
        &self,
        body: &str,
        owned: &Owned,
        args: impl FnOnce(&mut redis::ScriptInvocation<'_>),
    ) -> Result<Fenced<T>, ClusterError> {
        let script = Self::fenced(body);
        let mut inv = script.prepare_invoke();
        inv.key(self.key(&["session", &owned.session_id]))
            .arg(owned.epoch)
            .arg(&owned.user_id)
            .arg(&self.instance)
            .arg(Self::ms(self.session_ttl));
        args(&mut inv);
        let mut conn = self.conn.clone();
        let v: redis::Value = timed(inv.invoke_async(&mut conn)).await?;
        if matches!(v, redis::Value::Int(-1)) {
            return Ok(Fenced::Stale);
        }
        redis::from_redis_value(v).map(Fenced::Done).map_err(decode)
    }

    /// [`Self::run_fenced`] for a script whose answer only tells whether the fence held.
    async fn run_fenced_unit(
        &self,
        body: &str,
        owned: &Owned,
        args: impl FnOnce(&mut redis::ScriptInvocation<'_>),
    ) -> Result<Fenced<()>, ClusterError> {
        Ok(self.run_fenced::<i64>(body, owned, args).await?.map(|_| ()))
    }

    /// Extends the session's lease (re-asserting its entry if the store lost it).
    pub async fn refresh(&self, owned: &Owned) -> Result<Fenced<Refreshed>, ClusterError> {
        let refreshed = self.run_fenced::<i64>(REFRESH, owned, |inv| {
            inv.key(self.key(&["leases", &owned.user_id]))
                .arg(&owned.session_id)
                .arg(Self::ms(self.lease_ttl))
                .arg(self.max_per_user);
        });
        Ok(refreshed.await?.map(|v| match v {
            1 => Refreshed::Extended,
            2 => Refreshed::Reasserted,
            _ => Refreshed::NoPlace,
        }))
    }

    /// Publishes the session's state, from which any instance can continue it.
    pub async fn publish(
        &self,
        owned: &Owned,
        state: &ResumeState,
    ) -> Result<Fenced<()>, ClusterError> {
        let body = serde_json::to_string(state).map_err(decode)?;
        self.run_fenced_unit(PUBLISH, owned, |inv| {
            inv.arg(body);
        })
        .await
    }

    /// Makes `token` resume the session.
    pub async fn register_token(
        &self,
        owned: &Owned,
        token: &str,
    ) -> Result<Fenced<()>, ClusterError> {
        self.run_fenced_unit(REGISTER_TOKEN, owned, |inv| {
            inv.key(self.key(&["token", token]))
                .arg(&owned.session_id)
                .arg(Self::ms(self.token_ttl));
        })
        .await
    }

    /// `token` no longer resumes the session.
    pub async fn retire_token(
        &self,
        owned: &Owned,
        token: &str,
    ) -> Result<Fenced<()>, ClusterError> {
        self.run_fenced_unit(RETIRE_TOKEN, owned, |inv| {
            inv.key(self.key(&["token", token])).arg(&owned.session_id);
        })
        .await
    }

    /// Adds the session's spend to its user's day; returns the day's total.
    pub async fn add_spend(&self, owned: &Owned, micros: u64) -> Result<Fenced<u64>, ClusterError> {
        self.run_fenced(ADD_SPEND, owned, |inv| {
            inv.key(self.key(&["spend", &owned.user_id, &Self::day()]))
                .arg(micros);
        })
        .await
    }

    /// Frees the session's place; what remains is a tombstone with its epoch.
    ///
    /// Until the store takes it, an ended session's entry and tokens could give it a second
    /// life on a resume, and its lease keeps a place of the user's: retried with backoff while
    /// the store is unreachable (about 13 s in all), then the error is returned.
    pub async fn release(&self, owned: &Owned) -> Result<Fenced<()>, ClusterError> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.release_once(owned).await {
                Err(e) if delay < Duration::from_secs(10) => {
                    tracing::warn!(error = %e, "could not release the session; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                result => return result,
            }
        }
    }

    async fn release_once(&self, owned: &Owned) -> Result<Fenced<()>, ClusterError> {
        self.run_fenced_unit(RELEASE, owned, |inv| {
            inv.key(self.key(&["leases", &owned.user_id]))
                .arg(&owned.session_id);
        })
        .await
    }

    fn day() -> String {
        (now_ms() / 86_400_000).to_string()
    }

    /// The user's spend today across instances.
    pub async fn spent_today(&self, user_id: &str) -> Result<u64, ClusterError> {
        let mut conn = self.conn.clone();
        let v: Option<u64> = timed(conn.get(self.key(&["spend", user_id, &Self::day()]))).await?;
        Ok(v.unwrap_or(0))
    }
}

fn decode(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Decode(e.to_string())
}

/// A script's `{code, ...}` answer.
fn split_code(v: redis::Value) -> Result<(i64, Vec<redis::Value>), ClusterError> {
    match v {
        redis::Value::Array(mut items) if !items.is_empty() => {
            let code = redis::from_redis_value(items.remove(0)).map_err(decode)?;
            Ok((code, items))
        }
        other => Err(ClusterError::Decode(format!("answered {other:?}"))),
    }
}

impl<T> Fenced<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Fenced<U> {
        match self {
            Fenced::Done(v) => Fenced::Done(f(v)),
            Fenced::Stale => Fenced::Stale,
        }
    }
}
