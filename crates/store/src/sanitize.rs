//! Text bound for the database, made storable: the one place where it happens.
//!
//! Architecture invariant: every text bound for the database passes [`sanitize_text`] (through
//! [`Snapshot::sanitized`], in the store's write path, the one way to the database for live
//! records and spool replays alike); the database never sees a NUL. A NUL in a client tool's
//! error, a model's reply, a transcript or a client field is stored as U+FFFD; it no longer
//! makes PostgreSQL refuse the whole session record (which the recorder then quarantines).
//!
//! [`Snapshot::sanitize`] visits every text field of a record by destructuring each row type
//! whole, so a text field added to a row type does not compile until it is listed here.

use std::borrow::Cow;

use crate::{SessionRecord, Snapshot, ToolCallRecord, TurnRecord};

/// What a NUL becomes: U+FFFD REPLACEMENT CHARACTER.
pub const REPLACEMENT: char = '\u{FFFD}';

/// The schema's bound on a tool call id, in bytes (`octet_length(call_id) between 1 and 128`).
pub const CALL_ID_MAX_BYTES: usize = 128;

/// Whether `s` holds a character the database cannot store.
pub fn needs_sanitizing(s: &str) -> bool {
    s.contains('\0')
}

/// Makes `s` storable in place: every U+0000 (NUL) becomes U+FFFD. Returns whether anything
/// was replaced; when nothing was (the usual case) `s` is left untouched, not reallocated.
///
/// NUL is the one character to replace. PostgreSQL `text` cannot hold it: the whole statement
/// fails with SQLSTATE 22021 ("invalid byte sequence for encoding \"UTF8\": 0x00"), which
/// quarantines the record. SQLite stores it, but its text functions stop at it (`length()`,
/// and so the table checks built on it, counts only the characters before the first NUL).
///
/// Everything else a Rust `String` holds is valid UTF-8, which both databases accept as it is
/// (in a UTF-8 PostgreSQL database, as Supabase's and the default are): the other C0 control
/// characters (`\t`, `\n`, `\r`, and also ESC and the rest), noncharacters such as U+FFFE, and
/// U+FFFD itself are kept. Whether a client may send such characters at all is a question for
/// the edge (the protocol's field checks), not for storage.
pub fn sanitize_text(s: &mut String) -> bool {
    if !needs_sanitizing(s) {
        return false;
    }
    *s = s.replace('\0', "\u{FFFD}");
    true
}

/// Gives a row type `needs_sanitizing` and `sanitize_fields` over its text fields. Every field
/// must be listed, as text (`String`), optional text (`Option<String>`) or other: the patterns
/// are exhaustive, so a field left out is a compile error.
macro_rules! text_fields {
    ($ty:ident {
        text: [$($t:ident),* $(,)?],
        optional: [$($o:ident),* $(,)?],
        other: [$($x:ident),* $(,)?] $(,)?
    }) => {
        impl $ty {
            /// Whether any text field holds a character the database cannot store.
            fn needs_sanitizing(&self) -> bool {
                let $ty { $($t,)* $($o,)* $($x: _,)* } = self;
                $(
                    if needs_sanitizing($t) {
                        return true;
                    }
                )*
                $(
                    if $o.as_deref().is_some_and(needs_sanitizing) {
                        return true;
                    }
                )*
                false
            }

            /// [`sanitize_text`] on every text field; whether anything was replaced.
            fn sanitize_fields(&mut self) -> bool {
                let $ty { $($t,)* $($o,)* $($x: _,)* } = self;
                let mut changed = false;
                $(
                    changed |= sanitize_text($t);
                )*
                $(
                    if let Some(s) = $o {
                        changed |= sanitize_text(s);
                    }
                )*
                changed
            }
        }
    };
}

text_fields!(SessionRecord {
    text: [user_id, transport],
    optional: [
        call_sid,
        caller,
        conversation_id,
        end_reason,
        stt_model,
        llm_model,
        tts_model,
        price_catalog_version,
        client_name,
        client_version,
    ],
    other: [
        id,
        started_at,
        ended_at,
        duration_ms,
        turns,
        stt_seconds,
        llm_input_tokens,
        llm_output_tokens,
        tts_chars,
        stt_cost_micros,
        llm_cost_micros,
        tts_cost_micros,
        total_cost_micros,
    ],
});

text_fields!(TurnRecord {
    text: [user_id, user_text, assistant_text],
    optional: [],
    other: [
        session_id,
        turn_index,
        interrupted,
        eos_to_final_ms,
        llm_first_token_ms,
        tts_first_audio_ms,
        to_first_audio_ms,
        tools_ms,
        created_at,
    ],
});

text_fields!(ToolCallRecord {
    text: [call_id, user_id, name, outcome],
    optional: [kind, mcp_server, arguments, result],
    other: [
        session_id,
        turn_index,
        arguments_bytes,
        duration_ms,
        created_at
    ],
});

impl ToolCallRecord {
    /// [`Self::sanitize_fields`], keeping the call id within the schema's bound: a replacement
    /// takes three bytes where the NUL took one, so an id the server accepted (at most 128
    /// bytes) may outgrow the bound. Only then is it cut, at a character boundary.
    fn sanitize(&mut self) -> bool {
        let before = self.call_id.len();
        let changed = self.sanitize_fields();
        if self.call_id.len() > before.max(CALL_ID_MAX_BYTES) {
            let mut end = CALL_ID_MAX_BYTES;
            while !self.call_id.is_char_boundary(end) {
                end -= 1;
            }
            self.call_id.truncate(end);
        }
        changed
    }
}

impl Snapshot {
    /// Whether any text of the record (session, turns, tool calls) holds a character the
    /// database cannot store.
    pub fn needs_sanitizing(&self) -> bool {
        let Snapshot {
            seq: _,
            session,
            turns,
            tool_calls,
        } = self;
        session.needs_sanitizing()
            || turns.iter().any(TurnRecord::needs_sanitizing)
            || tool_calls.iter().any(ToolCallRecord::needs_sanitizing)
    }

    /// Makes every text of the record storable ([`sanitize_text`]): the session's, each
    /// turn's and each tool call's. Returns whether anything was replaced; allocates nothing
    /// when nothing is.
    pub fn sanitize(&mut self) -> bool {
        let Snapshot {
            seq: _,
            session,
            turns,
            tool_calls,
        } = self;
        let mut changed = session.sanitize_fields();
        for t in turns {
            changed |= t.sanitize_fields();
        }
        for c in tool_calls {
            changed |= c.sanitize();
        }
        changed
    }

    /// The record as the database can store it: this one, borrowed, when it needs nothing (no
    /// copy); otherwise a sanitized copy ([`Snapshot::sanitize`]).
    pub fn sanitized(&self) -> Cow<'_, Snapshot> {
        if self.needs_sanitizing() {
            let mut copy = self.clone();
            copy.sanitize();
            Cow::Owned(copy)
        } else {
            Cow::Borrowed(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record with `text` in every text field, optional ones included, one turn and one
    /// tool call.
    fn snapshot_with(text: &str) -> Snapshot {
        let now = chrono::Utc::now();
        let id = uuid::Uuid::new_v4();
        let t = || text.to_owned();
        Snapshot {
            seq: 1,
            session: SessionRecord {
                id,
                user_id: t(),
                conversation_id: Some(t()),
                started_at: now,
                ended_at: Some(now),
                duration_ms: 1,
                end_reason: Some(t()),
                turns: 1,
                stt_seconds: 1.0,
                llm_input_tokens: 1,
                llm_output_tokens: 1,
                tts_chars: 1,
                stt_cost_micros: None,
                llm_cost_micros: None,
                tts_cost_micros: None,
                total_cost_micros: None,
                stt_model: Some(t()),
                llm_model: Some(t()),
                tts_model: Some(t()),
                price_catalog_version: Some(t()),
                client_name: Some(t()),
                client_version: Some(t()),
                transport: t(),
                call_sid: Some(t()),
                caller: Some(t()),
            },
            turns: vec![TurnRecord {
                session_id: id,
                turn_index: 1,
                user_id: t(),
                user_text: t(),
                assistant_text: t(),
                interrupted: false,
                eos_to_final_ms: None,
                llm_first_token_ms: None,
                tts_first_audio_ms: None,
                to_first_audio_ms: None,
                tools_ms: None,
                created_at: now,
            }],
            tool_calls: vec![ToolCallRecord {
                session_id: id,
                turn_index: 1,
                call_id: t(),
                user_id: t(),
                name: t(),
                kind: Some(t()),
                mcp_server: Some(t()),
                arguments_bytes: 0,
                duration_ms: 0,
                outcome: t(),
                arguments: Some(t()),
                result: Some(t()),
                created_at: now,
            }],
        }
    }

    #[test]
    fn text_without_nul_is_left_alone_and_not_reallocated() {
        let kept = "héllo\t\n\r\u{1b}\u{7f}\u{fffe}\u{FFFD} ✓";
        let mut s = String::with_capacity(64);
        s.push_str(kept);
        let (ptr, capacity) = (s.as_ptr(), s.capacity());
        assert!(!sanitize_text(&mut s));
        assert_eq!(s, kept);
        assert_eq!(s.as_ptr(), ptr, "not reallocated");
        assert_eq!(s.capacity(), capacity);
        let mut empty = String::new();
        assert!(!sanitize_text(&mut empty));
        assert!(empty.is_empty());
    }

    #[test]
    fn nul_is_replaced_by_the_replacement_character() {
        for (raw, stored) in [
            ("\0", "\u{FFFD}"),
            ("a\0b", "a\u{FFFD}b"),
            (
                "\0error: device said \0\0",
                "\u{FFFD}error: device said \u{FFFD}\u{FFFD}",
            ),
            ("é\0\n", "é\u{FFFD}\n"),
        ] {
            let mut s = raw.to_owned();
            assert!(needs_sanitizing(&s));
            assert!(sanitize_text(&mut s), "{raw:?}");
            assert_eq!(s, stored);
            assert!(!needs_sanitizing(&s));
            assert!(!sanitize_text(&mut s), "sanitizing twice changes nothing");
        }
    }

    #[test]
    fn every_text_of_a_snapshot_is_sanitized() {
        let raw = snapshot_with("a\0b");
        assert!(raw.needs_sanitizing());
        let nuls = serde_json::to_string(&raw)
            .unwrap()
            .matches("\\u0000")
            .count();
        assert_eq!(nuls, 12 + 3 + 8, "every text field holds a NUL");
        let clean = raw.sanitized();
        assert!(matches!(clean, Cow::Owned(_)));
        assert!(!clean.needs_sanitizing());
        let json = serde_json::to_string(&*clean).unwrap();
        assert!(!json.contains("\\u0000"), "{json}");
        assert_eq!(json.matches(REPLACEMENT).count(), nuls, "{json}");
        assert_eq!(clean.turns[0].assistant_text, "a\u{FFFD}b");
        assert_eq!(clean.tool_calls[0].result.as_deref(), Some("a\u{FFFD}b"));
        assert_eq!(clean.session.client_name.as_deref(), Some("a\u{FFFD}b"));
        // In place, the same.
        let mut in_place = raw.clone();
        assert!(in_place.sanitize());
        assert_eq!(in_place, *clean);
        // Only the text changed.
        assert_eq!(in_place.session.id, raw.session.id);
        assert_eq!(
            in_place.tool_calls[0].created_at,
            raw.tool_calls[0].created_at
        );
    }

    #[test]
    fn a_clean_snapshot_is_borrowed_not_copied() {
        let mut snap = snapshot_with("plain\ttext \u{FFFD}");
        assert!(!snap.needs_sanitizing());
        assert!(matches!(snap.sanitized(), Cow::Borrowed(s) if std::ptr::eq(s, &snap)));
        let before = snap.clone();
        let ptr = snap.turns[0].user_text.as_ptr();
        assert!(!snap.sanitize());
        assert_eq!(snap, before);
        assert_eq!(snap.turns[0].user_text.as_ptr(), ptr, "not reallocated");
    }

    #[test]
    fn a_call_id_grown_past_its_bound_is_cut_at_a_character_boundary() {
        let mut snap = snapshot_with("x");
        for (raw, stored) in [
            // 128 bytes with the NUL; 130 with its replacement: cut before it.
            (format!("{}\0", "x".repeat(127)), "x".repeat(127)),
            (
                format!("{}\0", "x".repeat(125)),
                format!("{}\u{FFFD}", "x".repeat(125)),
            ),
            ("\0".repeat(128), "\u{FFFD}".repeat(42)),
            ("call\0_1".to_owned(), "call\u{FFFD}_1".to_owned()),
        ] {
            snap.tool_calls[0].call_id = raw.clone();
            assert!(snap.sanitize(), "{raw:?}");
            let id = &snap.tool_calls[0].call_id;
            assert_eq!(id, &stored);
            assert!(!id.is_empty() && id.len() <= CALL_ID_MAX_BYTES);
        }
        // An id without a NUL is never cut, whatever its length (the schema judges it).
        let long = "y".repeat(CALL_ID_MAX_BYTES + 1);
        snap.tool_calls[0].call_id = long.clone();
        assert!(!snap.sanitize());
        assert_eq!(snap.tool_calls[0].call_id, long);
    }
}
