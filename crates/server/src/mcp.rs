//! Tools from Model Context Protocol servers (`[[mcp_servers]]`), offered to the model beside
//! the declared `[[tools]]` and called like webhook tools.
//!
//! Each server has one connection shared by every session, kept by a task of its own: it
//! connects (Streamable HTTP, or a local program over stdio), lists the server's tools,
//! relists them when the server says they changed (and every [`REFRESH`] in case it does not
//! say), and reconnects with backoff when the connection fails or the program dies; a server
//! that is down never blocks start, and its tools are not offered while it is down. The tools
//! are seen by the model as `{server}__{tool}`, filtered by the server's allow and deny lists,
//! their schemas compiled once per listing. Calls to one server are bounded
//! (`max_concurrency`); a call dropped before its answer (deadline, barge-in, session end)
//! sends the server MCP's `notifications/cancelled`.
//!
//! The connection speaks the protocol's `initialize` handshake (version 2025-11-25, the
//! latest with one): every server answers it, including those that also speak the
//! handshake-less 2026-07-28 version, and list changes then arrive as plain notifications.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, ContentBlock,
    Implementation, ProtocolVersion, ResourceContents,
};
use rmcp::service::{NotificationContext, RoleClient, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ClientHandler, Peer, ServiceError, ServiceExt};
use secrecy::ExposeSecret;
use tokio::sync::{Notify, Semaphore};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use atlas_providers::llm::ToolSpec;

use crate::config::{McpServerConfig, McpTransport};
use crate::metrics;

/// Separates a server's name from its tool's in the names the model sees.
pub const SEPARATOR: &str = "__";
/// Longest tool name the model providers accept.
const MAX_TOOL_NAME: usize = 64;
/// Most tools taken from one server.
const MAX_TOOLS_PER_SERVER: usize = 64;
/// Longest description passed on to the model.
const MAX_DESCRIPTION: usize = 4096;
/// How long the handshake (and each listing) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the tools are listed again even when the server does not say they changed; a
/// failed listing also finds a server that went away without closing the connection.
pub const REFRESH: Duration = Duration::from_secs(30);
/// The first wait before reconnecting; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Largest message taken from a Streamable HTTP server (a listing or a result).
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Longest line of a stdio server's stderr logged whole.
const MAX_STDERR_LINE: usize = 4096;
/// Environment variables a stdio server inherits (everything else it gets is configured).
const INHERITED_ENV: [&str; 4] = ["PATH", "HOME", "LANG", "TZ"];

/// One tool of one server, as offered to the model.
pub struct McpTool {
    /// What the model sees (name `{server}__{tool}`).
    pub spec: ToolSpec,
    /// The server's own name of the tool.
    remote: String,
    validator: jsonschema::Validator,
    server: Arc<Server>,
}

impl McpTool {
    /// The server's name.
    pub fn server_name(&self) -> &Arc<str> {
        &self.server.name
    }

    /// The server's time limit for a call.
    pub fn timeout(&self) -> Duration {
        self.server.timeout
    }

    /// The schema violations of `arguments` (at most `max`).
    pub fn violations(&self, arguments: &serde_json::Value, max: usize) -> Vec<String> {
        self.validator
            .iter_errors(arguments)
            .take(max)
            .map(|e| e.to_string())
            .collect()
    }

    /// Calls the tool; `Ok` is the result for the model (text, or structured content as
    /// JSON), `Err` the reason it failed, in words the model can act on. Dropping the future
    /// before it finishes cancels the call at the server.
    pub async fn call(
        &self,
        arguments: serde_json::Map<String, serde_json::Value>,
        max_result_bytes: usize,
    ) -> Result<String, String> {
        let server = &self.server;
        let _permit = server
            .permits
            .acquire()
            .await
            .map_err(|_| "the tool's server has stopped".to_owned())?;
        let Some(peer) = server.peer() else {
            return Err(format!(
                "the tool's server ({}) is not available right now",
                server.name
            ));
        };
        let params = CallToolRequestParams::new(self.remote.clone()).with_arguments(arguments);
        let sent = std::time::Instant::now();
        let answer = peer.call_tool(params).await;
        metrics::mcp_call(&server.name, answer.is_ok(), sent.elapsed());
        match answer {
            Ok(result) => render(result, max_result_bytes),
            Err(e) => {
                if matches!(
                    e,
                    ServiceError::TransportClosed | ServiceError::TransportSend(_)
                ) {
                    // Look at the connection now rather than at the next refresh.
                    server.check.notify_one();
                }
                Err(format!("the tool failed: {}", describe(&e)))
            }
        }
    }
}

/// The result as the model receives it.
fn render(result: CallToolResult, max_result_bytes: usize) -> Result<String, String> {
    let failed = result.is_error == Some(true);
    let mut text = String::new();
    let mut left_out: Vec<&str> = Vec::new();
    let mut push = |piece: &str| {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(piece);
    };
    for block in &result.content {
        match block {
            ContentBlock::Text(t) => push(&t.text),
            ContentBlock::Image(_) => left_out.push("an image"),
            ContentBlock::Audio(_) => left_out.push("audio"),
            ContentBlock::Resource(r) => match &r.resource {
                ResourceContents::TextResourceContents { text, .. } => push(text),
                _ => left_out.push("a binary resource"),
            },
            ContentBlock::ResourceLink(link) => push(&format!("{} <{}>", link.name, link.uri)),
            _ => left_out.push("content of an unknown kind"),
        }
    }
    // Structured content is the result itself; the text blocks beside it repeat it.
    let mut content = match result.structured_content {
        Some(value) if !failed && !value.is_null() => value.to_string(),
        _ => text,
    };
    if !left_out.is_empty() {
        left_out.dedup();
        let what = left_out.join(" and ");
        if content.is_empty() {
            return Err(format!(
                "the tool answered with {what} only, which this assistant cannot use"
            ));
        }
        content.push_str(&format!(
            "\n[the tool also answered with {what}, left out: this assistant cannot use them]"
        ));
    }
    if content.len() > max_result_bytes {
        return Err(format!(
            "the tool's answer is larger than {max_result_bytes} bytes"
        ));
    }
    if failed {
        if content.is_empty() {
            content = "the tool reported an error without saying which".into();
        }
        return Err(content);
    }
    Ok(content)
}

/// A server error in words for the model and the log (no Rust type names).
fn describe(e: &ServiceError) -> String {
    let text = match e {
        ServiceError::McpError(d) => {
            format!("the server answered error {}: {}", d.code.0, d.message)
        }
        ServiceError::TransportClosed => "the connection to the server closed".into(),
        ServiceError::TransportSend(t) => format!(
            "the server could not be reached: {}",
            atlas_providers::error_chain(t.error.as_ref())
        ),
        ServiceError::Cancelled { .. } => "the call was cancelled".into(),
        ServiceError::UnexpectedResponse => {
            "the server answered with something other than a result".into()
        }
        other => other.to_string(),
    };
    text.chars().take(300).collect()
}

/// What `/readyz` and the metrics say of one server.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServerHealth {
    /// `up` or `down`.
    pub state: &'static str,
    /// Tools offered from it.
    pub tools: usize,
    /// Why it is down, or what was left out of its tools.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Connections made since start.
    pub connections: u64,
}

struct Server {
    name: Arc<str>,
    config: McpServerConfig,
    transport: McpTransport,
    timeout: Duration,
    permits: Semaphore,
    /// The live connection's peer, while up.
    peer: Mutex<Option<Peer<RoleClient>>>,
    /// The server's tools as last listed (empty while down), before the catalog's checks
    /// across servers.
    tools: Mutex<Vec<rmcp::model::Tool>>,
    health: Mutex<ServerHealth>,
    /// Wakes the connection task: a call found the connection broken.
    check: Notify,
}

impl Server {
    fn peer(&self) -> Option<Peer<RoleClient>> {
        self.peer.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_health(&self, up: bool, problem: Option<String>) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.state = if up { "up" } else { "down" };
        h.problem = problem;
        metrics::mcp_server_up(&self.name, up);
    }
}

/// The tools of every server, as offered now.
#[derive(Default)]
pub struct Catalog {
    /// Bumped on every change.
    pub generation: u64,
    /// In the servers' declared order, then each server's own.
    pub tools: Vec<Arc<McpTool>>,
    by_name: HashMap<String, Arc<McpTool>>,
}

impl Catalog {
    /// The tool the model calls `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<McpTool>> {
        self.by_name.get(name)
    }
}

/// The servers and their tools.
pub struct McpHub {
    servers: Vec<Arc<Server>>,
    catalog: Mutex<Arc<Catalog>>,
    /// Names of the declared `[[tools]]`, which a server's tool may not take.
    reserved: HashSet<String>,
    stop: CancellationToken,
}

impl std::fmt::Debug for McpHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpHub")
            .field(
                "servers",
                &self.servers.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Drop for McpHub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl McpHub {
    /// Starts a connection task per server (in the background: nothing here waits for a
    /// server). `reserved` are the declared tools' names.
    pub fn start(
        configs: &[McpServerConfig],
        reserved: HashSet<String>,
    ) -> Result<Arc<McpHub>, crate::config::ConfigError> {
        let mut servers = Vec::with_capacity(configs.len());
        for c in configs {
            let name: Arc<str> = c.name.as_str().into();
            servers.push(Arc::new(Server {
                transport: c.transport()?,
                timeout: Duration::from_millis(c.timeout_ms),
                permits: Semaphore::new(c.max_concurrency as usize),
                peer: Mutex::new(None),
                tools: Mutex::new(Vec::new()),
                health: Mutex::new(ServerHealth {
                    state: "down",
                    tools: 0,
                    problem: Some("connecting".into()),
                    connections: 0,
                }),
                check: Notify::new(),
                config: c.clone(),
                name,
            }));
            metrics::mcp_server_up(&c.name, false);
        }
        let hub = Arc::new(McpHub {
            servers,
            catalog: Mutex::new(Arc::new(Catalog::default())),
            reserved,
            stop: CancellationToken::new(),
        });
        for server in &hub.servers {
            tokio::spawn(keep_connected(
                server.clone(),
                Arc::downgrade(&hub),
                hub.stop.clone(),
            ));
        }
        Ok(hub)
    }

    /// The tools offered now.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Each server's health, by name.
    pub fn health(&self) -> serde_json::Map<String, serde_json::Value> {
        self.servers
            .iter()
            .map(|s| {
                let h = s.health.lock().unwrap_or_else(|p| p.into_inner()).clone();
                (
                    s.name.to_string(),
                    serde_json::to_value(h).unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Closes every connection (stdio servers are stopped).
    pub fn close(&self) {
        self.stop.cancel();
    }

    /// Rebuilds the catalog from every server's latest listing.
    fn rebuild(&self) {
        let mut taken: HashSet<String> = self.reserved.clone();
        let mut tools = Vec::new();
        for server in &self.servers {
            let listed = server
                .tools
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let mut skipped = Vec::new();
            let mut offered = 0;
            for tool in listed {
                if !server.config.offers(&tool.name) {
                    continue;
                }
                if offered == MAX_TOOLS_PER_SERVER {
                    skipped.push(format!(
                        "{} (more than {MAX_TOOLS_PER_SERVER} tools)",
                        tool.name
                    ));
                    continue;
                }
                match offer(server, &tool, &taken) {
                    Ok(t) => {
                        taken.insert(t.spec.name.clone());
                        tools.push(Arc::new(t));
                        offered += 1;
                    }
                    Err(why) => skipped.push(format!("{} ({why})", tool.name)),
                }
            }
            let mut h = server.health.lock().unwrap_or_else(|p| p.into_inner());
            h.tools = offered;
            if !skipped.is_empty() {
                warn!(mcp_server = %server.name, ?skipped, "tools not offered");
                if h.state == "up" {
                    h.problem = Some(format!("not offered: {}", skipped.join(", ")));
                }
            }
            metrics::mcp_tools(&server.name, offered);
        }
        let mut catalog = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        let by_name = tools
            .iter()
            .map(|t: &Arc<McpTool>| (t.spec.name.clone(), t.clone()))
            .collect();
        *catalog = Arc::new(Catalog {
            generation: catalog.generation + 1,
            tools,
            by_name,
        });
    }
}

/// The tool as the model sees it, or why it cannot be offered.
fn offer(
    server: &Arc<Server>,
    tool: &rmcp::model::Tool,
    taken: &HashSet<String>,
) -> Result<McpTool, String> {
    let name: String = format!("{}{SEPARATOR}{}", server.name, tool.name)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.len() > MAX_TOOL_NAME {
        return Err(format!(
            "its name is longer than {MAX_TOOL_NAME} characters with the server's"
        ));
    }
    if taken.contains(&name) {
        return Err(format!("{name} is taken"));
    }
    let schema = serde_json::Value::Object((*tool.input_schema).clone());
    if schema.get("type").and_then(|t| t.as_str()) != Some("object") {
        return Err("its input schema is not an object schema".into());
    }
    let validator = jsonschema::validator_for(&schema)
        .map_err(|e| format!("its input schema is not a valid JSON Schema: {e}"))?;
    let description: String = tool
        .description
        .as_deref()
        .or(tool.title.as_deref())
        .unwrap_or(&tool.name)
        .chars()
        .take(MAX_DESCRIPTION)
        .collect();
    Ok(McpTool {
        spec: ToolSpec {
            name,
            description,
            parameters: schema,
        },
        remote: tool.name.to_string(),
        validator,
        server: server.clone(),
    })
}

/// Hears the server's notifications.
struct Listener {
    tools_changed: Arc<Notify>,
}

impl ClientHandler for Listener {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("atlas-voice", env!("CARGO_PKG_VERSION")),
        )
        .with_protocol_version(ProtocolVersion::V_2025_11_25)
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.tools_changed.notify_one();
    }
}

/// Connects, keeps the tools listed, reconnects with backoff; until `stop`.
async fn keep_connected(server: Arc<Server>, hub: Weak<McpHub>, stop: CancellationToken) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let tools_changed = Arc::new(Notify::new());
        let listener = Listener {
            tools_changed: tools_changed.clone(),
        };
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            c = tokio::time::timeout(CONNECT_TIMEOUT, connect(&server, listener)) => c,
        };
        let problem = match connected {
            Err(_) => format!("no answer to the handshake within {CONNECT_TIMEOUT:?}"),
            Ok(Err(e)) => e,
            Ok(Ok(running)) => {
                let problem = serve(&server, &hub, running, &tools_changed, &stop).await;
                if stop.is_cancelled() {
                    return;
                }
                backoff = FIRST_BACKOFF;
                problem
            }
        };
        *server.peer.lock().unwrap_or_else(|p| p.into_inner()) = None;
        server
            .tools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        server.set_health(false, Some(problem.clone()));
        match hub.upgrade() {
            Some(hub) => hub.rebuild(),
            None => return,
        }
        warn!(mcp_server = %server.name, problem, retry_in_ms = backoff.as_millis() as u64, "MCP server down");
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Uses one connection until it fails (the reason) or `stop`.
async fn serve(
    server: &Arc<Server>,
    hub: &Weak<McpHub>,
    running: RunningService<RoleClient, Listener>,
    tools_changed: &Notify,
    stop: &CancellationToken,
) -> String {
    let peer = running.peer().clone();
    let version = peer
        .peer_info()
        .map(|i| i.protocol_version.to_string())
        .unwrap_or_default();
    let closer = running.cancellation_token();
    let mut ended = tokio::spawn(running.waiting());
    let mut first = true;
    let mut closed = false;
    let problem = loop {
        // List (again): at connection, when told the tools changed, when a call found the
        // connection broken, and every REFRESH.
        let listed = tokio::select! {
            _ = stop.cancelled() => break String::new(),
            l = tokio::time::timeout(CONNECT_TIMEOUT, peer.list_all_tools()) => l,
        };
        match listed {
            Ok(Ok(tools)) => {
                let changed = {
                    let mut held = server.tools.lock().unwrap_or_else(|p| p.into_inner());
                    let changed = *held != tools;
                    *held = tools;
                    changed
                };
                if first {
                    first = false;
                    *server.peer.lock().unwrap_or_else(|p| p.into_inner()) = Some(peer.clone());
                    server
                        .health
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .connections += 1;
                    server.set_health(true, None);
                    info!(mcp_server = %server.name, protocol = %version, "MCP server connected");
                }
                if changed {
                    let Some(hub) = hub.upgrade() else {
                        break String::new();
                    };
                    hub.rebuild();
                }
            }
            Ok(Err(e)) => break format!("listing its tools failed: {}", describe(&e)),
            Err(_) => break format!("no answer to tools/list within {CONNECT_TIMEOUT:?}"),
        }
        tokio::select! {
            _ = stop.cancelled() => break String::new(),
            _ = &mut ended => {
                closed = true;
                break "the connection closed".into();
            }
            _ = tools_changed.notified() => {}
            _ = server.check.notified() => {}
            _ = tokio::time::sleep(REFRESH) => {}
        }
    };
    closer.cancel();
    if !closed {
        let _ = tokio::time::timeout(Duration::from_secs(5), ended).await;
    }
    problem
}

/// Opens a connection and completes the handshake.
async fn connect(
    server: &Server,
    listener: Listener,
) -> Result<RunningService<RoleClient, Listener>, String> {
    match &server.transport {
        McpTransport::Http { url, headers } => {
            let mut custom = HashMap::new();
            for (name, value) in headers {
                let name = http::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("{name:?} is not a header name"))?;
                let value = http::HeaderValue::from_str(value.expose_secret())
                    .map_err(|_| format!("the value of header {name} is not valid"))?;
                custom.insert(name, value);
            }
            let client = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| e.to_string())?;
            // The SDK's own bound on requests in flight (16 by default) would queue calls
            // below the server's `max_concurrency`: the semaphore is the one bound.
            let config = StreamableHttpClientTransportConfig::with_uri(url.as_str())
                .max_concurrent_requests(server.config.max_concurrency as usize)
                .custom_headers(custom)
                .max_json_response_size(MAX_MESSAGE_BYTES)
                .max_sse_event_size(MAX_MESSAGE_BYTES);
            let transport = StreamableHttpClientTransport::with_client(client, config);
            listener
                .serve(transport)
                .await
                .map_err(|e| format!("the handshake failed: {e}"))
        }
        McpTransport::Stdio { command, env, cwd } => {
            let mut cmd = tokio::process::Command::new(&command[0]);
            cmd.args(&command[1..]).env_clear().kill_on_drop(true);
            for key in INHERITED_ENV {
                if let Some(value) = std::env::var_os(key) {
                    cmd.env(key, value);
                }
            }
            for (key, value) in env {
                cmd.env(key, value.expose_secret());
            }
            if let Some(dir) = cwd {
                cmd.current_dir(dir);
            }
            let (transport, stderr) = TokioChildProcess::builder(cmd)
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot run {:?}: {e}", command[0]))?;
            if let Some(stderr) = stderr {
                tokio::spawn(log_stderr(server.name.clone(), stderr));
            }
            listener
                .serve(transport)
                .await
                .map_err(|e| format!("the handshake failed: {e}"))
        }
    }
}

/// A stdio server's stderr, line by line, into the log under the server's name.
async fn log_stderr(name: Arc<str>, stderr: tokio::process::ChildStderr) {
    let mut lines = FramedRead::new(stderr, LinesCodec::new_with_max_length(MAX_STDERR_LINE));
    while let Some(line) = lines.next().await {
        match line {
            Ok(line) => info!(mcp_server = %name, "{}", line.trim_end()),
            Err(LinesCodecError::MaxLineLengthExceeded) => {
                info!(mcp_server = %name, "(a line longer than {MAX_STDERR_LINE} bytes was left out)")
            }
            Err(LinesCodecError::Io(_)) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(t: &str) -> ContentBlock {
        ContentBlock::text(t)
    }

    fn result(content: Vec<ContentBlock>) -> CallToolResult {
        CallToolResult::success(content)
    }

    #[test]
    fn text_content_is_the_result_and_structured_content_wins_over_it() {
        assert_eq!(
            render(result(vec![text("a"), text("b")]), 100),
            Ok("a\nb".into())
        );
        let mut r = result(vec![text(r#"{"celsius": 21}"#)]);
        r.structured_content = Some(serde_json::json!({"celsius": 21}));
        assert_eq!(render(r, 100), Ok(r#"{"celsius":21}"#.into()));
    }

    #[test]
    fn errors_images_and_oversized_answers_are_told_to_the_model() {
        let mut failed = result(vec![text("the city is unknown")]);
        failed.is_error = Some(true);
        assert_eq!(render(failed, 100), Err("the city is unknown".into()));

        let image = ContentBlock::image("aGVsbG8=", "image/png");
        let e = render(result(vec![image.clone()]), 100).unwrap_err();
        assert!(
            e.contains("an image only") && e.contains("cannot use"),
            "{e}"
        );
        let with_text = render(result(vec![text("a chart"), image]), 200).unwrap();
        assert!(
            with_text.starts_with("a chart\n[the tool also answered with an image"),
            "{with_text}"
        );

        let e = render(result(vec![text(&"x".repeat(101))]), 100).unwrap_err();
        assert!(e.contains("larger than 100 bytes"), "{e}");
    }
}
