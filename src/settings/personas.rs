//! `[personas]`: the personas the operator defines, and what a persona is.

use serde::{Deserialize, Serialize};

use super::{invalid, SettingsError};

/// `[personas]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPersonas {
    pub default: String,
    pub defined: Vec<RawPersona>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPersona {
    pub name: String,
    #[serde(default)]
    pub adapter: String,
    #[serde(default)]
    pub seed: Vec<String>,
}

/// `[personas]`: personas the operator defines; moderators add more.
#[derive(Debug, Clone, Serialize)]
pub struct PersonaSettings {
    /// The persona of channels where none was chosen (empty: none).
    pub default: String,
    pub defined: Vec<PersonaSpec>,
}

/// A persona: a name, an optional LoRA adapter, optional seed turns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonaSpec {
    pub name: String,
    /// A PEFT adapter folder; `None`: the base model.
    #[serde(default)]
    pub adapter: Option<std::path::PathBuf>,
    /// Turns placed before every conversation's context, oldest first.
    #[serde(default)]
    pub seed: Vec<String>,
    /// Where a moderator created it (a channel, or a server's scope); only
    /// moderators there may replace it. `None`: defined in the settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_in: Option<String>,
    /// Whether its owners let other scopes use it (`/persona share`).
    /// Operator personas (`created_in` `None`) are for everyone anyway.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
}

impl PersonaSpec {
    /// Whether moderators acting for `scope` may speak as it: an operator
    /// persona (defined in the settings, or created before personas had
    /// owners), a shared one, or their own.
    pub fn usable_in(&self, scope: &str) -> bool {
        self.created_in.as_deref().is_none_or(|owner| self.shared || owner == scope)
    }

    /// Whether moderators acting for `scope` (an operator when `operator`)
    /// may train it, roll it back, replace it or share it: its owners, or
    /// an operator. Operator personas only an operator.
    pub fn managed_by(&self, scope: &str, operator: bool) -> bool {
        operator || self.created_in.as_deref() == Some(scope)
    }
}

/// Whether a persona name is acceptable: 1-32 of `a-z 0-9 _ -`.
pub fn persona_name_ok(name: &str) -> bool {
    (1..=32).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl RawPersonas {
    pub(super) fn validate(self) -> Result<PersonaSettings, SettingsError> {
        let mut defined: Vec<PersonaSpec> = Vec::new();
        for p in self.defined {
            if !persona_name_ok(&p.name) {
                return Err(invalid("personas.defined", format!("{:?} is not a persona name (1-32 of a-z, 0-9, _ and -)", p.name)));
            }
            if defined.iter().any(|d| d.name == p.name) {
                return Err(invalid("personas.defined", format!("{:?} is defined twice", p.name)));
            }
            if let Some(s) = p.seed.iter().find(|s| s.trim().is_empty() || s.len() > 2000) {
                return Err(invalid("personas.defined", format!("{}: seed turn {s:?} must be 1-2000 bytes", p.name)));
            }
            let adapter = (!p.adapter.trim().is_empty()).then(|| std::path::PathBuf::from(p.adapter.trim()));
            defined.push(PersonaSpec { name: p.name, adapter, seed: p.seed, created_in: None, shared: false });
        }
        if !self.default.is_empty() && !defined.iter().any(|d| d.name == self.default) {
            return Err(invalid("personas.default", format!("{:?} is not in personas.defined", self.default)));
        }
        Ok(PersonaSettings { default: self.default, defined })
    }
}
