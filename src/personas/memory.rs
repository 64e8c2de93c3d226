//! Personas kept in memory: for `context.store = "memory"` (the command
//! line and tests); gone when the process ends.

use std::collections::HashMap;
use std::sync::RwLock;

use dialogd_adapters::BoxFuture;

use super::{PersonaError, PersonaStore};
use crate::settings::PersonaSpec;

/// Created personas and choices in maps. A std lock: never held across an
/// await.
#[derive(Debug, Default)]
pub struct MemoryPersonaStore {
    created: RwLock<HashMap<String, PersonaSpec>>,
    choices: RwLock<HashMap<String, String>>,
}

impl MemoryPersonaStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl PersonaStore for MemoryPersonaStore {
    fn created(&self) -> BoxFuture<'_, Result<Vec<PersonaSpec>, PersonaError>> {
        let all = self.created.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        Box::pin(async move { Ok(all) })
    }

    fn put(&self, spec: PersonaSpec) -> BoxFuture<'_, Result<(), PersonaError>> {
        self.created.write().unwrap_or_else(|e| e.into_inner()).insert(spec.name.clone(), spec);
        Box::pin(async { Ok(()) })
    }

    fn choose(&self, scope: &str, name: Option<&str>) -> BoxFuture<'_, Result<(), PersonaError>> {
        let mut choices = self.choices.write().unwrap_or_else(|e| e.into_inner());
        match name {
            Some(name) => choices.insert(scope.to_string(), name.to_string()),
            None => choices.remove(scope),
        };
        Box::pin(async { Ok(()) })
    }

    fn chosen(&self, scopes: &[String]) -> BoxFuture<'_, Result<Vec<Option<String>>, PersonaError>> {
        let choices = self.choices.read().unwrap_or_else(|e| e.into_inner());
        let chosen = scopes.iter().map(|s| choices.get(s).cloned()).collect();
        Box::pin(async move { Ok(chosen) })
    }
}
