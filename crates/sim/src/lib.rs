//! Deterministic simulation of the session machine and its ownership, the way FoundationDB
//! and TigerBeetle test: one seed decides the whole schedule — client behaviour, provider
//! answers, shared-store faults, the clock — and invariants are checked after every step.
//!
//! # Layout
//! - [`store`]: the shared store's semantics (the Redis scripts), with data loss.
//! - this module: the world — two instances running [`Session`] machines for one user's
//!   sessions with the real machine configuration, a driver that carries out their outputs
//!   the way the server's does (replies as provider requests with usage whose speech is
//!   synthesised twice as fast as real time and pushed while the machine wants it, aborts
//!   reported at once, fenced shared-store writes, the recorder), random clients that play
//!   the reply audio they receive in real time (half of them confirming what they played,
//!   as a phone line does), and the invariants.
//!
//! Sessions with an even id decide the end of a turn with the `smart` policy: the world's
//! end-of-turn model answers each pause after a random delay, complete or not, or says at once
//! that it cannot (busy), or never answers; the turn invariants check that only a complete
//! score on a live pause, the maximum silence (the silence policy's time for a pause the model
//! could not judge), push-to-talk or a typed turn ends a turn, and that every pause ends.
//!
//! Sessions whose id is 2 or 3 modulo 4 draft replies (two a turn) to words that do not end
//! the turn yet: nothing of a reply reaches the client before its turn is heard, a draft kept
//! answers exactly the words heard, and a discarded one is billed like any request.
//!
//! A failing seed prints `cargo run -p atlas-sim --release -- --seed N`, which replays it;
//! [`shrink`] cuts the failing schedule down to a short sequence of actions.

pub mod store;

use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use atlas_core::cost::from_usd;
use atlas_core::echo;
use atlas_core::history::Role;
use atlas_core::latency::Latency;
use atlas_core::session::ledger::{LlmBill, ReportedTokens};
use atlas_core::session::{
    Attaching, Carried, Config, Event, Heard, Input, LeaseAnswer, Output, ReplyOutcome, Session,
    VerifiedToken,
};
use atlas_core::turns::TurnPolicy;
use atlas_core::vocab::{AudioFormat, Limits};

use store::{Refresh, Store, Write};

/// Actions in one seed's schedule.
pub const ACTIONS: usize = 200;

/// Instances in the simulated cluster.
const INSTANCES: usize = 2;
/// Sessions one user may hold.
const MAX_PER_USER: usize = 3;
/// Lease lifetime (ms).
const LEASE_TTL: u64 = 15_000;
/// How long a claim waits for its handshake (ms).
const CLAIM_TTL: u64 = 15_000;
/// The session budget: a few dozen replies, so that budgets run out within a run.
const BUDGET_USD: f64 = 0.05;
/// Output tokens a request may produce at most (the configured cap).
const MAX_TOKENS: u64 = 200;
/// The smart turn policy's maximum silence (ms).
const MAX_SILENCE: u64 = 1_500;
/// The smart turn policy's silence (ms) for a pause the model cannot judge.
const UNJUDGED: u64 = 300;
/// The smart turn policy's threshold.
const THRESHOLD: f32 = 0.5;
/// The local recogniser cuts an utterance this long (ms) after its speech ended.
const CUT_MS: i64 = 300;
/// Words that alone, while a reply plays, are no turn (the machine's default backchannels
/// among [`WORDS`]).
const BACKCHANNELS: &[&str] = &["okay", "mm-hm"];
/// The echo window of sessions that guard against echo (ms).
const ECHO_WINDOW: u64 = 1_000;
/// Echo comes back at most this long (ms) after the assistant went quiet.
const ECHO_LATE: u64 = 600;

/// One thing that happens. Parameters are interpreted against the world's state when the
/// action runs, so a schedule with actions removed (shrinking) still runs.
#[derive(Clone, Copy, Debug)]
pub enum Action {
    /// A new session on an instance.
    NewSession { instance: u8 },
    /// A client acts on its session.
    Client { session: u8, what: ClientAct },
    /// A reply in flight finishes on its own.
    ReplyFinishes { session: u8, tokens: u8 },
    /// Time passes.
    Advance { ms: u16 },
    /// The shared store loses everything (restart without persistence).
    StoreLosesData,
    /// The shared store stops or starts answering.
    StoreReachable(bool),
}

/// What a client does.
#[derive(Clone, Copy, Debug)]
pub enum ClientAct {
    /// An audio frame (`valid`: of an accepted size).
    Audio {
        valid: bool,
    },
    /// A typed turn (`nul`: with a NUL in it).
    Text {
        nul: bool,
    },
    /// Words heard: a partial, a final, the endpoint.
    Partial,
    Final {
        speech_final: bool,
    },
    UtteranceEnd,
    SpeechStarted,
    /// The recogniser cut the utterance (the local recogniser): the next final transcribes it.
    SpeechEnded,
    /// Push-to-talk released.
    Commit,
    /// Stop the reply.
    Cancel,
    /// `auth.refresh`.
    Refresh,
    /// A burst of frames (flood).
    Flood {
        frames: u8,
    },
    /// The connection drops.
    Drop,
    /// `session.end`.
    End,
    /// Reconnect with the resume token on an instance; `complete`: the handshake completes.
    Resume {
        instance: u8,
        complete: bool,
    },
}

/// A broken invariant.
#[derive(Clone, Debug)]
pub struct Violation {
    /// Index of the action after which it was found.
    pub step: usize,
    /// Which invariant.
    pub invariant: &'static str,
    /// What was seen.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "after action {}: {}: {}",
            self.step, self.invariant, self.detail
        )
    }
}

/// What a run did (for the seeds-per-second figure and coverage).
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Machine inputs fed.
    pub inputs: u64,
    /// Provider requests started.
    pub requests: u64,
    /// Resumes completed on another instance.
    pub moves: u64,
    /// Sessions recorded.
    pub records: u64,
    /// Draft replies kept and discarded.
    pub drafts: (u64, u64),
    /// Transcripts of the assistant's own voice fed.
    pub echoes: u64,
}

/// What the world's sessions use beyond the basic machine (the seeds found before a feature
/// existed replay in a world without it).
#[derive(Clone, Copy, Debug)]
pub struct Features {
    /// Sessions with an even id use the smart turn policy.
    pub smart_turns: bool,
    /// Sessions with an id of 2 or 3 modulo 4 draft replies.
    pub drafts: bool,
    /// Sessions with an id divisible by 3 guard against echo, and their clients hear the
    /// assistant's words back through the microphone.
    pub echo: bool,
}

impl Features {
    /// Everything.
    pub const ALL: Features = Features {
        smart_turns: true,
        drafts: true,
        echo: true,
    };
}

/// A provider request in flight.
#[derive(Clone, Debug)]
struct Request {
    turn_id: u64,
    input_tokens: u64,
    produced: u64,
    spoken: String,
    /// When it started (ms).
    started_ms: u64,
    /// Speech synthesised and pushed so far (ms).
    pushed_ms: u64,
}

/// Speech is synthesised this many times faster than real time.
const SYNTHESIS_SPEED: u64 = 2;
/// Each sentence of a reply is this long (ms).
const SENTENCE_MS: u64 = 500;
/// Reply audio is pushed in chunks this long (ms).
const CHUNK_MS: u64 = 100;
/// A reply's speech is at most this long (ms).
const REPLY_MS: u64 = 3_000;

/// The client's side of the reply audio: it plays what it receives in real time.
#[derive(Clone, Debug, Default)]
struct Listener {
    turn_id: u64,
    /// Bytes received for the turn.
    received: u64,
    /// When byte 0 would have played (ms), moved when the buffer ran dry.
    clock: u64,
    /// Bytes played when the turn was cut, if it was.
    cut_at: Option<u64>,
    /// The turn is over (its log was written): no more audio may come.
    over: bool,
    /// When it was cut or over (ms): its echo may still come back for a while.
    quiet_ms: Option<u64>,
}

impl Listener {
    fn played(&self, now_ms: u64, bytes_per_ms: u64) -> u64 {
        (now_ms.saturating_sub(self.clock) * bytes_per_ms).min(self.received)
    }
}

/// One instance's copy of a session.
struct Copy {
    instance: usize,
    machine: Session,
    epoch: u64,
    /// Ledger usage carried in (from the published state).
    base: (u64, u64, u64),
    /// Usage reported by the provider for this copy's requests (input, output, tts chars).
    truth: (u64, u64, u64),
    request: Option<Request>,
    ended: bool,
    /// Answers of the shared store still on their way: (due ms, answer, sent at).
    lease_answers: Vec<(u64, LeaseAnswer, Instant)>,
    verifying: Option<u64>,
    turns: Vec<(u64, String)>,
    /// The attached client's playback of the current reply.
    listener: Listener,
    /// The current reply's sentences, with the offset (bytes) where their audio ends.
    sentences: Vec<(String, u64)>,
    /// A broken playout rule seen while carrying out the outputs.
    playout_violation: Option<String>,
    /// A connection the machine should have refused, if one was attached.
    attach_violation: Option<String>,
    /// An overtaken resume is being fed: the machine must refuse it.
    expect_refusal: bool,
    /// The smart turn policy's side of the world, when the session uses it.
    smart: Option<TurnWatch>,
    /// The latest turn heard (`Heard`), and its words.
    heard: (u64, String),
    /// The turn and words of the latest reply started.
    asked: (u64, String),
    /// A broken draft rule seen while carrying out the outputs.
    draft_violation: Option<String>,
    /// A finalise was asked and its final has not come (the final ends the turn).
    finalizing: bool,
    /// A broken echo rule seen while carrying out the outputs.
    echo_violation: Option<String>,
}

/// What the world knows of a smart-policy session's turn: the pause the machine asked about,
/// the model's answers on their way, and a broken turn rule.
#[derive(Debug, Default)]
struct TurnWatch {
    /// The live pause. `None` once speech resumed or the turn ended.
    pause: Option<WatchedPause>,
    /// A recogniser's cut is being fed: a pause it opens awaits the cut's words.
    cutting: bool,
    /// End of speech (ms, before the start when negative) of the recognition signal being
    /// fed.
    signal_eos: i64,
    /// A finalise was asked (push-to-talk): the next final may end the turn.
    commit: bool,

    /// When speech last started (ms).
    speech_started: Option<i64>,
    /// Words heard in finals since the last turn ended.
    pending: Vec<String>,
    /// The model's answers on their way: (due ms, pause, probability; `None`: it cannot
    /// judge).
    answers: Vec<(u64, u64, Option<f32>)>,
    /// A broken turn rule.
    violation: Option<String>,
}

/// A pause the machine asked about, as the world sees it.
#[derive(Clone, Copy, Debug)]
struct WatchedPause {
    id: u64,
    /// The end of speech (ms) it followed.
    since: i64,
    /// Opened at a recogniser's cut whose final has not come yet.
    awaiting: bool,
    /// Decided (a complete score or the maximum silence) while awaiting: the final ends the
    /// turn.
    decided: bool,
    /// When its silence ends the turn (ms): the maximum silence, or sooner once the model
    /// said it cannot judge it.
    limit: i64,
}

impl TurnWatch {
    /// The words waiting are only backchannels: with a reply playing they end no turn.
    fn only_backchannels(&self) -> bool {
        self.pending
            .iter()
            .all(|w| BACKCHANNELS.contains(&w.as_str()))
    }
}

impl Copy {
    /// A fresh copy on `instance`: nothing in flight, nothing seen yet.
    fn new(
        instance: usize,
        machine: Session,
        epoch: u64,
        base: (u64, u64, u64),
        turns: Vec<(u64, String)>,
    ) -> Self {
        Copy {
            instance,
            machine,
            epoch,
            base,
            truth: (0, 0, 0),
            request: None,
            ended: false,
            lease_answers: Vec::new(),
            verifying: None,
            listener: Listener::default(),
            sentences: Vec::new(),
            playout_violation: None,
            attach_violation: None,
            expect_refusal: false,
            turns,
            smart: None,
            heard: (0, String::new()),
            asked: (0, String::new()),
            draft_violation: None,
            finalizing: false,
            echo_violation: None,
        }
    }
}

/// One session across instances.
struct SimSession {
    sid: u64,
    copies: Vec<Copy>,
    /// The copy the client is attached to.
    attached: Option<usize>,
    /// The latest resume token the client heard.
    token: Option<String>,
    /// The database's row: the epoch of the final record it holds (a snapshot replaces the
    /// row only if it is not older, as the store's sequence check does), and how many final
    /// records were accepted for that epoch.
    record: Option<(u64, u32)>,
    /// Words the person said or typed, and words the assistant was heard to say.
    said: HashSet<String>,
    /// The end of speech (ms) of the recogniser's last cut, until a final transcribes it.
    cut: Option<i64>,
}

/// The world.
pub struct World {
    rng: StdRng,
    t0: Instant,
    now_ms: u64,
    store: Store,
    reachable: bool,
    sessions: Vec<SimSession>,
    states: Vec<(Carried, Vec<(u64, String)>)>,
    next_sid: u64,
    next_token: u64,
    stats: Stats,
    db_has_nul: bool,
    /// Print every output (`ATLAS_SIM_TRACE`).
    trace: bool,
    /// The most one request can cost: a full prompt, the longest reply and its speech.
    worst_request: u64,
    /// Releases of ended sessions the store has not taken yet (retried, as the server does).
    releases: Vec<(u64, u64, usize)>,
    /// What the sessions use.
    features: Features,
    /// The end-of-turn model's randomness (its own, so that the rest of the world draws the
    /// same numbers with it or without it).
    model_rng: StdRng,
    /// The echo's randomness (its own, likewise).
    echo_rng: StdRng,
    /// An echo is being fed: the machine must act on none of it.
    echoing: bool,
}

/// The most one request can cost: a full prompt, the longest reply and its speech.
fn worst_request() -> u64 {
    let prices = config().prices;
    prices.reply_estimate(20_000 + 100, MAX_TOKENS).unwrap_or(0)
        + prices
            .cost(&atlas_core::cost::Consumption {
                tts_chars: 400,
                ..Default::default()
            })
            .total
            .unwrap_or(0)
}

/// The configuration of a session: the smart turn policy when `smart`, drafting when
/// `drafts`, guarding against echo when `echo`.
fn config_for(smart: bool, drafts: bool, echo: bool) -> Config {
    let mut config = config();
    if drafts {
        config.turns.drafts = 2;
    }
    if echo {
        config.turns.echo_window = Duration::from_millis(ECHO_WINDOW);
    }
    if smart {
        config.turns.policy = TurnPolicy::Smart {
            threshold: THRESHOLD,
            max_silence: Duration::from_millis(MAX_SILENCE),
            unjudged: Duration::from_millis(UNJUDGED),
        };
    }
    config
}

fn config() -> Config {
    let reference = Config::reference();
    Config {
        session_budget: Some(from_usd(BUDGET_USD)),
        llm_max_tokens: MAX_TOKENS as u32,
        lease_ttl: Some(Duration::from_millis(LEASE_TTL)),
        limits: Limits {
            budget_usd: Some(BUDGET_USD),
            ..reference.limits.clone()
        },
        ..reference
    }
}

const WORDS: &[&str] = &[
    "what", "is", "the", "weather", "in", "paris", "tell", "me", "a", "story", "stop", "wait",
    "okay", "mm-hm", "time",
];

impl World {
    /// A world for `seed` (its own randomness: provider usage, delays) whose sessions use
    /// `features`.
    pub fn new(seed: u64, features: Features) -> Self {
        World {
            features,
            model_rng: StdRng::seed_from_u64(seed ^ 0x007e_4d0f_7a12),
            echo_rng: StdRng::seed_from_u64(seed ^ 0x0ec4_0ec4),
            echoing: false,
            rng: StdRng::seed_from_u64(seed ^ 0x05ee_d0fa_71a5),
            t0: Instant::now(),
            now_ms: 0,
            store: Store::default(),
            reachable: true,
            sessions: Vec::new(),
            states: Vec::new(),
            next_sid: 1,
            next_token: 1,
            stats: Stats::default(),
            db_has_nul: false,
            trace: std::env::var_os("ATLAS_SIM_TRACE").is_some(),
            worst_request: worst_request(),
            releases: Vec::new(),
        }
    }

    fn now(&self) -> Instant {
        self.t0 + Duration::from_millis(self.now_ms)
    }

    /// The instant `ms` after the start (before it, when negative).
    fn at_ms(&self, ms: i64) -> Instant {
        let d = Duration::from_millis(ms.unsigned_abs());
        if ms < 0 { self.t0 - d } else { self.t0 + d }
    }

    fn is_smart(&self, sid: u64) -> bool {
        self.features.smart_turns && sid.is_multiple_of(2)
    }

    /// The configuration of session `sid`.
    fn config_of(&self, sid: u64) -> Config {
        config_for(
            self.is_smart(sid),
            self.features.drafts && sid % 4 >= 2,
            self.hears_echo(sid),
        )
    }

    fn hears_echo(&self, sid: u64) -> bool {
        self.features.echo && sid.is_multiple_of(3)
    }

    /// A fresh copy of session `sid` on `instance`.
    fn copy(
        &self,
        sid: u64,
        instance: usize,
        machine: Session,
        epoch: u64,
        base: (u64, u64, u64),
        turns: Vec<(u64, String)>,
    ) -> Copy {
        let mut copy = Copy::new(instance, machine, epoch, base, turns);
        if self.is_smart(sid) {
            copy.smart = Some(TurnWatch::default());
        }
        copy
    }

    fn words(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| WORDS[self.rng.random_range(0..WORDS.len())])
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs `actions`, then lets every session end; checks the invariants after each step.
    pub fn run(mut self, actions: &[Action]) -> Result<Stats, Violation> {
        for (step, action) in actions.iter().enumerate() {
            self.act(*action);
            self.settle_all();
            self.check(step)?;
        }
        // Every client goes away; every session must end and be recorded once.
        for s in 0..self.sessions.len() {
            self.client(s, ClientAct::Drop);
        }
        self.reachable = true;
        for _ in 0..400 {
            self.advance(30_000);
            self.settle_all();
            self.check(actions.len())?;
        }
        self.check_final(actions.len())?;
        Ok(self.stats)
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::NewSession { instance } => self.new_session(instance as usize % INSTANCES),
            Action::Client { session, what } => {
                if !self.sessions.is_empty() {
                    let s = session as usize % self.sessions.len();
                    self.echo(s);
                    self.client(s, what);
                }
            }
            Action::ReplyFinishes { session, tokens } => {
                if !self.sessions.is_empty() {
                    let s = session as usize % self.sessions.len();
                    self.finish_reply(s, u64::from(tokens) % MAX_TOKENS + 1);
                }
            }
            Action::Advance { ms } => self.advance(u64::from(ms)),
            Action::StoreLosesData => self.store.lose_everything(self.now_ms),
            Action::StoreReachable(up) => self.reachable = up,
        }
    }

    fn new_token(&mut self) -> String {
        self.next_token += 1;
        format!("t{}", self.next_token)
    }

    fn new_session(&mut self, instance: usize) {
        if !self.reachable {
            return;
        }
        let sid = self.next_sid;
        if !self
            .store
            .admit(sid, instance, MAX_PER_USER, LEASE_TTL, self.now_ms)
        {
            return;
        }
        self.next_sid += 1;
        let machine = Session::new(sid.to_string(), self.config_of(sid), self.now(), None);
        let copy = self.copy(sid, instance, machine, 1, (0, 0, 0), Vec::new());
        self.sessions.push(SimSession {
            sid,
            copies: vec![copy],
            attached: Some(0),
            token: None,
            record: None,
            said: HashSet::new(),
            cut: None,
        });
        let s = self.sessions.len() - 1;
        let token = self.new_token();
        self.feed(s, 0, Input::Attach(attaching(false, token, self.now())));
    }

    /// Feeds one input to a copy and carries out what it decides.
    fn feed(&mut self, s: usize, c: usize, input: Input<'_>) {
        self.stats.inputs += 1;
        let now = self.now();
        self.sessions[s].copies[c].machine.handle(input, now);
        self.drain(s, c);
    }

    /// A client acts; for a smart-policy session, its turn rules are checked around it.
    fn client(&mut self, s: usize, what: ClientAct) {
        let watched = self.sessions[s]
            .attached
            .filter(|&c| !self.sessions[s].copies[c].ended)
            .filter(|&c| self.sessions[s].copies[c].smart.is_some());
        let Some(c) = watched else {
            return self.client_act(s, what);
        };
        let now_ms = self.now_ms as i64;
        let cut = self.sessions[s].cut;
        let copy = &mut self.sessions[s].copies[c];
        let last = copy.machine.last_turn();
        let watch = copy.smart.as_mut().expect("watched");
        let commit = watch.commit;
        match what {
            // Speech goes on: the pause is over, and so is its score.
            ClientAct::Partial => watch.pause = None,
            ClientAct::SpeechStarted => {
                watch.pause = None;
                watch.speech_started = Some(now_ms);
            }
            ClientAct::Final { .. } => {
                let eos = cut.unwrap_or(now_ms - 150);
                // The cut's own words keep its pause; words from before it too; later ones
                // void it.
                match &mut watch.pause {
                    Some(p) if eos == p.since => p.awaiting = false,
                    Some(p) if eos < p.since => {}
                    _ => watch.pause = None,
                }
                watch.signal_eos = eos;
            }
            ClientAct::UtteranceEnd => watch.signal_eos = now_ms - 1000,
            ClientAct::SpeechEnded => {
                watch.signal_eos = now_ms - CUT_MS;
                watch.cutting = true;
            }
            _ => {}
        }
        // A decided pause whose words are in ends the turn at the next endpoint.
        let words_in = |watch: &TurnWatch| {
            watch.pause.is_some_and(|p| p.decided && !p.awaiting)
                && matches!(
                    what,
                    ClientAct::Final { speech_final: true } | ClientAct::UtteranceEnd
                )
        };
        let due = words_in(watch);
        let backchannels = watch.only_backchannels();
        self.client_act(s, what);
        let copy = &mut self.sessions[s].copies[c];
        let ended = copy.machine.last_turn() > last;
        let watch = copy.smart.as_mut().expect("watched");
        watch.cutting = false;
        let allowed = match what {
            ClientAct::Text { .. } | ClientAct::Commit => true,
            // Push-to-talk's finalise: the final that answers it ends the turn.
            ClientAct::Final { .. } => commit || due,
            ClientAct::UtteranceEnd => due,
            ClientAct::Drop | ClientAct::End | ClientAct::Resume { .. } => true,
            _ => false,
        };
        if ended && !allowed {
            watch.violation.get_or_insert(format!(
                "{what:?} ended turn {}: only a complete score on a live pause, the maximum \
                 silence, push-to-talk or typing may",
                last + 1
            ));
        }
        if due && !ended && !backchannels && !watch.pending.is_empty() {
            watch.violation.get_or_insert(format!(
                "the words of decided pause {:?} arrived ({what:?}) and turn {} did not end",
                watch.pause,
                last + 1
            ));
        }
        if matches!(what, ClientAct::Final { .. }) {
            watch.commit = false;
        }
        // Ending a turn (or finding only backchannels to end it with) is the pause's end: a
        // decided pause's words, or push-to-talk's final.
        if due || (commit && matches!(what, ClientAct::Final { .. })) {
            watch.pause = None;
        }
        if ended || due {
            watch.pending.clear();
        }
        if ended {
            watch.pause = None;
        }
    }

    fn client_act(&mut self, s: usize, what: ClientAct) {
        let Some(c) = self.sessions[s].attached else {
            if let ClientAct::Resume { instance, complete } = what {
                self.resume(s, instance as usize % INSTANCES, complete);
            }
            return;
        };
        if self.sessions[s].copies[c].ended {
            self.sessions[s].attached = None;
            return;
        }
        match what {
            ClientAct::Audio { valid } => {
                let len = if valid { 3200 } else { 33 };
                self.feed(s, c, Input::Audio(Bytes::from(vec![0u8; len])));
            }
            ClientAct::Text { nul } => {
                let mut text = self.words(3);
                if nul {
                    text.push('\0');
                }
                self.remember_said(s, &text);
                self.feed(s, c, Input::Text(&text));
                if nul && self.sessions[s].sid % 2 == 1 {
                    // A phone's keypad too: digits, then `#` sends them as a typed turn.
                    let digits = format!("{}", self.sessions[s].sid % 1000);
                    self.remember_said(s, &format!("keypad: {digits}"));
                    for d in digits.chars().chain(['#']) {
                        if self.sessions[s].copies[c].ended {
                            break;
                        }
                        self.feed(s, c, Input::Digit(d));
                    }
                }
            }
            ClientAct::Partial => {
                let text = self.words(2);
                self.remember_said(s, &text);
                self.feed(s, c, Input::Heard(Heard::Partial(&text)));
            }
            ClientAct::Final { speech_final } => {
                self.sessions[s].copies[c].finalizing = false;
                let text = self.words(3);
                self.remember_said(s, &text);
                if let Some(watch) = &mut self.sessions[s].copies[c].smart {
                    watch
                        .pending
                        .extend(text.split_whitespace().map(str::to_owned));
                }
                let eos_ms = self.sessions[s]
                    .cut
                    .take()
                    .unwrap_or(self.now_ms as i64 - 150);
                let eos = Some(self.at_ms(eos_ms));
                self.feed(
                    s,
                    c,
                    Input::Heard(Heard::Final {
                        text: &text,
                        speech_final,
                        end_of_speech: eos,
                    }),
                );
            }
            ClientAct::UtteranceEnd => {
                let eos = Some(self.now() - Duration::from_millis(1000));
                self.feed(
                    s,
                    c,
                    Input::Heard(Heard::UtteranceEnd { end_of_speech: eos }),
                );
            }
            ClientAct::SpeechStarted => self.feed(s, c, Input::Heard(Heard::SpeechStarted)),
            ClientAct::SpeechEnded => {
                let eos_ms = self.now_ms as i64 - CUT_MS;
                self.sessions[s].cut = Some(eos_ms);
                let eos = Some(self.at_ms(eos_ms));
                self.feed(
                    s,
                    c,
                    Input::Heard(Heard::SpeechEnded { end_of_speech: eos }),
                );
            }
            ClientAct::Commit => self.feed(s, c, Input::Commit),
            ClientAct::Cancel => self.feed(s, c, Input::Cancel),
            ClientAct::Refresh => self.feed(s, c, Input::Refresh("header.payload.sig".into())),
            ClientAct::Flood { frames } => {
                for _ in 0..u32::from(frames) * 4 {
                    self.feed(s, c, Input::Audio(Bytes::from(vec![0u8; 320])));
                    if self.sessions[s].copies[c].ended {
                        break;
                    }
                }
            }
            ClientAct::Drop => {
                self.sessions[s].attached = None;
                self.feed(s, c, Input::Detach);
            }
            ClientAct::End => self.feed(s, c, Input::End),
            ClientAct::Resume { instance, complete } => {
                // A second connection with the token while the first is live.
                self.resume(s, instance as usize % INSTANCES, complete);
            }
        }
    }

    /// The microphone of a client on its loudspeaker hears the assistant: now and then,
    /// while a reply plays or shortly after, the recogniser transcribes words it played,
    /// maybe with one misheard. The machine must act on none of it.
    fn echo(&mut self, s: usize) {
        let Some(c) = self.sessions[s].attached else {
            return;
        };
        let copy = &self.sessions[s].copies[c];
        if !self.hears_echo(self.sessions[s].sid)
            || copy.ended
            || self.echo_rng.random_range(0..3) != 0
        {
            return;
        }
        let bpm = bytes_per_ms(&copy.machine);
        let l = &copy.listener;
        // Words of the reply being played (the sentences are those of the latest reply).
        if l.turn_id == 0
            || copy.asked.0 != l.turn_id
            || l.quiet_ms.is_some_and(|q| self.now_ms >= q + ECHO_LATE)
        {
            return;
        }
        let played = l.cut_at.unwrap_or_else(|| l.played(self.now_ms, bpm));
        let heard: Vec<String> = copy
            .sentences
            .iter()
            .take_while(|(_, end)| *end <= played)
            .map(|(text, _)| text.clone())
            .collect();
        let partial = self.echo_rng.random_bool(0.5);
        let least = if partial { 1 } else { echo::MIN_ECHO_WORDS };
        if heard.len() < least || (!partial && copy.finalizing) {
            return;
        }
        let n = self
            .echo_rng
            .random_range(least..=heard.len().min(4).max(least));
        let start = self.echo_rng.random_range(0..=heard.len() - n);
        let mut words = heard[start..start + n].to_vec();
        if n >= 3 && self.echo_rng.random_range(0..3) == 0 {
            let i = self.echo_rng.random_range(0..n);
            words[i] = "stop".into();
        }
        let text = words.join(" ");
        let heard = if partial {
            Heard::Partial(&text)
        } else {
            Heard::Final {
                text: &text,
                speech_final: false,
                end_of_speech: Some(self.now() - Duration::from_millis(150)),
            }
        };
        // (An interim transcript's last word is not judged.)
        if partial && n <= echo::MIN_ECHO_WORDS {
            // Too few words to tell from the person's: speech goes on, the pause is over.
            if let Some(watch) = &mut self.sessions[s].copies[c].smart {
                watch.pause = None;
            }
        }
        let last = self.sessions[s].copies[c].machine.last_turn();
        self.stats.echoes += 1;
        self.echoing = true;
        self.feed(s, c, Input::Heard(heard));
        self.echoing = false;
        let copy = &mut self.sessions[s].copies[c];
        if copy.machine.last_turn() != last {
            copy.echo_violation
                .get_or_insert(format!("the echo {text:?} ended turn {}", last + 1));
        }
    }

    fn remember_said(&mut self, s: usize, text: &str) {
        for w in text.split_whitespace() {
            self.sessions[s]
                .said
                .insert(w.trim_matches('\0').to_owned());
        }
    }

    /// A reconnect with the resume token: the two-step hand-over.
    fn resume(&mut self, s: usize, instance: usize, complete: bool) {
        let Some(token) = self.sessions[s].token.clone() else {
            return;
        };
        if !self.reachable {
            return;
        }
        let Ok((sid, epoch, owner, published)) = self.store.claim(
            &token,
            instance,
            MAX_PER_USER,
            LEASE_TTL,
            CLAIM_TTL,
            self.now_ms,
        ) else {
            return;
        };
        // The instance's registry holds the latest copy registered there.
        let local = (owner == instance)
            .then(|| {
                self.sessions[s]
                    .copies
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.instance == instance && !c.ended)
                    .max_by_key(|(_, c)| c.epoch)
                    .map(|(i, _)| i)
            })
            .flatten();
        if local.is_none() && !published {
            self.store.abandon(sid, epoch, instance);
            return;
        }
        if !complete {
            // The client is lost before its session.start.
            self.store.abandon(sid, epoch, instance);
            return;
        }
        if (self.now_ms + sid).is_multiple_of(7) {
            // A second resume of the same token claims the session before this one's
            // handshake completes (and is lost itself): this one's commit must fail.
            let _ = self.store.claim(
                &token,
                (instance + 1) % INSTANCES,
                MAX_PER_USER,
                LEASE_TTL,
                CLAIM_TTL,
                self.now_ms,
            );
        }
        let Some(state) = self.store.commit(sid, epoch, instance, self.now_ms) else {
            if let Some(c) = local {
                // A later claim overtook this one: the driver still asks, and the machine
                // must refuse the connection and keep the one it has.
                let overtaken = Attaching {
                    overtaken: true,
                    ..attaching(true, self.new_token(), self.now())
                };
                self.sessions[s].copies[c].expect_refusal = true;
                self.feed(s, c, Input::Attach(overtaken));
                let copy = &mut self.sessions[s].copies[c];
                if std::mem::take(&mut copy.expect_refusal) {
                    copy.attach_violation
                        .get_or_insert("an overtaken resume was not refused".into());
                }
            }
            return;
        };
        let token = self.new_token();
        if let Some(c) = local {
            // The same instance: the session itself takes the connection.
            let copy = &mut self.sessions[s].copies[c];
            copy.epoch = copy.epoch.max(epoch);
            if let Some(old) = self.sessions[s].attached
                && old != c
            {
                self.feed(s, old, Input::Detach);
            }
            self.sessions[s].attached = Some(c);
            self.feed(s, c, Input::Attach(attaching(true, token, self.now())));
            return;
        }
        let Some(state) = state else {
            return;
        };
        let (carried, turns) = self.states[state].clone();
        let usage = {
            let c = carried.ledger.consumption;
            (c.llm_input_tokens, c.llm_output_tokens, c.tts_chars)
        };
        let machine = Session::new(
            sid.to_string(),
            self.config_of(sid),
            self.now(),
            Some((carried, Duration::ZERO)),
        );
        let copy = self.copy(sid, instance, machine, epoch, usage, turns);
        self.sessions[s].copies.push(copy);
        self.stats.moves += 1;
        let c = self.sessions[s].copies.len() - 1;
        if let Some(old) = self.sessions[s].attached {
            // The old connection is the same client's: it is gone.
            self.sessions[s].attached = None;
            self.feed(s, old, Input::Detach);
        }
        self.sessions[s].attached = Some(c);
        self.feed(s, c, Input::Attach(attaching(true, token, self.now())));
    }

    fn finish_reply(&mut self, s: usize, tokens: u64) {
        let Some(c) = self.sessions[s]
            .copies
            .iter()
            .position(|c| c.request.is_some() && !c.ended)
        else {
            return;
        };
        let mut r = self.sessions[s].copies[c]
            .request
            .take()
            .unwrap_or_else(|| unreachable!());
        r.produced = tokens;
        r.spoken = self.words(4);
        self.remember_said(s, &r.spoken);
        // What the task still had on its way reaches the machine before its end: one more
        // chunk, and the last sentence's end.
        let now = self.now();
        self.push_chunk(s, c, &mut r);
        self.end_sentence(s, c, &r);
        let outcome = self.bill(s, c, &r, true);
        let copy = &mut self.sessions[s].copies[c];
        copy.machine.handle(Input::ReplyEnded(outcome), now);
        self.drain(s, c);
    }

    /// The reply in flight synthesises its speech twice as fast as real time, pushing it
    /// while the machine wants it (a full playout holds synthesis back).
    fn synthesise(&mut self, s: usize, c: usize) {
        let Some(mut r) = self.sessions[s].copies[c].request.take() else {
            return;
        };
        let due = ((self.now_ms - r.started_ms) * SYNTHESIS_SPEED).min(REPLY_MS);
        while r.pushed_ms + CHUNK_MS <= due
            && self.sessions[s].copies[c].machine.wants_reply_audio()
        {
            self.push_chunk(s, c, &mut r);
            if r.pushed_ms % SENTENCE_MS == 0 {
                self.end_sentence(s, c, &r);
            }
        }
        self.sessions[s].copies[c].request = Some(r);
    }

    /// One chunk of the reply's speech reaches the machine.
    fn push_chunk(&mut self, s: usize, c: usize, r: &mut Request) {
        let bpm = bytes_per_ms(&self.sessions[s].copies[c].machine);
        let chunk = vec![0u8; (CHUNK_MS * bpm) as usize];
        let turn_id = r.turn_id;
        self.feed(
            s,
            c,
            Input::ReplyAudio {
                turn_id,
                pcm: &chunk,
            },
        );
        r.pushed_ms += CHUNK_MS;
    }

    /// The sentence whose audio ends where the pushed audio does.
    fn end_sentence(&mut self, s: usize, c: usize, r: &Request) {
        let bpm = bytes_per_ms(&self.sessions[s].copies[c].machine);
        let end = r.pushed_ms * bpm;
        if self.sessions[s].copies[c]
            .sentences
            .last()
            .is_some_and(|(_, e)| *e == end)
        {
            return;
        }
        let text = format!(
            "r{}s{}",
            r.turn_id,
            self.sessions[s].copies[c].sentences.len()
        );
        self.remember_said(s, &text);
        self.sessions[s].copies[c]
            .sentences
            .push((text.clone(), end));
        // The model's words reach the machine as they are written, spaces and all.
        self.feed(
            s,
            c,
            Input::ReplyText {
                turn_id: r.turn_id,
                text: format!("{text} "),
            },
        );
        self.feed(
            s,
            c,
            Input::ReplySentence {
                turn_id: r.turn_id,
                round: Some(0),
                text,
            },
        );
    }

    /// The attached client receives reply audio and plays it in real time.
    fn hear(&mut self, s: usize, c: usize, turn_id: u64, len: u64) {
        let bpm = bytes_per_ms(&self.sessions[s].copies[c].machine);
        let lead = config().playout_lead.as_millis() as u64 * bpm;
        let now_ms = self.now_ms;
        let attached = self.sessions[s].attached == Some(c);
        let copy = &mut self.sessions[s].copies[c];
        let l = &mut copy.listener;
        if l.turn_id != turn_id {
            *l = Listener {
                turn_id,
                clock: now_ms,
                ..Listener::default()
            };
        }
        let broken = if !attached {
            Some(format!("turn {turn_id}: audio with no client attached"))
        } else if l.over || l.cut_at.is_some() {
            Some(format!(
                "turn {turn_id}: audio after the turn was cut or over"
            ))
        } else {
            None
        };
        if l.played(now_ms, bpm) >= l.received {
            // The buffer ran dry: this piece plays from now.
            l.clock = now_ms - l.received / bpm;
        }
        l.received += len;
        let ahead = l.received - l.played(now_ms, bpm);
        let broken = broken.or_else(|| {
            (ahead > lead + bpm).then(|| {
                format!("turn {turn_id}: the client holds {ahead} bytes, over the lead {lead}")
            })
        });
        if let Some(b) = broken {
            copy.playout_violation.get_or_insert(b);
        }
        // Clients of odd sessions are phones: they confirm what they have played, as Twilio
        // echoes a mark once the audio before it has played.
        let played = l.played(now_ms, bpm);
        if attached && self.sessions[s].sid % 2 == 1 && played > 0 {
            let now = self.now();
            self.sessions[s].copies[c].machine.handle(
                Input::Played {
                    turn_id,
                    offset: played,
                },
                now,
            );
        }
    }

    /// A turn's log: no more audio for it, and a cut turn keeps only what the client played.
    fn turn_over(&mut self, s: usize, c: usize, log: &atlas_core::session::TurnLog) {
        let bpm = bytes_per_ms(&self.sessions[s].copies[c].machine);
        let copy = &mut self.sessions[s].copies[c];
        if copy.listener.turn_id != log.turn_id {
            return;
        }
        copy.listener.over = true;
        copy.listener.quiet_ms.get_or_insert(self.now_ms);
        let Some(played) = copy.listener.cut_at else {
            return;
        };
        for w in log.assistant_text.split_whitespace() {
            let unheard = copy
                .sentences
                .iter()
                .any(|(text, end)| text == w && *end > played + bpm);
            if unheard {
                copy.playout_violation.get_or_insert(format!(
                    "turn {}: {w:?} recorded as said, but the client had played {played} bytes",
                    log.turn_id
                ));
            }
        }
    }

    /// What the provider reports for a request, added to the copy's truth.
    fn bill(&mut self, s: usize, c: usize, r: &Request, finished: bool) -> ReplyOutcome {
        let tts = r.spoken.len() as u64;
        let copy = &mut self.sessions[s].copies[c];
        copy.truth.0 += r.input_tokens;
        copy.truth.1 += r.produced;
        copy.truth.2 += tts;
        ReplyOutcome {
            turn_id: r.turn_id,
            llm: LlmBill {
                billable: true,
                finished,
                prompt_chars: r.input_tokens as usize * 4,
                generated_chars: r.produced as usize * 4,
                reported: ReportedTokens {
                    input: Some(r.input_tokens),
                    output: Some(r.produced),
                    ..ReportedTokens::default()
                },
            },
            tts_chars: tts,
            latency: Latency::default(),
            failure: None,
        }
    }

    /// Carries out a copy's outputs the way the server's driver does.
    fn drain(&mut self, s: usize, c: usize) {
        while let Some(output) = self.sessions[s].copies[c].machine.poll_output() {
            if self.trace {
                eprintln!(
                    "[{} ms] session {} copy {c}: {output:?}",
                    self.now_ms, self.sessions[s].sid
                );
            }
            if self.echoing
                && matches!(
                    output,
                    Output::AbortReply { .. }
                        | Output::StartReply { .. }
                        | Output::ScoreTurn { .. }
                        | Output::Turn(_)
                        | Output::DraftSettled { .. }
                        | Output::Event(Event::Hearing { .. } | Event::Heard { .. })
                )
            {
                self.sessions[s].copies[c]
                    .echo_violation
                    .get_or_insert(format!("the echo led to {output:?}"));
            }
            match output {
                Output::Event(Event::Ready { resume_token, .. })
                    if self.sessions[s].attached == Some(c) =>
                {
                    self.sessions[s].token = Some(resume_token);
                }
                Output::StartReply { turn_id, .. } => {
                    let copy = &self.sessions[s].copies[c];
                    assert!(
                        copy.request.is_none(),
                        "one reply at a time: turn {turn_id} started while another ran"
                    );
                    let input_tokens = self.rng.random_range(50..400);
                    let started_ms = self.now_ms;
                    let copy = &mut self.sessions[s].copies[c];
                    let asked = copy
                        .machine
                        .prompt()
                        .iter()
                        .rev()
                        .find(|m| m.role == Role::User)
                        .map(|m| m.text.clone())
                        .unwrap_or_default();
                    copy.asked = (turn_id, asked);
                    copy.sentences.clear();
                    copy.request = Some(Request {
                        turn_id,
                        input_tokens,
                        produced: 0,
                        spoken: String::new(),
                        started_ms,
                        pushed_ms: 0,
                    });
                    self.stats.requests += 1;
                }
                Output::AbortReply { turn_id } => {
                    let bpm = bytes_per_ms(&self.sessions[s].copies[c].machine);
                    let now_ms = self.now_ms;
                    let l = &mut self.sessions[s].copies[c].listener;
                    if l.turn_id == turn_id && l.cut_at.is_none() {
                        l.cut_at = Some(l.played(now_ms, bpm));
                        l.quiet_ms.get_or_insert(now_ms);
                    }
                    // Aborted at once; the provider bills what it did so far.
                    let r = self.sessions[s].copies[c]
                        .request
                        .take_if(|r| r.turn_id == turn_id);
                    let outcome = match r {
                        Some(mut r) => {
                            r.produced = self.rng.random_range(0..MAX_TOKENS / 2);
                            if r.produced > 0 {
                                r.spoken = self.words(2);
                                self.remember_said(s, &r.spoken);
                            }
                            self.bill(s, c, &r, false)
                        }
                        None => ReplyOutcome {
                            turn_id,
                            llm: LlmBill::default(),
                            tts_chars: 0,
                            latency: Latency::default(),
                            failure: None,
                        },
                    };
                    let now = self.now();
                    self.sessions[s].copies[c]
                        .machine
                        .handle(Input::ReplyEnded(outcome), now);
                }
                Output::VerifyToken(_) => {
                    let copy = &mut self.sessions[s].copies[c];
                    assert!(copy.verifying.is_none(), "two token verifications at once");
                    copy.verifying = Some(self.now_ms + 20);
                }
                Output::Publish => {
                    if self.write(s, c) {
                        let copy = &self.sessions[s].copies[c];
                        let state = (copy.machine.carried(), copy.turns.clone());
                        self.states.push(state);
                        let index = self.states.len() - 1;
                        let sid = self.sessions[s].sid;
                        if let Some(e) = self.store.sessions.get_mut(&sid) {
                            e.state = Some(index);
                        }
                    }
                }
                Output::RefreshLease => {
                    let sent = self.now();
                    let (sid, epoch, instance) = self.ident(s, c);
                    let answer = if self.reachable {
                        match self.store.refresh(
                            sid,
                            epoch,
                            instance,
                            MAX_PER_USER,
                            LEASE_TTL,
                            self.now_ms,
                        ) {
                            Refresh::Extended(false) => LeaseAnswer::Extended,
                            Refresh::Extended(true) => LeaseAnswer::Reasserted,
                            Refresh::Stale => LeaseAnswer::Stale,
                            Refresh::NoPlace => LeaseAnswer::NoPlace,
                        }
                    } else {
                        LeaseAnswer::Unreachable
                    };
                    // Answers take a while (slow Redis).
                    let due = self.now_ms + self.rng.random_range(1..400);
                    self.sessions[s].copies[c]
                        .lease_answers
                        .push((due, answer, sent));
                }
                Output::RegisterToken(token) => {
                    if self.write(s, c) {
                        let sid = self.sessions[s].sid;
                        self.store.tokens.insert(token, sid);
                    }
                }
                Output::RetireToken(token) => {
                    if self.write(s, c) {
                        let sid = self.sessions[s].sid;
                        if self.store.tokens.get(&token) == Some(&sid) {
                            self.store.tokens.remove(&token);
                        }
                    }
                }
                Output::Audio { turn_id, pcm } => {
                    self.before_heard(s, c, turn_id, "audio");
                    self.hear(s, c, turn_id, pcm.len() as u64);
                }
                Output::Event(Event::Heard { turn_id, text }) => {
                    let copy = &mut self.sessions[s].copies[c];
                    // People say none of the assistant's words (`r1s0`) in this world.
                    if text.split_whitespace().any(assistants_word) {
                        copy.echo_violation.get_or_insert(format!(
                            "turn {turn_id} heard as {text:?}: the assistant's words"
                        ));
                    }
                    copy.heard = (turn_id, text);
                }
                Output::Event(Event::ReplyStarted { turn_id }) => {
                    self.before_heard(s, c, turn_id, "response.started");
                }
                Output::Event(Event::ReplyText { turn_id, .. }) => {
                    self.before_heard(s, c, turn_id, "response.text");
                }
                Output::DraftSettled { kept } => {
                    let copy = &mut self.sessions[s].copies[c];
                    if kept {
                        self.stats.drafts.0 += 1;
                        let (turn_id, text) = &copy.heard;
                        let (asked_turn, asked) = &copy.asked;
                        if asked_turn != turn_id || !asked.ends_with(text.as_str()) {
                            copy.draft_violation.get_or_insert(format!(
                                "turn {turn_id} heard as {text:?} kept the draft of turn \
                                 {asked_turn} to {asked:?}"
                            ));
                        }
                    } else {
                        self.stats.drafts.1 += 1;
                    }
                }
                Output::Spend(delta) => {
                    if self.write(s, c) {
                        self.store.spend += delta.daily;
                    }
                }
                Output::Turn(log) => {
                    self.turn_over(s, c, &log);
                    let text = format!("{}|{}", log.user_text, log.assistant_text);
                    self.sessions[s].copies[c].turns.push((log.turn_id, text));
                }
                Output::CloseConnection(..) => {
                    if self.sessions[s].attached == Some(c) {
                        self.sessions[s].attached = None;
                    }
                }
                Output::AttachConnection => {
                    if self.sessions[s].copies[c].expect_refusal {
                        self.sessions[s].copies[c]
                            .attach_violation
                            .get_or_insert("an overtaken resume was attached".into());
                    }
                    self.sessions[s].attached = Some(c);
                }
                // The connection that asked is not attached.
                Output::RefuseConnection { .. } => {
                    self.sessions[s].copies[c].expect_refusal = false;
                }
                Output::Finish(f) => {
                    let copy = &mut self.sessions[s].copies[c];
                    copy.ended = true;
                    if self.sessions[s].attached == Some(c) {
                        self.sessions[s].attached = None;
                    }
                    if f.record {
                        let epoch = self.sessions[s].copies[c].epoch;
                        let row = &mut self.sessions[s].record;
                        match row {
                            Some((e, n)) if *e == epoch => *n += 1,
                            Some((e, _)) if *e > epoch => {}
                            _ => *row = Some((epoch, 1)),
                        }
                        self.stats.records += 1;
                        // The recorder: every text passes the sanitising boundary.
                        let turns = &self.sessions[s].copies[c].turns;
                        if turns.iter().any(|(_, t)| stored(t).contains('\0')) {
                            self.db_has_nul = true;
                        }
                    }
                    if f.record && !f.handover {
                        let release = self.ident(s, c);
                        self.releases.push(release);
                        self.retry_releases();
                    }
                }
                Output::Finalize => {
                    self.sessions[s].copies[c].finalizing = true;
                    if let Some(watch) = &mut self.sessions[s].copies[c].smart {
                        watch.commit = true;
                    }
                }
                Output::ScoreTurn { pause } => {
                    let now_ms = self.now_ms;
                    // The model answers after a while, complete or not; now and then it says
                    // at once that it cannot (busy), or never answers.
                    let answer = match self.model_rng.random_range(0..10) {
                        0 => None,
                        1 => Some((now_ms + self.model_rng.random_range(0..5), None)),
                        _ => Some((
                            now_ms + self.model_rng.random_range(20..150),
                            Some(self.model_rng.random::<f32>()),
                        )),
                    };
                    let watch = self.sessions[s].copies[c]
                        .smart
                        .as_mut()
                        .expect("only smart sessions judge pauses");
                    if watch.speech_started.is_some_and(|t| t > watch.signal_eos) {
                        watch.violation.get_or_insert(format!(
                            "pause {pause} opened for speech that ended at {} ms, though speech \
                             started again at {:?} ms",
                            watch.signal_eos, watch.speech_started
                        ));
                    }
                    watch.pause = Some(WatchedPause {
                        id: pause,
                        since: watch.signal_eos,
                        awaiting: watch.cutting,
                        decided: false,
                        limit: watch.signal_eos + MAX_SILENCE as i64,
                    });
                    if let Some((due, probability)) = answer {
                        watch.answers.push((due, pause, probability));
                    }
                }
                Output::Event(_)
                | Output::Ping
                | Output::Forward { .. }
                | Output::SendHeld
                | Output::Rejected(_)
                | Output::CloseRecogniser
                | Output::CallTool { .. }
                | Output::CancelTool { .. }
                | Output::Acknowledge { .. }
                | Output::ContinueReply { .. }
                | Output::ToolLog(_)
                | Output::Checkpoint => {}
            }
        }
    }

    /// Something of the reply to `turn_id` reached the client: its turn must have been heard.
    fn before_heard(&mut self, s: usize, c: usize, turn_id: u64, what: &str) {
        let copy = &mut self.sessions[s].copies[c];
        if turn_id > copy.heard.0 {
            copy.draft_violation.get_or_insert(format!(
                "{what} of turn {turn_id} before it was heard (last heard: {})",
                copy.heard.0
            ));
        }
    }

    fn ident(&self, s: usize, c: usize) -> (u64, u64, usize) {
        let copy = &self.sessions[s].copies[c];
        (self.sessions[s].sid, copy.epoch, copy.instance)
    }

    /// A fenced write; a stale writer learns it lost the session.
    fn write(&mut self, s: usize, c: usize) -> bool {
        if !self.reachable {
            return false;
        }
        let (sid, epoch, instance) = self.ident(s, c);
        match self.store.fence(sid, epoch, instance) {
            Write::Done | Write::Reasserted => true,
            Write::Stale => {
                let now = self.now();
                self.sessions[s].copies[c]
                    .machine
                    .handle(Input::OwnershipLost, now);
                false
            }
        }
    }

    /// An ended session's release is retried until the store takes it: until then its entry
    /// and tokens could give it a second life on a resume.
    fn retry_releases(&mut self) {
        if self.reachable {
            for (sid, epoch, instance) in std::mem::take(&mut self.releases) {
                self.store.release(sid, epoch, instance);
            }
        }
    }

    /// Delivers answers that are due and wakes machines at their deadlines.
    fn settle_all(&mut self) {
        self.retry_releases();
        for s in 0..self.sessions.len() {
            for c in 0..self.sessions[s].copies.len() {
                if self.sessions[s].copies[c].ended {
                    continue;
                }
                let now_ms = self.now_ms;
                let due: Vec<_> = {
                    let answers = &mut self.sessions[s].copies[c].lease_answers;
                    let (due, later) = answers.drain(..).partition(|(t, ..)| *t <= now_ms);
                    *answers = later;
                    due
                };
                for (_, answer, sent_at) in due {
                    self.feed(s, c, Input::Lease { answer, sent_at });
                }
                if self.sessions[s].copies[c]
                    .verifying
                    .is_some_and(|t| t <= now_ms)
                {
                    self.sessions[s].copies[c].verifying = None;
                    let expiry = self.now() + Duration::from_secs(3600);
                    let token = VerifiedToken {
                        user_id: "user".into(),
                        expiry,
                    };
                    self.feed(s, c, Input::TokenRefreshed(Ok(token)));
                }
                self.answer_scores(s, c);
                self.synthesise(s, c);
                let now = self.now();
                if self.sessions[s].copies[c]
                    .machine
                    .poll_timeout()
                    .is_some_and(|t| t <= now)
                {
                    let last = self.sessions[s].copies[c].machine.last_turn();
                    self.sessions[s].copies[c].machine.handle_timeout(now);
                    self.drain(s, c);
                    self.turn_by_clock(s, c, last);
                }
            }
        }
    }

    /// The end-of-turn model's answers that are due reach a smart-policy session.
    fn answer_scores(&mut self, s: usize, c: usize) {
        let now_ms = self.now_ms;
        let Some(watch) = &mut self.sessions[s].copies[c].smart else {
            return;
        };
        let (due, later): (Vec<_>, Vec<_>) =
            watch.answers.drain(..).partition(|(t, ..)| *t <= now_ms);
        watch.answers = later;
        for (_, pause, probability) in due {
            if self.sessions[s].copies[c].ended {
                return;
            }
            let copy = &mut self.sessions[s].copies[c];
            let last = copy.machine.last_turn();
            let Some(probability) = probability else {
                // Cannot judge: the pause's silence is the silence policy's, and may be over.
                let watch = copy.smart.as_mut().expect("smart");
                if let Some(p) = watch.pause.as_mut().filter(|p| p.id == pause) {
                    p.limit = p.limit.min(p.since + UNJUDGED as i64);
                }
                self.feed(s, c, Input::TurnUnjudged { pause });
                self.turn_by_clock(s, c, last);
                continue;
            };
            let watch = copy.smart.as_ref().expect("smart");
            let decisive = watch.pause.is_some_and(|p| p.id == pause) && probability >= THRESHOLD;
            // Decided before its words arrived: the turn waits for them.
            let awaiting = watch.pause.is_some_and(|p| p.awaiting);
            let backchannels = watch.only_backchannels();
            self.feed(s, c, Input::TurnScored { pause, probability });
            let copy = &mut self.sessions[s].copies[c];
            let ended = copy.machine.last_turn() > last;
            let watch = copy.smart.as_mut().expect("smart");
            if decisive && awaiting {
                if ended {
                    watch.violation.get_or_insert(format!(
                        "a complete score for pause {pause} ended turn {} before the words \
                         before the pause were transcribed",
                        last + 1
                    ));
                }
                if let Some(p) = &mut watch.pause {
                    p.decided = true;
                }
                continue;
            }
            if ended && !decisive {
                watch.violation.get_or_insert(format!(
                    "a score of {probability:.2} for pause {pause} ended turn {} (live pause: \
                     {:?})",
                    last + 1,
                    watch.pause
                ));
            }
            if decisive && !ended && !backchannels {
                watch.violation.get_or_insert(format!(
                    "a complete score ({probability:.2}) for live pause {pause} did not end the turn"
                ));
            }
            if decisive || ended {
                watch.pause = None;
                watch.pending.clear();
            }
        }
    }

    /// After the machine's timers ran at the current time: a turn they ended must have had
    /// its maximum silence run out; a pause of backchannels alone may end without a turn.
    fn turn_by_clock(&mut self, s: usize, c: usize, last: u64) {
        let now_ms = self.now_ms as i64;
        let copy = &mut self.sessions[s].copies[c];
        let ended = copy.machine.last_turn() > last;
        let Some(watch) = &mut copy.smart else {
            return;
        };
        let silence_over = watch.pause.is_some_and(|p| !p.decided && now_ms >= p.limit);
        if silence_over && let Some(p) = watch.pause.as_mut().filter(|p| p.awaiting) {
            // The silence decided; the turn waits for the words.
            p.decided = true;
            if ended {
                watch.violation.get_or_insert(format!(
                    "turn {} ended by the clock before the words before its pause were \
                     transcribed",
                    last + 1
                ));
            }
            return;
        }
        if ended && !silence_over {
            watch.violation.get_or_insert(format!(
                "turn {} ended by the clock at {now_ms} ms before its maximum silence (pause \
                 {:?})",
                last + 1,
                watch.pause
            ));
        }
        if ended || (silence_over && watch.only_backchannels()) {
            watch.pause = None;
            watch.pending.clear();
        }
    }

    /// Moves the clock forward, stopping at every deadline and answer on the way.
    fn advance(&mut self, ms: u64) {
        let until = self.now_ms + ms;
        loop {
            let mut next = until;
            for s in &self.sessions {
                for c in s.copies.iter().filter(|c| !c.ended) {
                    if let Some(t) = c.machine.poll_timeout() {
                        let t = t.saturating_duration_since(self.t0).as_millis() as u64;
                        next = next.min(t.max(self.now_ms + 1));
                    }
                    for (due, ..) in &c.lease_answers {
                        next = next.min((*due).max(self.now_ms + 1));
                    }
                    for (due, ..) in c.smart.iter().flat_map(|w| &w.answers) {
                        next = next.min((*due).max(self.now_ms + 1));
                    }
                    if let Some(t) = c.verifying {
                        next = next.min(t.max(self.now_ms + 1));
                    }
                    if let Some(r) = &c.request
                        && r.pushed_ms < REPLY_MS
                        && c.machine.wants_reply_audio()
                    {
                        // The next chunk of speech synthesised (while the playout is full,
                        // its own deadline wakes the world).
                        let t = r.started_ms + (r.pushed_ms + CHUNK_MS) / SYNTHESIS_SPEED;
                        next = next.min(t.max(self.now_ms + 1));
                    }
                }
            }
            self.now_ms = next;
            self.settle_all();
            if next >= until {
                break;
            }
        }
    }

    /// The invariants, after every step.
    fn check(&self, step: usize) -> Result<(), Violation> {
        let fail = |invariant, detail: String| {
            Err(Violation {
                step,
                invariant,
                detail,
            })
        };
        let budget = from_usd(BUDGET_USD);
        let worst = self.worst_request;
        let mut live = 0;
        for s in &self.sessions {
            let mut owners = 0;
            let stored = self.store.sessions.get(&s.sid).map(|e| e.epoch);
            for c in &s.copies {
                // Nothing free: the ledger holds exactly what the provider reported for every
                // request this copy started and finished or cut.
                let u = c.machine.ledger().usage();
                let billed = (
                    u.llm_input_tokens - c.base.0,
                    u.llm_output_tokens - c.base.1,
                    u.tts_chars - c.base.2,
                );
                if billed != c.truth {
                    return fail(
                        "every request billed exactly once",
                        format!(
                            "session {} on instance {}: ledger {billed:?}, provider {:?}",
                            s.sid, c.instance, c.truth
                        ),
                    );
                }
                // Spend ≤ budget + one request's worst case.
                let spent = c.machine.ledger().cost().total.unwrap_or(0);
                if spent > budget + worst {
                    return fail(
                        "spend within the budget and one request",
                        format!("session {} spent {spent} µ$", s.sid),
                    );
                }
                if let Some(detail) = &c.attach_violation {
                    return fail(
                        "a resume overtaken by a later one is refused",
                        format!("session {}: {detail}", s.sid),
                    );
                }
                if let Some(watch) = &c.smart {
                    if let Some(detail) = &watch.violation {
                        return fail(
                            "under the smart policy a turn ends only by a complete score, the \
                             maximum silence (the silence policy's time for a pause the model \
                             cannot judge), push-to-talk or typing, never while speech goes on",
                            format!("session {}: {detail}", s.sid),
                        );
                    }
                    // A pause of backchannels alone may end without a turn (push-to-talk
                    // with only "mm-hm" to say, say).
                    let backchannels = !watch.pending.is_empty() && watch.only_backchannels();
                    if !c.ended
                        && !backchannels
                        && let Some(WatchedPause {
                            id: pause,
                            since: eos,
                            decided: false,
                            limit,
                            ..
                        }) = watch.pause
                        && self.now_ms as i64 > limit
                    {
                        return fail(
                            "every pause ends by its score or the maximum silence",
                            format!(
                                "session {}: pause {pause} after speech ending at {eos} ms still \
                                 open at {} ms",
                                s.sid, self.now_ms
                            ),
                        );
                    }
                }
                if let Some(detail) = &c.echo_violation {
                    return fail(
                        "the assistant's voice heard back interrupts nothing, shows nothing, \
                         makes no turn and never becomes the person's words",
                        format!("session {}: {detail}", s.sid),
                    );
                }
                if let Some(detail) = &c.draft_violation {
                    return fail(
                        "nothing of a reply reaches the client before its turn is heard, and a \
                         draft is kept only for the words heard",
                        format!("session {}: {detail}", s.sid),
                    );
                }
                if let Some(detail) = &c.playout_violation {
                    return fail(
                        "reply audio goes out paced, only in its turn, and only heard words count",
                        format!("session {}: {detail}", s.sid),
                    );
                }
                if c.ended {
                    if c.machine.poll_timeout().is_some() {
                        return fail(
                            "no timer armed on an ended session",
                            format!("session {}", s.sid),
                        );
                    }
                    if c.request.is_some() {
                        return fail(
                            "every request billed exactly once",
                            format!("session {} ended with a request in flight", s.sid),
                        );
                    }
                    continue;
                }
                if Some(c.epoch) == stored {
                    owners += 1;
                }
                // History holds only what was said, typed or heard.
                for m in c.machine.history() {
                    for w in m.text.split_whitespace() {
                        let w = w.trim_matches('\0');
                        if !s.said.contains(w) {
                            return fail(
                                "history holds only what was said or heard",
                                format!(
                                    "session {}: {:?} word {w:?} never said",
                                    s.sid,
                                    if m.role == Role::User {
                                        "user"
                                    } else {
                                        "assistant"
                                    }
                                ),
                            );
                        }
                    }
                }
            }
            if owners > 1 {
                return fail(
                    "at most one live owner",
                    format!("session {}: {owners} copies hold the stored epoch", s.sid),
                );
            }
            if let Some((epoch, n)) = s.record
                && n > 1
            {
                return fail(
                    "exactly one final record",
                    format!("session {} recorded {n} times at epoch {epoch}", s.sid),
                );
            }
            if s.copies
                .iter()
                .any(|c| !c.ended && c.epoch >= stored.unwrap_or(0))
            {
                live += 1;
            }
        }
        // The user's live sessions stay under the cap (after the store lost its data, until
        // every session has refreshed its lease once).
        let grace = self
            .store
            .lost_at
            .is_some_and(|t| self.now_ms < t + LEASE_TTL);
        if live > MAX_PER_USER && !grace {
            return fail(
                "live sessions within the user's cap",
                format!("{live} live sessions"),
            );
        }
        if self.db_has_nul {
            return fail("no NUL reaches the database", String::new());
        }
        Ok(())
    }

    /// After every client left and the windows ran out: every session ended, recorded once.
    fn check_final(&self, step: usize) -> Result<(), Violation> {
        for s in &self.sessions {
            if let Some(c) = s.copies.iter().find(|c| !c.ended) {
                return Err(Violation {
                    step,
                    invariant: "every session ends",
                    detail: format!("session {} still live on instance {}", s.sid, c.instance),
                });
            }
            let last = s.copies.iter().map(|c| c.epoch).max().unwrap_or(0);
            if s.record.map(|(e, _)| e) != Some(last) {
                return Err(Violation {
                    step,
                    invariant: "exactly one final record, by the last owner",
                    detail: format!(
                        "session {}: row {:?}, last owner's epoch {last}",
                        s.sid, s.record
                    ),
                });
            }
        }
        Ok(())
    }
}

/// A text as the recorder stores it: through the store's own sanitising boundary.
/// A word of the assistant's (`r{turn}s{sentence}`).
fn assistants_word(word: &str) -> bool {
    word.strip_prefix('r')
        .and_then(|w| w.split_once('s'))
        .is_some_and(|(t, n)| {
            [t, n]
                .iter()
                .all(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        })
}

fn stored(text: &str) -> String {
    let mut text = text.to_owned();
    atlas_store::sanitize_text(&mut text);
    text
}

/// Bytes of reply audio per millisecond.
fn bytes_per_ms(machine: &Session) -> u64 {
    u64::from(machine.output_format().sample_rate) * 2 / 1000
}

fn attaching(resumed: bool, token: String, now: Instant) -> Attaching {
    Attaching {
        resumed,
        overtaken: false,
        user_id: "user".into(),
        token,
        token_expiry: now + Duration::from_secs(3600),
        input: AudioFormat::DEFAULT_INPUT,
        output: AudioFormat::DEFAULT_OUTPUT,
    }
}

/// The schedule a seed decides.
pub fn schedule(seed: u64, len: usize) -> Vec<Action> {
    schedule_with(seed, len, true)
}

/// The schedule a seed decides; with `cuts`, some finals are preceded by the recogniser's cut
/// of their utterance and a while for transcribing it (without, the schedules of the seeds
/// found before cuts existed).
pub fn schedule_with(seed: u64, len: usize, cuts: bool) -> Vec<Action> {
    let mut rng = StdRng::seed_from_u64(seed);
    // A second generator, so that adding cuts leaves the rest of each schedule as it was.
    let mut cut_rng = StdRng::seed_from_u64(seed ^ 0x6375_7473);
    let mut actions = Vec::with_capacity(len);
    for _ in 0..len {
        let session = rng.random::<u8>();
        let roll = rng.random_range(0..100);
        let action = match roll {
            0..4 => Action::NewSession {
                instance: rng.random(),
            },
            4..14 => Action::Advance {
                ms: rng.random_range(1..3000),
            },
            14..15 => Action::Advance {
                ms: rng.random_range(10_000..65_000),
            },
            15..25 => Action::ReplyFinishes {
                session,
                tokens: rng.random(),
            },
            25 if rng.random_range(0..4) == 0 => Action::StoreLosesData,
            26 => Action::StoreReachable(rng.random_range(0..3) != 0),
            _ => Action::Client {
                session,
                what: match rng.random_range(0..100) {
                    0..15 => ClientAct::Audio {
                        valid: rng.random_range(0..10) != 0,
                    },
                    15..27 => ClientAct::Text {
                        nul: rng.random_range(0..5) == 0,
                    },
                    27..37 => ClientAct::Partial,
                    37..49 => ClientAct::Final {
                        speech_final: rng.random(),
                    },
                    49..54 => ClientAct::UtteranceEnd,
                    54..57 => ClientAct::SpeechStarted,
                    57..62 => ClientAct::Commit,
                    62..68 => ClientAct::Cancel,
                    68..73 => ClientAct::Refresh,
                    73..75 => ClientAct::Flood {
                        frames: rng.random(),
                    },
                    75..84 => ClientAct::Drop,
                    84..87 => ClientAct::End,
                    _ => ClientAct::Resume {
                        instance: rng.random(),
                        complete: rng.random_range(0..4) != 0,
                    },
                },
            },
        };
        if cuts
            && let Action::Client {
                session,
                what: ClientAct::Final { .. },
            } = action
            && cut_rng.random_range(0..3) == 0
        {
            actions.push(Action::Client {
                session,
                what: ClientAct::SpeechEnded,
            });
            actions.push(Action::Advance {
                ms: cut_rng.random_range(10..400),
            });
        }
        actions.push(action);
    }
    actions
}

/// Runs a schedule; a panic (a broken assertion of the driver's contract) is a violation.
pub fn run(seed: u64, actions: &[Action]) -> Result<Stats, Violation> {
    run_with(seed, actions, Features::ALL)
}

/// Runs a schedule in a world whose sessions use `features` (the seeds found before a
/// feature existed replay without it).
pub fn run_with(seed: u64, actions: &[Action], features: Features) -> Result<Stats, Violation> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        World::new(seed, features).run(actions)
    }))
    .unwrap_or_else(|panic| {
        let detail = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        Err(Violation {
            step: actions.len(),
            invariant: "the driver's contract",
            detail,
        })
    })
}

/// Runs one seed's schedule of `len` actions.
pub fn run_seed(seed: u64, len: usize) -> Result<Stats, Violation> {
    run(seed, &schedule(seed, len))
}

/// Cuts a failing schedule down: drops chunks of actions while the same invariant still
/// fails (delta debugging), so a failure reads as a short sequence.
pub fn shrink(seed: u64, actions: &[Action], invariant: &str) -> Vec<Action> {
    let fails = |a: &[Action]| run(seed, a).is_err_and(|v| v.invariant == invariant);
    let mut current = actions.to_vec();
    let mut chunk = current.len().div_ceil(2).max(1);
    while chunk >= 1 {
        let mut i = 0;
        let mut removed = false;
        while i < current.len() {
            let end = (i + chunk).min(current.len());
            let candidate: Vec<Action> = current[..i]
                .iter()
                .chain(&current[end..])
                .copied()
                .collect();
            if fails(&candidate) {
                current = candidate;
                removed = true;
            } else {
                i += chunk;
            }
        }
        if !removed {
            if chunk == 1 {
                break;
            }
            chunk /= 2;
        }
    }
    current
}

/// The command that replays a seed.
pub fn replay_command(seed: u64, len: usize) -> String {
    format!("cargo run -p atlas-sim --release -- --seed {seed} --actions {len}")
}
