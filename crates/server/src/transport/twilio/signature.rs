//! `X-Twilio-Signature`: proof that a webhook request came from Twilio.
//!
//! Twilio signs each webhook request with HMAC-SHA1 keyed with the account's auth token. The
//! signed text is the full URL Twilio requested (scheme, host, path and query string, as
//! configured in Twilio), followed by the POST parameters sorted by name, each name
//! immediately followed by its value, with no separators. The header carries the digest in
//! standard base64.
//!
//! Two details follow Twilio's own validators (twilio-python's `RequestValidator`,
//! twilio-node's `validateRequest`) rather than the prose of the docs:
//! - a name that occurs more than once contributes each of its distinct values, sorted,
//!   each as name + value;
//! - the signature is accepted over the URL with the scheme's default port added (`:443`
//!   for https, `:80` for http) when it has none, and with its port removed when it has one,
//!   because Twilio's signing is not consistent about ports.
//!
//! The URL must be the public one Twilio requested: behind a TLS-terminating proxy, the
//! `https://` URL configured in Twilio, not the one the listener saw.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha1::Sha1;

type HmacSha1 = Hmac<Sha1>;

/// The HTTP header that carries Twilio's signature.
pub const HEADER: &str = "X-Twilio-Signature";

/// The signature Twilio sends for a request to `url` with the form parameters `params`:
/// base64 of HMAC-SHA1, keyed with `auth_token`, over the URL followed by the parameters in
/// order of name, then value, each name followed by its value.
pub fn sign(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let digest = signer(auth_token, url, &sorted(params))
        .finalize()
        .into_bytes();
    STANDARD.encode(digest)
}

/// Whether `header`, the value of [`HEADER`], is Twilio's signature of a request to `url`
/// with the form parameters `params`.
///
/// Accepts the signature over `url` as given, with the scheme's default port added (when
/// `url` has no port) and with the port removed (when it has one). The comparison is in
/// constant time. An empty `auth_token` verifies nothing.
pub fn verify(auth_token: &str, url: &str, params: &[(String, String)], header: &str) -> bool {
    if auth_token.is_empty() {
        return false;
    }
    let Ok(claimed) = STANDARD.decode(header.trim()) else {
        return false;
    };
    let params = sorted(params);
    let (with_port, without_port) = port_variants(url);
    [Some(url), with_port.as_deref(), without_port.as_deref()]
        .into_iter()
        .flatten()
        .any(|candidate| {
            signer(auth_token, candidate, &params)
                .verify_slice(&claimed)
                .is_ok()
        })
}

/// The parameters in the order Twilio signs them: by name, then by value, each distinct
/// pair once.
fn sorted(params: &[(String, String)]) -> Vec<(&str, &str)> {
    let mut sorted: Vec<(&str, &str)> = params
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    sorted.sort_unstable();
    sorted.dedup();
    sorted
}

/// The HMAC over `url` and the already sorted `params`, ready to finalise or verify.
fn signer(auth_token: &str, url: &str, params: &[(&str, &str)]) -> HmacSha1 {
    let mut mac =
        HmacSha1::new_from_slice(auth_token.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(url.as_bytes());
    for (name, value) in params {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    mac
}

/// `url` with its scheme's default port added (when it has no port and is http or https),
/// and `url` with its port removed (when it has one).
fn port_variants(url: &str) -> (Option<String>, Option<String>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (None, None);
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    // Userinfo, if any, ends at the last '@'; a colon inside an IPv6 literal's brackets is not
    // a port separator.
    let host_start = authority.rfind('@').map_or(0, |at| at + 1);
    let (userinfo, host_port) = authority.split_at(host_start);
    let port_colon = host_port
        .rfind(':')
        .filter(|&colon| !host_port[colon..].contains(']'));
    match port_colon {
        Some(colon) => {
            let host = &host_port[..colon];
            (None, Some(format!("{scheme}://{userinfo}{host}{tail}")))
        }
        None => {
            let port = if scheme.eq_ignore_ascii_case("https") {
                443
            } else if scheme.eq_ignore_ascii_case("http") {
                80
            } else {
                return (None, None);
            };
            (Some(format!("{scheme}://{authority}:{port}{tail}")), None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "12345";
    const URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";
    /// The signature of [`documented`] to [`URL`], as Twilio's guide gives it.
    const DOCUMENTED: &str = "0/KCTR6DLpKmkAf8muzZqo1nDgQ=";
    /// The signature of [`sdk`] to [`URL`], from twilio-python's tests.
    const SDK: &str = "RSOYDt4T1cUTdK1PDd93/VVr8B8=";
    /// The signature of [`sdk`] to [`URL`] with `:443` added, from twilio-python's tests.
    const SDK_443: &str = "kvajT1Ptam85bY51eRf/AJRuM3w=";

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|&(name, value)| (name.to_owned(), value.to_owned()))
            .collect()
    }

    /// The worked example of Twilio's "Webhooks security" guide.
    fn documented() -> Vec<(String, String)> {
        params(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ])
    }

    /// The request twilio-python's and twilio-php's validator tests use.
    fn sdk() -> Vec<(String, String)> {
        params(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ])
    }

    #[test]
    fn the_documented_example_signs_and_verifies() {
        assert_eq!(sign(TOKEN, URL, &documented()), DOCUMENTED);
        assert!(verify(TOKEN, URL, &documented(), DOCUMENTED));
    }

    #[test]
    fn the_sdk_test_vector_signs_and_verifies() {
        assert_eq!(sign(TOKEN, URL, &sdk()), SDK);
        assert!(verify(TOKEN, URL, &sdk(), SDK));
    }

    #[test]
    fn the_order_the_parameters_arrive_in_does_not_matter() {
        let mut shuffled = documented();
        shuffled.reverse();
        shuffled.swap(0, 2);
        assert_eq!(sign(TOKEN, URL, &shuffled), DOCUMENTED);
    }

    #[test]
    fn repeated_names_sign_each_distinct_value_in_order() {
        // twilio-python's test_compute_signature_duplicate_multi_dict.
        let repeated = params(&[
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
        ]);
        assert_eq!(sign(TOKEN, URL, &repeated), "IK+Dwps556ElfBT0I3Rgjkr1wJU=");
        let mut twice = sdk();
        twice.push(("Digits".into(), "1234".into()));
        assert_eq!(sign(TOKEN, URL, &twice), SDK);
    }

    #[test]
    fn a_request_without_parameters_signs_the_url_alone() {
        assert_eq!(sign(TOKEN, URL, &[]), "zYQTYrRWXE7LtzbG4PfP7/bkkGo=");
    }

    #[test]
    fn any_change_to_the_request_fails() {
        let mut altered = documented();
        altered[2].1 = "1235".into();
        assert!(!verify(TOKEN, URL, &altered, DOCUMENTED));
        let mut renamed = documented();
        renamed[2].0 = "digits".into();
        assert!(!verify(TOKEN, URL, &renamed, DOCUMENTED));
        let mut extra = documented();
        extra.push(("Extra".into(), String::new()));
        assert!(!verify(TOKEN, URL, &extra, DOCUMENTED));
        assert!(!verify(TOKEN, URL, &documented()[1..], DOCUMENTED));
        let other_url = "https://mycompany.com/myapp.php?foo=1&bar=3";
        assert!(!verify(TOKEN, other_url, &documented(), DOCUMENTED));
        assert!(!verify("12346", URL, &documented(), DOCUMENTED));
    }

    #[test]
    fn a_missing_or_garbled_header_fails() {
        for header in [
            "",
            "   ",
            "not base64!",
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ",
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ=0",
            "1/KCTR6DLpKmkAf8muzZqo1nDgQ=",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ=0/KCTR6DLpKmkAf8muzZqo1nDgQ=",
        ] {
            assert!(!verify(TOKEN, URL, &documented(), header), "{header:?}");
        }
    }

    #[test]
    fn surrounding_whitespace_in_the_header_is_ignored() {
        let header = format!(" {DOCUMENTED}\t");
        assert!(verify(TOKEN, URL, &documented(), &header));
    }

    #[test]
    fn an_empty_auth_token_verifies_nothing() {
        let forged = sign("", URL, &documented());
        assert!(!verify("", URL, &documented(), &forged));
    }

    #[test]
    fn the_default_port_is_accepted_added_or_removed() {
        // twilio-python's test_validation_adds_port_on_https: the signature over
        // "https://mycompany.com:443/…" verifies for the URL without a port.
        assert!(verify(TOKEN, URL, &sdk(), SDK_443));
        // And either verifies for the URL with the port.
        let with_port = "https://mycompany.com:443/myapp.php?foo=1&bar=2";
        assert!(verify(TOKEN, with_port, &sdk(), SDK));
        assert!(verify(TOKEN, with_port, &sdk(), SDK_443));
        // test_validation_removes_port_on_https: any port.
        let odd_port = "https://mycompany.com:1234/myapp.php?foo=1&bar=2";
        assert!(verify(TOKEN, odd_port, &sdk(), SDK));
    }

    #[test]
    fn plain_http_urls_get_port_80() {
        // twilio-python's test_validation_adds_port_on_http and _removes_port_on_http.
        let http = "http://mycompany.com/myapp.php?foo=1&bar=2";
        assert!(verify(TOKEN, http, &sdk(), "0ZXoZLH/DfblKGATFgpif+LLRf4="));
        let odd_port = "http://mycompany.com:1234/myapp.php?foo=1&bar=2";
        assert!(verify(
            TOKEN,
            odd_port,
            &sdk(),
            "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
        ));
        // The https signatures are not valid for http.
        assert!(!verify(TOKEN, http, &sdk(), SDK));
        assert!(!verify(TOKEN, http, &sdk(), SDK_443));
    }

    #[test]
    fn port_variants_respect_userinfo_ipv6_and_the_path() {
        let cases = [
            (
                "https://a.example/p:1?q=:2#f",
                (Some("https://a.example:443/p:1?q=:2#f"), None),
            ),
            (
                "https://u:pw@a.example:8443?x",
                (None, Some("https://u:pw@a.example?x")),
            ),
            ("https://[::1]/hook", (Some("https://[::1]:443/hook"), None)),
            (
                "https://[::1]:8443/hook",
                (None, Some("https://[::1]/hook")),
            ),
            ("wss://a.example/hook", (None, None)),
            ("not a url", (None, None)),
        ];
        for (url, (with_port, without_port)) in cases {
            assert_eq!(
                port_variants(url),
                (with_port.map(String::from), without_port.map(String::from)),
                "{url}"
            );
        }
    }
}
