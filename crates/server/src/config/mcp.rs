//! `[[mcp_servers]]`: Model Context Protocol servers whose tools the assistant may call.
//!
//! A server is reached either over Streamable HTTP (`url`, with `headers`) or as a local
//! command spoken to over stdio (`command`, `env`, `cwd`). Header and environment values may
//! name environment variables as `${NAME}`, so tokens stay out of the file; the values are
//! secret (never logged or printed).

use std::collections::BTreeMap;
use std::path::PathBuf;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Longest server name: the model sees tools as `{server}__{tool}`, at most 64 characters.
pub const MAX_SERVER_NAME: usize = 24;
/// Most MCP servers one deployment declares.
pub const MAX_SERVERS: usize = 16;

/// One MCP server.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct McpServerConfig {
    /// The server's name: the prefix of its tools (`{name}__{tool}`), in logs, metrics and
    /// records. Letters, digits and `-`, at most 24.
    pub name: String,
    /// Streamable HTTP: the endpoint (`https://…/mcp`; plain HTTP only on a loopback address).
    #[serde(default)]
    pub url: Option<String>,
    /// Streamable HTTP: headers sent with every request (e.g. `Authorization = "Bearer
    /// ${SEARCH_TOKEN}"`).
    #[serde(default, serialize_with = "redact_values")]
    pub headers: BTreeMap<String, String>,
    /// stdio: the program and its arguments, run as given (no shell).
    #[serde(default)]
    pub command: Vec<String>,
    /// stdio: environment of the program (it inherits nothing else but `PATH`, `HOME`,
    /// `LANG` and `TZ`).
    #[serde(default, serialize_with = "redact_values")]
    pub env: BTreeMap<String, String>,
    /// stdio: working directory of the program.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Only these of the server's tools are offered (by the server's own names; empty: all).
    #[serde(default)]
    pub allow: Vec<String>,
    /// These of the server's tools are never offered.
    #[serde(default)]
    pub deny: Vec<String>,
    /// How long a call is waited for, in milliseconds (100–60,000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Calls in flight to this server at once, from all sessions (1–256); more wait their
    /// turn within their time limit.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: u32,
}

fn default_timeout_ms() -> u64 {
    5_000
}

fn default_max_concurrency() -> u32 {
    32
}

fn redact_values<S: serde::Serializer>(
    v: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(v.keys().map(|k| (k, "[redacted]")))
}

/// How a server is reached, its secrets resolved.
#[derive(Clone, Debug)]
pub enum McpTransport {
    /// Streamable HTTP.
    Http {
        /// The endpoint.
        url: String,
        /// Headers sent with every request.
        headers: Vec<(String, SecretString)>,
    },
    /// A local program over stdio.
    Stdio {
        /// Program and arguments.
        command: Vec<String>,
        /// Its environment (besides the few inherited variables).
        env: Vec<(String, SecretString)>,
        /// Its working directory.
        cwd: Option<PathBuf>,
    },
}

impl McpServerConfig {
    /// A local program over stdio, with the defaults.
    pub fn stdio(name: &str, command: Vec<String>) -> Self {
        McpServerConfig {
            name: name.into(),
            url: None,
            headers: BTreeMap::new(),
            command,
            env: BTreeMap::new(),
            cwd: None,
            allow: Vec::new(),
            deny: Vec::new(),
            timeout_ms: default_timeout_ms(),
            max_concurrency: default_max_concurrency(),
        }
    }

    /// A Streamable HTTP server, with the defaults.
    pub fn http(name: &str, url: &str) -> Self {
        McpServerConfig {
            url: Some(url.into()),
            ..McpServerConfig::stdio(name, Vec::new())
        }
    }

    /// Whether the server offers its tool `name` (by the server's own name).
    pub fn offers(&self, name: &str) -> bool {
        (self.allow.is_empty() || self.allow.iter().any(|a| a == name))
            && !self.deny.iter().any(|d| d == name)
    }

    /// The transport, with `${NAME}` references replaced from the environment.
    pub fn transport(&self) -> Result<McpTransport, ConfigError> {
        self.transport_with(|name| std::env::var(name).ok())
    }

    fn transport_with(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<McpTransport, ConfigError> {
        let resolve = |what: &str, map: &BTreeMap<String, String>| {
            map.iter()
                .map(|(k, v)| {
                    let value = expand(v, &lookup).map_err(|missing| {
                        ConfigError(format!(
                            "mcp server {:?}: {what} {k:?} names ${{{missing}}}, which is not set",
                            self.name
                        ))
                    })?;
                    Ok((k.clone(), SecretString::from(value)))
                })
                .collect::<Result<Vec<_>, ConfigError>>()
        };
        match (&self.url, self.command.is_empty()) {
            (Some(url), true) => Ok(McpTransport::Http {
                url: url.clone(),
                headers: resolve("header", &self.headers)?,
            }),
            (None, false) => Ok(McpTransport::Stdio {
                command: self.command.clone(),
                env: resolve("environment variable", &self.env)?,
                cwd: self.cwd.clone(),
            }),
            _ => Err(ConfigError(format!(
                "mcp server {:?} needs either a url (Streamable HTTP) or a command (stdio), not both",
                self.name
            ))),
        }
    }

    /// Checks one server's declaration.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError(format!("mcp server {:?}: {m}", self.name)));
        let valid_name = !self.name.is_empty()
            && self.name.len() <= MAX_SERVER_NAME
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid_name {
            return Err(ConfigError(format!(
                "mcp server name {:?} must be 1 to {MAX_SERVER_NAME} letters, digits or '-'",
                self.name
            )));
        }
        if !(100..=60_000).contains(&self.timeout_ms) {
            return fail("timeout_ms must be between 100 and 60000".into());
        }
        if !(1..=256).contains(&self.max_concurrency) {
            return fail("max_concurrency must be between 1 and 256".into());
        }
        if let Some(both) = self.allow.iter().find(|a| self.deny.contains(a)) {
            return fail(format!("tool {both:?} is both allowed and denied"));
        }
        if self.allow.len() + self.deny.len() > 256 {
            return fail("allow and deny name at most 256 tools".into());
        }
        match self.transport()? {
            McpTransport::Http { url, .. } => {
                if !self.env.is_empty() || self.cwd.is_some() {
                    return fail("env and cwd are for stdio servers (command)".into());
                }
                if !super::https_or_loopback(&url) {
                    return fail(format!(
                        "url must be https (http only on a loopback address), got {url:?}"
                    ));
                }
                for name in self.headers.keys() {
                    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                        return fail(format!("{name:?} is not a header name"));
                    }
                }
            }
            McpTransport::Stdio { command, .. } => {
                if !self.headers.is_empty() {
                    return fail("headers are for Streamable HTTP servers (url)".into());
                }
                if command[0].trim().is_empty() {
                    return fail("command must start with the program to run".into());
                }
            }
        }
        Ok(())
    }
}

/// `text` with every `${NAME}` replaced by `lookup(NAME)`; `Err(NAME)` for one not set.
fn expand(text: &str, lookup: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start + 2..].find('}') else {
            break;
        };
        let name = &rest[start + 2..start + 2 + len];
        out.push_str(&rest[..start]);
        out.push_str(&lookup(name).ok_or_else(|| name.to_owned())?);
        rest = &rest[start + 3 + len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks the declared servers: each valid, names unique.
pub(super) fn validate_all(servers: &[McpServerConfig]) -> Result<(), ConfigError> {
    if servers.len() > MAX_SERVERS {
        return Err(ConfigError(format!(
            "at most {MAX_SERVERS} mcp servers may be declared"
        )));
    }
    let mut names = std::collections::HashSet::new();
    for s in servers {
        s.validate()?;
        if !names.insert(s.name.to_ascii_lowercase()) {
            return Err(ConfigError(format!(
                "mcp server {:?} is declared twice",
                s.name
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn stdio(name: &str) -> McpServerConfig {
        McpServerConfig::stdio(name, vec!["mcp-server-time".into()])
    }

    fn http(url: &str) -> McpServerConfig {
        McpServerConfig::http("search", url)
    }

    #[test]
    fn references_to_the_environment_are_expanded_and_a_missing_one_is_named() {
        let lookup = |n: &str| (n == "TOKEN").then(|| "s3cret".to_owned());
        assert_eq!(expand("Bearer ${TOKEN}", &lookup).unwrap(), "Bearer s3cret");
        assert_eq!(
            expand("${TOKEN}-${TOKEN}", &lookup).unwrap(),
            "s3cret-s3cret"
        );
        assert_eq!(expand("no reference", &lookup).unwrap(), "no reference");
        assert_eq!(expand("open ${TOKEN", &lookup).unwrap(), "open ${TOKEN");
        assert_eq!(expand("${OTHER}", &lookup).unwrap_err(), "OTHER");

        let mut server = http("https://mcp.example.com/mcp");
        server
            .headers
            .insert("Authorization".into(), "Bearer ${TOKEN}".into());
        let McpTransport::Http { headers, .. } = server.transport_with(lookup).unwrap() else {
            panic!("an http server");
        };
        assert_eq!(headers[0].1.expose_secret(), "Bearer s3cret");
        let mut server = http("https://mcp.example.com/mcp");
        server
            .headers
            .insert("X-Key".into(), "${ATLAS_TEST_UNSET_VARIABLE}".into());
        let e = server.validate().unwrap_err().to_string();
        assert!(e.contains("${ATLAS_TEST_UNSET_VARIABLE}"), "{e}");
    }

    #[test]
    fn header_and_environment_values_are_never_printed() {
        let mut server = http("https://mcp.example.com/mcp");
        server
            .headers
            .insert("Authorization".into(), "Bearer abc".into());
        let shown = serde_json::to_string(&server).unwrap();
        assert!(
            !shown.contains("abc") && shown.contains("[redacted]"),
            "{shown}"
        );
    }

    #[test]
    fn allow_and_deny_lists_choose_the_tools() {
        let mut server = stdio("time");
        assert!(server.offers("get_current_time"));
        server.deny = vec!["convert_time".into()];
        assert!(server.offers("get_current_time") && !server.offers("convert_time"));
        server.deny.clear();
        server.allow = vec!["convert_time".into()];
        assert!(!server.offers("get_current_time") && server.offers("convert_time"));
    }

    #[test]
    fn bad_declarations_are_refused_with_the_reason() {
        let cases: Vec<(McpServerConfig, &str)> = vec![
            (stdio("a__b"), "letters, digits or '-'"),
            (stdio(&"x".repeat(25)), "letters, digits or '-'"),
            (http("http://mcp.example.com/mcp"), "must be https"),
            (http("ftp://127.0.0.1/"), "must be https"),
            (
                McpServerConfig {
                    url: Some("https://x.example/mcp".into()),
                    ..stdio("both")
                },
                "not both",
            ),
            (
                McpServerConfig {
                    command: Vec::new(),
                    ..stdio("neither")
                },
                "either a url",
            ),
            (
                McpServerConfig {
                    timeout_ms: 50,
                    ..stdio("fast")
                },
                "timeout_ms",
            ),
            (
                McpServerConfig {
                    max_concurrency: 0,
                    ..stdio("none")
                },
                "max_concurrency",
            ),
            (
                McpServerConfig {
                    allow: vec!["t".into()],
                    deny: vec!["t".into()],
                    ..stdio("torn")
                },
                "both allowed and denied",
            ),
            (
                McpServerConfig {
                    command: vec![" ".into()],
                    ..stdio("blank")
                },
                "program",
            ),
            (
                McpServerConfig {
                    cwd: Some("/tmp".into()),
                    ..http("https://x.example/mcp")
                },
                "stdio servers",
            ),
        ];
        for (server, expected) in cases {
            let e = server.validate().expect_err(&server.name).to_string();
            assert!(e.contains(expected), "{}: {e}", server.name);
        }
        assert!(http("http://127.0.0.1:9/mcp").validate().is_ok());
        assert!(stdio("time").validate().is_ok());
        let e = validate_all(&[stdio("time"), stdio("Time")]).unwrap_err();
        assert!(e.to_string().contains("declared twice"), "{e}");
    }
}
