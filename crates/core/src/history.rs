//! The bounded conversation history sent to the LLM.

use std::collections::VecDeque;

use crate::tools::{ToolCall, ToolResult};

/// Who said it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The person.
    User,
    /// The assistant.
    Assistant,
}

/// One message of the conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Speaker.
    pub role: Role,
    /// What was said (for the assistant: only what was actually spoken).
    pub text: String,
    /// Assistant only: the tools it called after its text.
    pub tool_calls: Vec<ToolCall>,
    /// User side only: the answers to the calls of the assistant message before it (they
    /// come first, before any text).
    pub tool_results: Vec<ToolResult>,
}

impl Message {
    /// What the person said.
    pub fn user(text: impl Into<String>) -> Self {
        Message {
            role: Role::User,
            text: text.into(),
            tool_calls: Vec::new(),
            tool_results: Vec::new(),
        }
    }

    /// What the assistant said.
    pub fn assistant(text: impl Into<String>) -> Self {
        Message {
            role: Role::Assistant,
            ..Message::user(text)
        }
    }

    /// Characters held, the measure of the history's bound.
    pub fn chars(&self) -> usize {
        self.text.len()
            + self
                .tool_calls
                .iter()
                .map(|c| c.name.len() + c.arguments.len())
                .sum::<usize>()
            + self
                .tool_results
                .iter()
                .map(|r| r.content.len())
                .sum::<usize>()
    }
}

/// Bounds on the history kept for the LLM.
#[derive(Clone, Copy, Debug)]
pub struct HistoryLimits {
    /// Most messages kept.
    pub max_messages: usize,
    /// Most characters kept (a proxy for tokens: about four characters a token).
    pub max_chars: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            max_messages: 40,
            max_chars: 24_000,
        }
    }
}

/// Conversation history with strictly alternating roles, starting with the user, trimmed
/// from the oldest end to stay within its limits. A tool round is an assistant message with
/// calls followed at once by the user-side message with every call's result; trimming never
/// separates them (a provider refuses a result without its call).
#[derive(Clone, Debug)]
pub struct History {
    limits: HistoryLimits,
    messages: VecDeque<Message>,
    /// Characters currently held (kept to avoid recounting).
    chars: usize,
}

impl History {
    /// An empty history.
    pub fn new(limits: HistoryLimits) -> Self {
        History {
            limits,
            messages: VecDeque::new(),
            chars: 0,
        }
    }

    /// A history continued from elsewhere (messages another history held, oldest first).
    pub fn restored(limits: HistoryLimits, messages: impl IntoIterator<Item = Message>) -> Self {
        let messages: VecDeque<Message> = messages.into_iter().collect();
        let chars = messages.iter().map(Message::chars).sum();
        let mut history = History {
            limits,
            messages,
            chars,
        };
        history.trim();
        history
    }

    /// Adds what the user said; consecutive user messages are merged.
    pub fn push_user(&mut self, text: &str) {
        self.push(Role::User, text);
    }

    /// Adds what the assistant said (only the part actually spoken); empty text adds nothing.
    pub fn push_assistant(&mut self, text: &str) {
        if self.messages.is_empty() {
            return; // the history always starts with the user
        }
        self.push(Role::Assistant, text);
    }

    /// Adds a tool round: what the assistant said before calling, its calls, and every
    /// call's result (one per call, in the calls' order).
    pub fn push_tool_round(&mut self, text: &str, calls: Vec<ToolCall>, results: Vec<ToolResult>) {
        if self.messages.is_empty() || calls.is_empty() {
            return;
        }
        debug_assert_eq!(calls.len(), results.len());
        let mut text = text.trim().to_owned();
        // Two assistant messages in a row are not allowed: earlier words of this turn join
        // the calling message (a tool round always ends with the results, so the earlier
        // message has no calls of its own).
        if self
            .messages
            .back()
            .is_some_and(|m| m.role == Role::Assistant && m.tool_calls.is_empty())
            && let Some(previous) = self.messages.pop_back()
        {
            self.chars -= previous.chars();
            text = join(&previous.text, &text);
        }
        let call = Message {
            tool_calls: calls,
            ..Message::assistant(text)
        };
        let answer = Message {
            tool_results: results,
            ..Message::user("")
        };
        self.chars += call.chars() + answer.chars();
        self.messages.push_back(call);
        self.messages.push_back(answer);
        self.trim();
    }

    fn push(&mut self, role: Role, text: &str) {
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        match self.messages.back_mut() {
            // Text after an assistant's calls starts a new message (their results come
            // between).
            Some(last) if last.role == role && last.tool_calls.is_empty() => {
                if last.text.is_empty() {
                    last.text.push_str(text);
                    self.chars += text.len();
                } else {
                    last.text.push(' ');
                    last.text.push_str(text);
                    self.chars += text.len() + 1;
                }
            }
            _ => {
                self.messages.push_back(Message {
                    role,
                    ..Message::user(text)
                });
                self.chars += text.len();
            }
        }
        self.trim();
    }

    fn trim(&mut self) {
        while self.messages.len() > 1
            && (self.messages.len() > self.limits.max_messages
                || self.chars > self.limits.max_chars)
        {
            self.pop_front();
        }
        // The history starts with the person's words: never with the assistant, nor with
        // results whose calls were trimmed away.
        while self
            .messages
            .front()
            .is_some_and(|m| m.role == Role::Assistant || !m.tool_results.is_empty())
        {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(m) = self.messages.pop_front() {
            self.chars -= m.chars();
        }
    }

    /// Characters held (text, calls and results).
    pub fn chars(&self) -> usize {
        self.chars
    }

    /// The messages, oldest first.
    pub fn messages(&self) -> impl ExactSizeIterator<Item = &Message> {
        self.messages.iter()
    }

    /// Number of messages.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether the history is empty.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_owned(),
        (_, true) => a.to_owned(),
        _ => format!("{a} {b}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A history under these limits after the user and the assistant said `exchanges`.
    fn exchanged(
        max_messages: usize,
        max_chars: usize,
        exchanges: impl IntoIterator<Item = (String, String)>,
    ) -> History {
        let mut h = History::new(HistoryLimits {
            max_messages,
            max_chars,
        });
        for (user, assistant) in exchanges {
            h.push_user(&user);
            h.push_assistant(&assistant);
        }
        h
    }

    fn roles(h: &History) -> Vec<Role> {
        h.messages().map(|m| m.role).collect()
    }

    #[test]
    fn alternates_and_merges() {
        let mut h = History::new(HistoryLimits::default());
        h.push_assistant("ignored: history starts with the user");
        h.push_user("Hello");
        h.push_assistant("");
        h.push_user("are you there?");
        h.push_assistant("Yes.");
        assert_eq!(roles(&h), vec![Role::User, Role::Assistant]);
        assert_eq!(h.messages().next().unwrap().text, "Hello are you there?");
    }

    #[test]
    fn trims_oldest_and_keeps_user_first() {
        let h = exchanged(
            3,
            1000,
            (0..5).map(|i| (format!("question {i}"), format!("answer {i}"))),
        );
        assert!(h.len() <= 3);
        assert_eq!(h.messages().next().unwrap().role, Role::User);
        assert_eq!(h.messages().last().unwrap().text, "answer 4");
    }

    #[test]
    fn trims_by_characters() {
        let h = exchanged(100, 50, (0..10).map(|_| ("x".repeat(20), "y".repeat(20))));
        let total: usize = h.messages().map(|m| m.text.len()).sum();
        assert!(total <= 50);
        assert_eq!(h.messages().next().unwrap().role, Role::User);
    }

    fn call(id: &str) -> ToolCall {
        ToolCall {
            id: id.into(),
            name: "lookup".into(),
            arguments: r#"{"q":1}"#.into(),
        }
    }

    fn result(id: &str) -> ToolResult {
        ToolResult {
            call_id: id.into(),
            content: "{}".into(),
            is_error: false,
        }
    }

    #[test]
    fn a_tool_round_keeps_calls_and_results_adjacent() {
        let mut h = History::new(HistoryLimits::default());
        h.push_user("Where is my order?");
        h.push_tool_round(
            "Let me look.",
            vec![call("a"), call("b")],
            vec![result("a"), result("b")],
        );
        h.push_assistant("It ships tomorrow.");
        h.push_user("Thanks");
        let m: Vec<_> = h.messages().collect();
        assert_eq!(m.len(), 5);
        assert_eq!(m[1].role, Role::Assistant);
        assert_eq!(m[1].text, "Let me look.");
        assert_eq!(m[1].tool_calls.len(), 2);
        assert_eq!(m[2].role, Role::User);
        assert_eq!(m[2].tool_results.len(), 2);
        assert_eq!(m[3].text, "It ships tomorrow.");
        assert_eq!(m[4].text, "Thanks");
        let total: usize = h.messages().map(Message::chars).sum();
        assert_eq!(h.chars(), total);
    }

    #[test]
    fn words_after_results_join_the_results_message() {
        let mut h = History::new(HistoryLimits::default());
        h.push_user("Book it");
        h.push_tool_round("", vec![call("a")], vec![result("a")]);
        // The reply was cut before a word was spoken; the person talks again.
        h.push_assistant("");
        h.push_user("hello?");
        let m: Vec<_> = h.messages().collect();
        assert_eq!(m.len(), 3);
        assert_eq!(m[2].tool_results.len(), 1);
        assert_eq!(m[2].text, "hello?");
    }

    #[test]
    fn consecutive_rounds_and_earlier_words_merge_into_one_assistant_message() {
        let mut h = History::new(HistoryLimits::default());
        h.push_user("Book it");
        h.push_assistant("Sure.");
        h.push_tool_round("Checking.", vec![call("a")], vec![result("a")]);
        h.push_tool_round("", vec![call("b")], vec![result("b")]);
        let roles = roles(&h);
        assert_eq!(
            roles,
            vec![
                Role::User,
                Role::Assistant,
                Role::User,
                Role::Assistant,
                Role::User
            ]
        );
        assert_eq!(h.messages().nth(1).unwrap().text, "Sure. Checking.");
        let total: usize = h.messages().map(Message::chars).sum();
        assert_eq!(h.chars(), total);
    }

    #[test]
    fn trimming_never_leaves_results_without_their_calls() {
        let mut h = History::new(HistoryLimits {
            max_messages: 4,
            max_chars: 10_000,
        });
        for i in 0..6 {
            h.push_user(&format!("question {i}"));
            h.push_tool_round("", vec![call(&i.to_string())], vec![result(&i.to_string())]);
            h.push_assistant(&format!("answer {i}"));
        }
        let first = h.messages().next().unwrap();
        assert_eq!(first.role, Role::User);
        assert!(first.tool_results.is_empty(), "{first:?}");
        for pair in h.messages().collect::<Vec<_>>().windows(2) {
            if !pair[1].tool_results.is_empty() {
                assert_eq!(pair[0].tool_calls.len(), pair[1].tool_results.len());
            }
        }
        let total: usize = h.messages().map(Message::chars).sum();
        assert_eq!(h.chars(), total);
    }
}
