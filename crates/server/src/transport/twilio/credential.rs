//! The stream credential: who a call belongs to, carried from the voice webhook to the media
//! stream.
//!
//! The voice webhook (a request Twilio signed, see [`super::signature`]) decides whose call it
//! is and answers with TwiML that connects the call to our WebSocket. The `<Stream>` URL cannot
//! carry a query string, so the credential rides in a `<Parameter>` and comes back in the
//! `start` message's `customParameters`. It is signed by this server, bound to the call's
//! `CallSid` (which the `start` message also carries) and short-lived, so a credential copied
//! from one call is useless on another or later.
//!
//! Format, all ASCII:
//!
//! ```text
//! v1.<call sid>.<user id>.<expires>.<mac>
//! ```
//!
//! where the call sid, the user id and the MAC are base64url without padding (an alphabet
//! without `.`, so a user id may contain anything), `expires` is Unix seconds in decimal, and
//! the MAC is HMAC-SHA256, keyed with the server's secret, over a fixed context label followed
//! by everything before the last `.`. For a 34-character call sid and a user id of up to 128
//! bytes the credential is under 300 characters.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The longest credential [`verify`] reads. A `<Parameter>` must stay under 500 characters.
pub const MAX_LEN: usize = 500;

/// The version field every credential starts with.
const PREFIX: &str = "v1.";

/// Mixed into every MAC, so a MAC made with the same secret for another purpose never passes
/// as one of these.
const CONTEXT: &[u8] = b"atlas-voice twilio stream credential\n";

/// Why a credential was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Not a credential: too long, or not of the format.
    #[error("the stream credential is malformed")]
    Malformed,
    /// The MAC does not match: altered, forged, or made with another secret.
    #[error("the stream credential's signature is not valid")]
    BadSignature,
    /// Genuine, but issued for another call.
    #[error("the stream credential was issued for another call")]
    OtherCall,
    /// Genuine, but expired.
    #[error("the stream credential has expired")]
    Expired,
}

/// A credential that `user_id` may stream the call `call_sid` until `expires_unix` (Unix
/// seconds, exclusive), signed with `secret`.
///
/// `secret` should be at least 32 random bytes. Keep `user_id` to 128 bytes or fewer so the
/// credential stays well under [`MAX_LEN`].
pub fn issue(secret: &[u8], call_sid: &str, user_id: &str, expires_unix: u64) -> String {
    let mut token = String::with_capacity(100 + (call_sid.len() + user_id.len()) * 4 / 3);
    token.push_str(PREFIX);
    URL_SAFE_NO_PAD.encode_string(call_sid, &mut token);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(user_id, &mut token);
    token.push('.');
    token.push_str(&expires_unix.to_string());
    let tag = keyed(secret, &token).finalize().into_bytes();
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(tag, &mut token);
    token
}

/// The user id in `token`, if `secret` signed it for the call `call_sid` and it has not
/// expired at `now_unix`.
///
/// The MAC is checked, in constant time, before anything inside the credential is looked at.
/// An empty `secret` verifies nothing.
pub fn verify(
    secret: &[u8],
    token: &str,
    call_sid: &str,
    now_unix: u64,
) -> Result<String, CredentialError> {
    use CredentialError::{BadSignature, Expired, Malformed, OtherCall};

    if token.len() > MAX_LEN {
        return Err(Malformed);
    }
    let (signed, tag) = token.rsplit_once('.').ok_or(Malformed)?;
    let fields = signed.strip_prefix(PREFIX).ok_or(Malformed)?;
    let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| Malformed)?;
    if secret.is_empty() {
        return Err(BadSignature);
    }
    keyed(secret, signed)
        .verify_slice(&tag)
        .map_err(|_| BadSignature)?;

    let mut fields = fields.split('.');
    let (Some(call), Some(user), Some(expires), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(Malformed);
    };
    let call = decode_text(call)?;
    let user = decode_text(user)?;
    let expires: u64 = expires.parse().map_err(|_| Malformed)?;
    if call != call_sid {
        return Err(OtherCall);
    }
    if now_unix >= expires {
        return Err(Expired);
    }
    Ok(user)
}

/// The MAC over `signed`, ready to finalise or verify.
fn keyed(secret: &[u8], signed: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(CONTEXT);
    mac.update(signed.as_bytes());
    mac
}

/// A base64url field holding UTF-8 text.
fn decode_text(field: &str) -> Result<String, CredentialError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(field)
        .map_err(|_| CredentialError::Malformed)?;
    String::from_utf8(bytes).map_err(|_| CredentialError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const CALL: &str = "CA0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_700_000_000;

    fn token(user: &str) -> String {
        issue(SECRET, CALL, user, NOW + 60)
    }

    /// A token with `signed` before the MAC, correctly signed.
    fn signed_as_is(signed: &str) -> String {
        let tag = keyed(SECRET, signed).finalize().into_bytes();
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    #[test]
    fn a_credential_round_trips() {
        assert_eq!(CALL.len(), 34);
        for user in [
            "user-1",
            "",
            "a.b.c",
            "...",
            "7c9e6679-7425-40de-944b-e07fc1f90ae7",
            "Zoë/🎧 \"'<>&",
        ] {
            let token = token(user);
            assert!(token.is_ascii(), "{token}");
            assert_eq!(
                verify(SECRET, &token, CALL, NOW),
                Ok(user.to_owned()),
                "{user}"
            );
        }
    }

    #[test]
    fn issuing_is_deterministic_and_binds_every_field() {
        assert_eq!(token("u"), token("u"));
        assert_ne!(token("u"), token("v"));
        assert_ne!(token("u"), issue(SECRET, CALL, "u", NOW + 61));
        assert_ne!(token("u"), issue(SECRET, "CA1", "u", NOW + 60));
        assert_ne!(token("u"), issue(b"another secret", CALL, "u", NOW + 60));
    }

    #[test]
    fn every_altered_character_is_refused() {
        let token = token("user-1");
        for (i, c) in token.char_indices() {
            for replacement in ['A', 'B', '.', '-', '_'] {
                if replacement == c {
                    continue;
                }
                let mut altered = token.clone();
                altered.replace_range(i..i + 1, &replacement.to_string());
                assert!(
                    verify(SECRET, &altered, CALL, NOW).is_err(),
                    "{altered} was accepted"
                );
            }
        }
        // A user id swapped in from another genuine credential is refused too.
        let other = issue(SECRET, CALL, "user-2", NOW + 60);
        let mut spliced: Vec<&str> = token.split('.').collect();
        spliced[2] = other.split('.').nth(2).expect("a user field");
        assert_eq!(
            verify(SECRET, &spliced.join("."), CALL, NOW),
            Err(CredentialError::BadSignature)
        );
    }

    #[test]
    fn another_secret_is_a_bad_signature() {
        let token = token("user-1");
        assert_eq!(
            verify(b"0123456789abcdef0123456789abcdeg", &token, CALL, NOW),
            Err(CredentialError::BadSignature)
        );
        assert_eq!(
            verify(b"", &token, CALL, NOW),
            Err(CredentialError::BadSignature)
        );
        let unkeyed = issue(b"", CALL, "user-1", NOW + 60);
        assert_eq!(
            verify(b"", &unkeyed, CALL, NOW),
            Err(CredentialError::BadSignature)
        );
    }

    #[test]
    fn a_credential_for_another_call_is_refused() {
        let token = token("user-1");
        for other in [
            "CA0123456789abcdef0123456789abcdee",
            "",
            "ca0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(
                verify(SECRET, &token, other, NOW),
                Err(CredentialError::OtherCall)
            );
        }
    }

    #[test]
    fn a_credential_expires_at_its_second() {
        let token = token("user-1");
        assert!(verify(SECRET, &token, CALL, NOW + 59).is_ok());
        assert_eq!(
            verify(SECRET, &token, CALL, NOW + 60),
            Err(CredentialError::Expired)
        );
        assert_eq!(
            verify(SECRET, &token, CALL, u64::MAX),
            Err(CredentialError::Expired)
        );
        let forever = issue(SECRET, CALL, "user-1", u64::MAX);
        assert!(verify(SECRET, &forever, CALL, u64::MAX - 1).is_ok());
    }

    #[test]
    fn the_longest_expected_credential_fits_a_parameter() {
        let user = "u".repeat(128);
        let token = issue(SECRET, CALL, &user, u64::MAX);
        assert!(token.len() < 300, "{} characters", token.len());
        // The whole <Parameter>'s name and value, too.
        assert!("credential".len() + token.len() < MAX_LEN);
        assert_eq!(verify(SECRET, &token, CALL, NOW), Ok(user));
    }

    #[test]
    fn overlong_input_is_refused_unread() {
        let long_user = "u".repeat(400);
        let genuine_but_long = issue(SECRET, CALL, &long_user, NOW + 60);
        assert!(genuine_but_long.len() > MAX_LEN);
        assert_eq!(
            verify(SECRET, &genuine_but_long, CALL, NOW),
            Err(CredentialError::Malformed)
        );
        assert_eq!(
            verify(SECRET, &"A".repeat(MAX_LEN + 1), CALL, NOW),
            Err(CredentialError::Malformed)
        );
    }

    #[test]
    fn garbage_is_refused() {
        for garbage in [
            "",
            ".",
            "v1",
            "v1.",
            "v1..",
            "v2.Q0E.dQ.1.AAAA",
            "v1.Q0E.dQ.1.!!!!",
            "v1.Q0E.dQ.1.AAAA=",
            "not a credential at all",
            "\u{0}.\u{0}",
            "v1.🎧.🎧.🎧.🎧",
        ] {
            let e = verify(SECRET, garbage, CALL, NOW).expect_err(garbage);
            assert!(
                matches!(
                    e,
                    CredentialError::Malformed | CredentialError::BadSignature
                ),
                "{garbage:?}: {e}"
            );
        }
        assert_eq!(
            verify(SECRET, "", CALL, NOW),
            Err(CredentialError::Malformed)
        );
        // A well-formed but unsigned one is a bad signature.
        assert_eq!(
            verify(SECRET, "v1.Q0E.dQ.1.AAAA", CALL, NOW),
            Err(CredentialError::BadSignature)
        );
    }

    #[test]
    fn a_signed_credential_of_the_wrong_shape_is_malformed() {
        let call = URL_SAFE_NO_PAD.encode(CALL);
        let user = URL_SAFE_NO_PAD.encode("user-1");
        for signed in [
            format!("v1.{call}.{user}"),
            format!("v1.{call}.{user}.{}.extra", NOW + 60),
            format!("v1.{call}.{user}.soon"),
            format!("v1.{call}.{user}.-1"),
            format!("v1.{call}.{user}.99999999999999999999"),
            format!("v1.{call}.!!.{}", NOW + 60),
            format!(
                "v1.{call}.{}.{}",
                URL_SAFE_NO_PAD.encode([0xFF_u8, 0xFE]),
                NOW + 60
            ),
        ] {
            assert_eq!(
                verify(SECRET, &signed_as_is(&signed), CALL, NOW),
                Err(CredentialError::Malformed),
                "{signed}"
            );
        }
        // The same construction of a well-formed one passes.
        let good = format!("v1.{call}.{user}.{}", NOW + 60);
        assert_eq!(
            verify(SECRET, &signed_as_is(&good), CALL, NOW),
            Ok("user-1".to_owned())
        );
        assert_eq!(signed_as_is(&good), token("user-1"));
    }
}
