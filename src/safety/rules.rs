//! The offline rule filter: `rustrict`'s analysis in dialogd's categories,
//! matched on whole words.
//!
//! rustrict (MIT OR Apache-2.0) matches a curated word list through
//! look-alike characters, leetspeak, separators and repeated letters, and
//! carries a list of innocent words that contain bad ones ("Scunthorpe",
//! "assassin", "cocktail"). It answers a set of categories with three
//! severities each; [`RuleFilter::analyze`] turns that into [`Hit`]s.
//!
//! rustrict also matches inside words and across word boundaries: "Shital"
//! and "Nishit" contain a swear word, and "don't I think" reads "t I t".
//! So every detection is located (rustrict censors exactly the characters
//! it matched) and kept only when it stands on word boundaries: nothing but
//! an allowed prefix ("bull", "mother", …) may come before it in its word
//! and nothing but an allowed suffix ("s", "ing", "head", …) after it.
//! The obfuscations the filter exists to catch still match, because they
//! make up whole words: "f u c k" (single letters joined), "s.h.i.t",
//! "a$$hole", "sh1t". The part of a detection that lies inside a word is
//! blanked out and the text analysed again, so what remains is judged on
//! its own.
//!
//! Whole words that are also names stay flagged ("Dick Francis", the
//! Austrian village of Fucking): a channel's moderators can allow them
//! (`WordList::allowed`).

use rustrict::{Censor, Type};

use super::{Category, Hit, Severity};

/// rustrict's categories, in ours.
const CATEGORIES: [(Type, Category); 5] = [
    (Type::PROFANE, Category::Profanity),
    (Type::OFFENSIVE, Category::Hate),
    (Type::SEXUAL, Category::Sexual),
    (Type::MEAN, Category::Insult),
    (Type::EVASIVE, Category::Evasion),
];

/// What rustrict writes over the characters it matched: a private-use
/// character, so it never stands for itself (a text that contains it is
/// judged without the word-boundary test).
const MARK: char = '\u{F8FF}';

/// Rounds of "blank out detections inside words, analyse again".
const MAX_PASSES: usize = 4;

/// Word parts that may come before a detection in the same word: the
/// compounds abuse is made of ("bullshit", "motherfucker", "dumbass").
const ALLOWED_PREFIXES: &[&str] = &[
    "ass", "bat", "big", "bull", "chicken", "cock", "dick", "dip", "dirt", "dog", "dumb", "fat", "holy", "horse", "jack",
    "lame", "mother", "smart", "stupid", "super", "ugly", "wise",
];

/// Word endings that may follow a detection: inflections and the
/// compounds of insults ("shitty", "fuckface", "wankers").
const ALLOWED_SUFFIXES: &[&str] = &[
    "s", "es", "ed", "er", "ers", "ing", "ings", "in", "y", "ey", "ie", "ies", "ty", "head", "heads", "face", "faces", "hole",
    "holes", "bag", "bags", "wad", "wads", "stick", "sticks", "tard", "tards", "ass", "off", "up", "wit", "wits",
];

/// The rule-based filter (stateless; cheap to clone and share).
#[derive(Debug, Clone, Copy, Default)]
pub struct RuleFilter;

impl RuleFilter {
    /// Every category rustrict finds in `text` on whole words, with its
    /// severity.
    pub fn analyze(&self, text: &str) -> Vec<Hit> {
        let mut text = text.to_string();
        for _ in 0..MAX_PASSES {
            match whole_word_pass(&text) {
                Pass::Done(typ) => return hits(typ),
                Pass::Blanked(next) => text = next,
            }
        }
        hits(Censor::from_str(&text).analyze())
    }
}

enum Pass {
    /// Every detection stands on word boundaries (or none could be
    /// located): this is the analysis.
    Done(Type),
    /// Some detections were inside words; the text with them blanked out.
    Blanked(String),
}

fn whole_word_pass(text: &str) -> Pass {
    let mut censor = Censor::from_str(text);
    censor.with_censor_threshold(Type::ANY).with_censor_first_character_threshold(Type::ANY).with_censor_replacement(MARK);
    let (censored, typ) = censor.censor_and_analyze();
    let found = CATEGORIES.iter().any(|&(mask, _)| typ.is(mask));
    if !found || text.contains(MARK) {
        return Pass::Done(typ);
    }
    let original: Vec<char> = text.chars().collect();
    let marked: Vec<char> = censored.chars().collect();
    if original.len() != marked.len() {
        // rustrict dropped a character (a combining accent): positions no
        // longer line up, so keep its verdict as it is.
        return Pass::Done(typ);
    }
    let mut blanked = original.clone();
    let mut any = false;
    let mut idx = 0;
    while idx < marked.len() {
        if marked[idx] != MARK {
            idx += 1;
            continue;
        }
        let start = idx;
        while idx < marked.len() && marked[idx] == MARK {
            idx += 1;
        }
        for (from, to) in pieces_inside_words(&original, start, idx) {
            blanked[from..to].iter_mut().for_each(|c| *c = ' ');
            any = true;
        }
    }
    if any {
        Pass::Blanked(blanked.into_iter().collect())
    } else {
        Pass::Done(typ)
    }
}

/// Letters, digits and apostrophes make up a word ("don't" is one word).
fn in_word(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '\'' | '’')
}

/// The parts of the detection at `text[start..end]` that lie inside a
/// word: its first word when something other than an allowed prefix comes
/// before it in that word, its last word when something other than an
/// allowed suffix follows (apostrophes ignored: "shit's" ends in "s").
/// Empty when the detection stands on word boundaries. Only those parts are
/// blanked: in "have sex tonight" a match that runs into "t" loses the "t",
/// and "have sex" is judged again on its own.
fn pieces_inside_words(text: &[char], start: usize, end: usize) -> Vec<(usize, usize)> {
    let part = |s: &[char]| s.iter().filter(|c| !matches!(c, '\'' | '’')).flat_map(|c| c.to_lowercase()).collect::<String>();
    let before_len = text[..start].iter().rev().take_while(|c| in_word(**c)).count();
    let after_len = text[end..].iter().take_while(|c| in_word(**c)).count();
    let before = part(&text[start - before_len..start]);
    let after = part(&text[end..end + after_len]);
    let mut out = Vec::new();
    if !(before.is_empty() || ALLOWED_PREFIXES.contains(&before.as_str())) {
        // The detection's first word, up to where it leaves the word.
        let len = text[start..end].iter().take_while(|c| in_word(**c)).count().max(1);
        out.push((start, start + len));
    }
    if !(after.is_empty() || ALLOWED_SUFFIXES.contains(&after.as_str())) {
        let len = text[start..end].iter().rev().take_while(|c| in_word(**c)).count().max(1);
        out.push((end - len, end));
    }
    out
}

fn hits(typ: Type) -> Vec<Hit> {
    CATEGORIES
        .iter()
        .filter_map(|&(mask, category)| {
            let severity = if typ.is(mask & Type::SEVERE) {
                Severity::Severe
            } else if typ.is(mask & Type::MODERATE) {
                Severity::Moderate
            } else if typ.is(mask & Type::MILD) {
                Severity::Mild
            } else {
                return None;
            };
            Some(Hit { category, severity, source: "rules", detail: None })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flagged(text: &str) -> bool {
        RuleFilter.analyze(text).iter().any(|h| h.severity >= Severity::Moderate)
    }

    #[test]
    fn detections_inside_words_and_across_them_are_dropped() {
        for text in ["Shital", "Nishit", "don't I think", "what I think", "Middlesex", "Hancock", "the sextant", "shiitake"] {
            assert!(!flagged(text), "{text}: {:?}", RuleFilter.analyze(text));
        }
    }

    #[test]
    fn whole_words_compounds_and_obfuscations_still_match() {
        for text in [
            "shit", "Shit!", "'shit'", "shitty bot", "fuckface", "bullshit", "motherfucker", "dumbass", "wankers", "f u c k you",
            "s.h.i.t", "a$$hole", "sh1t", "fuuuuck", "Nishit, you shit",
        ] {
            assert!(flagged(text), "{text}");
        }
    }
}
