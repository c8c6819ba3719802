//! Tools in chat requests, checked the way the real APIs check them: the declarations
//! (`tools`), `tool_choice`, and the pairing of every call in the history with its result.
//!
//! The error messages are the APIs' own where they are known from captured responses:
//! Anthropic's "Requests which include `tool_use` or `tool_result` blocks must define tools.",
//! "`tool_use` ids were found without `tool_result` blocks immediately after: …", "Did not find
//! N `tool_result` block(s) at the beginning of this message…", "unexpected `tool_use_id`
//! found in `tool_result` blocks: …"; OpenAI's "Invalid parameter: messages with role 'tool'
//! must be a response to a preceeding message with 'tool_calls'." (`param`
//! `messages.[i].role`), "Invalid parameter: 'tool_call_id' of '…' not found in 'tool_calls' of
//! previous message.", "An assistant message with 'tool_calls' must be followed by tool
//! messages responding to each 'tool_call_id'. …" and "Invalid value for 'tool_choice':
//! 'tool_choice' is only allowed when 'tools' are specified.". The others follow the style of
//! each API's validation messages.

use serde_json::{Map, Value};

use super::BadRequest;

/// How a request lets the model use its tools.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) enum Choice {
    /// The model decides (the default).
    #[default]
    Auto,
    /// No tool may be called.
    None,
    /// Some tool must be called (Anthropic `any`, OpenAI `required`).
    Any,
    /// This tool must be called.
    Named(String),
}

/// The tool side of a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Tools {
    /// Names of the declared tools.
    pub(super) names: Vec<String>,
    /// `tool_choice`.
    pub(super) choice: Choice,
}

impl Tools {
    /// Whether the model may call `name` in this request.
    pub(super) fn allows(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
            && match &self.choice {
                Choice::None => false,
                Choice::Named(n) => n == name,
                Choice::Auto | Choice::Any => true,
            }
    }
}

/// One message as far as tools are concerned.
#[derive(Debug, Default)]
pub(super) struct Round {
    /// Ids of the calls the message makes (assistant).
    pub(super) calls: Vec<String>,
    /// `(content block index, tool_use_id)` of the results it carries (user).
    pub(super) results: Vec<(usize, String)>,
    /// Results before its first other block.
    pub(super) leading_results: usize,
}

/// Tool names as both APIs accept them.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

// ---------------------------------------------------------------------------------------------
// Anthropic

/// `tools` and `tool_choice` of an Anthropic request.
pub(super) fn anthropic_tools(obj: &Map<String, Value>) -> Result<Tools, BadRequest> {
    let mut names: Vec<String> = Vec::new();
    match obj.get("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(tools)) => {
            for (i, tool) in tools.iter().enumerate() {
                let tool = tool.as_object().ok_or_else(|| {
                    BadRequest::new(format!("tools.{i}: Input should be a valid dictionary"))
                })?;
                let name = tool
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| BadRequest::new(format!("tools.{i}.name: Field required")))?;
                if !valid_name(name) {
                    return Err(BadRequest::new(format!(
                        "tools.{i}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
                    )));
                }
                if tool.get("description").is_some_and(|d| !d.is_string()) {
                    return Err(BadRequest::new(format!(
                        "tools.{i}.description: Input should be a valid string"
                    )));
                }
                let schema = tool.get("input_schema").ok_or_else(|| {
                    BadRequest::new(format!("tools.{i}.input_schema: Field required"))
                })?;
                if !schema.is_object() {
                    return Err(BadRequest::new(format!(
                        "tools.{i}.input_schema: Input should be a valid dictionary"
                    )));
                }
                if schema.get("type").and_then(Value::as_str) != Some("object") {
                    return Err(BadRequest::new(format!(
                        "tools.{i}.input_schema.type: Input should be 'object'"
                    )));
                }
                if names.iter().any(|n| n == name) {
                    return Err(BadRequest::new("tools: Tool names must be unique."));
                }
                names.push(name.to_owned());
            }
        }
        Some(_) => return Err(BadRequest::new("tools: Input should be a valid list")),
    }
    let choice = match obj.get("tool_choice") {
        None | Some(Value::Null) => Choice::Auto,
        Some(choice) => {
            let kind = choice
                .as_object()
                .ok_or_else(|| BadRequest::new("tool_choice: Input should be a valid dictionary"))?
                .get("type")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    BadRequest::new("tool_choice: Unable to extract tag using discriminator 'type'")
                })?;
            match kind {
                "auto" => Choice::Auto,
                "any" => Choice::Any,
                "none" => Choice::None,
                "tool" => {
                    let name = choice
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| BadRequest::new("tool_choice.tool.name: Field required"))?;
                    if !names.iter().any(|n| n == name) {
                        return Err(BadRequest::new(format!(
                            "tool_choice.tool.name: Tool '{name}' not found in the provided tools"
                        )));
                    }
                    Choice::Named(name.to_owned())
                }
                other => {
                    return Err(BadRequest::new(format!(
                        "tool_choice: Input tag '{other}' found using 'type' does not match any of the expected tags: 'auto', 'any', 'tool', 'none'"
                    )));
                }
            }
        }
    };
    Ok(Tools { names, choice })
}

/// What an Anthropic message's content blocks hold.
#[derive(Debug, Default)]
pub(super) struct Blocks {
    /// Text blocks joined by a space.
    pub(super) text: String,
    /// Tool calls and results.
    pub(super) round: Round,
    /// Contents of the `tool_result` blocks, in order.
    pub(super) result_texts: Vec<String>,
    /// Characters of tool inputs and results (for the prompt's token estimate).
    pub(super) tool_chars: usize,
}

/// Reads Anthropic content blocks (`text`, `tool_use`, `tool_result`; other types ignored).
pub(super) fn anthropic_blocks(blocks: &[Value], path: &str) -> Result<Blocks, BadRequest> {
    let mut out = Blocks::default();
    let mut texts = Vec::new();
    let mut other_seen = false;
    for (j, block) in blocks.iter().enumerate() {
        let field = |name: &str| BadRequest::new(format!("{path}.{j}.{name}: Field required"));
        let kind = block
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| field("type"))?;
        match kind {
            "text" => {
                let text = block
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| field("text"))?;
                texts.push(text);
            }
            "tool_use" => {
                let id = block
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| field("tool_use.id"))?;
                block
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| field("tool_use.name"))?;
                let input = block.get("input").ok_or_else(|| field("tool_use.input"))?;
                if !input.is_object() {
                    return Err(BadRequest::new(format!(
                        "{path}.{j}.tool_use.input: Input should be a valid dictionary"
                    )));
                }
                out.tool_chars += input.to_string().chars().count();
                out.round.calls.push(id.to_owned());
            }
            "tool_result" => {
                let id = block
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| field("tool_result.tool_use_id"))?;
                let content = match block.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(inner)) => {
                        anthropic_blocks(inner, &format!("{path}.{j}.tool_result.content"))?.text
                    }
                    Some(_) => {
                        return Err(BadRequest::new(format!(
                            "{path}.{j}.tool_result.content: Input should be a valid string or a list of content blocks"
                        )));
                    }
                };
                if block.get("is_error").is_some_and(|e| !e.is_boolean()) {
                    return Err(BadRequest::new(format!(
                        "{path}.{j}.tool_result.is_error: Input should be a valid boolean"
                    )));
                }
                out.tool_chars += content.chars().count();
                out.result_texts.push(content);
                out.round.results.push((j, id.to_owned()));
                if !other_seen {
                    out.round.leading_results += 1;
                }
                continue;
            }
            _ => {}
        }
        other_seen = true;
    }
    out.text = texts.join(" ");
    Ok(out)
}

/// Every call answered in the next message, first thing; every result answering a call of
/// the message before.
pub(super) fn check_anthropic_rounds(rounds: &[Round], tools: &Tools) -> Result<(), BadRequest> {
    let uses_tools = rounds
        .iter()
        .any(|r| !r.calls.is_empty() || !r.results.is_empty());
    if uses_tools && tools.names.is_empty() {
        return Err(BadRequest::new(
            "Requests which include `tool_use` or `tool_result` blocks must define tools.",
        ));
    }
    for (i, round) in rounds.iter().enumerate() {
        let previous: &[String] = match i.checked_sub(1) {
            Some(p) => &rounds[p].calls,
            None => &[],
        };
        if let Some((j, id)) = round.results.iter().find(|(_, id)| !previous.contains(id)) {
            return Err(BadRequest::new(format!(
                "messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: {id}. Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
            )));
        }
        if round.calls.is_empty() {
            continue;
        }
        let next = rounds.get(i + 1);
        let unanswered: Vec<&str> = round
            .calls
            .iter()
            .filter(|id| !next.is_some_and(|n| n.results.iter().any(|(_, r)| r == *id)))
            .map(String::as_str)
            .collect();
        if !unanswered.is_empty() {
            return Err(BadRequest::new(format!(
                "messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: {}. Each `tool_use` block must have a corresponding `tool_result` block in the next message.",
                unanswered.join(", ")
            )));
        }
        if next.is_some_and(|n| n.leading_results < round.calls.len()) {
            return Err(BadRequest::new(format!(
                "messages.{}: Did not find {} `tool_result` block(s) at the beginning of this message. Messages following `tool_use` blocks must begin with a matching number of `tool_result` blocks.",
                i + 1,
                round.calls.len()
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// OpenAI

/// OpenAI's 400 for the missing parameter `name` of the object at `path`.
fn missing(path: &str, name: &str) -> BadRequest {
    BadRequest::new(format!("Missing required parameter: '{path}.{name}'."))
        .param(format!("{path}.{name}"))
        .code("missing_required_parameter")
}

/// The string `name` of `object` (at `path`); OpenAI's 400 when it is missing (or not a
/// string).
fn required_str<'a>(object: &'a Value, path: &str, name: &str) -> Result<&'a str, BadRequest> {
    object
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| missing(path, name))
}

/// Checks that the `type` of the tool or call at `path` is `function`.
fn check_function_type(object: &Value, path: &str) -> Result<(), BadRequest> {
    let kind = required_str(object, path, "type")?;
    if kind != "function" {
        return Err(BadRequest::new(format!(
            "Invalid value: '{kind}'. Supported values are: 'function' and 'custom'."
        ))
        .param(format!("{path}.type"))
        .code("invalid_value"));
    }
    Ok(())
}

/// `tools` and `tool_choice` of an OpenAI Chat Completions request.
pub(super) fn openai_tools(obj: &Map<String, Value>) -> Result<Tools, BadRequest> {
    let mut names: Vec<String> = Vec::new();
    match obj.get("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(tools)) => {
            if tools.is_empty() {
                return Err(BadRequest::new(
                    "Invalid 'tools': empty array. Expected an array with minimum length 1, but got an empty array instead.",
                )
                .param("tools")
                .code("empty_array"));
            }
            for (i, tool) in tools.iter().enumerate() {
                let path = format!("tools[{i}]");
                check_function_type(tool, &path)?;
                let function = tool
                    .get("function")
                    .filter(|f| f.is_object())
                    .ok_or_else(|| missing(&path, "function"))?;
                let name = required_str(function, &format!("{path}.function"), "name")?;
                if !valid_name(name) {
                    return Err(BadRequest::new(format!(
                        "Invalid 'tools[{i}].function.name': string does not match pattern. Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'."
                    ))
                    .param(format!("tools[{i}].function.name"))
                    .code("invalid_value"));
                }
                if let Some(parameters) = function.get("parameters")
                    && !parameters.is_object()
                {
                    return Err(BadRequest::new(format!(
                        "Invalid type for 'tools[{i}].function.parameters': expected an object, but got {} instead.",
                        json_kind(parameters)
                    ))
                    .param(format!("tools[{i}].function.parameters"))
                    .code("invalid_type"));
                }
                names.push(name.to_owned());
            }
        }
        Some(other) => {
            return Err(BadRequest::new(format!(
                "Invalid type for 'tools': expected an array of objects, but got {} instead.",
                json_kind(other)
            ))
            .param("tools")
            .code("invalid_type"));
        }
    }
    let choice = match obj.get("tool_choice") {
        None | Some(Value::Null) => {
            return Ok(Tools {
                names,
                choice: Choice::Auto,
            });
        }
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Choice::Auto,
            "none" => Choice::None,
            "required" => Choice::Any,
            other => {
                return Err(BadRequest::new(format!(
                    "Invalid value: '{other}'. Supported values are: 'none', 'auto', and 'required'."
                ))
                .param("tool_choice")
                .code("invalid_value"));
            }
        },
        Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    BadRequest::new("Missing required parameter: 'tool_choice.function.name'.")
                        .param("tool_choice.function.name")
                        .code("missing_required_parameter")
                })?;
            Choice::Named(name.to_owned())
        }
        Some(Value::Object(o)) => {
            let kind = o.get("type").and_then(Value::as_str).unwrap_or("");
            return Err(BadRequest::new(format!(
                "Invalid value: '{kind}'. Supported values are: 'function', 'allowed_tools', and 'custom'."
            ))
            .param("tool_choice.type")
            .code("invalid_value"));
        }
        Some(other) => {
            return Err(BadRequest::new(format!(
                "Invalid type for 'tool_choice': expected one of a string or an object, but got {} instead.",
                json_kind(other)
            ))
            .param("tool_choice")
            .code("invalid_type"));
        }
    };
    if names.is_empty() {
        return Err(BadRequest::new(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
        )
        .param("tool_choice"));
    }
    Ok(Tools { names, choice })
}

/// The `tool_calls` of an assistant message: their ids, and the characters of their arguments.
pub(super) fn openai_calls(message: &Value, i: usize) -> Result<(Vec<String>, usize), BadRequest> {
    let calls = match message.get("tool_calls") {
        None | Some(Value::Null) => return Ok((Vec::new(), 0)),
        Some(Value::Array(calls)) => calls,
        Some(other) => {
            return Err(BadRequest::new(format!(
                "Invalid type for 'messages[{i}].tool_calls': expected an array of objects, but got {} instead.",
                json_kind(other)
            ))
            .param(format!("messages[{i}].tool_calls"))
            .code("invalid_type"));
        }
    };
    let mut ids = Vec::with_capacity(calls.len());
    let mut chars = 0;
    for (k, call) in calls.iter().enumerate() {
        let path = format!("messages[{i}].tool_calls[{k}]");
        let id = required_str(call, &path, "id")?;
        check_function_type(call, &path)?;
        let function = call
            .get("function")
            .ok_or_else(|| missing(&path, "function"))?;
        let function_path = format!("{path}.function");
        required_str(function, &function_path, "name")?;
        let arguments = required_str(function, &function_path, "arguments")?;
        chars += arguments.chars().count();
        ids.push(id.to_owned());
    }
    Ok((ids, chars))
}

/// One OpenAI message as far as the pairing of calls and results goes.
#[derive(Debug)]
pub(super) enum Wire {
    /// An assistant message, with the ids of its `tool_calls`.
    Assistant(Vec<String>),
    /// A `tool` message answering this call id.
    Tool(String),
    /// Any other message.
    Other,
}

/// Every `tool` message answers a call of the assistant message its group follows, and every
/// call is answered before the next other message.
pub(super) fn check_openai_rounds(messages: &[Wire]) -> Result<(), BadRequest> {
    // The calls of the assistant message the current run of tool messages answers, and those
    // still unanswered.
    let mut open: Option<(&[String], Vec<&str>)> = None;
    let unanswered_error = |i: usize, ids: &[&str]| {
        BadRequest::new(format!(
            "An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. The following tool_call_ids did not have response messages: {}",
            ids.join(", ")
        ))
        .param(format!("messages.[{i}].role"))
    };
    for (i, message) in messages.iter().enumerate() {
        if let Wire::Tool(id) = message {
            let Some((calls, unanswered)) = open.as_mut() else {
                return Err(BadRequest::new(
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'.",
                )
                .param(format!("messages.[{i}].role")));
            };
            if !calls.contains(id) {
                return Err(BadRequest::new(format!(
                    "Invalid parameter: 'tool_call_id' of '{id}' not found in 'tool_calls' of previous message."
                ))
                .param(format!("messages.[{i}].tool_call_id")));
            }
            unanswered.retain(|u| u != id);
            continue;
        }
        if let Some((_, unanswered)) = &open
            && !unanswered.is_empty()
        {
            return Err(unanswered_error(i, unanswered));
        }
        open = match message {
            Wire::Assistant(calls) if !calls.is_empty() => {
                Some((calls, calls.iter().map(String::as_str).collect()))
            }
            _ => None,
        };
    }
    if let Some((_, unanswered)) = &open
        && !unanswered.is_empty()
    {
        return Err(unanswered_error(messages.len(), unanswered));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn anthropic_tool_declarations_and_choice() {
        let tools = anthropic_tools(&obj(json!({
            "tools": [{"name": "get_weather", "description": "d", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "get_weather"},
        })))
        .unwrap();
        assert_eq!(tools.names, vec!["get_weather"]);
        assert!(tools.allows("get_weather"));
        assert!(!tools.allows("other"));
        for (body, wanted) in [
            (
                json!({"tools": [{"name": "a b", "input_schema": {"type": "object"}}]}),
                "tools.0.name",
            ),
            (
                json!({"tools": [{"name": "a"}]}),
                "tools.0.input_schema: Field required",
            ),
            (
                json!({"tools": [{"name": "a", "input_schema": {"type": "string"}}]}),
                "tools.0.input_schema.type",
            ),
            (
                json!({"tools": {"name": "a"}}),
                "tools: Input should be a valid list",
            ),
            (
                json!({"tool_choice": {"type": "sometimes"}}),
                "Input tag 'sometimes'",
            ),
            (
                json!({"tool_choice": {"type": "tool", "name": "nope"}}),
                "Tool 'nope' not found",
            ),
        ] {
            let e = anthropic_tools(&obj(body)).unwrap_err();
            assert!(e.message.contains(wanted), "{} lacks {wanted}", e.message);
        }
        let none = anthropic_tools(&obj(json!({
            "tools": [{"name": "a", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "none"},
        })))
        .unwrap();
        assert!(!none.allows("a"));
    }

    fn round(calls: &[&str], results: &[&str], leading: usize) -> Round {
        Round {
            calls: calls.iter().map(|c| c.to_string()).collect(),
            results: results
                .iter()
                .enumerate()
                .map(|(j, r)| (j, r.to_string()))
                .collect(),
            leading_results: leading,
        }
    }

    #[test]
    fn anthropic_rounds_pair_calls_with_results() {
        let tools = Tools {
            names: vec!["t".into()],
            choice: Choice::Auto,
        };
        let ok = [
            round(&[], &[], 0),
            round(&["a", "b"], &[], 0),
            round(&[], &["a", "b"], 2),
        ];
        check_anthropic_rounds(&ok, &tools).unwrap();
        let e = check_anthropic_rounds(&ok, &Tools::default()).unwrap_err();
        assert!(e.message.contains("must define tools"));
        let missing = [
            round(&[], &[], 0),
            round(&["a", "b"], &[], 0),
            round(&[], &["a"], 1),
        ];
        let e = check_anthropic_rounds(&missing, &tools).unwrap_err();
        assert!(e.message.starts_with("messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: b."));
        let late = [
            round(&[], &[], 0),
            round(&["a"], &[], 0),
            round(&[], &["a"], 0),
        ];
        let e = check_anthropic_rounds(&late, &tools).unwrap_err();
        assert!(
            e.message
                .starts_with("messages.2: Did not find 1 `tool_result` block(s)")
        );
        let stray = [
            round(&[], &[], 0),
            round(&[], &[], 0),
            round(&[], &["x"], 1),
        ];
        let e = check_anthropic_rounds(&stray, &tools).unwrap_err();
        assert!(e.message.starts_with(
            "messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks: x."
        ));
    }

    #[test]
    fn openai_tool_declarations_and_choice() {
        let tools = openai_tools(&obj(json!({
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            "tool_choice": "required",
        })))
        .unwrap();
        assert_eq!(tools.choice, Choice::Any);
        for (body, param) in [
            (json!({"tools": []}), "tools"),
            (
                json!({"tools": [{"type": "function"}]}),
                "tools[0].function",
            ),
            (
                json!({"tools": [{"type": "web", "function": {"name": "a"}}]}),
                "tools[0].type",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a", "parameters": "x"}}]}),
                "tools[0].function.parameters",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a"}}], "tool_choice": "always"}),
                "tool_choice",
            ),
            (json!({"tool_choice": "auto"}), "tool_choice"),
        ] {
            let e = openai_tools(&obj(body)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{}", e.message);
        }
    }

    #[test]
    fn openai_rounds_pair_calls_with_tool_messages() {
        let calls = || Wire::Assistant(vec!["a".into(), "b".into()]);
        let ok = [
            Wire::Other,
            calls(),
            Wire::Tool("b".into()),
            Wire::Tool("a".into()),
            Wire::Other,
        ];
        check_openai_rounds(&ok).unwrap();
        let stray = [Wire::Other, Wire::Tool("a".into())];
        let e = check_openai_rounds(&stray).unwrap_err();
        assert!(
            e.message
                .contains("must be a response to a preceeding message with 'tool_calls'")
        );
        assert_eq!(e.param.as_deref(), Some("messages.[1].role"));
        let wrong = [Wire::Other, calls(), Wire::Tool("c".into())];
        let e = check_openai_rounds(&wrong).unwrap_err();
        assert!(e.message.contains("'tool_call_id' of 'c' not found"));
        let short = [Wire::Other, calls(), Wire::Tool("a".into()), Wire::Other];
        let e = check_openai_rounds(&short).unwrap_err();
        assert!(e.message.ends_with("did not have response messages: b"));
        assert_eq!(e.param.as_deref(), Some("messages.[3].role"));
        let after_text = [
            Wire::Other,
            Wire::Assistant(Vec::new()),
            Wire::Tool("a".into()),
        ];
        assert!(check_openai_rounds(&after_text).is_err());
    }
}
