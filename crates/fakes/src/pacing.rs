//! Timed streaming bodies: chunks released at given instants, plus injected aborts and stalls.

use std::io;

use axum::body::Body;
use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a streaming body does at its next instant.
pub(crate) enum Step {
    /// Write these bytes.
    Data(Bytes),
    /// Abort the response (the body yields an I/O error, so hyper tears the connection down
    /// without finishing the chunked encoding).
    Abort,
    /// Never produce anything again (until the client goes away or the fakes shut down).
    Stall,
}

/// A [`Step`] due at an instant.
pub(crate) struct Timed {
    pub(crate) at: Instant,
    pub(crate) step: Step,
}

impl Timed {
    pub(crate) fn data(at: Instant, data: impl Into<Bytes>) -> Self {
        Self {
            at,
            step: Step::Data(data.into()),
        }
    }
}

/// A response body that plays `steps` at their instants. The body ends when the iterator does;
/// on shutdown it aborts.
pub(crate) fn paced_body<I>(steps: I, shutdown: CancellationToken) -> Body
where
    I: Iterator<Item = Timed> + Send + 'static,
{
    let stream = futures_util::stream::unfold(
        (steps, shutdown, false),
        |(mut steps, shutdown, done)| async move {
            if done {
                return None;
            }
            let Timed { at, step } = steps.next()?;
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = shutdown.cancelled() => return Some((Err(shutting_down()), (steps, shutdown, true))),
            }
            match step {
                Step::Data(data) => Some((Ok(data), (steps, shutdown, false))),
                Step::Abort => Some((
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "injected fault: connection dropped mid-stream",
                    )),
                    (steps, shutdown, true),
                )),
                Step::Stall => {
                    shutdown.cancelled().await;
                    Some((Err(shutting_down()), (steps, shutdown, true)))
                }
            }
        },
    );
    Body::from_stream(stream)
}

fn shutting_down() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "fake server shutting down",
    )
}
