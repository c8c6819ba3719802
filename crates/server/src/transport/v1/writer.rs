//! The single writer of a protocol v1 connection: serialises events, writes audio frames,
//! closes.
//!
//! Every frame to the client goes through one bounded queue drained by this task, in the
//! order the session machine decided it (the machine sends no audio of a turn after its
//! `response.interrupted`), and frames waiting together are flushed together.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message};
use bytes::Bytes;
use futures_util::{Sink, SinkExt};
use tokio::sync::mpsc;

use atlas_protocol::ServerEvent;

/// Frames queued for the client.
#[derive(Debug)]
pub enum Outbound {
    /// A JSON event.
    Event(ServerEvent),
    /// A frame of reply audio (PCM at the client's output rate, at most [`MAX_FRAME_MS`]).
    Audio(Bytes),
    /// A WebSocket ping (heartbeat).
    Ping,
    /// Close the connection with this code and reason; nothing after it is written.
    Close {
        /// WebSocket close code.
        code: u16,
        /// Short reason.
        reason: &'static str,
    },
}

/// The client stopped reading or went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The queue is full: the client reads too slowly.
    Full,
    /// The writer has stopped.
    Closed,
}

/// Handle for queueing frames.
#[derive(Clone, Debug)]
pub struct OutboundTx {
    tx: mpsc::Sender<Outbound>,
}

impl OutboundTx {
    /// Wraps the queue's sender.
    pub fn new(tx: mpsc::Sender<Outbound>) -> Self {
        OutboundTx { tx }
    }

    /// Queues an event without waiting; a full queue means a slow consumer.
    pub fn event(&self, event: ServerEvent) -> Result<(), SendError> {
        self.tx
            .try_send(Outbound::Event(event))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SendError::Full,
                mpsc::error::TrySendError::Closed(_) => SendError::Closed,
            })
    }

    /// Queues a piece of reply audio as frames of at most [`MAX_FRAME_MS`] at `rate`, without
    /// waiting (the playout paces it, so a full queue means a slow consumer).
    pub fn audio(&self, pcm: Bytes, rate: u32) -> Result<(), SendError> {
        let max = (rate * MAX_FRAME_MS / 1000).max(1) as usize * 2;
        let mut offset = 0;
        while offset < pcm.len() {
            let end = (offset + max).min(pcm.len());
            self.tx
                .try_send(Outbound::Audio(pcm.slice(offset..end)))
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => SendError::Full,
                    mpsc::error::TrySendError::Closed(_) => SendError::Closed,
                })?;
            offset = end;
        }
        Ok(())
    }

    /// Queues a heartbeat ping.
    pub fn ping(&self) -> Result<(), SendError> {
        self.tx.try_send(Outbound::Ping).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        })
    }

    /// Queues the close frame (waits briefly for room).
    pub async fn close(&self, code: u16, reason: &'static str) {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            self.tx.send(Outbound::Close { code, reason }),
        )
        .await;
    }

    /// Resolves when the writer has stopped.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// How the writer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterExit {
    /// A close frame was written (or the queue ended).
    Closed,
    /// A write took longer than the deadline: the client is not reading.
    SlowConsumer,
    /// The connection failed.
    Gone,
}

/// Largest audio frame protocol v1 sends, in milliseconds (docs/protocol.md, section 4.3).
pub const MAX_FRAME_MS: u32 = 100;

/// Most frames written before one flush.
const MAX_BATCH: usize = 32;

/// Drains `rx` into `sink` until a close, a failure, or a write slower than `send_timeout`.
///
/// Frames already waiting in the queue are written together and flushed once (one system
/// call for a burst such as the first 300 ms of a reply plus its events); a lone frame is
/// flushed at once, so batching never delays anything.
pub async fn run_writer<S>(
    mut sink: S,
    mut rx: mpsc::Receiver<Outbound>,
    send_timeout: Duration,
) -> WriterExit
where
    S: Sink<Message> + Unpin,
{
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut batched = 0;
        while let Some(item) = next.take() {
            let frame = match item {
                Outbound::Event(event) => Message::Text(event.to_json().into()),
                Outbound::Audio(pcm) => Message::Binary(pcm),
                Outbound::Ping => Message::Ping(Bytes::new()),
                Outbound::Close { code, reason } => {
                    let frame = Message::Close(Some(CloseFrame {
                        code,
                        reason: reason.into(),
                    }));
                    // `send` flushes what was fed before the close frame too.
                    let _ = tokio::time::timeout(send_timeout, sink.send(frame)).await;
                    let _ = tokio::time::timeout(send_timeout, sink.close()).await;
                    return WriterExit::Closed;
                }
            };
            match tokio::time::timeout(send_timeout, sink.feed(frame)).await {
                Ok(Ok(())) => batched += 1,
                Ok(Err(_)) => return WriterExit::Gone,
                Err(_) => return WriterExit::SlowConsumer,
            }
            if batched < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        match tokio::time::timeout(send_timeout, sink.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return WriterExit::Gone,
            Err(_) => return WriterExit::SlowConsumer,
        }
    }
    let _ = tokio::time::timeout(send_timeout, sink.close()).await;
    WriterExit::Closed
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn a_piece_of_audio_goes_out_as_frames_of_at_most_100_ms() {
        let (sink_tx, sink_rx) = futures::channel::mpsc::channel::<Message>(64);
        let (tx, rx) = mpsc::channel(16);
        let out = OutboundTx::new(tx);
        // 250 ms at 8 kHz: 100 + 100 + 50 ms, whole samples.
        out.audio(Bytes::from(vec![7u8; 4000]), 8000).unwrap();
        out.close(1000, "bye").await;
        let exit = run_writer(sink_tx, rx, Duration::from_secs(1)).await;
        assert_eq!(exit, WriterExit::Closed);
        let frames: Vec<Message> = sink_rx.collect().await;
        let sizes: Vec<usize> = frames
            .iter()
            .filter_map(|m| match m {
                Message::Binary(b) => Some(b.len()),
                _ => None,
            })
            .collect();
        assert_eq!(sizes, [1600, 1600, 800]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_reads_is_detected() {
        // A sink with room for one frame that is never drained.
        let (sink_tx, _sink_rx) = futures::channel::mpsc::channel::<Message>(0);
        let (tx, rx) = mpsc::channel(16);
        let out = OutboundTx::new(tx);
        for i in 0..5 {
            out.audio(Bytes::from(vec![i; 4]), 8000).unwrap();
        }
        let exit = run_writer(sink_tx, rx, Duration::from_secs(2)).await;
        assert_eq!(exit, WriterExit::SlowConsumer);
    }

    /// A sink that records frames and counts flushes.
    #[derive(Default)]
    struct Counting {
        frames: Vec<Message>,
        flushes: usize,
    }

    impl Sink<Message> for Counting {
        type Error = std::convert::Infallible;
        fn poll_ready(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn start_send(
            mut self: std::pin::Pin<&mut Self>,
            item: Message,
        ) -> Result<(), Self::Error> {
            self.frames.push(item);
            Ok(())
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            self.flushes += 1;
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn queued_frames_go_out_in_order_with_one_flush_per_burst() {
        let (tx, rx) = mpsc::channel(64);
        let out = OutboundTx::new(tx);
        for i in 0..5u8 {
            out.audio(Bytes::from(vec![i; 4]), 8000).unwrap();
        }
        out.event(ServerEvent::Pong { id: None }).unwrap();
        let mut sink = Counting::default();
        let writer = tokio::spawn(async move {
            let exit = run_writer(&mut sink, rx, Duration::from_secs(1)).await;
            (exit, sink)
        });
        // Let the burst go out, then send a lone frame and close.
        tokio::time::sleep(Duration::from_millis(50)).await;
        out.audio(Bytes::from_static(b"alone!"), 8000).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        out.close(1000, "bye").await;
        let (exit, sink) = writer.await.unwrap();
        assert_eq!(exit, WriterExit::Closed);
        let kinds: Vec<String> = sink
            .frames
            .iter()
            .map(|m| match m {
                Message::Binary(b) if b.len() == 4 => format!("a{}", b[0]),
                Message::Binary(b) => String::from_utf8_lossy(b).trim_end_matches('!').to_owned(),
                Message::Text(_) => "event".into(),
                Message::Close(_) => "close".into(),
                _ => "other".into(),
            })
            .collect();
        assert_eq!(
            kinds,
            ["a0", "a1", "a2", "a3", "a4", "event", "alone", "close"]
        );
        // One flush for the burst of six, one for the lone frame, one for the close.
        assert_eq!(sink.flushes, 3, "{kinds:?}");
    }

    #[tokio::test]
    async fn full_queue_reports_slow_consumer() {
        let (tx, _rx) = mpsc::channel(1);
        let out = OutboundTx::new(tx);
        out.event(ServerEvent::Pong { id: None }).unwrap();
        assert_eq!(
            out.event(ServerEvent::Pong { id: None }),
            Err(SendError::Full)
        );
    }
}
