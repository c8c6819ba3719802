//! The TwiML the voice webhook answers with.
//!
//! [`connect_stream`] connects the call to our WebSocket with `<Connect><Stream>`, which makes
//! the stream bidirectional: Twilio sends the caller's audio and plays what we send back. The
//! `<Stream>` URL does not support query string parameters; anything the socket needs to know
//! goes in `<Parameter>` elements, which come back in the `start` message's
//! `customParameters`. [`refuse`] says a sentence and hangs up.
//!
//! Every attribute value and text node is escaped; characters XML 1.0 cannot carry at all
//! (most C0 controls, U+FFFE, U+FFFF) become U+FFFD, so no input yields a document Twilio
//! cannot parse.

/// The XML declaration every document starts with.
const PROLOG: &str = r#"<?xml version="1.0" encoding="UTF-8"?>"#;

/// A document that connects the call to the WebSocket at `stream_url` (a `wss://` URL without
/// a query string) as a bidirectional stream, handing it `parameters` as `<Parameter>`
/// name/value pairs.
pub fn connect_stream(stream_url: &str, parameters: &[(&str, &str)]) -> String {
    let mut xml = String::with_capacity(
        160 + stream_url.len()
            + parameters
                .iter()
                .map(|(name, value)| 32 + name.len() + value.len())
                .sum::<usize>(),
    );
    xml.push_str(PROLOG);
    xml.push_str(r#"<Response><Connect><Stream url=""#);
    escape_into(&mut xml, stream_url);
    if parameters.is_empty() {
        xml.push_str(r#""/>"#);
    } else {
        xml.push_str(r#"">"#);
        for (name, value) in parameters {
            xml.push_str(r#"<Parameter name=""#);
            escape_into(&mut xml, name);
            xml.push_str(r#"" value=""#);
            escape_into(&mut xml, value);
            xml.push_str(r#""/>"#);
        }
        xml.push_str("</Stream>");
    }
    xml.push_str("</Connect></Response>");
    xml
}

/// A document that says `message` to the caller and hangs up.
pub fn refuse(message: &str) -> String {
    let mut xml = String::with_capacity(96 + message.len());
    xml.push_str(PROLOG);
    xml.push_str("<Response><Say>");
    escape_into(&mut xml, message);
    xml.push_str("</Say><Hangup/></Response>");
    xml
}

/// Appends `text` to `out`, escaped for an attribute value or a text node alike.
///
/// Tab, line feed and carriage return are written as character references so that attribute
/// value normalisation does not turn them into spaces.
fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c if c < ' ' || c == '\u{fffe}' || c == '\u{ffff}' => {
                out.push(char::REPLACEMENT_CHARACTER);
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Undoes [`escape_into`] (the references it writes, nothing more).
    fn unescape(text: &str) -> String {
        text.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&#9;", "\t")
            .replace("&#10;", "\n")
            .replace("&#13;", "\r")
            .replace("&amp;", "&")
    }

    /// The values of the attribute `name` in `xml`, in order, unescaped. Only sound if the
    /// escaping is: a raw `"` in a value would end it early and show up in the assertions.
    fn attributes(xml: &str, name: &str) -> Vec<String> {
        let key = format!(" {name}=\"");
        xml.match_indices(&key)
            .map(|(at, _)| {
                let rest = &xml[at + key.len()..];
                let end = rest.find('"').expect("a closing quote");
                unescape(&rest[..end])
            })
            .collect()
    }

    /// The element names of `xml` in document order, closing tags with a leading '/'.
    fn tags(xml: &str) -> Vec<String> {
        xml.split('<')
            .skip(1)
            .map(|tag| match tag.strip_prefix('/') {
                Some(closing) => format!(
                    "/{}",
                    &closing[..closing.find('>').unwrap_or(closing.len())]
                ),
                None => tag[..tag.find([' ', '>', '/']).unwrap_or(tag.len())].to_owned(),
            })
            .collect()
    }

    #[test]
    fn connect_stream_has_the_documented_shape() {
        let xml = connect_stream(
            "wss://voice.example.net/twilio/stream",
            &[("credential", "v1.abc.def"), ("lang", "en")],
        );
        assert_eq!(
            xml,
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?>"#,
                r#"<Response><Connect><Stream url="wss://voice.example.net/twilio/stream">"#,
                r#"<Parameter name="credential" value="v1.abc.def"/>"#,
                r#"<Parameter name="lang" value="en"/>"#,
                r#"</Stream></Connect></Response>"#,
            )
        );
    }

    #[test]
    fn connect_stream_without_parameters_closes_the_stream_at_once() {
        assert_eq!(
            connect_stream("wss://a.example/s", &[]),
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?>"#,
                r#"<Response><Connect><Stream url="wss://a.example/s"/></Connect></Response>"#,
            )
        );
    }

    #[test]
    fn hostile_attribute_values_stay_inside_their_quotes() {
        let url = r#"wss://a.example/s"/><Hangup/><Stream url="x"#;
        let name = "n'\"<&>";
        let value = "\"/></Stream></Connect><Dial>+15550100</Dial><Connect><Stream url=\"";
        let xml = connect_stream(url, &[(name, value)]);

        assert_eq!(
            tags(&xml),
            [
                "?xml",
                "Response",
                "Connect",
                "Stream",
                "Parameter",
                "/Stream",
                "/Connect",
                "/Response"
            ]
        );
        assert_eq!(attributes(&xml, "url"), [url]);
        assert_eq!(attributes(&xml, "name"), [name]);
        assert_eq!(attributes(&xml, "value"), [value]);
        // Only the document's own markup has these characters raw.
        let body = xml.strip_prefix(PROLOG).expect("the prolog");
        assert_eq!(body.matches('<').count(), 7);
        assert_eq!(body.matches('>').count(), 7);
        assert_eq!(body.matches('"').count(), 6);
        assert!(!body.contains('\''));
    }

    #[test]
    fn whitespace_survives_and_unencodable_characters_are_replaced() {
        let xml = connect_stream(
            "wss://a.example/s",
            &[("k", "a\tb\nc\rd\u{0}e\u{1b}f\u{fffe}g")],
        );
        assert_eq!(
            attributes(&xml, "value"),
            ["a\tb\nc\rd\u{fffd}e\u{fffd}f\u{fffd}g"]
        );
        assert!(!xml.contains(['\t', '\n', '\r', '\u{0}', '\u{1b}', '\u{fffe}']));
        // Other non-ASCII text passes through untouched.
        let xml = connect_stream("wss://a.example/s", &[("name", "Zoë 🎧")]);
        assert_eq!(attributes(&xml, "value"), ["Zoë 🎧"]);
    }

    #[test]
    fn refuse_says_the_message_and_hangs_up() {
        assert_eq!(
            refuse("Sorry, we can't take your call right now."),
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?>"#,
                "<Response><Say>Sorry, we can&apos;t take your call right now.</Say>",
                "<Hangup/></Response>",
            )
        );
    }

    #[test]
    fn a_hostile_message_stays_text() {
        let message = "</Say><Dial>+15550100</Dial><Say>&amp;";
        let xml = refuse(message);
        assert_eq!(
            tags(&xml),
            ["?xml", "Response", "Say", "/Say", "Hangup", "/Response"]
        );
        let text = xml
            .split_once("<Say>")
            .and_then(|(_, rest)| rest.split_once("</Say>"))
            .map(|(text, _)| text)
            .expect("a Say element");
        assert_eq!(unescape(text), message);
    }
}
