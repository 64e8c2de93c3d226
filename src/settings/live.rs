//! The settings that change while the daemon runs: `[generation]` and
//! `[safety]`, replaced whole on SIGHUP.
//!
//! [`LiveSettings`] holds a `tokio::sync::watch` channel per section. The
//! pipeline reads the current value for each message (a message keeps the
//! settings it started with); the jobs' gate subscribes
//! ([`LiveSettings::watch_generation`], [`LiveSettings::watch_safety`]) so
//! probes sample and are judged as served replies are.

use std::sync::Arc;

use tokio::sync::watch;

use super::{GenerationSettings, SafetySettings};

/// The live `[generation]` and `[safety]` settings. Share it in an `Arc`.
#[derive(Debug)]
pub struct LiveSettings {
    generation: watch::Sender<Arc<GenerationSettings>>,
    safety: watch::Sender<Arc<SafetySettings>>,
}

impl LiveSettings {
    pub fn new(generation: GenerationSettings, safety: SafetySettings) -> Self {
        Self { generation: watch::Sender::new(Arc::new(generation)), safety: watch::Sender::new(Arc::new(safety)) }
    }

    /// The generation settings now in force.
    pub fn generation(&self) -> Arc<GenerationSettings> {
        self.generation.borrow().clone()
    }

    /// Replaces the generation settings; work already started keeps the
    /// ones it read.
    pub fn set_generation(&self, generation: GenerationSettings) {
        self.generation.send_replace(Arc::new(generation));
    }

    /// The safety settings now in force.
    pub fn safety(&self) -> Arc<SafetySettings> {
        self.safety.borrow().clone()
    }

    /// Replaces the safety settings (policies, notice, blocked words).
    pub fn set_safety(&self, safety: SafetySettings) {
        self.safety.send_replace(Arc::new(safety));
    }

    /// A receiver that always sees the newest generation settings.
    pub fn watch_generation(&self) -> watch::Receiver<Arc<GenerationSettings>> {
        self.generation.subscribe()
    }

    /// A receiver that always sees the newest safety settings.
    pub fn watch_safety(&self) -> watch::Receiver<Arc<SafetySettings>> {
        self.safety.subscribe()
    }
}
