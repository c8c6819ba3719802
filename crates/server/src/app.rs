//! Building and running the application: state, router, listener, graceful drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::trace::TraceLayer;
use tracing::info;

use atlas_protocol::{ErrorCode, SUBPROTOCOL, VOICE_PATH};

use axum::extract::ConnectInfo;

use crate::auth::{AuthError, Authenticator, extract_token};
use crate::config::Config;
use crate::engines::Engines;
use crate::error::ApiError;
use crate::metrics;
use crate::registry::{AdmitError, Registry};
use crate::session::{Upgrade, handle_upgrade};

/// Shared state of the running server.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

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
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The application, bound to its port and ready to run.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    /// Stops the recorder after the sessions have flushed their records.
    recorder_stop: CancellationToken,
    recorder_task: tokio::task::JoinHandle<()>,
}

impl Application {
    /// Builds the adapters from `config` and binds the listener.
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        let engines = Engines::from_config(&config).await?;
        Self::build_with(config, engines).await
    }

    /// Binds the listener with the given engines (tests and embedders).
    pub async fn build_with(config: Config, engines: Engines) -> anyhow::Result<Application> {
        config.validate()?;
        if config.dev && !config.listen.ip().is_loopback() {
            tracing::error!(
                listen = %config.listen,
                "DEVELOPMENT MODE ON A PUBLIC ADDRESS (ATLAS_DEV_ALLOW_PUBLIC): anyone who can \
                 reach this server can mint access tokens at /dev/token; never do this in production"
            );
        }
        let listener = TcpListener::bind(config.listen).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {} (ATLAS_LISTEN): {e}", config.listen)
        })?;
        let catalog = crate::catalog::Catalog::load(config.price_catalog.as_deref())?;
        let models = crate::catalog::Models {
            stt: (
                engines.stt.provider().to_owned(),
                engines.stt.model().to_owned(),
            ),
            llm: (
                engines.llm.provider().to_owned(),
                engines.llm.model().to_owned(),
            ),
            tts: (
                engines.tts.provider().to_owned(),
                engines.tts.model().to_owned(),
            ),
        };
        let prices = catalog.prices(&models);
        if prices
            .cost(&atlas_core::cost::Consumption::default())
            .total
            .is_none()
        {
            tracing::warn!(
                ?models,
                "a model is missing from the price catalog: costs are reported as unknown and budgets cannot be enforced"
            );
        }
        let recorder_stop = CancellationToken::new();
        let (recorder, recorder_task) = crate::recorder::Recorder::start(
            &config.database_url,
            &config.spool_dir,
            config.db_auto_migrate,
            recorder_stop.clone(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("database ({}): {e}", redact_url(&config.database_url)))?;
        let cluster = match &config.redis_url {
            Some(url) => Some(Arc::new(
                crate::cluster::Cluster::connect(
                    url,
                    &config.redis_prefix,
                    Duration::from_secs(config.lease_ttl_s),
                )
                .map_err(|e| anyhow::anyhow!("REDIS_URL: {e}"))?,
            )),
            None => None,
        };
        let connect_limiter = crate::client_addr::ConnectLimiter::from_config(&config)?;
        let state = AppState(Arc::new(Inner {
            auth: Authenticator::new(&config),
            registry: Registry::new(config.max_sessions_per_user, config.max_sessions),
            prices,
            catalog_version: catalog.version().to_owned(),
            models,
            recorder,
            cluster,
            connect_limiter,
            metrics: metrics::install(),
            config,
            engines,
            shutdown: CancellationToken::new(),
            sessions: TaskTracker::new(),
        }));
        Ok(Application {
            listener,
            state,
            recorder_stop,
            recorder_task,
        })
    }

    /// The bound address (port 0 resolves here).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.state.config.listen)
    }

    /// A token that starts the drain when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }

    /// Serves until the shutdown token is cancelled, then drains: sessions are told to
    /// resume elsewhere and closed with 1001; waits for them up to the drain timeout.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let state = self.state.clone();
        let router = router(state.clone());
        let shutdown = state.shutdown.clone();
        let server = crate::edge::serve(
            self.listener,
            router,
            shutdown,
            crate::edge::EdgeLimits::from_config(&state.config),
        );
        // The per-address limiter keeps a cell per address it has seen: prune idle ones.
        let pruner = {
            let state = state.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(60));
                loop {
                    every.tick().await;
                    state.connect_limiter.prune();
                }
            })
        };
        let result = server.await;
        pruner.abort();
        state.sessions.close();
        let drain = Duration::from_secs(state.config.drain_timeout_s);
        if tokio::time::timeout(drain, state.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = state.sessions.len(),
                "drain timeout reached with sessions still open"
            );
        }
        // Sessions have submitted their final records; let the recorder write them.
        self.recorder_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.recorder_task).await;
        info!("server stopped");
        result
    }
}

/// The HTTP routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/worklet.js", get(worklet_js))
        .route("/dev/token", axum::routing::post(dev_token))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .route(VOICE_PATH, get(voice))
        .layer(
            // Spans carry the path only: query strings may hold access tokens.
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                tracing::debug_span!("http", method = %req.method(), path = %req.uri().path())
            }),
        )
        .with_state(state)
}

/// The web client: plain HTML and JavaScript compiled into the binary, no build step.
async fn index() -> Response {
    static_file(
        "text/html; charset=utf-8",
        include_str!("../static/index.html"),
    )
}

async fn app_js() -> Response {
    static_file(
        "text/javascript; charset=utf-8",
        include_str!("../static/app.js"),
    )
}

async fn worklet_js() -> Response {
    static_file(
        "text/javascript; charset=utf-8",
        include_str!("../static/worklet.js"),
    )
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            ("content-type", content_type),
            ("cache-control", "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Development only: a short-lived token for a fresh user id, so the page works without
/// an account, signed with the development-only key. Refused (404) unless `ATLAS_DEV=true`.
async fn dev_token(State(state): State<AppState>) -> Response {
    if !state.config.dev {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::Forbidden,
            "development tokens are disabled; sign in with Supabase",
        )
        .into_response();
    }
    // Never the configured secret: development tokens are signed with the development-only
    // key, which only a server in dev mode accepts.
    let secret = secrecy::SecretString::from(crate::config::DEV_JWT_SECRET);
    let user = uuid::Uuid::new_v4().to_string();
    match crate::auth::mint_token(
        &secret,
        &user,
        &state.config.jwt_audience,
        "authenticated",
        3600,
    ) {
        Ok(token) => {
            axum::Json(serde_json::json!({ "token": token, "user_id": user })).into_response()
        }
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "cannot mint a token",
        )
        .into_response(),
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.shutdown.is_cancelled() {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Draining,
            "draining",
        )
        .into_response()
    } else if !state.recorder.ready().await {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal,
            "the database is unreachable (records are being spooled)",
        )
        .into_response()
    } else {
        "ready".into_response()
    }
}

/// The URL without its password, for messages.
fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

async fn metrics_page(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [("content-type", "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "metrics are handled by the embedding program",
        )
            .into_response(),
    }
}

fn refuse(reason: &'static str, e: ApiError) -> ApiError {
    metrics::refused(reason);
    tracing::info!(reason, "connection refused");
    e
}

async fn voice(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    conn: Option<axum::Extension<crate::edge::Conn>>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(refuse(
            "draining",
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Draining,
                "the server is draining; connect to another instance",
            ),
        ));
    }
    if !state.connect_limiter.check(&headers, peer) {
        return Err(refuse(
            "rate_limited",
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManyAttempts,
                "too many connection attempts from this address; retry with backoff",
            ),
        ));
    }
    let token = extract_token(&headers, query.as_deref())
        .ok_or_else(|| refuse("missing_token", AuthError::Missing.into()))?;
    let identity = state
        .auth
        .verify(&token)
        .await
        .map_err(|e| refuse(e.label(), e.into()))?;
    let upgrade = upgrade.map_err(|e| {
        refuse(
            "not_websocket",
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidMessage,
                format!("a WebSocket upgrade is required: {e}"),
            ),
        )
    })?;
    let resume = query.as_deref().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "resume")
            .map(|(_, v)| v.into_owned())
    });
    // Limits are decided here, before the upgrade. A resume takes no new place: the session
    // kept its own while detached, so reconnecting never resets a limit.
    let unavailable = |e: crate::cluster::ClusterError| {
        tracing::warn!(error = %e, "scale-out store unavailable");
        refuse(
            "cluster_unavailable",
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::AtCapacity,
                "the session service is temporarily unavailable; retry shortly",
            ),
        )
    };
    let kind = match resume {
        Some(token) => match state.registry.find_resume(&token, &identity.user_id) {
            Some(entry) => Upgrade::Resume(entry),
            None => {
                // Perhaps the session was dropped on another instance.
                let claimed = match &state.cluster {
                    Some(cluster) => cluster
                        .claim_resume(&token, &identity.user_id)
                        .await
                        .map_err(unavailable)?,
                    None => None,
                };
                match claimed {
                    Some(moved) => match state.registry.admit_moved(&identity.user_id) {
                        Ok(permit) => Upgrade::Adopt(permit, Box::new(moved)),
                        Err(_) => {
                            return Err(refuse(
                                "at_capacity",
                                ApiError::new(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    ErrorCode::AtCapacity,
                                    "the server is at capacity; retry shortly or connect elsewhere",
                                ),
                            ));
                        }
                    },
                    None => {
                        return Err(refuse(
                            "resume_failed",
                            ApiError::new(
                                StatusCode::NOT_FOUND,
                                ErrorCode::ResumeFailed,
                                "unknown or expired resume token; start a new session",
                            ),
                        ));
                    }
                }
            }
        },
        None => {
            // Refuse a session that could not afford even one reply today.
            if let Some(daily) = state.config.user_daily_budget_usd {
                let spent = match &state.cluster {
                    Some(cluster) => cluster
                        .spent_today(&identity.user_id)
                        .await
                        .map_err(unavailable)?,
                    None => state.registry.spent_today(&identity.user_id),
                };
                let one_reply = state
                    .prices
                    .reply_estimate(
                        state.config.system_prompt.len() as u64 / 4,
                        u64::from(state.config.llm_max_tokens),
                    )
                    .unwrap_or(0);
                if spent.saturating_add(one_reply) > atlas_core::cost::from_usd(daily) {
                    return Err(refuse(
                        "budget_exhausted",
                        ApiError::new(
                            StatusCode::TOO_MANY_REQUESTS,
                            ErrorCode::BudgetExhausted,
                            "today's budget for this user is spent",
                        ),
                    ));
                }
            }
            let too_many = || {
                refuse(
                    "too_many_sessions",
                    ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        ErrorCode::TooManySessions,
                        format!(
                            "at most {} concurrent sessions per user",
                            state.config.max_sessions_per_user
                        ),
                    ),
                )
            };
            let permit = match state.registry.admit(&identity.user_id) {
                Ok(permit) => permit,
                Err(AdmitError::TooManySessions) => return Err(too_many()),
                Err(AdmitError::AtCapacity) => {
                    return Err(refuse(
                        "at_capacity",
                        ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            ErrorCode::AtCapacity,
                            "the server is at capacity; retry shortly or connect elsewhere",
                        ),
                    ));
                }
            };
            let session_id = uuid::Uuid::new_v4().to_string();
            // Across instances, the per-user limit is decided by one atomic script.
            if let Some(cluster) = &state.cluster {
                let admitted = cluster
                    .admit(
                        &identity.user_id,
                        &session_id,
                        state.config.max_sessions_per_user,
                    )
                    .await
                    .map_err(unavailable)?;
                if !admitted {
                    return Err(too_many());
                }
            }
            Upgrade::New(permit, session_id)
        }
    };
    let max_message = crate::edge::max_ws_message(&state.config);
    if let Some(axum::Extension(conn)) = conn {
        conn.upgrading();
    }
    let sessions = state.sessions.clone();
    Ok(upgrade
        .protocols([SUBPROTOCOL])
        // Small buffers: an idle session should cost kilobytes, not the 128 KiB defaults
        // (larger frames still arrive; the read buffer grows as needed). Frames are written
        // when the writer flushes, which it does as soon as its queue is empty (see
        // `run_writer`): the buffer only lets a burst go out in one system call.
        .read_buffer_size(8 * 1024)
        .write_buffer_size(64 * 1024)
        .max_message_size(max_message)
        .max_frame_size(max_message)
        .on_upgrade(move |socket| {
            sessions.track_future(handle_upgrade(socket, state, identity, kind))
        }))
}
