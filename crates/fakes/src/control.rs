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
struct FaultRequest {
    target: Target,
    fault: Fault,
}

/// `POST /_fakes/faults`: queues a one-shot fault.
pub(crate) async fn inject(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    queue(&body, |req: FaultRequest| {
        shared.inject(req.target, req.fault)
    })
}

/// Parses a control request and hands it to `apply`; 400 with the parse error otherwise.
fn queue<T: serde::de::DeserializeOwned>(body: &[u8], apply: impl FnOnce(T)) -> Response {
    match serde_json::from_slice::<T>(body) {
        Ok(req) => {
            apply(req);
            Json(json!({"ok": true})).into_response()
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"ok": false, "error": e.to_string()})),
        )
            .into_response(),
    }
}

/// Body of `POST /_fakes/scripts`.
#[derive(serde::Deserialize)]
struct ScriptRequest {
    target: Target,
    reply: ScriptedReply,
}

/// `POST /_fakes/scripts`: queues a scripted reply.
pub(crate) async fn script(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    queue(&body, |req: ScriptRequest| {
        shared.script(req.target, req.reply)
    })
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

/// Any other route.
pub(crate) async fn not_found(uri: Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": format!("no fake at {}", uri.path())})),
    )
        .into_response()
}
