//! DialoGPT prompts: turns joined by `<|endoftext|>`, within a token budget.
//!
//! Every turn, the last (the user's message) included, is followed by the
//! separator; the model then writes the bot's turn until the next separator.
//! When the turns do not fit the budget, whole turns are dropped from the
//! oldest end; a single turn longer than the budget keeps its end, which is
//! the part the reply answers.
//!
//! [`normalize_turn`] is the one form a turn's text takes before it is
//! encoded, on every path: `dialogd generate`, `rank` and `chat`, the
//! daemon (the message it stores, its stored turns and a persona's seed
//! turns), training data and the MMI source (which reads the same encoded
//! turns as the ranker).

/// A turn's text as every path encodes it: Unicode NFC (a precomposed
/// "é" and "e" + combining accent are the same turn) and no leading or
/// trailing whitespace. Whitespace inside the text (newlines, tabs, double
/// spaces) is kept: it is what the user wrote and the tokenizer encodes it.
/// Platform markup is the adapters' business: each removes its own
/// addressing (a Discord bot mention, a Telegram `@bot`) and nothing else,
/// the same way for every message; other markup (a mention of another
/// member, a link) is part of what was said and stays. Typed special tokens
/// stay text (see [`crate::tokenizer`]).
pub fn normalize_turn(text: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    text.trim().nfc().collect()
}

/// The longest turn accepted, in bytes. Longer turns are refused rather
/// than silently cut (cutting to the token budget happens below this size).
pub const MAX_TURN_BYTES: usize = 32 * 1024;

/// A prompt ready for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// Token ids, oldest turn first, each turn followed by the separator.
    pub ids: Vec<u32>,
    /// How many of the newest turns made it in (in whole or in part).
    pub turns_kept: usize,
    /// Whether the oldest kept turn lost its beginning to the budget.
    pub truncated: bool,
}

/// Prompt building failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error("no turns to answer")]
    NoTurns,
    #[error("turn {0} is empty")]
    EmptyTurn(usize),
    #[error("a prompt budget of {0} tokens cannot hold a turn and its separator")]
    BudgetTooSmall(usize),
}

/// Joins encoded turns (oldest first) into a prompt of at most `budget`
/// tokens.
pub fn build_prompt(turns: &[Vec<u32>], eos_id: u32, budget: usize) -> Result<Prompt, PromptError> {
    if turns.is_empty() {
        return Err(PromptError::NoTurns);
    }
    if let Some(idx) = turns.iter().position(|t| t.is_empty()) {
        return Err(PromptError::EmptyTurn(idx + 1));
    }
    if budget < 2 {
        return Err(PromptError::BudgetTooSmall(budget));
    }
    // Walk from the newest turn back while whole turns fit.
    let mut used = 0;
    let mut first_kept = turns.len();
    for (idx, turn) in turns.iter().enumerate().rev() {
        if used + turn.len() + 1 > budget {
            break;
        }
        used += turn.len() + 1;
        first_kept = idx;
    }
    let mut ids = Vec::with_capacity(used.max(budget.min(1024)));
    let truncated = first_kept == turns.len();
    if truncated {
        // Even the newest turn is too long: keep its end.
        let newest = &turns[turns.len() - 1];
        ids.extend_from_slice(&newest[newest.len() - (budget - 1)..]);
        ids.push(eos_id);
        first_kept = turns.len() - 1;
    } else {
        for turn in &turns[first_kept..] {
            ids.extend_from_slice(turn);
            ids.push(eos_id);
        }
    }
    Ok(Prompt { ids, turns_kept: turns.len() - first_kept, truncated })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 50256;

    #[test]
    fn every_turn_ends_with_the_separator() {
        let p = build_prompt(&[vec![1, 2], vec![3], vec![4, 5, 6]], EOS, 100).unwrap();
        assert_eq!(p.ids, vec![1, 2, EOS, 3, EOS, 4, 5, 6, EOS]);
        assert_eq!((p.turns_kept, p.truncated), (3, false));
    }

    #[test]
    fn budget_drops_whole_turns_from_the_oldest_end() {
        let turns = [vec![1, 2, 3], vec![4], vec![5, 6]];
        // 3 + 2 = 5 fits the two newest turns, not the oldest (4 more).
        let p = build_prompt(&turns, EOS, 8).unwrap();
        assert_eq!(p.ids, vec![4, EOS, 5, 6, EOS]);
        assert_eq!(p.turns_kept, 2);
        let p = build_prompt(&turns, EOS, 9).unwrap();
        assert_eq!(p.ids.len(), 9);
    }

    #[test]
    fn a_turn_longer_than_the_budget_keeps_its_end() {
        let turns = [vec![9, 9], (1..=10).collect::<Vec<u32>>()];
        let p = build_prompt(&turns, EOS, 4).unwrap();
        assert_eq!(p.ids, vec![8, 9, 10, EOS]);
        assert_eq!((p.turns_kept, p.truncated), (1, true));
    }

    #[test]
    fn turns_are_normalized_to_nfc_without_outer_whitespace() {
        assert_eq!(normalize_turn("  Cafe\u{301} cr\u{e8}me \n"), "Caf\u{e9} cr\u{e8}me");
        assert_eq!(normalize_turn("tabs\tand\nnewlines  inside"), "tabs\tand\nnewlines  inside");
        assert_eq!(normalize_turn("<|endoftext|>"), "<|endoftext|>");
        assert_eq!(normalize_turn(" \t "), "");
    }

    #[test]
    fn bad_input_is_refused() {
        assert_eq!(build_prompt(&[], EOS, 10), Err(PromptError::NoTurns));
        assert_eq!(build_prompt(&[vec![1], vec![]], EOS, 10), Err(PromptError::EmptyTurn(2)));
        assert_eq!(build_prompt(&[vec![1]], EOS, 1), Err(PromptError::BudgetTooSmall(1)));
    }
}
