//! Screening candidates before ranking: the degenerate replies users
//! complain about (empty turns, the bot repeating itself, parroting the
//! user) never reach the ranker.
//!
//! A candidate is empty when it has no meaningful content: nothing but
//! whitespace, control and formatting characters (zero-width spaces,
//! direction marks). Emoji, CJK and punctuation are content: " 🙂 🙂" is a
//! reply.
//!
//! Texts are compared after [`normalize`]: lower case, letters and digits
//! only, single spaces. "Hi!!" and "hi" are the same reply. A text with no
//! letters or digits (only emoji or punctuation) is compared by its
//! meaningful characters instead, so "🙂" and "🙂!" differ but "🙂" and
//! " 🙂 " do not.

use serde::Serialize;
use unicode_categories::UnicodeCategories;

/// Why a candidate was dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum Rejection {
    /// Nothing but whitespace, control and formatting characters.
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

/// Whether a character carries content: not whitespace, not a control
/// (Cc) and not a formatting character (Cf: zero-width space and joiner,
/// direction marks, the byte-order mark).
pub fn is_meaningful(c: char) -> bool {
    !c.is_whitespace() && !c.is_other_control() && !c.is_other_format()
}

/// Whether a text has any meaningful character (see [`is_meaningful`]).
pub fn has_content(text: &str) -> bool {
    text.chars().any(is_meaningful)
}

/// The comparison key: [`normalize`]d words, or, for a text without
/// letters or digits, its meaningful characters (lower case, one space
/// between runs). Empty only for a text without content.
fn comparison_key(text: &str) -> String {
    let words = normalize(text);
    if !words.is_empty() {
        return words;
    }
    let mut out = String::new();
    for run in text.split(|c: char| !is_meaningful(c)).filter(|r| !r.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(run.chars().flat_map(char::to_lowercase));
    }
    out
}

/// One verdict per candidate: `None` keeps it. `recent_bot_turns` are
/// newest first.
pub fn screen(candidates: &[String], user_turn: &str, recent_bot_turns: &[String]) -> Vec<Option<Rejection>> {
    let user = comparison_key(user_turn);
    let bot: Vec<String> = recent_bot_turns.iter().map(|t| comparison_key(t)).collect();
    let mut seen: Vec<String> = Vec::with_capacity(candidates.len());
    candidates
        .iter()
        .map(|candidate| {
            let norm = comparison_key(candidate);
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
            [" \u{200B}\t\u{200E} ", "Does money buy happiness??", "I like trains", "Nope.", "nope", "Money helps, a bit."]
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
    fn emoji_cjk_and_punctuation_are_content() {
        let candidates: Vec<String> = ["🙂 🙂 🙂", "你好", "...", "?!", "👍🏽", "👨\u{200D}👩\u{200D}👧", "\u{FEFF}\u{2060}", "", " 🙂🙂🙂 ", "🙂🙂🙂"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let verdicts = screen(&candidates, "hello", &["…".to_string()]);
        assert_eq!(
            verdicts,
            vec![
                None,
                None,
                None,
                None,
                None,
                None,
                Some(Rejection::Empty),
                Some(Rejection::Empty),
                None,
                // Emoji-only texts compare by their characters: the same run
                // of emoji is a duplicate, whatever spaces surround it.
                Some(Rejection::Duplicate { of: 8 }),
            ]
        );
        // A repeat of the bot's own emoji-only turn and an echo of the user's
        // are still caught.
        let again = screen(&["🙂".to_string(), "👋".to_string()], "👋", &["🙂".to_string()]);
        assert_eq!(again, vec![Some(Rejection::RepeatsBot { turn_idx: 0 }), Some(Rejection::EchoesUser)]);
        assert!(has_content("。") && has_content("🙂") && !has_content(" \u{200B}\u{00AD}\n"));
    }

    #[test]
    fn normalize_keeps_letters_of_every_script() {
        assert_eq!(normalize("  Café, 你好!! "), "café 你好");
        assert_eq!(normalize("<|endoftext|>"), "endoftext");
        assert_eq!(normalize("?!"), "");
    }
}
