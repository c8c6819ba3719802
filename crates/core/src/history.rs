//! The bounded conversation history sent to the LLM.

use std::collections::VecDeque;

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
/// from the oldest end to stay within its limits.
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

    fn push(&mut self, role: Role, text: &str) {
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        match self.messages.back_mut() {
            Some(last) if last.role == role => {
                last.text.push(' ');
                last.text.push_str(text);
                self.chars += text.len() + 1;
            }
            _ => {
                self.messages.push_back(Message {
                    role,
                    text: text.to_owned(),
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
        while self
            .messages
            .front()
            .is_some_and(|m| m.role == Role::Assistant)
        {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(m) = self.messages.pop_front() {
            self.chars -= m.text.len();
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut h = History::new(HistoryLimits {
            max_messages: 3,
            max_chars: 1000,
        });
        for i in 0..5 {
            h.push_user(&format!("question {i}"));
            h.push_assistant(&format!("answer {i}"));
        }
        assert!(h.len() <= 3);
        assert_eq!(h.messages().next().unwrap().role, Role::User);
        assert_eq!(h.messages().last().unwrap().text, "answer 4");
    }

    #[test]
    fn trims_by_characters() {
        let mut h = History::new(HistoryLimits {
            max_messages: 100,
            max_chars: 50,
        });
        for _ in 0..10 {
            h.push_user(&"x".repeat(20));
            h.push_assistant(&"y".repeat(20));
        }
        let total: usize = h.messages().map(|m| m.text.len()).sum();
        assert!(total <= 50);
        assert_eq!(h.messages().next().unwrap().role, Role::User);
    }
}
