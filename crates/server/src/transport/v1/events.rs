//! The session's events as protocol v1 JSON events.

use std::time::Duration;

use atlas_core::cost::to_usd;
use atlas_core::latency::Latency;
use atlas_core::session::ledger::Usage;
use atlas_core::session::{Ending, Event, Opaque};
use atlas_protocol::{EndingReason, LatencyBreakdown, ServerEvent};

/// The v1 event for `event`.
pub fn server_event(event: Event) -> ServerEvent {
    match event {
        Event::Ready {
            session_id,
            resume_token,
            resumed_turns: None,
            limits,
            input_audio,
            output_audio,
        } => ServerEvent::SessionStarted {
            session_id,
            resume_token,
            limits,
            input_audio,
            output_audio,
        },
        Event::Ready {
            session_id,
            resume_token,
            resumed_turns: Some(turns),
            limits,
            input_audio,
            output_audio,
        } => ServerEvent::SessionResumed {
            session_id,
            resume_token,
            limits,
            input_audio,
            output_audio,
            turns,
        },
        Event::Hearing { text } => ServerEvent::TranscriptPartial { text },
        Event::Heard { turn_id, text } => ServerEvent::TranscriptFinal { turn_id, text },
        Event::ReplyStarted { turn_id } => ServerEvent::ResponseStarted { turn_id },
        Event::ReplyText { turn_id, text } => ServerEvent::ResponseTextDelta { turn_id, text },
        Event::ReplyDone {
            turn_id,
            interrupted,
            latency,
        } => ServerEvent::ResponseDone {
            turn_id,
            interrupted,
            latency_ms: breakdown(latency),
        },
        Event::Interrupted { turn_id } => ServerEvent::ResponseInterrupted { turn_id },
        Event::ToolCall {
            turn_id,
            call_id,
            name,
            arguments,
            timeout,
        } => ServerEvent::ToolCall {
            turn_id,
            call_id,
            name,
            // Checked against the schema already: the arguments are a JSON object.
            arguments: serde_json::from_str(&arguments).unwrap_or_else(|_| serde_json::json!({})),
            timeout_ms: timeout.as_millis() as u64,
        },
        Event::ToolCancelled { call_id, reason } => ServerEvent::ToolCancelled {
            call_id,
            reason: reason.to_owned(),
        },
        Event::Usage(usage) => ServerEvent::Usage(usage_v1(usage)),
        Event::BudgetWarning {
            spent_usd,
            budget_usd,
        } => ServerEvent::BudgetWarning {
            spent_usd,
            budget_usd,
        },
        Event::Ending {
            reason,
            seconds_left,
        } => ServerEvent::SessionEnding {
            reason: match reason {
                Ending::MaxDuration => EndingReason::MaxDuration,
                Ending::Draining => EndingReason::Draining,
                Ending::Budget => EndingReason::Budget,
            },
            seconds_left,
        },
        Event::Problem {
            code,
            message,
            fatal,
        } => ServerEvent::Error {
            code,
            message,
            fatal,
        },
        Event::Pong { id } => ServerEvent::Pong {
            id: id.and_then(|o| serde_json::from_str(&o.0).ok()),
        },
    }
}

/// A v1 ping id as the session keeps it (its JSON text).
pub fn ping_id(id: Option<serde_json::Value>) -> Option<Opaque> {
    id.map(|v| Opaque(v.to_string().into()))
}

/// A turn's latency in v1's terms (whole milliseconds).
pub fn breakdown(l: Latency) -> LatencyBreakdown {
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
    LatencyBreakdown {
        end_of_speech_to_final: ms(l.end_of_speech_to_final),
        llm_first_token: ms(l.llm_first_token),
        tts_first_audio: ms(l.tts_first_audio),
        to_first_audio: ms(l.to_first_audio),
        tools: ms(l.tools),
    }
}

/// Usage in v1's terms (cost in dollars).
fn usage_v1(u: Usage) -> atlas_protocol::Usage {
    atlas_protocol::Usage {
        cost_usd: u.cost.map(to_usd),
        stt_seconds: u.stt_seconds,
        llm_input_tokens: u.llm_input_tokens,
        llm_output_tokens: u.llm_output_tokens,
        tts_chars: u.tts_chars,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atlas_protocol::{AudioFormat, ErrorCode, Limits};

    fn ready(resumed_turns: Option<u64>) -> Event {
        Event::Ready {
            session_id: "s".into(),
            resume_token: "t".into(),
            resumed_turns,
            limits: Limits {
                max_duration_s: 1,
                budget_usd: None,
                idle_timeout_s: 2,
                resume_window_s: 3,
            },
            input_audio: AudioFormat::DEFAULT_INPUT,
            output_audio: AudioFormat::DEFAULT_OUTPUT,
        }
    }

    #[test]
    fn a_new_and_a_resumed_session_are_told_apart_on_the_wire() {
        assert!(matches!(
            server_event(ready(None)),
            ServerEvent::SessionStarted { .. }
        ));
        assert!(matches!(
            server_event(ready(Some(4))),
            ServerEvent::SessionResumed { turns: 4, .. }
        ));
        let json =
            server_event(Event::problem(ErrorCode::RateLimited, "slow down", false)).to_json();
        assert_eq!(
            json,
            r#"{"type":"error","code":"rate_limited","message":"slow down","fatal":false}"#
        );
        assert_eq!(
            server_event(Event::Interrupted { turn_id: 3 }).to_json(),
            r#"{"type":"response.interrupted","turn_id":3}"#
        );
        let id = serde_json::json!({"n": [1, "two"]});
        assert_eq!(
            server_event(Event::Pong {
                id: ping_id(Some(id.clone()))
            }),
            ServerEvent::Pong { id: Some(id) }
        );
        let latency = Latency {
            to_first_audio: Some(Duration::from_micros(700_900)),
            tools: Some(Duration::from_millis(1_500)),
            ..Latency::default()
        };
        assert_eq!(
            server_event(Event::ReplyDone {
                turn_id: 2,
                interrupted: false,
                latency
            })
            .to_json(),
            r#"{"type":"response.done","turn_id":2,"interrupted":false,"latency_ms":{"to_first_audio":700,"tools":1500}}"#
        );
        let usage = Usage {
            cost: Some(1_250),
            stt_seconds: 1.5,
            llm_input_tokens: 2,
            llm_output_tokens: 3,
            tts_chars: 4,
        };
        assert_eq!(
            server_event(Event::Usage(usage)).to_json(),
            r#"{"type":"usage","cost_usd":0.00125,"stt_seconds":1.5,"llm_input_tokens":2,"llm_output_tokens":3,"tts_chars":4}"#
        );
        assert_eq!(
            server_event(Event::Ending {
                reason: Ending::Budget,
                seconds_left: 0
            })
            .to_json(),
            r#"{"type":"session.ending","reason":"budget","seconds_left":0}"#
        );
    }
}
