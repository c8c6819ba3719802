//! The shared state of a running server, handed to every handler and session.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::engines::Engines;
use crate::registry::Registry;

/// Shared state of the running server.
#[derive(Clone)]
pub struct AppState(pub(crate) Arc<Inner>);

/// What [`AppState`] holds.
pub struct Inner {
    /// Validated configuration.
    pub config: Config,
    /// Token verifier.
    pub auth: Authenticator,
    /// Provider adapters.
    pub engines: Engines,
    /// Cancelled when the server starts draining.
    pub shutdown: CancellationToken,
    /// Tracks live sessions so the drain can wait for them.
    pub sessions: TaskTracker,
    /// Admission, capacity and the resume directory.
    pub registry: Arc<Registry>,
    /// Connection attempts per client address.
    pub connect_limiter: crate::client_addr::ConnectLimiter,
    /// Renders `/metrics`.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Unit prices of the configured engines (unset where the catalog does not know a model).
    pub prices: atlas_core::cost::Prices,
    /// Version of the price catalog in use, recorded with sessions.
    pub catalog_version: String,
    /// The engines' (provider, model) per stage.
    pub models: crate::catalog::Models,
    /// Session records.
    pub recorder: crate::recorder::Recorder,
    /// Shared state across instances, when `REDIS_URL` is set.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The tools the assistant may call, when any are declared.
    pub tools: Option<Arc<crate::tools::Toolbox>>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}
