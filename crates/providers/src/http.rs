//! Timeouts and retries shared by the HTTP adapters.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use crate::ProviderError;

/// Timeouts and retry policy for one provider.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// TCP/TLS connect deadline.
    pub connect_timeout: Duration,
    /// Deadline for the response headers after the request is sent.
    pub response_timeout: Duration,
    /// Longest silence between two chunks of a streamed body.
    pub idle_timeout: Duration,
    /// Retries after the first attempt (0 disables retrying).
    pub max_retries: usize,
    /// First backoff delay; doubles each retry.
    pub retry_min_delay: Duration,
    /// Longest backoff delay.
    pub retry_max_delay: Duration,
    /// A `retry-after` longer than this is not waited for: the call fails instead, because a
    /// person is waiting for the answer.
    pub max_retry_after: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(15),
            max_retries: 2,
            retry_min_delay: Duration::from_millis(200),
            retry_max_delay: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(5),
        }
    }
}

impl HttpSettings {
    /// A `reqwest` client with this connect timeout.
    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new())
    }

    /// Runs `attempt` until it succeeds, fails with a non-retryable error, or the retry
    /// budget is spent; waits per exponential backoff with jitter, or per `retry-after`.
    pub async fn retry<T, F, Fut>(&self, what: &'static str, attempt: F) -> Result<T, ProviderError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry_min_delay)
            .with_max_delay(self.retry_max_delay)
            .with_max_times(self.max_retries)
            .with_jitter();
        let max_retry_after = self.max_retry_after;
        attempt
            .retry(backoff)
            .when(ProviderError::is_retryable)
            .adjust(move |e, delay| {
                let delay = delay?;
                match e.retry_after() {
                    Some(after) if after > max_retry_after => None,
                    Some(after) => Some(after),
                    None => Some(delay),
                }
            })
            .notify(|e, delay| {
                tracing::warn!(provider_call = what, error = %e, retry_in_ms = delay.as_millis() as u64, "provider call failed; retrying");
            })
            .await
    }

    /// Sends the request `build` makes, retrying per this policy, until a success status;
    /// error responses become [`ProviderError::Status`] via `parse_error`.
    pub(crate) async fn send_with_retry(
        &self,
        what: &'static str,
        build: impl Fn() -> reqwest::RequestBuilder,
        parse_error: fn(&serde_json::Value) -> Option<(String, String)>,
    ) -> Result<reqwest::Response, ProviderError> {
        self.retry(what, || async {
            let response = self.send(build()).await?;
            if response.status().is_success() {
                Ok(response)
            } else {
                Err(status_error(response, parse_error).await)
            }
        })
        .await
    }

    /// Sends `request` with the response deadline; maps transport failures.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ProviderError> {
        match tokio::time::timeout(self.response_timeout, request.send()).await {
            Err(_) => Err(ProviderError::Timeout("response headers")),
            Ok(Err(e)) if e.is_timeout() => Err(ProviderError::Timeout("connection")),
            Ok(Err(e)) => Err(ProviderError::Connect(error_chain(&e))),
            Ok(Ok(r)) => Ok(r),
        }
    }
}

/// The endpoint an HTTP adapter posts its JSON requests to, and how: a client with the
/// adapter's connect timeout, its timeouts and retry policy, and how to read its errors.
pub(crate) struct Endpoint {
    client: reqwest::Client,
    url: String,
    http: HttpSettings,
    /// Names the call in logs (`anthropic.messages`).
    what: &'static str,
    /// Pulls the provider's (type, message) out of an error body.
    parse_error: fn(&serde_json::Value) -> Option<(String, String)>,
}

impl Endpoint {
    /// `path` under `base_url` (a trailing `/` on the base is ignored), called `what` in logs,
    /// reached per `http`; `parse_error` reads the provider's error bodies.
    pub(crate) fn new(
        http: &HttpSettings,
        base_url: &str,
        path: &str,
        what: &'static str,
        parse_error: fn(&serde_json::Value) -> Option<(String, String)>,
    ) -> Self {
        Endpoint {
            client: http.client(),
            url: format!("{}{path}", base_url.trim_end_matches('/')),
            http: http.clone(),
            what,
            parse_error,
        }
    }

    /// Posts `body` as JSON, with the headers `headers` adds (credentials and the like),
    /// retrying per [`HttpSettings::send_with_retry`]; returns the successful response's
    /// body as a stream with the idle timeout.
    pub(crate) async fn post_json(
        &self,
        body: &(impl serde::Serialize + Sync),
        headers: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder + Sync,
    ) -> Result<impl Stream<Item = Result<Bytes, ProviderError>> + Send + 'static, ProviderError>
    {
        let body = serde_json::to_vec(body).map_err(|e| ProviderError::Protocol(e.to_string()))?;
        let response = self
            .http
            .send_with_retry(
                self.what,
                || {
                    headers(self.client.post(&self.url))
                        .headers(trace_headers())
                        .header("content-type", "application/json")
                        .body(body.clone())
                },
                self.parse_error,
            )
            .await?;
        Ok(body_with_idle_timeout(response, self.http.idle_timeout))
    }
}

/// The current span's trace context as HTTP headers (`traceparent`, `tracestate`), for a
/// request leaving on the session's behalf; nothing when tracing is off.
pub fn trace_headers() -> http::HeaderMap {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    struct Headers(http::HeaderMap);
    impl opentelemetry::propagation::Injector for Headers {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(key.as_bytes()),
                http::HeaderValue::from_str(&value),
            ) {
                self.0.insert(k, v);
            }
        }
    }
    let cx = tracing::Span::current().context();
    let mut headers = Headers(http::HeaderMap::new());
    if cx.span().span_context().is_valid() {
        opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut headers));
    }
    headers.0
}

/// The error and its sources on one line (no URL query strings: reqwest strips none, so
/// callers must not put secrets in URLs).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Parses a `retry-after` header given in seconds (integer or decimal).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let secs: f64 = v.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

/// Reads an error response into [`ProviderError::Status`], using `parse` to pull the
/// provider's (type, message) out of its JSON body.
async fn status_error(
    response: reqwest::Response,
    parse: fn(&serde_json::Value) -> Option<(String, String)>,
) -> ProviderError {
    let status = response.status().as_u16();
    let retry_after = retry_after(response.headers());
    let body = tokio::time::timeout(Duration::from_secs(5), response.bytes())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let body = &body[..body.len().min(16 * 1024)];
    let (kind, message) = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .as_ref()
        .and_then(parse)
        .unwrap_or_else(|| {
            (
                "unknown".to_owned(),
                String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            )
        });
    ProviderError::Status {
        status,
        kind,
        message,
        retry_after,
    }
}

/// The response body as a stream of chunks, failing with [`ProviderError::Timeout`] when no
/// chunk arrives within `idle`.
fn body_with_idle_timeout(
    response: reqwest::Response,
    idle: Duration,
) -> impl Stream<Item = Result<Bytes, ProviderError>> + Send + 'static {
    let body = response.bytes_stream();
    futures_util::stream::unfold(Box::pin(body), move |mut body| async move {
        match tokio::time::timeout(idle, body.next()).await {
            Err(_) => Some((Err(ProviderError::Timeout("next chunk")), body)),
            Ok(None) => None,
            Ok(Some(Ok(b))) => Some((Ok(b), body)),
            Ok(Some(Err(e))) => Some((Err(ProviderError::Closed(error_chain(&e))), body)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn status(status: u16, retry_after: Option<Duration>) -> ProviderError {
        ProviderError::Status {
            status,
            kind: "x".into(),
            message: "y".into(),
            retry_after,
        }
    }

    fn fast() -> HttpSettings {
        HttpSettings {
            retry_min_delay: Duration::from_millis(1),
            retry_max_delay: Duration::from_millis(2),
            ..HttpSettings::default()
        }
    }

    #[tokio::test]
    async fn retries_retryable_errors_then_succeeds() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let out = fast()
            .retry("test", move || {
                let c = c.clone();
                async move {
                    match c.fetch_add(1, Ordering::SeqCst) {
                        0 => Err(status(529, None)),
                        1 => Err(status(429, Some(Duration::from_millis(5)))),
                        _ => Ok(7),
                    }
                }
            })
            .await;
        assert_eq!(out.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn does_not_retry_client_errors_or_long_retry_after() {
        for err in [
            status(400, None),
            status(429, Some(Duration::from_secs(60))),
        ] {
            let calls = Arc::new(AtomicUsize::new(0));
            let c = calls.clone();
            let e = err.clone();
            let out: Result<(), _> = fast()
                .retry("test", move || {
                    c.fetch_add(1, Ordering::SeqCst);
                    let e = e.clone();
                    async move { Err(e) }
                })
                .await;
            assert!(out.is_err());
            assert_eq!(calls.load(Ordering::SeqCst), 1, "{err}");
        }
    }

    #[tokio::test]
    async fn gives_up_after_max_retries() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let out: Result<(), _> = fast()
            .retry("test", move || {
                c.fetch_add(1, Ordering::SeqCst);
                async { Err(status(503, None)) }
            })
            .await;
        assert!(matches!(
            out,
            Err(ProviderError::Status { status: 503, .. })
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn parses_retry_after() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after", "0.5".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(500)));
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
