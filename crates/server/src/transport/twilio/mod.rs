//! Twilio Media Streams: phone calls reach a session through Twilio.
//!
//! A call to one of the account's numbers makes Twilio request the voice webhook, a signed
//! HTTP POST. We answer with TwiML, `<Connect><Stream url="wss://…">`, and Twilio opens a
//! WebSocket to that URL: a bidirectional Media Stream. Over it Twilio sends JSON text
//! messages (`connected`, `start`, then `media` with the caller's audio as base64 μ-law at
//! 8000 Hz, `dtmf`, `mark`, and finally `stop`), and we send `media` with audio to play,
//! `mark` to learn when playback reaches a point, and `clear` to cut playback short when the
//! caller barges in.
//!
//! The server's side, with I/O:
//! - [`webhook`]: the voice webhook and the stream's upgrade.
//! - [`stream`]: the stream's handshake, its messages in the session's terms, and the
//!   session's output on it.
//!
//! The pieces they use are pure: no I/O, no clock, no configuration.
//! - [`signature`]: `X-Twilio-Signature`, which proves the webhook request came from Twilio.
//! - [`twiml`]: the webhook's answers, connect the call to the stream or refuse it.
//! - [`credential`]: who the call belongs to, signed by us in the webhook's answer and brought
//!   back in the stream's `start` message, bound to the call and short-lived.
//! - [`wire`]: the stream's messages, parsed and rendered.
//! - [`mulaw`]: G.711 μ-law to and from 16-bit linear PCM.
//!
//! In order: verify the webhook's signature, decide whose call it is, answer
//! [`twiml::connect_stream`] with a [`credential::issue`]d credential as a parameter; on the
//! socket, [`wire::parse`] the `start` message, [`credential::verify`] its credential against
//! its call sid, and check the media format; then decode `media` payloads with [`mulaw`] into
//! the session and encode its replies into [`wire::media`] messages.

pub mod credential;
pub mod mulaw;
pub mod signature;
pub mod stream;
pub mod twiml;
pub mod webhook;
pub mod wire;

/// A phone number with all but its last four digits masked (`+14155550123` → `+*******0123`).
pub fn mask_number(number: &str) -> String {
    let digits = number.chars().filter(char::is_ascii_digit).count();
    let mut seen = 0;
    number
        .chars()
        .map(|c| {
            if c.is_ascii_digit() {
                seen += 1;
                if seen + 4 <= digits { '*' } else { c }
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_keep_only_their_last_four_digits() {
        assert_eq!(super::mask_number("+14155550123"), "+*******0123");
        assert_eq!(super::mask_number("123"), "123");
        assert_eq!(super::mask_number(""), "");
        assert_eq!(super::mask_number("anonymous"), "anonymous");
    }
}
