//! Stateless completions: a conversation in, ranked replies out.
//!
//! The neutral shape of the OpenAI-compatible API ([`crate::http`]'s
//! `/v1/chat/completions`): the client sends the whole conversation and
//! the core answers it through the same persona, safety filter, candidates
//! and ranking as a channel message, without reading or writing any
//! channel's context.

/// A conversation to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// The base model's id or a persona's name ([`Core::models`](crate::Core::models)).
    pub model: String,
    /// The conversation's turns, oldest first; the last is the user's, the
    /// one to answer.
    pub turns: Vec<ChatTurn>,
    /// Most new tokens per reply; `None`: `generation.max_new_tokens`
    /// (larger values are lowered to it).
    pub max_new_tokens: Option<usize>,
    /// `None`: `generation.temperature`.
    pub temperature: Option<f32>,
    /// `None`: `generation.top_p`.
    pub top_p: Option<f32>,
    /// Replies wanted, best first (1 to `generation.candidates`).
    pub n: usize,
    /// Fixes the draw; the same seed and request give the same replies.
    pub seed: Option<u64>,
    /// Each reply ends before the first of these strings.
    pub stop: Vec<String>,
    /// Who asks (rate limits and log lines); `None`: one shared anonymous caller.
    pub user: Option<String>,
}

/// One turn of a conversation sent whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    pub text: String,
    /// The bot's turn (OpenAI's `assistant`), not the user's.
    pub bot: bool,
}

/// Why a reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its turn, or a stop string was met.
    Stop,
    /// Cut off by the token limit.
    Length,
    /// No candidate passed the safety filter for this place: no text.
    ContentFilter,
}

impl FinishReason {
    /// OpenAI's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContentFilter => "content_filter",
        }
    }
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletionChoice {
    /// Empty for [`FinishReason::ContentFilter`].
    pub text: String,
    pub finish: FinishReason,
}

/// The answer to a [`CompletionRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// Exactly `n`, best first.
    pub choices: Vec<CompletionChoice>,
    /// Tokens of the prompt the model saw (persona seed turns included).
    pub prompt_tokens: usize,
    /// Tokens of the returned replies, together.
    pub completion_tokens: usize,
}

/// A model a caller may name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCard {
    pub id: String,
    /// A persona of the base model rather than the base model itself.
    pub persona: bool,
}

/// Why a completion was not given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompletionError {
    /// What refuses a channel message (busy, shutting down, rate limited…).
    #[error(transparent)]
    Core(#[from] crate::CoreError),
    /// `model` names neither the base model nor a persona.
    #[error("the model {0:?} does not exist (GET /v1/models lists them)")]
    UnknownModel(String),
    /// The conversation failed the input filter; the text is the
    /// operator's notice (`safety.notice`).
    #[error("{0}")]
    ContentFilter(String),
    /// A request field is out of range; `param` names it.
    #[error("{message}")]
    Invalid { param: &'static str, message: String },
}
