//! The LLM adapters against the provider fakes over loopback: tool calls come back assembled,
//! and tool rounds go out in the shapes the fakes (like the real APIs) accept — or are
//! refused with the provider's 400 when the history breaks the pairing rules.

use std::sync::Arc;
use std::time::Duration;

use atlas_fakes::{Fakes, FakesConfig, ScriptedCall, ScriptedReply, Target};
use atlas_providers::llm::anthropic::{Anthropic, AnthropicConfig};
use atlas_providers::llm::openai_compat::{OpenAiChat, OpenAiChatConfig};
use atlas_providers::llm::{
    ChatMessage, LlmEvent, LlmProvider, LlmRequest, ToolCall, ToolChoice, ToolResult, ToolSpec,
};
use atlas_providers::{HttpSettings, ProviderError};
use futures_util::StreamExt;
use secrecy::SecretString;
use serde_json::{Value, json};

const PARIS: &str = r#"{"city":"Paris"}"#;
/// Invalid JSON on purpose.
const BROKEN: &str = r#"{"city": "Ro"#;

async fn fakes() -> Fakes {
    let mut config = FakesConfig::default();
    config.llm.first_token = Duration::from_millis(10);
    config.llm.tokens_per_s = 1000.0;
    Fakes::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn anthropic(fakes: &Fakes) -> Arc<dyn LlmProvider> {
    Arc::new(Anthropic::new(AnthropicConfig {
        base_url: fakes.anthropic_url(),
        api_key: SecretString::from("key"),
        model: "claude-test".into(),
        http: HttpSettings::default(),
    }))
}

fn openai(fakes: &Fakes) -> Arc<dyn LlmProvider> {
    Arc::new(OpenAiChat::new(OpenAiChatConfig {
        base_url: fakes.openai_url(),
        api_key: Some(SecretString::from("key")),
        model: "gpt-test".into(),
        include_usage: true,
        provider: "openai",
        http: HttpSettings::default(),
    }))
}

fn request(messages: Vec<ChatMessage>) -> LlmRequest {
    LlmRequest {
        system: "Be brief.".into(),
        messages,
        max_tokens: 200,
        temperature: None,
        tools: vec![ToolSpec {
            name: "get_weather".into(),
            description: "Current weather in a city".into(),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        }]
        .into(),
        tool_choice: ToolChoice::Auto,
    }
}

/// What one completion said, the calls it made, and why it stopped.
#[derive(Debug)]
struct Completion {
    text: String,
    calls: Vec<ToolCall>,
    stop_reason: Option<String>,
}

async fn complete(llm: &dyn LlmProvider, request: LlmRequest) -> Result<Completion, ProviderError> {
    let mut stream = llm.stream(request).await?;
    let mut done = Completion {
        text: String::new(),
        calls: Vec::new(),
        stop_reason: None,
    };
    while let Some(event) = stream.next().await {
        match event? {
            LlmEvent::Delta(t) => done.text.push_str(&t),
            LlmEvent::ToolCall(c) => done.calls.push(c),
            LlmEvent::Usage(_) => {}
            LlmEvent::Done { stop_reason } => {
                done.stop_reason = stop_reason;
                return Ok(done);
            }
        }
    }
    panic!("stream ended without Done");
}

/// A question, parallel calls (one with broken arguments), their results, and the spoken
/// answer; then a history whose result answers no call, which the fake refuses.
async fn tool_round_trip(fakes: &Fakes, llm: &dyn LlmProvider, target: Target, tool_stop: &str) {
    fakes.script(
        target,
        ScriptedReply {
            text: "Let me check.".into(),
            tool_calls: vec![
                ScriptedCall::new("get_weather", PARIS),
                ScriptedCall::new("get_weather", BROKEN),
            ],
        },
    );
    let question = ChatMessage::user("Weather in Paris and Rome?");
    let first = complete(llm, request(vec![question.clone()]))
        .await
        .unwrap();
    assert_eq!(first.text, "Let me check.");
    assert_eq!(first.stop_reason.as_deref(), Some(tool_stop));
    assert_eq!(first.calls.len(), 2);
    assert_ne!(first.calls[0].id, first.calls[1].id);
    assert_eq!(first.calls[0].name, "get_weather");
    assert_eq!(first.calls[0].arguments, PARIS);
    assert_eq!(first.calls[1].arguments, BROKEN);

    let results = vec![
        ToolResult {
            call_id: first.calls[0].id.clone(),
            content: r#"{"temp_c":21}"#.into(),
            is_error: false,
        },
        ToolResult::error(&first.calls[1].id, "arguments are not valid JSON"),
    ];
    let history = vec![
        question,
        ChatMessage {
            tool_calls: first.calls.clone(),
            ..ChatMessage::assistant(first.text)
        },
        ChatMessage {
            tool_results: results,
            ..ChatMessage::user("")
        },
    ];
    let second = complete(llm, request(history.clone())).await.unwrap();
    assert_eq!(second.text, r#"Here is what I found: {"temp_c":21}."#);
    assert!(second.calls.is_empty());
    assert_ne!(second.stop_reason.as_deref(), Some(tool_stop));

    // A result for a call that was never made.
    let mut stray = history;
    stray[2].tool_results[0].call_id = "nobody".into();
    match complete(llm, request(stray)).await {
        Err(ProviderError::Status { status, kind, .. }) => {
            assert_eq!(status, 400);
            assert_eq!(kind, "invalid_request_error");
        }
        other => panic!("expected a 400, got {other:?}"),
    }
}

/// Runs [`tool_round_trip`] against the fake `target` with the adapter `llm` makes; returns
/// the body the fake received for the answered round.
async fn answered_round(
    llm: fn(&Fakes) -> Arc<dyn LlmProvider>,
    target: Target,
    tool_stop: &str,
) -> Value {
    let fakes = fakes().await;
    tool_round_trip(&fakes, llm(&fakes).as_ref(), target, tool_stop).await;
    let (_, body) = fakes.recorded().llm_requests.swap_remove(1);
    body
}

#[tokio::test]
async fn anthropic_tool_round_trip() {
    // What the fake received for the answered round: tool_use blocks back in the assistant
    // message, tool_result blocks (results first) in the next user message.
    let body = &answered_round(anthropic, Target::Anthropic, "tool_use").await;
    let calls = &body["messages"][1]["content"];
    assert_eq!(calls[0], json!({"type": "text", "text": "Let me check."}));
    assert_eq!(calls[1]["type"], "tool_use");
    assert_eq!(calls[1]["input"], json!({"city": "Paris"}));
    assert_eq!(calls[2]["input"], json!({}));
    let results = &body["messages"][2]["content"];
    assert_eq!(results[0]["type"], "tool_result");
    assert_eq!(results[0]["tool_use_id"], calls[1]["id"]);
    assert_eq!(results[1]["is_error"], true);
    assert_eq!(body["tool_choice"], json!({"type": "auto"}));
    assert_eq!(
        body["tools"][0]["input_schema"]["required"],
        json!(["city"])
    );
}

#[tokio::test]
async fn openai_tool_round_trip() {
    let body = &answered_round(openai, Target::OpenAiChat, "tool_calls").await;
    let messages = body["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["system", "user", "assistant", "tool", "tool"]);
    let calls = &messages[2]["tool_calls"];
    assert_eq!(calls[0]["function"]["arguments"], PARIS);
    assert_eq!(calls[1]["function"]["arguments"], "{}");
    assert_eq!(messages[3]["tool_call_id"], calls[0]["id"]);
    assert_eq!(
        messages[4]["content"],
        "Error: arguments are not valid JSON"
    );
    assert_eq!(body["tool_choice"], "auto");
    assert_eq!(body["tools"][0]["type"], "function");
}

#[tokio::test]
async fn no_tools_means_no_tool_fields_and_no_calls() {
    let fakes = fakes().await;
    for llm in [anthropic(&fakes), openai(&fakes)] {
        let request = LlmRequest {
            tools: Vec::new().into(),
            ..request(vec![ChatMessage::user("Hello")])
        };
        let done = complete(llm.as_ref(), request).await.unwrap();
        assert!(done.calls.is_empty());
        assert!(done.text.starts_with("Sure, you asked: Hello."));
    }
    for (_, body) in fakes.recorded().llm_requests {
        let body: &Value = &body;
        assert!(body.get("tools").is_none());
        assert!(body.get("tool_choice").is_none());
    }
}
