//! Timed streaming bodies: chunks released at given instants, plus injected aborts and stalls.

use std::io;

use axum::body::Body;
use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::state::StreamBill;

/// What a streaming body does at its next instant.
pub(crate) enum Step {
    /// Write these bytes (and bill what they carry).
    Data(Bytes, Bill),
    /// Abort the response (the body yields an I/O error, so hyper tears the connection down
    /// without finishing the chunked encoding).
    Abort,
    /// Never produce anything again (until the client goes away or the fakes shut down).
    Stall,
}

/// What the bytes of a step carry for the stream's bill.
pub(crate) enum Bill {
    /// Nothing billable.
    Nothing,
    /// This many characters of generated text.
    Generated(usize),
    /// An event reporting this many output tokens so far.
    Reported(u64),
    /// The stream's last event, reporting this many output tokens.
    Last(u64),
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
            step: Step::Data(data.into(), Bill::Nothing),
        }
    }

    /// Bytes carrying `chars` characters of generated text.
    pub(crate) fn generated(at: Instant, data: impl Into<Bytes>, chars: usize) -> Self {
        Self {
            at,
            step: Step::Data(data.into(), Bill::Generated(chars)),
        }
    }

    /// The stream's last event, reporting `output_tokens`.
    pub(crate) fn last(at: Instant, data: impl Into<Bytes>, output_tokens: u64) -> Self {
        Self {
            at,
            step: Step::Data(data.into(), Bill::Last(output_tokens)),
        }
    }
}

/// A response body that plays `steps` at their instants. The body ends when the iterator does;
/// on shutdown it aborts. `bill`, when given, is settled by what was sent (see [`StreamBill`]),
/// also when the client leaves and the body is dropped.
pub(crate) fn paced_body<I>(steps: I, shutdown: CancellationToken, bill: Option<StreamBill>) -> Body
where
    I: Iterator<Item = Timed> + Send + 'static,
{
    let stream = futures_util::stream::unfold(
        (steps, shutdown, bill, false),
        |(mut steps, shutdown, mut bill, done)| async move {
            if done {
                return None;
            }
            let Timed { at, step } = steps.next()?;
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = shutdown.cancelled() => return Some((Err(shutting_down()), (steps, shutdown, bill, true))),
            }
            match step {
                Step::Data(data, what) => {
                    if let Some(b) = &mut bill {
                        match what {
                            Bill::Nothing => {}
                            Bill::Generated(chars) => b.generated(chars),
                            Bill::Reported(tokens) => b.reported(tokens),
                            Bill::Last(tokens) => b.finished(tokens),
                        }
                    }
                    Some((Ok(data), (steps, shutdown, bill, false)))
                }
                Step::Abort => Some((
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "injected fault: connection dropped mid-stream",
                    )),
                    (steps, shutdown, bill, true),
                )),
                Step::Stall => {
                    shutdown.cancelled().await;
                    Some((Err(shutting_down()), (steps, shutdown, bill, true)))
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
