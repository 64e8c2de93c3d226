//! Personas: which one a channel speaks as, what each one serves, and the
//! prompt a persona's seed turns make.
//!
//! A persona is a name, an optional LoRA adapter and optional seed turns
//! placed before the context. The operator defines some in `[personas]`;
//! moderators create more with `/persona create`. Created personas and
//! each channel's or server's choice live in a [`PersonaStore`]: Redis
//! ([`redis::RedisPersonaStore`]) whenever `context.store = "redis"`, so
//! choices survive restarts and every daemon on that Redis agrees; memory
//! ([`memory::MemoryPersonaStore`]) otherwise. A channel's persona is the
//! one chosen for the channel, else the one chosen for its server, else
//! `personas.default`. What a persona serves — its configured adapter or
//! the newest promoted job's — is set by the job runner as versions change.
//!
//! With `[generation] backend = "redis"` ([`Personas::set_blobs`]) each
//! adapter the daemon loads is also stored in Redis as a blob named by its
//! content's hash ([`crate::remote::blobs`]), and that id, never the
//! folder, goes to the workers with each request.
//!
//! [`persona_prompt`] is the one place a persona's prompt is built: serving
//! and the jobs' promotion gate both call it, so the gate tests what users
//! get.

pub mod memory;
pub mod redis;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use dialogd_adapters::{BoxFuture, ChannelKey};

use crate::model::{Gpt2Config, LoraRuntime};
use crate::prompt::{build_prompt, Prompt, PromptError};
use crate::settings::{persona_name_ok, PersonaSettings, PersonaSpec};
use crate::tokenizer::DialogTokenizer;

/// The longest seed turn a moderator may give, in bytes.
pub const MAX_SEED_BYTES: usize = 2000;

/// Why a persona operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PersonaError {
    /// The store could not be read or written (Redis away, corrupt data).
    #[error("persona store: {0}")]
    Store(String),
    /// A request the rules refuse; the message is for the user.
    #[error("{0}")]
    Refused(String),
}

/// Where created personas and choices are kept. Implementations: Redis
/// and memory; the same behaviour (tested against both).
pub trait PersonaStore: Send + Sync + 'static {
    /// Every persona moderators created, in no particular order.
    fn created(&self) -> BoxFuture<'_, Result<Vec<PersonaSpec>, PersonaError>>;
    /// Creates or replaces a persona by name.
    fn put(&self, spec: PersonaSpec) -> BoxFuture<'_, Result<(), PersonaError>>;
    /// Chooses `name` for a scope (a channel `platform:id`, or a server,
    /// [`group_scope`]); `None` clears the choice.
    fn choose(&self, scope: &str, name: Option<&str>) -> BoxFuture<'_, Result<(), PersonaError>>;
    /// The choice of each scope, in order.
    fn chosen(&self, scopes: &[String]) -> BoxFuture<'_, Result<Vec<Option<String>>, PersonaError>>;
}

/// A persona's prompt: each seed turn then each context turn, every one
/// followed by `<|endoftext|>`. The seed turns are always kept; the
/// context (oldest turns dropped first, see [`build_prompt`]) gets what
/// they leave of `budget` tokens.
///
/// `turns` are the context's encoded turns, oldest first, the user's new
/// message last. Errors: the budget leaves no room for the last turn.
pub fn persona_prompt(tokenizer: &DialogTokenizer, seed: &[String], turns: &[Vec<u32>], budget: usize) -> Result<Prompt, PromptError> {
    let mut seed_ids = Vec::new();
    for turn in seed {
        if let Ok(ids) = tokenizer.encode(&crate::prompt::normalize_turn(turn)) {
            seed_ids.extend(ids);
            seed_ids.push(tokenizer.eos_id());
        }
    }
    let mut prompt = build_prompt(turns, tokenizer.eos_id(), budget.saturating_sub(seed_ids.len()))?;
    if !seed_ids.is_empty() {
        seed_ids.extend_from_slice(&prompt.ids);
        prompt.ids = seed_ids;
    }
    Ok(prompt)
}

/// A persona's adapter as generation takes it.
#[derive(Debug, Clone)]
pub struct PersonaAdapter {
    /// Loaded for the served model (what a local pool applies).
    pub runtime: Arc<LoraRuntime>,
    /// Its blob's id in Redis, for workers (`backend = "redis"`); `None`
    /// where adapters are not shipped, or storing it failed (logged).
    pub blob: Option<String>,
}

/// A persona ready to answer: seed turns and the adapter to apply.
#[derive(Debug, Clone)]
pub struct ActivePersona {
    pub name: String,
    pub seed: Vec<String>,
    /// The adapter folder served (configured, or the promoted job's).
    pub adapter_dir: Option<PathBuf>,
    /// That adapter, loaded for the served model (`None` when there is no
    /// adapter, or it could not be loaded: then the base model answers).
    pub adapter: Option<PersonaAdapter>,
    /// The promoted job it serves, if any.
    pub version: Option<u64>,
}

/// What a persona serves now.
#[derive(Debug, Clone, Default)]
struct Served {
    version: Option<u64>,
    adapter_dir: Option<PathBuf>,
}

/// The registry the pipeline and the runner share.
pub struct Personas {
    /// Created personas and every scope's choice (Redis, or memory).
    store: Arc<dyn PersonaStore>,
    settings: PersonaSettings,
    /// Promoted versions, set by the runner. A std lock: never held across
    /// an await.
    served: RwLock<HashMap<String, Served>>,
    /// The served model's shape and device, which adapters are loaded for;
    /// unset (the command line): adapters are not loaded.
    model: RwLock<Option<(Gpt2Config, candle_core::Device)>>,
    /// Loaded adapters by folder; a folder that failed to load maps to
    /// `None` (logged once, not retried on every message).
    adapters: RwLock<HashMap<PathBuf, Option<PersonaAdapter>>>,
    /// Where adapters are stored for workers (`backend = "redis"`).
    blobs: RwLock<Option<crate::remote::blobs::AdapterBlobs>>,
}

impl std::fmt::Debug for Personas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Personas").field("default", &self.settings.default).finish_non_exhaustive()
    }
}

/// The scope key of a server (Discord guild): `platform:group:ID`.
pub fn group_scope(channel: &ChannelKey, group: &str) -> String {
    format!("{}:group:{group}", channel.platform.as_str())
}

/// The scope a channel's moderators act for: its server (a Discord guild,
/// [`group_scope`]), else for Telegram the chat (a forum topic's channel
/// is `chat:topic`; its chat's moderators are the same), else the channel.
/// Word lists are kept per such scope, and personas belong to the scope
/// that created them.
pub fn moderation_scope(channel: &ChannelKey, group: Option<&str>) -> String {
    match group {
        Some(group) => group_scope(channel, group),
        None if channel.platform == dialogd_adapters::Platform::Telegram => {
            let chat = channel.channel_id.split_once(':').map_or(channel.channel_id.as_str(), |(chat, _topic)| chat);
            format!("{}:{chat}", channel.platform.as_str())
        }
        None => channel.to_string(),
    }
}

impl Personas {
    /// The registry over `store`, with the operator's `[personas]`.
    pub fn new(settings: PersonaSettings, store: Arc<dyn PersonaStore>) -> Arc<Self> {
        Arc::new(Self {
            store,
            settings,
            served: RwLock::new(HashMap::new()),
            model: RwLock::new(None),
            adapters: RwLock::new(HashMap::new()),
            blobs: RwLock::new(None),
        })
    }

    /// Stores every adapter loaded from now on in Redis for the workers
    /// (the daemon, with `backend = "redis"`).
    pub fn set_blobs(&self, blobs: crate::remote::blobs::AdapterBlobs) {
        *self.blobs.write().unwrap_or_else(|e| e.into_inner()) = Some(blobs);
        self.adapters.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Loads (and, with [`Self::set_blobs`], stores in Redis) the adapter
    /// of every persona of the settings file, so workers can serve them
    /// from the first request; failures are logged.
    pub async fn load_defined(&self) {
        for dir in self.settings.defined.iter().filter_map(|p| p.adapter.clone()) {
            self.adapter(&dir).await;
        }
    }

    /// Sets the model adapters are loaded for (the daemon, at start).
    pub fn set_model(&self, config: Gpt2Config, device: candle_core::Device) {
        *self.model.write().unwrap_or_else(|e| e.into_inner()) = Some((config, device));
        self.adapters.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The adapter in `dir`, loaded once (on a blocking thread) and cached;
    /// with [`Self::set_blobs`], stored in Redis too (a failed store is
    /// logged and tried again at the next use).
    pub async fn adapter(&self, dir: &std::path::Path) -> Option<PersonaAdapter> {
        if let Some(cached) = self.adapters.read().unwrap_or_else(|e| e.into_inner()).get(dir) {
            return cached.clone();
        }
        let (config, device) = self.model.read().unwrap_or_else(|e| e.into_inner()).clone()?;
        let path = dir.to_path_buf();
        let loaded = tokio::task::spawn_blocking(move || crate::training::lora::load_runtime_on(&path, &config, &device))
            .await
            .map_err(|e| e.to_string())
            .and_then(|loaded| loaded.map_err(|e| e.to_string()));
        let runtime = match loaded {
            Ok(runtime) => {
                tracing::info!(adapter = %dir.display(), rank = runtime.rank(), "persona adapter loaded");
                Arc::new(runtime)
            }
            Err(e) => {
                tracing::error!(adapter = %dir.display(), error = %e, "cannot load a persona adapter; the persona answers with the base model");
                self.adapters.write().unwrap_or_else(|e| e.into_inner()).insert(dir.to_path_buf(), None);
                return None;
            }
        };
        let blobs = self.blobs.read().unwrap_or_else(|e| e.into_inner()).clone();
        let (blob, keep) = match blobs {
            None => (None, true),
            Some(blobs) => match blobs.publish(dir).await {
                Ok(id) => (Some(id), true),
                Err(e) => {
                    tracing::error!(adapter = %dir.display(), error = %e, "cannot store a persona adapter for the workers; its replies fail until it is stored");
                    (None, false)
                }
            },
        };
        let adapter = PersonaAdapter { runtime, blob };
        if keep {
            self.adapters.write().unwrap_or_else(|e| e.into_inner()).insert(dir.to_path_buf(), Some(adapter.clone()));
        }
        Some(adapter)
    }

    /// Every persona: the configured ones, then those moderators created.
    pub async fn all(&self) -> Result<Vec<PersonaSpec>, PersonaError> {
        let mut all = self.settings.defined.clone();
        let mut created = self.store.created().await?;
        created.sort_by(|a, b| a.name.cmp(&b.name));
        all.extend(created.into_iter().filter(|p| !self.settings.defined.iter().any(|d| d.name == p.name)));
        Ok(all)
    }

    pub async fn get(&self, name: &str) -> Result<Option<PersonaSpec>, PersonaError> {
        Ok(self.all().await?.into_iter().find(|p| p.name == name))
    }

    /// Creates (or, for one created before in the same `scope`, replaces)
    /// a persona with seed turns and no adapter until a job trains one.
    /// Configured personas, and those another channel or server created,
    /// cannot be replaced.
    pub async fn create(&self, name: &str, seed: Vec<String>, scope: &str) -> Result<PersonaSpec, PersonaError> {
        if !persona_name_ok(name) {
            return Err(PersonaError::Refused(format!("{name:?} is not a persona name: use 1-32 of a-z, 0-9, _ and -")));
        }
        if self.settings.defined.iter().any(|d| d.name == name) {
            return Err(PersonaError::Refused(format!("{name} is defined in the settings; choose another name")));
        }
        if seed.iter().any(|s| s.len() > MAX_SEED_BYTES) {
            return Err(PersonaError::Refused(format!("a seed turn may have at most {MAX_SEED_BYTES} bytes")));
        }
        let mut shared = false;
        if let Some(existing) = self.get(name).await? {
            if existing.created_in.as_deref() != Some(scope) {
                return Err(PersonaError::Refused(format!("{name} belongs to another chat or server; choose another name")));
            }
            shared = existing.shared;
        }
        let spec = PersonaSpec { name: name.to_string(), adapter: None, seed, created_in: Some(scope.to_string()), shared };
        self.store.put(spec.clone()).await?;
        Ok(spec)
    }

    /// Chooses a persona for a scope (a channel, `platform:id`, or a server,
    /// [`group_scope`]) on behalf of the moderators of `by`
    /// ([`moderation_scope`]); `None` goes back to the default. Refused: no
    /// such persona, or another scope's that is not shared.
    pub async fn choose(&self, scope: &str, name: Option<&str>, by: &str) -> Result<(), PersonaError> {
        if let Some(name) = name {
            match self.get(name).await? {
                None => return Err(PersonaError::Refused(format!("there is no persona {name:?} (/persona list shows them)"))),
                Some(spec) if !spec.usable_in(by) => {
                    return Err(PersonaError::Refused(format!(
                        "{name} belongs to another chat or server and is not shared: only its moderators can let others use it (/persona share {name})"
                    )))
                }
                Some(_) => {}
            }
        }
        self.store.choose(scope, name).await
    }

    /// Marks a persona shared (other scopes may use it) or not, for the
    /// moderators of `by` (an operator when `operator`). Refused: no such
    /// persona, an operator persona, or another scope's.
    pub async fn share(&self, name: &str, shared: bool, by: &str, operator: bool) -> Result<PersonaSpec, PersonaError> {
        let Some(mut spec) = self.get(name).await? else {
            return Err(PersonaError::Refused(format!("there is no persona {name:?} (/persona list shows them)")));
        };
        if spec.created_in.is_none() {
            return Err(PersonaError::Refused(format!("{name} is the operator's: every chat may use it already")));
        }
        if !spec.managed_by(by, operator) {
            return Err(PersonaError::Refused(format!("{name} belongs to another chat or server: only its moderators can share it")));
        }
        spec.shared = shared;
        self.store.put(spec.clone()).await?;
        Ok(spec)
    }

    /// Whether the moderators of `by` (an operator when `operator`) may
    /// train or roll back `name`; `Err(Refused)` says why not.
    pub async fn may_manage(&self, name: &str, by: &str, operator: bool) -> Result<(), PersonaError> {
        match self.get(name).await? {
            None => Err(PersonaError::Refused(format!("there is no persona {name:?} (/persona list shows them)"))),
            Some(spec) if spec.managed_by(by, operator) => Ok(()),
            Some(spec) if spec.created_in.is_none() => {
                Err(PersonaError::Refused(format!("{name} is the operator's persona: only an operator can train it or roll it back")))
            }
            Some(_) => Err(PersonaError::Refused(format!(
                "{name} belongs to another chat or server: only its moderators can train it or roll it back"
            ))),
        }
    }

    /// `[personas] default`: the persona of a channel nobody chose one
    /// for, if any.
    pub fn default_name(&self) -> Option<&str> {
        Some(self.settings.default.as_str()).filter(|d| !d.is_empty())
    }

    /// The name of the persona a channel speaks as, if any.
    pub async fn chosen(&self, channel: &ChannelKey, group: Option<&str>) -> Result<Option<String>, PersonaError> {
        let mut scopes = vec![channel.to_string()];
        if let Some(group) = group {
            scopes.push(group_scope(channel, group));
        }
        let chosen = self.store.chosen(&scopes).await?;
        Ok(chosen.into_iter().flatten().next().or(self.default_name().map(String::from)))
    }

    /// The persona a channel speaks as, ready to use. A persona that no
    /// longer exists, or that its owners stopped sharing, is treated as
    /// none.
    pub async fn for_channel(&self, channel: &ChannelKey, group: Option<&str>) -> Result<Option<ActivePersona>, PersonaError> {
        let Some(name) = self.chosen(channel, group).await? else { return Ok(None) };
        let Some(spec) = self.get(&name).await? else { return Ok(None) };
        if !spec.usable_in(&moderation_scope(channel, group)) {
            tracing::debug!(%channel, persona = %name, "the persona chosen here is another scope's and no longer shared");
            return Ok(None);
        }
        self.named(&name).await
    }

    /// The persona `name`, ready to use; `None` when there is no such
    /// persona.
    pub async fn named(&self, name: &str) -> Result<Option<ActivePersona>, PersonaError> {
        let Some(spec) = self.get(name).await? else { return Ok(None) };
        let served = self.served.read().unwrap_or_else(|e| e.into_inner()).get(&spec.name).cloned().unwrap_or_default();
        let adapter_dir = served.adapter_dir.or(spec.adapter);
        let adapter = match &adapter_dir {
            Some(dir) => self.adapter(dir).await,
            None => None,
        };
        Ok(Some(ActivePersona { adapter_dir, adapter, version: served.version, name: spec.name, seed: spec.seed }))
    }

    /// Records what a persona serves (the runner, on promotion or
    /// rollback); `version` `None` with no folder: back to the configured
    /// adapter.
    pub fn set_served(&self, name: &str, version: Option<u64>, adapter_dir: Option<PathBuf>) {
        let mut served = self.served.write().unwrap_or_else(|e| e.into_inner());
        served.insert(name.to_string(), Served { version, adapter_dir });
    }

    /// The promoted version a persona serves now, as last set.
    pub fn served_version(&self, name: &str) -> Option<u64> {
        self.served.read().unwrap_or_else(|e| e.into_inner()).get(name).and_then(|s| s.version)
    }
}
