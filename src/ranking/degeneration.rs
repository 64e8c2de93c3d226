//! Screening candidates before ranking: the degenerate replies users
//! complain about (empty turns, the bot repeating itself, parroting the
//! user) never reach the ranker.
//!
//! Texts are compared after [`normalize`]: lower case, letters and digits
//! only, single spaces. "Hi!!" and "hi" are the same reply.

use serde::Serialize;

/// Why a candidate was dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum Rejection {
    /// Nothing but whitespace and punctuation.
    Empty,
    /// The same as one of the bot's recent turns in this channel (0 = the
    /// most recent of those given).
    RepeatsBot { turn_idx: usize },
    /// The same as the user's message.
    EchoesUser,
    /// The same as an earlier candidate (whose index is given).
    Duplicate { of: usize },
}

/// The comparison form of a reply.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

/// One verdict per candidate: `None` keeps it. `recent_bot_turns` are
/// newest first.
pub fn screen(candidates: &[String], user_turn: &str, recent_bot_turns: &[String]) -> Vec<Option<Rejection>> {
    let user = normalize(user_turn);
    let bot: Vec<String> = recent_bot_turns.iter().map(|t| normalize(t)).collect();
    let mut seen: Vec<String> = Vec::with_capacity(candidates.len());
    candidates
        .iter()
        .map(|candidate| {
            let norm = normalize(candidate);
            let verdict = if norm.is_empty() {
                Some(Rejection::Empty)
            } else if norm == user {
                Some(Rejection::EchoesUser)
            } else if let Some(turn_idx) = bot.iter().position(|b| *b == norm) {
                Some(Rejection::RepeatsBot { turn_idx })
            } else {
                seen.iter().position(|s| *s == norm).map(|of| Rejection::Duplicate { of })
            };
            seen.push(norm);
            verdict
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_empty_echoes_repeats_and_duplicates() {
        let candidates: Vec<String> =
            ["  ...  ", "Does money buy happiness??", "I like trains", "Nope.", "nope", "Money helps, a bit."]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let bot = vec!["Hello there".to_string(), "I like TRAINS!".to_string()];
        let verdicts = screen(&candidates, "does money buy happiness", &bot);
        assert_eq!(
            verdicts,
            vec![
                Some(Rejection::Empty),
                Some(Rejection::EchoesUser),
                Some(Rejection::RepeatsBot { turn_idx: 1 }),
                None,
                Some(Rejection::Duplicate { of: 3 }),
                None,
            ]
        );
    }

    #[test]
    fn normalize_keeps_letters_of_every_script() {
        assert_eq!(normalize("  Café, 你好!! "), "café 你好");
        assert_eq!(normalize("<|endoftext|>"), "endoftext");
        assert_eq!(normalize("?!"), "");
    }
}
