//! Building and running the application: state, router, listener, graceful drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::trace::TraceLayer;
use tracing::info;

use atlas_protocol::{ErrorCode, MAX_TEXT_FRAME_BYTES, SUBPROTOCOL, VOICE_PATH};

use crate::auth::{Authenticator, extract_token};
use crate::config::Config;
use crate::engines::Engines;
use crate::error::ApiError;
use crate::session::serve_connection;

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
}

impl Application {
    /// Builds the adapters from `config` and binds the listener.
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        let engines = Engines::from_config(&config)?;
        Self::build_with(config, engines).await
    }

    /// Binds the listener with the given engines (tests and embedders).
    pub async fn build_with(config: Config, engines: Engines) -> anyhow::Result<Application> {
        config.validate()?;
        let listener = TcpListener::bind(config.listen).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {} (ATLAS_LISTEN): {e}", config.listen)
        })?;
        let state = AppState(Arc::new(Inner {
            auth: Authenticator::new(&config),
            config,
            engines,
            shutdown: CancellationToken::new(),
            sessions: TaskTracker::new(),
        }));
        Ok(Application { listener, state })
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
        // Small frames (audio chunks, events) must not wait for Nagle's algorithm.
        let listener = self.listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { shutdown.cancelled().await });
        let result = server.await;
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
        info!("server stopped");
        result
    }
}

/// The HTTP routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route(VOICE_PATH, get(voice))
        .layer(
            // Spans carry the path only: query strings may hold access tokens.
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                tracing::debug_span!("http", method = %req.method(), path = %req.uri().path())
            }),
        )
        .with_state(state)
}

async fn index() -> Html<&'static str> {
    Html(
        "<!doctype html><title>atlas-voice</title><h1>atlas-voice</h1>\
         <p>The voice endpoint is <code>/v1/voice</code>. Try <code>atlas-voice call</code>.</p>",
    )
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.shutdown.is_cancelled() {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Draining,
            "draining",
        )
        .into_response()
    } else {
        "ready".into_response()
    }
}

async fn voice(
    State(state): State<AppState>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Draining,
            "the server is draining; connect to another instance",
        ));
    }
    let token = extract_token(&headers, query.as_deref()).ok_or(crate::auth::AuthError::Missing)?;
    let identity = state.auth.verify(&token).inspect_err(|e| {
        tracing::info!(reason = e.label(), "connection refused");
    })?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidMessage,
            format!("a WebSocket upgrade is required: {e}"),
        )
    })?;
    let max_message = (state.config.audio_chunk_max_bytes * 4)
        .max(1024 * 1024)
        .max(MAX_TEXT_FRAME_BYTES * 2);
    let sessions = state.sessions.clone();
    Ok(upgrade
        .protocols([SUBPROTOCOL])
        .max_message_size(max_message)
        .max_frame_size(max_message)
        .on_upgrade(move |socket| sessions.track_future(serve_connection(socket, state, identity))))
}
