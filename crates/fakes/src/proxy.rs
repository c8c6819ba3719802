//! A TCP proxy for fault injection at the network level:
//! - cut it and every connection through it drops without a close (as when a network or a
//!   server goes away); restore it and new connections go through again;
//! - stall it and it stops forwarding while keeping every connection open (a server that hangs,
//!   a network that black-holes packets); resume it and the held bytes flow on;
//! - give it a delay and every chunk from the client waits that long before it is forwarded
//!   (a slow network: one delay per request/response round trip).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// A TCP proxy that can be cut, stalled and slowed.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    upstream: Arc<Mutex<SocketAddr>>,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    stalled: watch::Sender<bool>,
    delay_us: Arc<AtomicU64>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), upstream).await
    }

    /// Listens on `listen` and forwards to `upstream`.
    pub async fn start_on(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let up = Arc::new(AtomicBool::new(true));
        let upstream = Arc::new(Mutex::new(upstream));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (stalled, _) = watch::channel(false);
        let delay_us = Arc::new(AtomicU64::new(0));
        let (u, c, s, d, target) = (
            up.clone(),
            conns.clone(),
            stalled.clone(),
            delay_us.clone(),
            upstream.clone(),
        );
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !u.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let to = *target.lock().unwrap_or_else(|e| e.into_inner());
                let (s, d) = (s.subscribe(), d.clone());
                let task = tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    if let Ok(server) = tokio::net::TcpStream::connect(to).await {
                        let _ = server.set_nodelay(true);
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::select! {
                            _ = pump(cr, sw, s.clone(), Some(d)) => {}
                            _ = pump(sr, cw, s, None) => {}
                        }
                    }
                });
                c.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(task.abort_handle());
            }
        });
        Ok(Proxy {
            addr,
            upstream,
            up,
            conns,
            stalled,
            delay_us,
        })
    }

    /// Sends new connections to `upstream` from now on (a load balancer moving traffic to
    /// another instance); connections already open stay where they are.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap_or_else(|e| e.into_inner()) = upstream;
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            c.abort();
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Stops forwarding in both directions; connections stay open and new ones are accepted
    /// (and hang).
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Forwards again, held bytes first.
    pub fn resume(&self) {
        self.stalled.send_replace(false);
    }

    /// Delays every chunk from a client by `delay` before forwarding it.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us.store(
            u64::try_from(delay.as_micros()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }
}

/// Copies `from` to `to`, holding data while stalled and waiting `delay` per chunk.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
    delay_us: Option<Arc<AtomicU64>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(d) = &delay_us {
            let us = d.load(Ordering::SeqCst);
            if us > 0 {
                tokio::time::sleep(Duration::from_micros(us)).await;
            }
        }
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
