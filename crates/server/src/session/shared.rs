//! The session's link to the shared store (scale-out): its ownership, and one task that
//! carries out its Redis writes in order, each fenced by the current epoch, reporting answers
//! back to the session loop.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

use atlas_core::session::LeaseAnswer;

use crate::auth::Identity;
use crate::cluster::{Cluster, ClusterError, Fenced, Owned, Refreshed, ResumeState};

/// Answers of work the driver runs off the session loop (shared-store writes, token checks).
#[derive(Debug)]
pub enum Answer {
    /// A lease refresh sent at that instant was answered.
    Lease(LeaseAnswer, std::time::Instant),
    /// The user's spend today across instances.
    DailySpent(u64),
    /// An `auth.refresh` token was verified (or refused, with the reason).
    TokenRefreshed(Result<Identity, String>),
    /// A fenced write found that another claim owns the session.
    Stale,
    /// A server tool's webhook answered (the result as JSON text, or why it failed).
    ToolFinished(String, Result<String, String>),
    /// The end-of-turn model judged a pause: the probability that the turn is complete
    /// (`None`: it could not, being busy or broken).
    TurnScored(u64, Option<f32>),
}

/// Writes to the shared store for one session, carried out in order by one task.
pub enum ClusterOp {
    /// Extend the lease (sent at that instant).
    Refresh(std::time::Instant),
    /// Publish the resume state.
    Publish(Box<ResumeState>),
    /// Make a token resume the session.
    RegisterToken(String),
    /// A token no longer resumes the session.
    RetireToken(String),
    /// Add micro-dollars to the user's day.
    Spend(u64),
    /// The session ended for good: free its place.
    Release,
}

/// Shared-store writes queued per session.
pub const CLUSTER_QUEUE: usize = 64;

/// The session's link to the shared store (scale-out): its ownership and its write queue.
pub struct Shared {
    /// The shared store.
    pub cluster: Arc<Cluster>,
    /// This instance's claim on the session.
    pub owned: Arc<Mutex<Owned>>,
    /// The write queue.
    pub ops: mpsc::Sender<ClusterOp>,
    /// The task carrying the writes out.
    pub writer: JoinHandle<()>,
}

/// Runs a session's shared-store writes in order, each fenced by the current epoch.
pub async fn run_cluster_ops(
    cluster: Arc<Cluster>,
    owned: Arc<Mutex<Owned>>,
    mut ops: mpsc::Receiver<ClusterOp>,
    answers: mpsc::Sender<Answer>,
) {
    while let Some(op) = ops.recv().await {
        let me = owned.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let stale = match op {
            ClusterOp::Refresh(sent_at) => {
                let answer = match cluster.refresh(&me).await {
                    Ok(Fenced::Done(Refreshed::Extended)) => LeaseAnswer::Extended,
                    Ok(Fenced::Done(Refreshed::Reasserted)) => LeaseAnswer::Reasserted,
                    Ok(Fenced::Done(Refreshed::NoPlace)) => LeaseAnswer::NoPlace,
                    Ok(Fenced::Stale) => LeaseAnswer::Stale,
                    Err(e) => {
                        warn!(error = %e, "lease refresh failed");
                        LeaseAnswer::Unreachable
                    }
                };
                let _ = answers.send(Answer::Lease(answer, sent_at)).await;
                false
            }
            ClusterOp::Publish(state) => log_fenced(cluster.publish(&me, &state).await, "publish"),
            ClusterOp::RegisterToken(t) => {
                log_fenced(cluster.register_token(&me, &t).await, "register token")
            }
            ClusterOp::RetireToken(t) => {
                log_fenced(cluster.retire_token(&me, &t).await, "retire token")
            }
            // Retried while the store is unreachable (see `Cluster::release`).
            ClusterOp::Release => log_fenced(cluster.release(&me).await, "release"),
            ClusterOp::Spend(micros) => match cluster.add_spend(&me, micros).await {
                Ok(Fenced::Done(total)) => {
                    let _ = answers.send(Answer::DailySpent(total)).await;
                    false
                }
                Ok(Fenced::Stale) => true,
                Err(e) => {
                    warn!(error = %e, "could not record spend in the shared store");
                    false
                }
            },
        };
        if stale {
            let _ = answers.send(Answer::Stale).await;
        }
    }
}

/// True when the write was refused as stale.
fn log_fenced(r: Result<Fenced<()>, ClusterError>, what: &'static str) -> bool {
    match r {
        Ok(Fenced::Done(())) => false,
        Ok(Fenced::Stale) => true,
        Err(e) => {
            warn!(error = %e, what, "shared store write failed");
            false
        }
    }
}
