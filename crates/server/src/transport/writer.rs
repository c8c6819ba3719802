//! The single writer of a connection, whatever its transport: writes the frames the
//! transport rendered, in order, and closes.
//!
//! Every frame to the client goes through one bounded queue drained by this task, in the
//! order the session machine decided it (the machine sends no audio of a turn after that
//! turn was cut), and frames waiting together are flushed together.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message};
use bytes::Bytes;
use futures_util::{Sink, SinkExt};
use tokio::sync::mpsc;

/// Frames queued for one client.
pub const CAPACITY: usize = 256;
/// A single write slower than this marks a slow consumer.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the writer task for a connection's sending half; returns its queue and the task.
pub fn spawn<S>(
    tasks: &tokio_util::task::TaskTracker,
    sink: S,
) -> (OutboundTx, tokio::task::JoinHandle<WriterExit>)
where
    S: Sink<Message> + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(CAPACITY);
    let task = tasks.spawn(run_writer(sink, rx, SEND_TIMEOUT));
    (OutboundTx::new(tx), task)
}

/// Frames queued for the client.
#[derive(Debug)]
pub enum Outbound {
    /// A WebSocket message, rendered by the transport.
    Frame(Message),
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

    /// Queues a frame without waiting; a full queue means a slow consumer (everything the
    /// session sends is paced or small).
    pub fn frame(&self, frame: Message) -> Result<(), SendError> {
        self.tx
            .try_send(Outbound::Frame(frame))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SendError::Full,
                mpsc::error::TrySendError::Closed(_) => SendError::Closed,
            })
    }

    /// Queues a WebSocket ping (heartbeat).
    pub fn ping(&self) -> Result<(), SendError> {
        self.frame(Message::Ping(Bytes::new()))
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
                Outbound::Frame(frame) => frame,
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

    fn audio(bytes: Vec<u8>) -> Message {
        Message::Binary(Bytes::from(bytes))
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_reads_is_detected() {
        // A sink with room for one frame that is never drained.
        let (sink_tx, _sink_rx) = futures::channel::mpsc::channel::<Message>(0);
        let (tx, rx) = mpsc::channel(16);
        let out = OutboundTx::new(tx);
        for i in 0..5 {
            out.frame(audio(vec![i; 4])).unwrap();
        }
        let exit = run_writer(sink_tx, rx, Duration::from_secs(2)).await;
        assert_eq!(exit, WriterExit::SlowConsumer);
    }

    #[tokio::test]
    async fn nothing_is_written_after_the_close() {
        let (sink_tx, sink_rx) = futures::channel::mpsc::channel::<Message>(64);
        let (tx, rx) = mpsc::channel(16);
        let out = OutboundTx::new(tx);
        out.frame(audio(vec![1; 4])).unwrap();
        out.close(1000, "bye").await;
        out.frame(audio(vec![2; 4])).unwrap();
        let exit = run_writer(sink_tx, rx, Duration::from_secs(1)).await;
        assert_eq!(exit, WriterExit::Closed);
        let frames: Vec<Message> = sink_rx.collect().await;
        assert_eq!(frames.len(), 2);
        assert!(matches!(frames.last(), Some(Message::Close(Some(f))) if f.code == 1000));
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
            out.frame(audio(vec![i; 4])).unwrap();
        }
        out.frame(Message::Text("{}".into())).unwrap();
        let mut sink = Counting::default();
        let writer = tokio::spawn(async move {
            let exit = run_writer(&mut sink, rx, Duration::from_secs(1)).await;
            (exit, sink)
        });
        // Let the burst go out, then send a lone frame and close.
        tokio::time::sleep(Duration::from_millis(50)).await;
        out.frame(Message::Binary(Bytes::from_static(b"alone")))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        out.close(1000, "bye").await;
        let (exit, sink) = writer.await.unwrap();
        assert_eq!(exit, WriterExit::Closed);
        let kinds: Vec<String> = sink
            .frames
            .iter()
            .map(|m| match m {
                Message::Binary(b) if b.len() == 4 => format!("a{}", b[0]),
                Message::Binary(b) => String::from_utf8_lossy(b).into_owned(),
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
        out.ping().unwrap();
        assert_eq!(out.ping(), Err(SendError::Full));
    }
}
