//! Moderator word lists: words blocked (or allowed) per guild or chat.
//!
//! [`WordLists`] maps a scope (the daemon's key for a Discord guild or a
//! Telegram chat, e.g. `discord:guild:123`) to a [`WordList`]; it is plain
//! serialisable data that the daemon persists (Redis or a file) and edits
//! when a moderator adds or removes a word.
//!
//! Blocked words match through the obfuscation people use to slip past
//! filters: case, accents and look-alike letters (NFKD, a small Cyrillic and
//! leetspeak table), punctuation inside a word (`b.a.d`), letters spaced out
//! (`b a d`), repeated letters (`baaaad`), `*` for one letter (`b*d`) and a
//! plural `s`. They match whole words only, never inside another word, so a
//! blocked "ass" does not flag "assassin" or "as".
//!
//! Allowed words are taken out of the text before the rule filter reads it
//! (a community that is fine with "damn" can say so).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

use super::{Category, Hit, SafetyError, Severity};

/// Most entries a list may hold (blocked and allowed each).
pub const MAX_WORDS: usize = 1000;
/// Longest entry, in characters.
pub const MAX_WORD_CHARS: usize = 64;

/// One scope's words.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WordList {
    /// Entries as moderators typed them (trimmed, lower case); a space makes
    /// a phrase.
    pub blocked: BTreeSet<String>,
    pub allowed: BTreeSet<String>,
}

/// Every scope's words.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WordLists {
    scopes: BTreeMap<String, WordList>,
}

impl WordLists {
    pub fn get(&self, scope: &str) -> Option<&WordList> {
        self.scopes.get(scope)
    }

    /// Blocks a word in a scope; `false` when it was already blocked.
    pub fn block(&mut self, scope: &str, word: &str) -> Result<bool, SafetyError> {
        let list = self.scopes.entry(scope.to_string()).or_default();
        insert(&mut list.blocked, word)
    }

    /// Unblocks a word; `false` when it was not blocked.
    pub fn unblock(&mut self, scope: &str, word: &str) -> bool {
        self.remove(scope, word, |l| &mut l.blocked)
    }

    /// Allows a word the rule filter would flag; `false` when already allowed.
    pub fn allow(&mut self, scope: &str, word: &str) -> Result<bool, SafetyError> {
        let list = self.scopes.entry(scope.to_string()).or_default();
        insert(&mut list.allowed, word)
    }

    pub fn disallow(&mut self, scope: &str, word: &str) -> bool {
        self.remove(scope, word, |l| &mut l.allowed)
    }

    fn remove(&mut self, scope: &str, word: &str, set: impl Fn(&mut WordList) -> &mut BTreeSet<String>) -> bool {
        let Some(list) = self.scopes.get_mut(scope) else { return false };
        let removed = set(list).remove(&entry_form(word));
        if list.blocked.is_empty() && list.allowed.is_empty() {
            self.scopes.remove(scope);
        }
        removed
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }

    pub fn from_json(text: &str) -> Result<Self, SafetyError> {
        let lists: Self = serde_json::from_str(text).map_err(|e| SafetyError::WordList(e.to_string()))?;
        for (scope, list) in &lists.scopes {
            for word in list.blocked.iter().chain(&list.allowed) {
                check_entry(word).map_err(|e| SafetyError::WordList(format!("scope {scope}: {e}")))?;
            }
        }
        Ok(lists)
    }
}

/// `word` in the form lists store it (trimmed, inner spaces single, lower
/// case), or why it cannot be an entry (no letters or digits, longer than
/// [`MAX_WORD_CHARS`]).
pub fn entry(word: &str) -> Result<String, SafetyError> {
    let entry = entry_form(word);
    check_entry(&entry)?;
    Ok(entry)
}

fn entry_form(word: &str) -> String {
    word.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

fn check_entry(word: &str) -> Result<(), SafetyError> {
    if word.chars().count() > MAX_WORD_CHARS {
        return Err(SafetyError::WordList(format!("`{word}` is longer than {MAX_WORD_CHARS} characters")));
    }
    if tokens(word).is_empty() {
        return Err(SafetyError::WordList(format!("`{word}` has no letters or digits")));
    }
    Ok(())
}

fn insert(set: &mut BTreeSet<String>, word: &str) -> Result<bool, SafetyError> {
    let entry = entry_form(word);
    check_entry(&entry)?;
    if set.len() >= MAX_WORDS && !set.contains(&entry) {
        return Err(SafetyError::WordList(format!("a list holds at most {MAX_WORDS} words")));
    }
    Ok(set.insert(entry))
}

impl WordList {
    /// This list with `other`'s entries added (the operator's
    /// `safety.blocked_words` with a scope's moderators' words).
    pub fn merged(&self, other: &WordList) -> WordList {
        WordList {
            blocked: self.blocked.union(&other.blocked).cloned().collect(),
            allowed: self.allowed.union(&other.allowed).cloned().collect(),
        }
    }

    /// A hit for every blocked entry found in `text`.
    pub fn blocked_in(&self, text: &str) -> Vec<Hit> {
        if self.blocked.is_empty() {
            return Vec::new();
        }
        let words = candidate_tokens(text);
        self.blocked
            .iter()
            .filter(|entry| phrase_in(&tokens(entry), &words))
            .map(|entry| Hit { category: Category::Blocked, severity: Severity::Severe, source: "moderator", detail: Some(entry.clone()) })
            .collect()
    }

    /// `text` without the words of the allowed list (whole words; phrases
    /// are not taken out).
    pub fn mask_allowed(&self, text: &str) -> String {
        if self.allowed.is_empty() {
            return text.to_string();
        }
        let allowed: Vec<Vec<char>> = self.allowed.iter().filter(|a| !a.contains(' ')).filter_map(|a| tokens(a).pop()).collect();
        text.split_whitespace()
            .filter(|raw| {
                let toks = tokens(raw);
                !(toks.len() == 1 && allowed.iter().any(|a| word_matches(a, &toks[0])))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// One character in comparison form: look-alikes and leetspeak folded.
fn fold(c: char) -> Option<char> {
    Some(match c {
        '0' => 'o',
        '1' | '!' | '|' => 'i',
        '3' => 'e',
        '4' | '@' => 'a',
        '5' | '$' => 's',
        '7' | '+' => 't',
        '8' => 'b',
        '9' => 'g',
        // Cyrillic and Greek letters that look Latin.
        'а' | 'α' => 'a',
        'в' | 'β' => 'b',
        'с' => 'c',
        'е' | 'ε' => 'e',
        'һ' => 'h',
        'і' | 'ι' => 'i',
        'ј' => 'j',
        'к' | 'κ' => 'k',
        'м' => 'm',
        'п' | 'η' => 'n',
        'о' | 'ο' => 'o',
        'р' | 'ρ' => 'p',
        'ѕ' => 's',
        'т' | 'τ' => 't',
        'у' | 'γ' => 'y',
        'х' | 'χ' => 'x',
        '*' => '*',
        c if c.is_alphanumeric() => c,
        _ => return None,
    })
}

/// The words of a text in comparison form: NFKD without combining marks,
/// lower case, folded; punctuation inside a word dropped; `!`/`?`/`.` at the
/// end of a word are punctuation, not letters.
fn tokens(text: &str) -> Vec<Vec<char>> {
    let plain: String = text.nfkd().filter(|c| !is_combining_mark(*c)).flat_map(char::to_lowercase).collect();
    plain
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | ':' | '"' | '(' | ')' | '[' | ']' | '{' | '}' | '/' | '\\' | '-' | '_'))
        .map(|raw| raw.trim_end_matches(['!', '?', '.', '\'', '-']).trim_start_matches(['\'', '-', '.']))
        .map(|raw| raw.chars().filter_map(fold).collect::<Vec<char>>())
        .filter(|t| t.iter().any(|c| *c != '*'))
        .collect()
}

/// The text's tokens, plus each run of three or more single-letter tokens
/// joined (`b a d` → `bad`) and hyphenated words joined (`bad-word`).
fn candidate_tokens(text: &str) -> Vec<Vec<char>> {
    let mut words = tokens(text);
    for raw in text.split_whitespace().filter(|raw| raw.contains(['-', '_'])) {
        words.extend(tokens(&raw.replace(['-', '_'], "")));
    }
    let mut joined = Vec::new();
    let mut run: Vec<char> = Vec::new();
    let mut run_len = 0;
    for t in words.iter().chain(std::iter::once(&vec!['x', 'x'])) {
        if t.len() == 1 {
            run.push(t[0]);
            run_len += 1;
        } else {
            if run_len >= 3 {
                joined.push(std::mem::take(&mut run));
            }
            run.clear();
            run_len = 0;
        }
    }
    words.extend(joined);
    words
}

/// Whether the entry's tokens occur, contiguous, among the text's.
fn phrase_in(entry: &[Vec<char>], words: &[Vec<char>]) -> bool {
    !entry.is_empty() && words.windows(entry.len()).any(|w| w.iter().zip(entry).all(|(t, e)| word_matches(e, t)))
}

/// Runs of equal characters: `baaad` → [(b,1),(a,3),(d,1)].
fn runs(word: &[char]) -> Vec<(char, usize)> {
    let mut out: Vec<(char, usize)> = Vec::new();
    for &c in word {
        match out.last_mut() {
            Some((last, n)) if *last == c && c != '*' => *n += 1,
            _ => out.push((c, 1)),
        }
    }
    out
}

/// Whether a text token is the entry word, allowing repeated letters, `*`
/// for one letter (at most half of them) and a plural `s`/`es`.
fn word_matches(entry: &[char], token: &[char]) -> bool {
    let try_one = |token: &[char]| {
        let (e, t) = (runs(entry), runs(token));
        let stars = token.iter().filter(|c| **c == '*').count();
        e.len() == t.len()
            && stars * 2 <= entry.len()
            && e.iter().zip(&t).all(|((ec, en), (tc, tn))| if *tc == '*' { *tn == 1 } else { ec == tc && tn >= en })
    };
    if try_one(token) {
        return true;
    }
    let n = token.len();
    (n > entry.len() && token.ends_with(&['s']) && try_one(&token[..n - 1]))
        || (n > entry.len() + 1 && token.ends_with(&['e', 's']) && try_one(&token[..n - 2]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(blocked: &[&str]) -> WordList {
        WordList { blocked: blocked.iter().map(|s| s.to_string()).collect(), allowed: BTreeSet::new() }
    }

    fn flagged(l: &WordList, text: &str) -> bool {
        !l.blocked_in(text).is_empty()
    }

    #[test]
    fn blocked_words_match_through_obfuscation() {
        let l = list(&["grumble", "moon pie"]);
        for text in [
            "you GRUMBLE",
            "grumbles everywhere",
            "g.r.u.m.b.l.e",
            "g r u m b l e now",
            "grrruuumble",
            "gr*mble",
            "6rumble",
            "grumblé",
            "ｇｒｕｍｂｌｅ",
            "grumblе", // Cyrillic е
            "gr|_|mble is not folded but gr1mble is not it either",
            "I love a Moon-Pie!",
            "grum-ble",
            "moon  pie?",
        ] {
            let expect = !text.starts_with("6rumble") && !text.starts_with("gr|_|");
            assert_eq!(flagged(&l, text), expect, "{text}");
        }
    }

    #[test]
    fn blocked_words_never_match_inside_other_words() {
        let l = list(&["ass", "pie"]);
        for text in ["an assassin", "as you wish", "class assignment", "piece of cake", "a magpie"] {
            assert!(!flagged(&l, text), "{text}");
        }
        assert!(flagged(&l, "you a$$"));
        assert!(flagged(&l, "pies!"));
        // More stars than letters is not a word.
        assert!(!flagged(&l, "a**"));
    }

    #[test]
    fn lists_are_edited_per_scope_and_round_trip() {
        let mut lists = WordLists::default();
        assert!(lists.block("discord:guild:1", "  Grumble ").unwrap());
        assert!(!lists.block("discord:guild:1", "grumble").unwrap());
        assert!(lists.allow("telegram:chat:2", "damn").unwrap());
        assert!(lists.block("discord:guild:1", "?!").is_err());
        assert!(lists.block("x", &"a".repeat(65)).is_err());
        let back = WordLists::from_json(&lists.to_json()).unwrap();
        assert_eq!(back, lists);
        assert!(flagged(back.get("discord:guild:1").unwrap(), "GRUMBLE"));
        assert!(back.get("telegram:chat:2").unwrap().blocked.is_empty());
        assert!(lists.unblock("discord:guild:1", "GRUMBLE"));
        assert!(lists.get("discord:guild:1").is_none());
        assert!(!lists.unblock("nowhere", "x"));
        assert_eq!(entry("  Moon   PIE ").unwrap(), "moon pie");
        let merged = list(&["a1"]).merged(&list(&["b2"]));
        assert_eq!(merged.blocked.iter().collect::<Vec<_>>(), ["a1", "b2"]);
        assert!(WordLists::from_json("{\"s\":{\"blocked\":[\"!!\"]}}").is_err());
    }

    #[test]
    fn allowed_words_are_masked() {
        let mut l = WordList::default();
        l.allowed.insert("damn".into());
        assert_eq!(l.mask_allowed("Damn! that was close"), "that was close");
    }
}
