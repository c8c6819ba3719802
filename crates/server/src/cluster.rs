//! Scale-out coordination through Redis (`REDIS_URL`): the per-user session limit across
//! instances (an atomic script over a sorted set of leases), leases that expire on their own
//! when an instance dies, the daily budget across instances, and the resume directory that lets
//! a session dropped on one instance resume on another.
//!
//! Keys (under `ATLAS_REDIS_PREFIX`, default `atlas`):
//! - `{p}:leases:{user}` — sorted set: session id → lease expiry (Unix ms). Admission drops
//!   expired leases and admits while the set is below the limit; instances refresh their
//!   sessions' leases every third of the TTL.
//! - `{p}:spend:{user}:{day}` — micro-dollars spent on that UTC day (expires after two days).
//! - `{p}:resume:{token}` — a detached session's state (JSON), for the resume window.
//! - `{p}:owner:{session}` — the instance that owns the session now.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

/// Deadline for any Redis call: a person is waiting.
const CALL_TIMEOUT: Duration = Duration::from_millis(1500);

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

const ADMIT: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
";

// Refreshing (re-)adds the lease: an instance refreshes only sessions it owns, including one
// it adopted after the previous owner's lease had lapsed.
const REFRESH: &str = r"
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return false end
local ok, state = pcall(cjson.decode, v)
if not ok or state['user_id'] ~= ARGV[1] then return false end
redis.call('DEL', KEYS[1])
return v
";

/// What a session needs to continue on another instance.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResumeState {
    /// Session id (kept).
    pub session_id: String,
    /// Owner; only they may resume.
    pub user_id: String,
    /// Start of the session.
    pub started_wall: chrono::DateTime<chrono::Utc>,
    /// Conversation, oldest first: (is the user, text).
    pub history: Vec<(bool, String)>,
    /// Usage and running cost.
    pub usage: atlas_protocol::Usage,
    /// What was used, for costing: stt ms, llm in, out, cache read, cache write, tts chars.
    pub consumption: [u64; 6],
    /// Spend already added to the daily total.
    pub reported_spend: u64,
    /// Whether the budget warning was sent.
    pub budget_warned: bool,
    /// Turns so far.
    pub last_turn: u64,
    /// The turns' records (the final record is written by the last owner).
    pub turn_records: Vec<atlas_store::TurnRecord>,
    /// Application conversation id.
    pub conversation_id: Option<String>,
    /// Client description.
    pub client: Option<atlas_protocol::ClientInfo>,
}

/// The instance's handle on the shared state.
pub struct Cluster {
    conn: ConnectionManager,
    prefix: String,
    /// This instance's id.
    pub instance: String,
    lease_ttl: Duration,
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
    pub fn connect(url: &str, prefix: &str, lease_ttl: Duration) -> Result<Cluster, ClusterError> {
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

    /// Admits `session_id` for `user_id` if the user holds fewer than `max` live leases.
    pub async fn admit(
        &self,
        user_id: &str,
        session_id: &str,
        max: u32,
    ) -> Result<bool, ClusterError> {
        let now = now_ms();
        let ttl = self.lease_ttl.as_millis() as u64;
        let mut conn = self.conn.clone();
        let script = redis::Script::new(ADMIT);
        let ok: i64 = timed(
            script
                .key(self.key(&["leases", user_id]))
                .arg(now)
                .arg(now + ttl)
                .arg(session_id)
                .arg(max)
                .arg(ttl * 4)
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(ok == 1)
    }

    /// Extends the lease of a live session.
    pub async fn refresh(&self, user_id: &str, session_id: &str) -> Result<(), ClusterError> {
        let now = now_ms();
        let ttl = self.lease_ttl.as_millis() as u64;
        let mut conn = self.conn.clone();
        let _: i64 = timed(
            redis::Script::new(REFRESH)
                .key(self.key(&["leases", user_id]))
                .arg(now + ttl)
                .arg(session_id)
                .arg(ttl * 4)
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(())
    }

    /// Frees a session's place.
    pub async fn release(&self, user_id: &str, session_id: &str) -> Result<(), ClusterError> {
        let mut conn = self.conn.clone();
        let _: i64 = timed(conn.zrem(self.key(&["leases", user_id]), session_id)).await?;
        Ok(())
    }

    fn day() -> String {
        (now_ms() / 86_400_000).to_string()
    }

    /// Adds spend to the user's day; returns the day's total.
    pub async fn add_spend(&self, user_id: &str, micros: u64) -> Result<u64, ClusterError> {
        let key = self.key(&["spend", user_id, &Self::day()]);
        let mut conn = self.conn.clone();
        let total: u64 = timed(conn.incr(&key, micros)).await?;
        let _: bool = timed(conn.expire(&key, 2 * 86_400)).await?;
        Ok(total)
    }

    /// The user's spend today across instances.
    pub async fn spent_today(&self, user_id: &str) -> Result<u64, ClusterError> {
        let mut conn = self.conn.clone();
        let v: Option<u64> = timed(conn.get(self.key(&["spend", user_id, &Self::day()]))).await?;
        Ok(v.unwrap_or(0))
    }

    /// Publishes a detached session's state under `token` for `ttl`, and claims ownership.
    pub async fn publish_resume(
        &self,
        token: &str,
        state: &ResumeState,
        ttl: Duration,
    ) -> Result<(), ClusterError> {
        let body = serde_json::to_string(state).map_err(|e| ClusterError::Decode(e.to_string()))?;
        let ms = ttl.as_millis() as u64;
        let mut conn = self.conn.clone();
        let _: () = timed(conn.pset_ex(self.key(&["resume", token]), body, ms)).await?;
        self.set_owner(&state.session_id, ttl + self.lease_ttl)
            .await
    }

    /// Takes the state behind `token` if it belongs to `user_id` (at most one taker).
    pub async fn claim_resume(
        &self,
        token: &str,
        user_id: &str,
    ) -> Result<Option<ResumeState>, ClusterError> {
        let mut conn = self.conn.clone();
        let v: Option<String> = timed(
            redis::Script::new(CLAIM)
                .key(self.key(&["resume", token]))
                .arg(user_id)
                .invoke_async(&mut conn),
        )
        .await?;
        match v {
            None => Ok(None),
            Some(v) => serde_json::from_str(&v)
                .map(Some)
                .map_err(|e| ClusterError::Decode(e.to_string())),
        }
    }

    /// Forgets a resume token (the session resumed locally or ended).
    pub async fn remove_resume(&self, token: &str) -> Result<(), ClusterError> {
        let mut conn = self.conn.clone();
        let _: i64 = timed(conn.del(self.key(&["resume", token]))).await?;
        Ok(())
    }

    /// Records this instance as the session's owner.
    pub async fn set_owner(&self, session_id: &str, ttl: Duration) -> Result<(), ClusterError> {
        let mut conn = self.conn.clone();
        let _: () = timed(conn.pset_ex(
            self.key(&["owner", session_id]),
            &self.instance,
            ttl.as_millis() as u64,
        ))
        .await?;
        Ok(())
    }

    /// The session's owner, if recorded.
    pub async fn owner(&self, session_id: &str) -> Result<Option<String>, ClusterError> {
        let mut conn = self.conn.clone();
        timed(conn.get(self.key(&["owner", session_id]))).await
    }
}
