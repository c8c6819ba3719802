//! Tools the assistant may call: the declared catalog (schemas compiled once at start, every
//! call checked against them before anything runs), the signed webhook call of server tools,
//! and the tools of MCP servers ([`crate::mcp`]), checked and called the same way.
//!
//! A webhook call is `POST {url}` with the JSON body
//! `{"tool", "call_id", "session_id", "user_id", "arguments"}` and two headers:
//! `x-atlas-timestamp` (Unix seconds) and `x-atlas-signature: v1=<hex HMAC-SHA256 of
//! "{timestamp}.{body}" with the configured secret>`. The answer is a 2xx with a JSON body (at
//! most `tool_max_result_bytes`), which the model receives as the call's result; any other
//! status fails the call (with the body's `error` string, if it has one, as the reason).
//! Redirects are not followed. A refused connection is retried once (nothing was sent); a
//! 502/503/504 only for tools declared `idempotent`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use atlas_core::tools::{CheckedCall, ToolCall, ToolKind};
use atlas_providers::llm::ToolSpec;

use crate::config::{Config, ConfigError, ToolRunner};
use crate::mcp::McpHub;

/// Header carrying the signing time (Unix seconds).
pub const TIMESTAMP_HEADER: &str = "x-atlas-timestamp";
/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-atlas-signature";

/// Most schema violations told to the model for one call.
const MAX_REPORTED_ERRORS: usize = 3;

struct Declared {
    kind: ToolKind,
    timeout: Duration,
    validator: jsonschema::Validator,
    url: Option<String>,
    idempotent: bool,
}

/// The declared tools, and the tools of the MCP servers.
pub struct Toolbox {
    /// The declared tools' specs.
    declared_specs: Arc<[ToolSpec]>,
    tools: HashMap<String, Declared>,
    client: reqwest::Client,
    secret: Option<SecretString>,
    max_result_bytes: usize,
    mcp: Option<Arc<McpHub>>,
    /// Declared and MCP specs together, for the MCP catalog of that generation.
    offered: std::sync::Mutex<(u64, Arc<[ToolSpec]>)>,
}

impl std::fmt::Debug for Toolbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Toolbox")
            .field(
                "tools",
                &self
                    .specs()
                    .iter()
                    .map(|s| s.name.clone())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Toolbox {
    /// Compiles the declared tools and starts connecting to the MCP servers (in the
    /// background); `None` when there are neither.
    pub fn from_config(config: &Config) -> Result<Option<Arc<Toolbox>>, ConfigError> {
        if config.tools.is_empty() && config.mcp_servers.is_empty() {
            return Ok(None);
        }
        let mut tools = HashMap::new();
        let mut specs = Vec::with_capacity(config.tools.len());
        for t in &config.tools {
            let validator = jsonschema::validator_for(&t.parameters).map_err(|e| {
                ConfigError(format!(
                    "tool {:?}: parameters is not a valid JSON Schema: {e}",
                    t.name
                ))
            })?;
            tools.insert(
                t.name.clone(),
                Declared {
                    kind: match t.kind {
                        ToolRunner::Webhook => ToolKind::Server,
                        ToolRunner::Client => ToolKind::Client,
                    },
                    timeout: Duration::from_millis(t.timeout_ms),
                    validator,
                    url: t.url.clone(),
                    idempotent: t.idempotent,
                },
            );
            specs.push(ToolSpec {
                name: t.name.clone(),
                description: t.description.clone(),
                parameters: t.parameters.clone(),
            });
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ConfigError(format!("webhook client: {e}")))?;
        let mcp = if config.mcp_servers.is_empty() {
            None
        } else {
            Some(McpHub::start(
                &config.mcp_servers,
                tools.keys().cloned().collect(),
            )?)
        };
        let declared_specs: Arc<[ToolSpec]> = specs.into();
        Ok(Some(Arc::new(Toolbox {
            offered: std::sync::Mutex::new((0, declared_specs.clone())),
            declared_specs,
            tools,
            client,
            secret: config.tool_webhook_secret.clone(),
            max_result_bytes: config.tool_max_result_bytes,
            mcp,
        })))
    }

    /// The tools offered to the model now: the declared ones, then the MCP servers' that are
    /// up.
    pub fn specs(&self) -> Arc<[ToolSpec]> {
        let Some(hub) = &self.mcp else {
            return self.declared_specs.clone();
        };
        let catalog = hub.catalog();
        let mut offered = self.offered.lock().unwrap_or_else(|p| p.into_inner());
        if offered.0 != catalog.generation {
            let all: Vec<ToolSpec> = self
                .declared_specs
                .iter()
                .cloned()
                .chain(catalog.tools.iter().map(|t| t.spec.clone()))
                .collect();
            *offered = (catalog.generation, all.into());
        }
        offered.1.clone()
    }

    /// The MCP servers, if any are configured.
    pub fn mcp(&self) -> Option<&Arc<McpHub>> {
        self.mcp.as_ref()
    }

    /// The MCP server whose tool the model calls `name`, if it is one.
    pub fn mcp_server_of(&self, name: &str) -> Option<Arc<str>> {
        let catalog = self.mcp.as_ref()?.catalog();
        catalog.get(name).map(|t| t.server_name().clone())
    }

    /// Checks a call against the declared tools: known name, arguments a JSON object that
    /// matches the tool's schema. The reason for a refusal is told to the model.
    pub fn check(&self, call: ToolCall) -> CheckedCall {
        let verdict = self.verdict(&call);
        CheckedCall { call, verdict }
    }

    fn verdict(&self, call: &ToolCall) -> Result<(ToolKind, Duration), String> {
        let (errors, kind, timeout) = if let Some(tool) = self.tools.get(&call.name) {
            let arguments = parse_arguments(&call.arguments)?;
            let errors: Vec<String> = tool
                .validator
                .iter_errors(&arguments)
                .take(MAX_REPORTED_ERRORS)
                .map(|e| e.to_string())
                .collect();
            (errors, tool.kind, tool.timeout)
        } else if let Some(tool) = self
            .mcp
            .as_ref()
            .and_then(|h| h.catalog().get(&call.name).cloned())
        {
            let arguments = parse_arguments(&call.arguments)?;
            let errors = tool.violations(&arguments, MAX_REPORTED_ERRORS);
            (errors, ToolKind::Server, tool.timeout())
        } else {
            let offered = self.specs();
            let known: Vec<&str> = offered.iter().map(|s| s.name.as_str()).collect();
            return Err(format!(
                "there is no tool named {:?}; the tools are: {}",
                call.name.chars().take(64).collect::<String>(),
                known.join(", ")
            ));
        };
        if !errors.is_empty() {
            return Err(format!(
                "the arguments do not match the tool's schema: {}",
                errors.join("; ")
            ));
        }
        Ok((kind, timeout))
    }

    /// Runs a server tool: a declared tool's webhook, or an MCP server's tool. `Ok` is the
    /// result for the model, `Err` the reason it failed.
    pub async fn call_server(
        &self,
        call: &ToolCall,
        session_id: &str,
        user_id: &str,
    ) -> Result<String, String> {
        if self.tools.contains_key(&call.name) {
            return self.call_webhook(call, session_id, user_id).await;
        }
        let tool = self
            .mcp
            .as_ref()
            .and_then(|h| h.catalog().get(&call.name).cloned())
            .ok_or_else(|| "the tool is no longer offered".to_owned())?;
        let serde_json::Value::Object(arguments) = parse_arguments(&call.arguments)? else {
            return Err("the arguments must be a JSON object".into());
        };
        tool.call(arguments, self.max_result_bytes).await
    }

    /// Calls a server tool's webhook; `Ok` is the result as compact JSON text, `Err` the
    /// reason it failed, for the model.
    async fn call_webhook(
        &self,
        call: &ToolCall,
        session_id: &str,
        user_id: &str,
    ) -> Result<String, String> {
        let (Some(tool), Some(secret)) = (self.tools.get(&call.name), &self.secret) else {
            return Err("the tool is not a webhook".into());
        };
        let Some(url) = &tool.url else {
            return Err("the tool is not a webhook".into());
        };
        let arguments = parse_arguments(&call.arguments)?;
        let body = serde_json::to_vec(&serde_json::json!({
            "tool": call.name,
            "call_id": call.id,
            "session_id": session_id,
            "user_id": user_id,
            "arguments": arguments,
        }))
        .map_err(|e| e.to_string())?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let signature = sign(secret, timestamp, &body);
            let sent = self
                .client
                .post(url)
                .headers(atlas_providers::trace_headers())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(TIMESTAMP_HEADER, timestamp.to_string())
                .header(SIGNATURE_HEADER, signature)
                .body(body.clone())
                .send()
                .await;
            let retry = match sent {
                Err(e) if e.is_connect() => attempt < 2,
                Err(e) => return Err(format!("the tool could not be reached: {}", kind_of(&e))),
                Ok(response) => {
                    let status = response.status();
                    let retryable =
                        tool.idempotent && matches!(status.as_u16(), 502..=504) && attempt < 2;
                    if !retryable {
                        return self.read_answer(response).await;
                    }
                    true
                }
            };
            if !retry {
                return Err("the tool could not be reached".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn read_answer(&self, response: reqwest::Response) -> Result<String, String> {
        let status = response.status();
        if response
            .content_length()
            .is_some_and(|n| n > self.max_result_bytes as u64)
        {
            return Err(format!(
                "the tool's answer is larger than {} bytes",
                self.max_result_bytes
            ));
        }
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| format!("the tool's answer broke off: {}", kind_of(&e)))?;
            if body.len() + chunk.len() > self.max_result_bytes {
                return Err(format!(
                    "the tool's answer is larger than {} bytes",
                    self.max_result_bytes
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let value: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
        if !status.is_success() {
            let reason = value
                .as_ref()
                .and_then(|v| v.get("error"))
                .and_then(|e| e.as_str())
                .map(|e| format!(": {}", e.chars().take(300).collect::<String>()))
                .unwrap_or_default();
            return Err(format!(
                "the tool failed with HTTP {}{reason}",
                status.as_u16()
            ));
        }
        match value {
            Some(v) => Ok(v.to_string()),
            None => Err("the tool's answer is not JSON".into()),
        }
    }
}

/// The arguments as the model wrote them, as a JSON object (nothing written: `{}`).
fn parse_arguments(text: &str) -> Result<serde_json::Value, String> {
    if text.trim().is_empty() {
        return Ok(serde_json::json!({}));
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err("the arguments must be a JSON object".into()),
        Err(e) => Err(format!("the arguments are not valid JSON: {e}")),
    }
}

/// `v1=<hex HMAC-SHA256 of "{timestamp}.{body}">`.
pub fn sign(secret: &SecretString, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(3 + digest.len() * 2);
    out.push_str("v1=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn kind_of(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection refused"
    } else if e.is_body() || e.is_decode() {
        "bad body"
    } else {
        "request failed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ToolConfig;

    fn toolbox() -> Arc<Toolbox> {
        let config = Config {
            tools: vec![ToolConfig {
                name: "lookup_order".into(),
                description: "Looks up an order.".into(),
                kind: ToolRunner::Webhook,
                url: Some("http://127.0.0.1:9/hook".into()),
                timeout_ms: 2000,
                idempotent: false,
                parameters: serde_json::json!({
                    "type": "object",
                    "properties": {"order_id": {"type": "string", "pattern": "^[A-Z][0-9]+$"}},
                    "required": ["order_id"],
                    "additionalProperties": false
                }),
            }],
            tool_webhook_secret: Some(SecretString::from("x".repeat(32))),
            ..Config::default()
        };
        Toolbox::from_config(&config).unwrap().unwrap()
    }

    fn call(name: &str, arguments: &str) -> ToolCall {
        ToolCall {
            id: "toolu_1".into(),
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn a_valid_call_runs_with_its_kind_and_timeout() {
        let checked = toolbox().check(call("lookup_order", r#"{"order_id":"A12"}"#));
        assert_eq!(
            checked.verdict,
            Ok((ToolKind::Server, Duration::from_millis(2000)))
        );
    }

    #[test]
    fn invalid_calls_are_refused_with_a_reason_for_the_model() {
        let t = toolbox();
        for (name, args, expect) in [
            ("delete_everything", "{}", "no tool named"),
            ("lookup_order", "{\"order_id\":", "not valid JSON"),
            ("lookup_order", "[1]", "JSON object"),
            ("lookup_order", "{}", "order_id"),
            ("lookup_order", r#"{"order_id":"a12"}"#, "schema"),
            ("lookup_order", r#"{"order_id":"A1","x":1}"#, "schema"),
        ] {
            let verdict = t.check(call(name, args)).verdict;
            let reason = verdict.expect_err(args);
            assert!(reason.contains(expect), "{args}: {reason}");
        }
    }

    #[test]
    fn a_schema_that_is_not_one_is_refused_at_start() {
        let config = Config {
            tools: vec![ToolConfig {
                name: "t".into(),
                description: "d".into(),
                kind: ToolRunner::Client,
                url: None,
                timeout_ms: 2000,
                idempotent: false,
                parameters: serde_json::json!({"type": "object", "properties": {"a": {"type": 12}}}),
            }],
            ..Config::default()
        };
        let e = Toolbox::from_config(&config).unwrap_err();
        assert!(e.to_string().contains("not a valid JSON Schema"), "{e}");
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Reference value computed independently:
        // printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac 'secret'
        let s = sign(&SecretString::from("secret"), 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(
            s,
            "v1=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
        assert_ne!(
            s,
            sign(&SecretString::from("secret"), 1_700_000_001, br#"{"a":1}"#)
        );
    }
}
