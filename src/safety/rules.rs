//! The offline rule filter: `rustrict`'s analysis in dialogd's categories.
//!
//! rustrict (MIT OR Apache-2.0) matches a curated word list through
//! look-alike characters, leetspeak, separators and repeated letters, and
//! carries a list of innocent words that contain bad ones ("Scunthorpe",
//! "assassin", "cocktail"). It answers a set of categories with three
//! severities each; [`RuleFilter::analyze`] turns that into [`Hit`]s.

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

/// The rule-based filter (stateless; cheap to clone and share).
#[derive(Debug, Clone, Copy, Default)]
pub struct RuleFilter;

impl RuleFilter {
    /// Every category rustrict finds in `text`, with its severity.
    pub fn analyze(&self, text: &str) -> Vec<Hit> {
        let typ = Censor::from_str(text).analyze();
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
}
