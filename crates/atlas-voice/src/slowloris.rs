//! `loadtest --slowloris N`: N sockets that never finish a request, held against the server
//! while the sessions run. Half send only a request line, half send nothing. Each one the
//! server closes is opened again, but not sooner than `limit` after it was last opened (a
//! socket refused at once waits out the rest): N slow sockets at any time, not a connection
//! flood.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the slow sockets saw.
#[derive(Debug, Default)]
pub struct SlowlorisReport {
    /// Sockets opened in all.
    pub opened: usize,
    /// Sockets the server closed.
    pub closed: usize,
    /// Connection attempts that failed (refused, out of descriptors …).
    pub connect_errors: usize,
    /// Open → closed by the server, ms: median, 99th percentile, maximum.
    pub close_p50_ms: u64,
    /// See `close_p50_ms`.
    pub close_p99_ms: u64,
    /// See `close_p50_ms`.
    pub close_max_ms: u64,
    /// Sockets still open when the run ended that had been open longer than `limit` + 1 s.
    pub open_past_limit: usize,
}

/// Holds `sockets` slow sockets against `addr` until `stop`; `limit` is the header timeout the
/// server is expected to enforce.
pub async fn run(
    addr: SocketAddr,
    sockets: usize,
    limit: Duration,
    stop: CancellationToken,
) -> SlowlorisReport {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..sockets {
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut closes = Vec::new();
            let (mut opened, mut errors, mut past_limit) = (0usize, 0usize, 0usize);
            let mut last_open: Option<Instant> = None;
            while !stop.is_cancelled() {
                if let Some(at) = last_open {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep_until(at + limit) => {}
                    }
                }
                last_open = Some(Instant::now());
                let Ok(mut socket) = TcpStream::connect(addr).await else {
                    errors += 1;
                    // Out of descriptors or a full backlog: retry shortly.
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                };
                opened += 1;
                if i % 2 == 0 && socket.write_all(b"GET / HTTP/1.1\r\n").await.is_err() {
                    closes.push(Duration::ZERO);
                    continue;
                }
                let began = Instant::now();
                let mut buf = [0u8; 512];
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => {
                            // A second of slack for the server's timer and scheduling.
                            if began.elapsed() > limit + Duration::from_secs(1) {
                                past_limit += 1;
                            }
                            break;
                        }
                        r = socket.read(&mut buf) => match r {
                            Ok(0) | Err(_) => {
                                closes.push(began.elapsed());
                                break;
                            }
                            Ok(_) => {}
                        },
                    }
                }
            }
            (opened, errors, past_limit, closes)
        });
    }
    let mut report = SlowlorisReport::default();
    let mut closes = Vec::new();
    while let Some(Ok((opened, errors, past, c))) = tasks.join_next().await {
        report.opened += opened;
        report.connect_errors += errors;
        report.open_past_limit += past;
        closes.extend(c);
    }
    closes.sort();
    report.closed = closes.len();
    let at = |p: f64| {
        closes
            .get(((closes.len() as f64 * p) as usize).min(closes.len().saturating_sub(1)))
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    };
    report.close_p50_ms = at(0.5);
    report.close_p99_ms = at(0.99);
    report.close_max_ms = closes.last().map(|d| d.as_millis() as u64).unwrap_or(0);
    report
}

impl SlowlorisReport {
    /// As JSON, for `loadtest --json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "opened": self.opened, "closed": self.closed, "connect_errors": self.connect_errors,
            "close_p50_ms": self.close_p50_ms, "close_p99_ms": self.close_p99_ms,
            "close_max_ms": self.close_max_ms, "open_past_limit": self.open_past_limit,
        })
    }
}
