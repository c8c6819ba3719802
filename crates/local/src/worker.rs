//! Engine worker processes: started once, shared by every session, restarted if they die.
//!
//! Each worker loads its model once and serves one request at a time on its own cores.
//! Requests beyond the one running wait in a bounded queue; when the queue is full the
//! request is turned away at once with [`ProviderError::Busy`] instead of making every
//! session slower.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atlas_providers::ProviderError;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{debug, info, warn};

use crate::ipc::{self, Reply, Request};

/// How to run a worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Name for logs and errors (`speech recognition`).
    pub name: &'static str,
    /// The worker binary.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Most requests queued or running at once.
    pub queue: usize,
    /// How long loading the model may take.
    pub start_timeout: Duration,
    /// How much lower than the server's its scheduling priority is (0: the same, up to 19).
    /// The language model runs lower so that, when it generates the next sentence while the
    /// voice speaks the first, the voice gets the cores first (docs/benchmarks.md).
    pub nice: i32,
}

type Pending = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Reply>>>>;

struct Running {
    pid: Option<u32>,
    frames: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    alive: Arc<AtomicBool>,
}

impl Running {
    fn send(&self, request: &Request, payload: &[u8]) -> bool {
        let header = serde_json::to_vec(request).expect("requests serialise");
        self.frames.send(ipc::frame_bytes(&header, payload)).is_ok()
    }
}

/// A running engine worker.
pub struct Worker {
    config: WorkerConfig,
    running: tokio::sync::Mutex<Option<Arc<Running>>>,
    slots: Arc<Semaphore>,
    next_id: AtomicU64,
    model: Mutex<String>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("name", &self.config.name)
            .finish()
    }
}

impl Worker {
    /// Starts the worker and waits until its model is loaded.
    pub async fn start(config: WorkerConfig) -> Result<Arc<Worker>, ProviderError> {
        let worker = Arc::new(Worker {
            slots: Arc::new(Semaphore::new(config.queue.max(1))),
            config,
            running: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
            model: Mutex::new(String::new()),
        });
        worker.ensure_running().await?;
        Ok(worker)
    }

    /// What the worker reported it loaded.
    pub fn model(&self) -> String {
        self.model.lock().expect("model lock").clone()
    }

    /// Process id of the running worker, if one is running.
    pub async fn pid(&self) -> Option<u32> {
        let guard = self.running.lock().await;
        guard
            .as_ref()
            .filter(|r| r.alive.load(Ordering::Acquire))
            .and_then(|r| r.pid)
    }

    /// Requests queued or running now.
    pub fn in_flight(&self) -> usize {
        self.config.queue.max(1) - self.slots.available_permits()
    }

    async fn ensure_running(&self) -> Result<Arc<Running>, ProviderError> {
        let mut guard = self.running.lock().await;
        if let Some(r) = guard.as_ref().filter(|r| r.alive.load(Ordering::Acquire)) {
            return Ok(r.clone());
        }
        let r = self.spawn().await?;
        *guard = Some(r.clone());
        Ok(r)
    }

    async fn spawn(&self) -> Result<Arc<Running>, ProviderError> {
        let name = self.config.name;
        let program = &self.config.program;
        let mut command = Command::new(program);
        command
            .args(&self.config.args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let nice = self.config.nice.clamp(0, 19);
        if nice > 0 {
            // SAFETY: runs in the child between fork and exec, where only async-signal-safe
            // calls are allowed; `setpriority` is a plain system call and nothing is allocated.
            // Set before exec, it holds for every thread the worker starts.
            unsafe {
                command.pre_exec(move || {
                    if libc::setpriority(libc::PRIO_PROCESS, 0, nice) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = command.spawn().map_err(|e| {
            ProviderError::Connect(format!(
                "could not start the {name} worker {}: {e} (build it with `cargo build --release`)",
                program.display()
            ))
        })?;
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");

        let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let log_tail = tail.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                debug!(worker = name, "{line}");
                let mut t = log_tail.lock().expect("tail lock");
                if t.len() == 20 {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        let stderr_tail = || {
            let t = tail.lock().expect("tail lock");
            t.iter()
                .rev()
                .take(3)
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join(" | ")
        };

        let ready = tokio::time::timeout(
            self.config.start_timeout,
            ipc::read_frame_async::<Reply>(&mut stdout),
        )
        .await;
        let model = match ready {
            Ok(Ok(Some((Reply::Ready { model }, _)))) => model,
            Ok(Ok(Some((other, _)))) => {
                return Err(ProviderError::Protocol(format!(
                    "{name} worker sent {other:?} before it was ready"
                )));
            }
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Err(ProviderError::Connect(format!(
                    "the {name} worker exited while loading ({}): {}",
                    status
                        .map(|s| s.map(|s| s.to_string()).unwrap_or_default())
                        .unwrap_or_default(),
                    stderr_tail()
                )));
            }
            Err(_) => {
                return Err(ProviderError::Timeout(
                    "the engine worker to load its model",
                ));
            }
        };
        let pid = child.id();
        info!(worker = name, %model, pid, "engine worker ready");
        *self.model.lock().expect("model lock") = model;

        let (frames, mut frame_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            while let Some(buf) = frame_rx.recv().await {
                if stdin.write_all(&buf).await.is_err() || stdin.flush().await.is_err() {
                    break;
                }
            }
        });

        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let (reader_pending, reader_alive) = (pending.clone(), alive.clone());
        tokio::spawn(async move {
            loop {
                match ipc::read_frame_async::<Reply>(&mut stdout).await {
                    Ok(Some((reply, payload))) => {
                        let reply = ipc::with_payload(reply, payload);
                        let id = match &reply {
                            Reply::Transcript { id, .. }
                            | Reply::Delta { id, .. }
                            | Reply::Done { id, .. }
                            | Reply::Audio { id, .. }
                            | Reply::TurnScore { id, .. }
                            | Reply::Failed { id, .. } => *id,
                            Reply::Ready { .. } => continue,
                        };
                        let tx = reader_pending
                            .lock()
                            .expect("pending lock")
                            .get(&id)
                            .cloned();
                        if let Some(tx) = tx {
                            let _ = tx.send(reply);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        warn!(worker = name, error = %e, "engine worker sent a bad frame");
                        break;
                    }
                }
            }
            reader_alive.store(false, Ordering::Release);
            // Dropping the senders fails every request in flight.
            reader_pending.lock().expect("pending lock").clear();
            let _ = child.start_kill();
            match child.wait().await {
                Ok(status) if status.success() => debug!(worker = name, "engine worker exited"),
                Ok(status) => {
                    warn!(worker = name, %status, "engine worker died; it restarts on the next request")
                }
                Err(e) => warn!(worker = name, error = %e, "engine worker lost"),
            }
        });
        Ok(Arc::new(Running {
            pid,
            frames,
            pending,
            alive,
        }))
    }

    /// Queues a request (`make` receives its id). Fails at once with
    /// [`ProviderError::Busy`] when the queue is full.
    pub async fn submit(
        &self,
        make: impl FnOnce(u64) -> Request,
        payload: &[u8],
    ) -> Result<Ticket, ProviderError> {
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            ProviderError::Busy(format!(
                "the {} engine has {} requests queued",
                self.config.name,
                self.config.queue.max(1)
            ))
        })?;
        let running = self.ensure_running().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        running.pending.lock().expect("pending lock").insert(id, tx);
        if !running.send(&make(id), payload) {
            running.pending.lock().expect("pending lock").remove(&id);
            return Err(ProviderError::Closed(format!(
                "the {} worker stopped",
                self.config.name
            )));
        }
        Ok(Ticket {
            id,
            name: self.config.name,
            rx,
            running,
            _permit: permit,
            finished: false,
        })
    }
}

/// A request in a worker's queue; dropping it before the end cancels it.
pub struct Ticket {
    id: u64,
    name: &'static str,
    rx: mpsc::UnboundedReceiver<Reply>,
    running: Arc<Running>,
    _permit: OwnedSemaphorePermit,
    finished: bool,
}

impl Ticket {
    /// The next reply for this request. Ends the ticket after `Transcript`, `Done`, the last
    /// `Audio` or `Failed`.
    pub async fn next(&mut self) -> Result<Reply, ProviderError> {
        match self.rx.recv().await {
            Some(reply) => {
                if matches!(
                    reply,
                    Reply::Transcript { .. }
                        | Reply::Done { .. }
                        | Reply::Audio { last: true, .. }
                        | Reply::TurnScore { .. }
                        | Reply::Failed { .. }
                ) {
                    self.finished = true;
                }
                Ok(reply)
            }
            None => {
                self.finished = true;
                Err(ProviderError::Closed(format!(
                    "the {} worker stopped during the request",
                    self.name
                )))
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.running
            .pending
            .lock()
            .expect("pending lock")
            .remove(&self.id);
        if !self.finished {
            self.running.send(&Request::Cancel { id: self.id }, &[]);
        }
    }
}
