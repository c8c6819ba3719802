//! Session timers: heartbeat, idle reaping, maximum duration, token expiry and the resume
//! window, decided from instants passed in.
//!
//! The session loop sleeps until [`SessionTimers::next_deadline`] and then calls
//! [`SessionTimers::poll`] until it returns `None`.

use std::time::{Duration, Instant};

/// Timer settings.
#[derive(Clone, Copy, Debug)]
pub struct TimerConfig {
    /// Ping cadence while a connection is attached.
    pub heartbeat_interval: Duration,
    /// Close the connection when a pong is this late.
    pub heartbeat_timeout: Duration,
    /// End the session after this long without client activity.
    pub idle_timeout: Duration,
    /// Longest session.
    pub max_duration: Duration,
    /// Warn this long before the maximum duration.
    pub max_duration_warning: Duration,
    /// Allowed time past token expiry before closing.
    pub token_grace: Duration,
    /// How long a detached session waits for a resume.
    pub resume_window: Duration,
}

/// What the session must do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerAction {
    /// Send a WebSocket ping.
    Ping,
    /// The attached connection missed its pong: drop it (the session detaches).
    HeartbeatTimeout,
    /// Tell the client the session ends in `seconds_left`.
    WarnMaxDuration {
        /// Seconds until the maximum duration.
        seconds_left: u64,
    },
    /// End the session.
    End(TimerEnd),
}

/// Why a timer ends the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerEnd {
    /// No client activity for the idle timeout.
    Idle,
    /// Maximum duration reached.
    MaxDuration,
    /// The access token expired and was not refreshed.
    TokenExpired,
    /// Detached for the whole resume window.
    ResumeWindowExpired,
}

/// Timer state of one session.
#[derive(Clone, Debug)]
pub struct SessionTimers {
    config: TimerConfig,
    started: Instant,
    last_activity: Instant,
    token_expiry: Instant,
    /// Set while no connection is attached.
    detached_since: Option<Instant>,
    /// When the next ping is due (attached only).
    next_ping: Instant,
    /// Set while a ping awaits its pong.
    pong_deadline: Option<Instant>,
    warned: bool,
}

impl SessionTimers {
    /// Timers for a session started at `now` whose token expires at `token_expiry`.
    pub fn new(config: TimerConfig, now: Instant, token_expiry: Instant) -> Self {
        SessionTimers {
            config,
            started: now,
            last_activity: now,
            token_expiry,
            detached_since: None,
            next_ping: now + config.heartbeat_interval,
            pong_deadline: None,
            warned: config.max_duration <= config.max_duration_warning,
        }
    }

    /// When the session started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Moves the start back (a session continued from another instance keeps its age, so
    /// reconnecting never extends the maximum duration).
    pub fn started_earlier(&mut self, by: Duration) {
        if let Some(t) = self.started.checked_sub(by) {
            self.started = t;
            self.warned = self.config.max_duration <= self.config.max_duration_warning;
        }
    }

    /// The client did something (any frame except pongs).
    pub fn activity(&mut self, now: Instant) {
        self.last_activity = now;
    }

    /// A pong arrived.
    pub fn pong(&mut self) {
        self.pong_deadline = None;
    }

    /// The access token was replaced.
    pub fn token_refreshed(&mut self, expiry: Instant) {
        self.token_expiry = expiry;
    }

    /// The connection went away; the resume window starts.
    pub fn detached(&mut self, now: Instant) {
        self.detached_since = Some(now);
        self.pong_deadline = None;
    }

    /// A connection is attached (new or resumed).
    pub fn attached(&mut self, now: Instant) {
        self.detached_since = None;
        self.last_activity = now;
        self.next_ping = now + self.config.heartbeat_interval;
        self.pong_deadline = None;
    }

    /// Whether no connection is attached.
    pub fn is_detached(&self) -> bool {
        self.detached_since.is_some()
    }

    fn max_end(&self) -> Instant {
        self.started + self.config.max_duration
    }

    fn token_end(&self) -> Instant {
        self.token_expiry + self.config.token_grace
    }

    /// The earliest instant at which [`poll`](Self::poll) has something to do.
    pub fn next_deadline(&self) -> Instant {
        let mut d = self
            .max_end()
            .min(self.last_activity + self.config.idle_timeout);
        if !self.warned {
            d = d.min(self.max_end() - self.config.max_duration_warning);
        }
        match self.detached_since {
            Some(since) => d = d.min(since + self.config.resume_window),
            None => {
                d = d.min(self.token_end());
                d = d.min(self.pong_deadline.unwrap_or(self.next_ping));
            }
        }
        d
    }

    /// The next action due at `now`, if any (call until `None`).
    pub fn poll(&mut self, now: Instant) -> Option<TimerAction> {
        if now >= self.max_end() {
            return Some(TimerAction::End(TimerEnd::MaxDuration));
        }
        if let Some(since) = self.detached_since {
            if now >= since + self.config.resume_window {
                return Some(TimerAction::End(TimerEnd::ResumeWindowExpired));
            }
        } else {
            if now >= self.token_end() {
                return Some(TimerAction::End(TimerEnd::TokenExpired));
            }
            if self.pong_deadline.is_some_and(|d| now >= d) {
                self.pong_deadline = None;
                return Some(TimerAction::HeartbeatTimeout);
            }
        }
        if now >= self.last_activity + self.config.idle_timeout {
            return Some(TimerAction::End(TimerEnd::Idle));
        }
        if !self.warned && now >= self.max_end() - self.config.max_duration_warning {
            self.warned = true;
            let left = self.max_end().saturating_duration_since(now);
            return Some(TimerAction::WarnMaxDuration {
                seconds_left: left.as_secs_f64().round() as u64,
            });
        }
        if self.detached_since.is_none() && self.pong_deadline.is_none() && now >= self.next_ping {
            self.next_ping = now + self.config.heartbeat_interval;
            self.pong_deadline = Some(now + self.config.heartbeat_timeout);
            return Some(TimerAction::Ping);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TimerConfig {
        TimerConfig {
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            max_duration: Duration::from_secs(1800),
            max_duration_warning: Duration::from_secs(60),
            token_grace: Duration::from_secs(5),
            resume_window: Duration::from_secs(60),
        }
    }

    /// Timers started at `t0` where only the maximum duration comes due: no idle timeout,
    /// heartbeat or token expiry within 100,000 s.
    fn max_duration_only(t0: Instant) -> SessionTimers {
        let mut c = config();
        c.idle_timeout = S(100_000);
        c.heartbeat_interval = S(100_000);
        SessionTimers::new(c, t0, t0 + S(100_000))
    }

    /// The maximum duration is the next deadline, at `at`, and ends the session then.
    fn max_duration_ends_at(t: &mut SessionTimers, at: Instant) {
        assert_eq!(t.next_deadline(), at);
        assert_eq!(t.poll(at), Some(TimerAction::End(TimerEnd::MaxDuration)));
    }

    fn drain(t: &mut SessionTimers, now: Instant) -> Vec<TimerAction> {
        std::iter::from_fn(|| t.poll(now)).take(10).collect()
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn heartbeat_pings_and_times_out_without_pong() {
        let t0 = Instant::now();
        let mut t = SessionTimers::new(config(), t0, t0 + S(3600));
        assert_eq!(t.next_deadline(), t0 + S(30));
        assert!(drain(&mut t, t0 + S(29)).is_empty());
        assert_eq!(drain(&mut t, t0 + S(30)), vec![TimerAction::Ping]);
        assert_eq!(t.next_deadline(), t0 + S(40));
        t.pong();
        assert!(drain(&mut t, t0 + S(40)).is_empty());
        assert_eq!(drain(&mut t, t0 + S(60)), vec![TimerAction::Ping]);
        assert_eq!(
            drain(&mut t, t0 + S(70)),
            vec![TimerAction::HeartbeatTimeout]
        );
    }

    #[test]
    fn idle_sessions_end_and_activity_postpones_it() {
        let t0 = Instant::now();
        let mut t = SessionTimers::new(config(), t0, t0 + S(36_000));
        t.detached(t0); // no heartbeat noise; resume window is shorter though
        t.attached(t0);
        t.activity(t0 + S(300));
        let at = t0 + S(899);
        assert!(!drain(&mut t, at).contains(&TimerAction::End(TimerEnd::Idle)));
        let acts = drain(&mut t, t0 + S(900));
        assert!(acts.contains(&TimerAction::End(TimerEnd::Idle)), "{acts:?}");
    }

    #[test]
    fn max_duration_warns_then_ends() {
        let t0 = Instant::now();
        let mut t = max_duration_only(t0);
        assert_eq!(t.next_deadline(), t0 + S(1740));
        assert_eq!(
            drain(&mut t, t0 + S(1740)),
            vec![TimerAction::WarnMaxDuration { seconds_left: 60 }]
        );
        max_duration_ends_at(&mut t, t0 + S(1800));
    }

    #[test]
    fn a_moved_session_keeps_its_age() {
        let t0 = Instant::now() + S(10_000);
        let mut t = max_duration_only(t0);
        t.started_earlier(S(1790));
        // Already inside the warning period: the new connection is warned at once.
        assert!(t.next_deadline() <= t0);
        assert_eq!(
            t.poll(t0),
            Some(TimerAction::WarnMaxDuration { seconds_left: 10 })
        );
        max_duration_ends_at(&mut t, t0 + S(10));
    }

    #[test]
    fn token_expiry_with_grace_and_refresh() {
        let t0 = Instant::now();
        let mut c = config();
        c.heartbeat_interval = S(100_000);
        let mut t = SessionTimers::new(c, t0, t0 + S(100));
        assert_eq!(t.next_deadline(), t0 + S(105));
        assert_eq!(t.poll(t0 + S(104)), None);
        t.token_refreshed(t0 + S(500));
        assert_eq!(t.poll(t0 + S(105)), None);
        assert_eq!(
            t.poll(t0 + S(505)),
            Some(TimerAction::End(TimerEnd::TokenExpired))
        );
    }

    #[test]
    fn resume_window_runs_only_while_detached() {
        let t0 = Instant::now();
        let mut t = SessionTimers::new(config(), t0, t0 + S(100));
        t.detached(t0 + S(10));
        assert!(t.is_detached());
        // Token expiry and heartbeats do not apply while detached.
        assert_eq!(t.next_deadline(), t0 + S(70));
        assert_eq!(t.poll(t0 + S(69)), None);
        t.attached(t0 + S(69));
        assert_eq!(t.poll(t0 + S(71)), None);
        t.detached(t0 + S(80));
        assert_eq!(
            t.poll(t0 + S(140)),
            Some(TimerAction::End(TimerEnd::ResumeWindowExpired))
        );
    }
}
