//! Control routes: `POST /_fakes/faults`, `POST /_fakes/scripts`, `GET|DELETE /_fakes/recorded`,
//! and the JSON 404.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::json;

use crate::state::Shared;
use crate::{Fault, ScriptedReply, Target};

/// Body of `POST /_fakes/faults`.
#[derive(serde::Deserialize)]
pub(crate) struct FaultRequest {
    target: Target,
    fault: Fault,
}

/// Body of `POST /_fakes/scripts`.
#[derive(serde::Deserialize)]
pub(crate) struct ScriptRequest {
    target: Target,
    reply: ScriptedReply,
}

/// A control request that queues something for a target.
pub(crate) trait Queued: serde::de::DeserializeOwned {
    /// Queues it.
    fn queue(self, shared: &Shared);
}

impl Queued for FaultRequest {
    fn queue(self, shared: &Shared) {
        shared.inject(self.target, self.fault);
    }
}

impl Queued for ScriptRequest {
    fn queue(self, shared: &Shared) {
        shared.script(self.target, self.reply);
    }
}

/// `POST /_fakes/faults` ([`FaultRequest`]: queues a one-shot fault) and
/// `POST /_fakes/scripts` ([`ScriptRequest`]: queues a scripted reply); 400 with the parse
/// error when the body is not a `T`.
pub(crate) async fn queue<T: Queued>(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match serde_json::from_slice::<T>(&body) {
        Ok(req) => {
            req.queue(&shared);
            Json(json!({"ok": true})).into_response()
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"ok": false, "error": e.to_string()})),
        )
            .into_response(),
    }
}

/// `GET /_fakes/recorded`: what the fakes received, as JSON.
pub(crate) async fn recorded(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.recorder.snapshot()).into_response()
}

/// `DELETE /_fakes/recorded`: forgets what was recorded.
pub(crate) async fn clear(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.recorder.clear();
    StatusCode::NO_CONTENT
}

/// `POST /v1/traces`: an OTLP/HTTP trace collector that takes every export and keeps nothing,
/// for load runs with traces on. The answer is an empty `ExportTraceServiceResponse` (in
/// protobuf, no bytes: every span accepted).
pub(crate) async fn traces(_body: Bytes) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
        Bytes::new(),
    )
        .into_response()
}

/// Any other route.
pub(crate) async fn not_found(uri: Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": format!("no fake at {}", uri.path())})),
    )
        .into_response()
}
