//! Building and running the application: state, router, listener, graceful drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, RawQuery, State};
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

use crate::admission;
use crate::auth::{AuthError, Authenticator, extract_token};
use crate::config::Config;
use crate::engines::Engines;
use crate::error::ApiError;
use crate::metrics;
use crate::registry::Registry;
use crate::transport::v1::accept as accept_v1;

pub use crate::state::{AppState, Inner};

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
        let unpriced = crate::catalog::unpriced(&models, &prices);
        let budgets = config.session_budget_usd > 0.0
            || config.user_daily_budget_usd.is_some_and(|b| b > 0.0);
        if !unpriced.is_empty() {
            if budgets && !config.allow_unpriced {
                anyhow::bail!(crate::catalog::unpriced_refusal(&unpriced));
            }
            tracing::warn!(
                ?unpriced,
                budgets,
                "a model is missing from the price catalog: its cost is reported as unknown and budgets cannot limit it"
            );
        }
        let recorder_stop = CancellationToken::new();
        let (recorder, recorder_task) = crate::recorder::Recorder::start(
            &config.database_url,
            &config.spool_dir,
            config.spool_max_records,
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
                    Duration::from_secs(config.resume_window_s),
                    Duration::from_secs(config.max_duration_s),
                    config.max_sessions_per_user,
                )
                .map_err(|e| anyhow::anyhow!("REDIS_URL: {e}"))?,
            )),
            None => None,
        };
        let connect_limiter = crate::client_addr::ConnectLimiter::from_config(&config)?;
        let tools = crate::tools::Toolbox::from_config(&config)?;
        let state = AppState(Arc::new(Inner {
            tools,
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
        metrics::unpriced_models_allowed(!unpriced.is_empty() && state.config.allow_unpriced);
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
        // Sessions have ended: MCP connections close (stdio servers stop).
        if let Some(hub) = state.tools.as_ref().and_then(|t| t.mcp()) {
            hub.close();
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
        .route("/sdk/{file}", get(sdk_file))
        .route("/dev/token", axum::routing::post(dev_token))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .route(VOICE_PATH, get(voice))
        .route(
            crate::transport::twilio::webhook::VOICE_PATH,
            axum::routing::post(crate::transport::twilio::webhook::voice).layer(
                axum::extract::DefaultBodyLimit::max(crate::transport::twilio::webhook::MAX_BODY),
            ),
        )
        .route(
            crate::transport::twilio::webhook::STREAM_PATH,
            get(crate::transport::twilio::webhook::stream),
        )
        .layer(
            // Spans carry the path only: query strings may hold access tokens.
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                tracing::debug_span!("http", method = %req.method(), path = %req.uri().path())
            }),
        )
        .with_state(state)
}

/// The web client: plain HTML and JavaScript compiled into the binary, no build step. The page
/// runs on the browser SDK (`clients/web`, `@atlas-voice/client`), whose ES modules are served
/// from `/sdk/` exactly as they are in the repository, so the page cannot drift from it.
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

/// The modules of `@atlas-voice/client`, by file name.
const SDK_FILES: [(&str, &str); 9] = [
    (
        "index.js",
        include_str!("../../../clients/web/src/index.js"),
    ),
    (
        "client.js",
        include_str!("../../../clients/web/src/client.js"),
    ),
    (
        "capture.js",
        include_str!("../../../clients/web/src/capture.js"),
    ),
    ("dsp.js", include_str!("../../../clients/web/src/dsp.js")),
    (
        "playback.js",
        include_str!("../../../clients/web/src/playback.js"),
    ),
    (
        "protocol.js",
        include_str!("../../../clients/web/src/protocol.js"),
    ),
    (
        "reconnect.js",
        include_str!("../../../clients/web/src/reconnect.js"),
    ),
    (
        "state.js",
        include_str!("../../../clients/web/src/state.js"),
    ),
    (
        "token.js",
        include_str!("../../../clients/web/src/token.js"),
    ),
];

async fn sdk_file(Path(file): Path<String>) -> Response {
    match SDK_FILES.iter().find(|(name, _)| *name == file) {
        Some((_, body)) => static_file("text/javascript; charset=utf-8", body),
        None => StatusCode::NOT_FOUND.into_response(),
    }
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

/// What `POST /dev/token` may be asked: a token for a user it minted one for before (the
/// page refreshes its token this way); a fresh user id without it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenRequest {
    user_id: Option<String>,
}

/// Development only: a short-lived token (`ATLAS_DEV_TOKEN_TTL_S`) for a fresh user id, or for
/// the `user_id` in the JSON body, so the page works without an account. Refused (404) unless
/// `ATLAS_DEV=true`.
async fn dev_token(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
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
    let asked = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice::<DevTokenRequest>(&body) {
            Ok(r) => r.user_id,
            Err(e) => {
                return ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::InvalidMessage,
                    format!("invalid request: {e}"),
                )
                .into_response();
            }
        }
    };
    let user = match asked {
        None => uuid::Uuid::new_v4().to_string(),
        Some(id) if uuid::Uuid::parse_str(&id).is_ok() && id.len() == 36 => id,
        Some(_) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidMessage,
                "user_id must be a user id this endpoint minted (a UUID)",
            )
            .into_response();
        }
    };
    let ttl = state.config.dev_token_ttl_s;
    match crate::auth::mint_token(
        &secret,
        &user,
        &state.config.jwt_audience,
        "authenticated",
        ttl,
    ) {
        Ok(token) => {
            axum::Json(serde_json::json!({ "token": token, "user_id": user, "expires_in": ttl }))
                .into_response()
        }
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "cannot mint a token",
        )
        .into_response(),
    }
}

/// Readiness means "can take sessions": not draining, and records have somewhere to go (the
/// database, or room in the spool). The record writer keeps the database state, so this costs
/// no database round trip; the details say what it is.
async fn readyz(State(state): State<AppState>) -> Response {
    let records = state.recorder.health();
    let unpriced = crate::catalog::unpriced(&state.models, &state.prices);
    let mut details = serde_json::json!({
        "database": if records.database_up { "up" } else { "down" },
        "spooled_records": records.spooled_records,
        "spool_max_records": records.spool_max_records,
        "unpriced_models_allowed": !unpriced.is_empty() && state.config.allow_unpriced,
        "unpriced_models": unpriced,
    });
    if let Some(hub) = state.tools.as_ref().and_then(|t| t.mcp()) {
        details["mcp_servers"] = hub.health().into();
    }
    let refuse = |code: ErrorCode, message: String| {
        let body = serde_json::json!({
            "error": { "code": code, "message": message },
            "details": details,
        });
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
    };
    if state.shutdown.is_cancelled() {
        refuse(ErrorCode::Draining, "draining".into())
    } else if !records.can_take_sessions() {
        refuse(
            ErrorCode::Internal,
            format!(
                "the database is unreachable and the spool holds {} records (ATLAS_SPOOL_MAX_RECORDS = {})",
                records.spooled_records, records.spool_max_records
            ),
        )
    } else {
        let mut body = details.clone();
        body["status"] = "ready".into();
        axum::Json(body).into_response()
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
    // Limits are decided here, before the upgrade.
    let kind = match resume {
        Some(token) => admission::resume(&state, &token, &identity.user_id).await,
        None => admission::admit(&state, &identity.user_id).await,
    }
    .map_err(|r| refuse(r.label(), r.into_error(&state)))?;
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
        .on_upgrade(move |socket| sessions.track_future(accept_v1(socket, state, identity, kind))))
}
