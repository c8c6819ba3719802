//! The session's connection to the speech recogniser: connects lazily without blocking the
//! session loop, buffers audio while connecting, reconnects after a drop with backoff, and
//! maps the recogniser's stream times back to session audio time across reconnections.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use atlas_core::uplink::{BACKLOG_MESSAGES, Reconnect};
use atlas_providers::ProviderError;
use atlas_providers::stt::{SttCommand, SttEvent, SttOptions, SttProvider, SttStream};

type Connecting = Pin<Box<dyn Future<Output = Result<SttStream, ProviderError>> + Send>>;

enum State {
    /// Not connected; connect on the next audio (not before `retry_at`).
    Idle,
    /// Handshake in progress.
    Connecting(Connecting),
    /// Streaming.
    Open(SttStream),
}

/// What the link reports to the session.
#[derive(Debug)]
pub enum LinkEvent {
    /// A recognition result; times already mapped to session audio seconds.
    Event(SttEvent),
    /// The connection failed or dropped; it will be retried on the next audio.
    Lost(ProviderError),
}

/// Audio on its way to the recogniser.
struct Chunk {
    pcm: Bytes,
    /// Session audio position of its first sample, in seconds.
    position_s: f64,
    /// Client frames it joins.
    frames: u64,
}

/// The session's recogniser connection.
pub struct SttLink {
    provider: Arc<dyn SttProvider>,
    options: SttOptions,
    state: State,
    /// Messages waiting for a connection.
    backlog: VecDeque<Chunk>,
    /// Frames the session machine let wait, to go in one message with what follows.
    held: BytesMut,
    /// Session audio position of the held audio, and how many frames it joins.
    held_at: f64,
    held_frames: u64,
    /// Session audio position of the first frame sent on the current connection.
    offset_s: Option<f64>,
    /// When it may connect again after failures (the rule is the core's).
    reconnect: Reconnect,
    /// Frames dropped because the recogniser fell behind.
    pub dropped_frames: u64,
    /// Seconds of audio dropped since [`SttLink::take_dropped_seconds`] last took them.
    dropped_seconds: f64,
}

impl SttLink {
    /// A link that will connect on the first audio.
    pub fn new(provider: Arc<dyn SttProvider>, options: SttOptions) -> Self {
        SttLink {
            provider,
            options,
            state: State::Idle,
            backlog: VecDeque::new(),
            held: BytesMut::new(),
            held_at: 0.0,
            held_frames: 0,
            offset_s: None,
            reconnect: Reconnect::default(),
            dropped_frames: 0,
            dropped_seconds: 0.0,
        }
    }

    /// Counts audio the recogniser will never hear (and so never bills).
    fn dropped(&mut self, frames: u64, bytes: usize) {
        self.dropped_frames += frames;
        self.dropped_seconds += (bytes / 2) as f64 / f64::from(self.options.sample_rate.max(1));
        crate::metrics::AUDIO.frames_dropped.increment(frames);
    }

    /// Seconds of audio dropped since the last call: the session takes them off its bill.
    pub fn take_dropped_seconds(&mut self) -> f64 {
        std::mem::take(&mut self.dropped_seconds)
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.reconnect.failures()
    }

    /// Starts connecting now (at session start, to hide the handshake).
    pub fn connect_now(&mut self) {
        if matches!(self.state, State::Idle) {
            let provider = self.provider.clone();
            let options = self.options.clone();
            self.state =
                State::Connecting(Box::pin(async move { provider.connect(options).await }));
        }
    }

    /// Sends a frame of audio at session position `position_s`, or keeps it (`hold`) to go
    /// in one message with the frames after it.
    pub fn send_audio(&mut self, pcm: Bytes, position_s: f64, hold: bool) {
        if self.held.is_empty() {
            if !hold {
                return self.send(Chunk {
                    pcm,
                    position_s,
                    frames: 1,
                });
            }
            self.held_at = position_s;
            // Room for a typical batch: five 20 ms frames and the one that sends them.
            self.held.reserve(pcm.len() * 6);
        }
        self.held.extend_from_slice(&pcm);
        self.held_frames += 1;
        if !hold {
            self.send_held();
        }
    }

    /// Sends the held frames now.
    pub fn send_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let chunk = Chunk {
            pcm: self.held.split().freeze(),
            position_s: self.held_at,
            frames: std::mem::take(&mut self.held_frames),
        };
        self.send(chunk);
    }

    fn send(&mut self, chunk: Chunk) {
        if let State::Open(stream) = &mut self.state {
            self.offset_s.get_or_insert(chunk.position_s);
            let bytes = chunk.pcm.len();
            match stream.commands.try_send(SttCommand::Audio(chunk.pcm)) {
                Ok(()) => return,
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    self.dropped(chunk.frames, bytes);
                    return;
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(SttCommand::Audio(pcm))) => {
                    self.state = State::Idle;
                    self.offset_s = None;
                    self.queue(Chunk { pcm, ..chunk });
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {}
            }
        } else {
            self.queue(chunk);
        }
        if matches!(self.state, State::Idle)
            && self.reconnect.may_connect(Instant::now().into_std())
        {
            self.connect_now();
        }
    }

    fn queue(&mut self, chunk: Chunk) {
        if self.backlog.len() == BACKLOG_MESSAGES
            && let Some(oldest) = self.backlog.pop_front()
        {
            self.dropped(oldest.frames, oldest.pcm.len());
        }
        self.backlog.push_back(chunk);
    }

    /// Asks the recogniser to finalise what it has heard (after the held audio).
    pub fn finalize(&mut self) {
        self.send_held();
        if let State::Open(stream) = &self.state {
            let _ = stream.commands.try_send(SttCommand::Finalize);
        }
    }

    /// Closes the connection politely (the recogniser flushes and ends) after the held
    /// audio.
    pub fn close(&mut self) {
        self.send_held();
        if let State::Open(stream) = &self.state {
            let _ = stream.commands.try_send(SttCommand::Close);
        }
        self.state = State::Idle;
        // Audio still waiting for a connection never reaches the recogniser.
        while let Some(chunk) = self.backlog.pop_front() {
            self.dropped(chunk.frames, chunk.pcm.len());
        }
    }

    /// The next thing that happens on the link; pending forever while idle.
    pub async fn next(&mut self) -> LinkEvent {
        loop {
            match &mut self.state {
                State::Idle => std::future::pending::<()>().await,
                State::Connecting(fut) => match fut.await {
                    Ok(stream) => {
                        self.state = State::Open(stream);
                        self.offset_s = None;
                        self.flush_backlog();
                    }
                    Err(e) => return self.lost(e),
                },
                State::Open(stream) => match stream.events.recv().await {
                    Some(Ok(event)) => {
                        self.reconnect.succeeded();
                        return LinkEvent::Event(self.map_times(event));
                    }
                    Some(Err(e)) => return self.lost(e),
                    None => {
                        return self
                            .lost(ProviderError::Closed("recogniser ended the stream".into()));
                    }
                },
            }
        }
    }

    fn lost(&mut self, e: ProviderError) -> LinkEvent {
        self.state = State::Idle;
        self.offset_s = None;
        self.reconnect.lost(e.is_busy(), Instant::now().into_std());
        LinkEvent::Lost(e)
    }

    fn flush_backlog(&mut self) {
        while let Some(chunk) = self.backlog.pop_front() {
            if let State::Open(stream) = &mut self.state {
                self.offset_s.get_or_insert(chunk.position_s);
                let bytes = chunk.pcm.len();
                if stream
                    .commands
                    .try_send(SttCommand::Audio(chunk.pcm))
                    .is_err()
                {
                    self.dropped(chunk.frames, bytes);
                }
            }
        }
    }

    fn map_times(&self, event: SttEvent) -> SttEvent {
        let offset = self.offset_s.unwrap_or(0.0);
        let shift = |t: Option<f64>| t.map(|t| t + offset);
        match event {
            SttEvent::Final {
                text,
                speech_final,
                from_finalize,
                speech_end_s,
            } => SttEvent::Final {
                text,
                speech_final,
                from_finalize,
                speech_end_s: shift(speech_end_s),
            },
            SttEvent::UtteranceEnd { last_word_end_s } => SttEvent::UtteranceEnd {
                last_word_end_s: shift(last_word_end_s),
            },
            SttEvent::SpeechStarted { at_s } => SttEvent::SpeechStarted { at_s: shift(at_s) },
            SttEvent::SpeechEnded { at_s } => SttEvent::SpeechEnded { at_s: shift(at_s) },
            partial @ SttEvent::Partial { .. } => partial,
        }
    }
}
