//! Admission: before the upgrade, whether a connection may start a new session or resume one,
//! and what it attaches to. One place for both cases, a single instance (this instance's
//! registry decides) and scale-out (Redis decides, atomically, across instances).

use axum::http::StatusCode;

use atlas_protocol::ErrorCode;

use crate::cluster::{Claim, ClusterError};
use crate::error::ApiError;
use crate::registry::AdmitError;
use crate::session::Upgrade;
use crate::state::AppState;

/// Why a connection is refused before the upgrade.
#[derive(Debug)]
pub enum Refusal {
    /// The resume token names no resumable session of this user.
    UnknownResume,
    /// The user holds the maximum number of sessions.
    TooManySessions,
    /// This instance is full.
    AtCapacity,
    /// The user's daily budget cannot pay for one more reply.
    BudgetExhausted,
    /// The shared store did not answer.
    Unavailable(ClusterError),
}

impl Refusal {
    /// Bounded label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::UnknownResume => "resume_failed",
            Refusal::TooManySessions => "too_many_sessions",
            Refusal::AtCapacity => "at_capacity",
            Refusal::BudgetExhausted => "budget_exhausted",
            Refusal::Unavailable(_) => "cluster_unavailable",
        }
    }

    /// The HTTP refusal the client gets.
    pub fn into_error(self, state: &AppState) -> ApiError {
        match self {
            Refusal::UnknownResume => ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::ResumeFailed,
                "unknown or expired resume token; start a new session",
            ),
            Refusal::TooManySessions => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManySessions,
                format!(
                    "at most {} concurrent sessions per user",
                    state.config.max_sessions_per_user
                ),
            ),
            Refusal::AtCapacity => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::AtCapacity,
                "the server is at capacity; retry shortly or connect elsewhere",
            ),
            Refusal::BudgetExhausted => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::BudgetExhausted,
                "today's budget for this user is spent",
            ),
            Refusal::Unavailable(e) => {
                tracing::warn!(error = %e, "scale-out store unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::AtCapacity,
                    "the session service is temporarily unavailable; retry shortly",
                )
            }
        }
    }
}

impl From<ClusterError> for Refusal {
    fn from(e: ClusterError) -> Self {
        Refusal::Unavailable(e)
    }
}

impl From<AdmitError> for Refusal {
    fn from(e: AdmitError) -> Self {
        match e {
            AdmitError::TooManySessions => Refusal::TooManySessions,
            AdmitError::AtCapacity => Refusal::AtCapacity,
        }
    }
}

/// Whether `user_id` could start a session now, without taking a place: the daily budget, the
/// per-user limit and this instance's capacity (a phone call's webhook answers with this, and
/// the call's stream is admitted for real moments later).
pub async fn check(state: &AppState, user_id: &str) -> Result<(), Refusal> {
    affordable(state, user_id).await?;
    if state.registry.sessions_of(user_id) >= state.config.max_sessions_per_user {
        return Err(Refusal::TooManySessions);
    }
    if state.registry.active() >= state.config.max_sessions {
        return Err(Refusal::AtCapacity);
    }
    Ok(())
}

/// Refuses a session that could not afford even one reply today.
async fn affordable(state: &AppState, user_id: &str) -> Result<(), Refusal> {
    if let Some(daily) = state.config.user_daily_budget_usd {
        let spent = match &state.cluster {
            Some(cluster) => cluster.spent_today(user_id).await?,
            None => state.registry.spent_today(user_id),
        };
        let one_reply = state
            .prices
            .reply_estimate(
                state.config.system_prompt.len(),
                u64::from(state.config.llm_max_tokens),
            )
            .unwrap_or(0);
        let limit = atlas_core::cost::from_usd(daily);
        if atlas_core::session::ledger::daily_exhausted(limit, spent, one_reply) {
            return Err(Refusal::BudgetExhausted);
        }
    }
    Ok(())
}

/// A resume. It takes no new place: the session kept its own while detached, so
/// reconnecting never resets a limit.
pub async fn resume(state: &AppState, token: &str, user_id: &str) -> Result<Upgrade, Refusal> {
    let Some(cluster) = &state.cluster else {
        // A single instance: its registry knows every session.
        return state
            .registry
            .find_resume(token, user_id)
            .map(|entry| Upgrade::Resume(entry, None))
            .ok_or(Refusal::UnknownResume);
    };
    // Scale-out: every resume, local ones included, claims the session pending the client's
    // handshake; the claim is committed (and the owner fenced off) only once the handshake is
    // done, so a resume that never completes leaves the session with its owner.
    let (claim, owner, published) = match cluster.claim(token, user_id).await? {
        Claim::Unknown => return Err(Refusal::UnknownResume),
        Claim::NoPlace => return Err(Refusal::TooManySessions),
        Claim::Pending {
            claim,
            owner,
            published,
        } => (claim, owner, published),
    };
    let local = (owner == cluster.instance)
        .then(|| state.registry.find_session(&claim.session_id, user_id))
        .flatten();
    let upgrade = match local {
        Some(entry) => Ok(Upgrade::Resume(entry, Some(claim.clone()))),
        None if published => state
            .registry
            .admit_moved(user_id)
            .map(|permit| Upgrade::Adopt(permit, claim.clone()))
            .map_err(Refusal::from),
        None => Err(Refusal::UnknownResume),
    };
    if upgrade.is_err() {
        let _ = cluster.abandon(&claim).await;
    }
    upgrade
}

/// A new session: under the user's limit (here, or across instances) and the daily budget.
pub async fn admit(state: &AppState, user_id: &str) -> Result<Upgrade, Refusal> {
    affordable(state, user_id).await?;
    let permit = state.registry.admit(user_id)?;
    let session_id = uuid::Uuid::new_v4().to_string();
    // Across instances, the per-user limit is decided by one atomic script.
    let owned = match &state.cluster {
        Some(cluster) => Some(
            cluster
                .admit(user_id, &session_id)
                .await?
                .ok_or(Refusal::TooManySessions)?,
        ),
        None => None,
    };
    Ok(Upgrade::New(permit, session_id, owned))
}
