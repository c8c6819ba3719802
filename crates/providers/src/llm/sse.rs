//! The server-sent-events loop shared by the streaming LLM adapters: each adapter parses its
//! provider's event data; the loop turns the byte stream into completion events.

use eventsource_stream::Eventsource;
use futures_util::StreamExt;

use super::{LlmEvent, LlmStream};
use crate::ProviderError;
use crate::http::Endpoint;

/// A provider's SSE parser: what it remembers between events, and how it reads one.
pub(crate) trait SseParser: Default + Send + 'static {
    /// What the stream must send before it ends; a stream that ends without it failed.
    const END: &'static str;

    /// Appends the events one SSE event's `data` carries to `out`; `Ok(true)` when it ended
    /// the completion. On an error, nothing is appended.
    fn feed(&mut self, data: &str, out: &mut Vec<LlmEvent>) -> Result<bool, ProviderError>;
}

/// Maps a stream of SSE bytes to completion events, parsed by `P`.
pub(crate) fn events_from_sse<P, S>(bytes: S) -> LlmStream
where
    P: SseParser,
    S: futures_util::Stream<Item = Result<bytes::Bytes, ProviderError>> + Send + 'static,
{
    Box::pin(async_stream::stream! {
        let mut sse = std::pin::pin!(bytes.eventsource());
        let mut parser = P::default();
        let mut items = Vec::new();
        while let Some(item) = sse.next().await {
            let event = match item {
                Ok(e) => e,
                Err(eventsource_stream::EventStreamError::Transport(e)) => { yield Err(e); return; }
                Err(e) => { yield Err(ProviderError::Protocol(e.to_string())); return; }
            };
            let fed = parser.feed(&event.data, &mut items);
            for e in items.drain(..) {
                yield Ok(e);
            }
            match fed {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => { yield Err(e); return; }
            }
        }
        yield Err(ProviderError::Closed(format!("stream ended before {}", P::END)));
    })
}

impl Endpoint {
    /// Posts `body` as JSON asking for an event stream (see [`Endpoint::post_json`]) and
    /// returns the completion events `P` parses out of the answer.
    pub(crate) async fn post_for_events<P: SseParser>(
        &self,
        body: &(impl serde::Serialize + Sync),
        headers: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder + Sync,
    ) -> Result<LlmStream, ProviderError> {
        let bytes = self
            .post_json(body, |post| {
                headers(post.header("accept", "text/event-stream"))
            })
            .await?;
        Ok(events_from_sse::<P, _>(bytes))
    }
}
