//! The daemon's settings: layered raw values, validated into typed settings.
//!
//! Two stages, as in ripgrep's flags: [`load_raw`] layers
//! `config/default.toml` (built in), the operator's file and `DIALOGD__…`
//! environment variables with the `config` crate into [`RawSettings`]
//! (unknown keys are errors); [`RawSettings::validate`] turns them into
//! [`Settings`], with an error naming the key for every bad value. Secrets
//! are [`Secret`]s: they print as `[redacted]` everywhere.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use crate::sampling::SamplingParams;

/// The documented defaults, the bottom settings layer.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Settings failures; every one names the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{path}: no such settings file")]
    MissingFile { path: String },
    /// A parse or layering error from the config crate (it names the key).
    #[error("settings: {0}")]
    Layer(#[from] config::ConfigError),
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid { key, message: message.into() }
}

/// A secret value (a token, a password): never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

// ---- raw layer: what the files and environment say ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    pub model: RawModel,
    pub generation: RawGeneration,
    pub context: RawContext,
    pub adapters: RawAdapters,
    pub rate_limit: RawRateLimit,
    pub telemetry: RawTelemetry,
    pub daemon: RawDaemon,
    pub safety: RawSafety,
    pub ranking: RawRanking,
    pub collect: RawCollect,
    pub jobs: RawJobs,
    pub personas: RawPersonas,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJobs {
    pub enabled: bool,
    pub dir: String,
    pub trainer: String,
    pub device: String,
    pub mode: String,
    pub lora_rank: usize,
    pub steps: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub eval_fraction: f64,
    pub checkpoint_every: usize,
    pub min_examples: usize,
    pub max_ppl_regression: f64,
    pub probes: Vec<String>,
    pub max_attempts: u32,
    pub poll_ms: u64,
    pub schedules: Vec<RawSchedule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSchedule {
    pub name: String,
    pub cron: String,
    #[serde(default)]
    pub persona: String,
    #[serde(default)]
    pub channels: Vec<String>,
}

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub per_user: u32,
    pub per_channel: u32,
    pub window_secs: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub path: String,
    pub device: String,
    pub dtype: String,
    pub quantize: String,
    pub kv_cache: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGeneration {
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub no_repeat_ngram: usize,
    pub candidates: usize,
    pub queue_depth: usize,
    pub max_batch: usize,
    pub max_prefill_tokens: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSafety {
    pub policy: String,
    pub channels: std::collections::BTreeMap<String, String>,
    pub toxic_input: String,
    pub notice: String,
    pub blocked_words: Vec<String>,
    pub max_attempts: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCollect {
    pub enabled: bool,
    pub dir: String,
    pub channels: Vec<String>,
    pub segment_max_bytes: u64,
    pub segment_max_secs: u64,
    pub retention_days: u64,
    pub author_key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRanking {
    pub rankers: Vec<String>,
    pub mmi: String,
    pub dialogrpt_weight: f64,
    pub generator_weight: f64,
    pub mmi_weight: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawContext {
    pub store: String,
    pub redis_url: String,
    pub key_prefix: String,
    pub max_turns: usize,
    pub max_tokens: usize,
    pub ttl_secs: u64,
    pub redis_timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdapters {
    pub http: RawHttp,
    pub console: RawConsole,
    pub discord: RawDiscord,
    pub telegram: RawTelegram,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    pub enabled: bool,
    pub listen: String,
    pub token: String,
    pub max_body_bytes: usize,
    pub header_timeout_secs: u64,
    pub body_timeout_secs: u64,
    pub max_connections: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsole {
    pub enabled: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscord {
    pub enabled: bool,
    pub token: String,
    pub proxy_url: String,
    pub allowed_guilds: Vec<u64>,
    pub allowed_channels: Vec<u64>,
    pub open_channels: Vec<u64>,
    pub command_guilds: Vec<u64>,
    pub moderator_roles: Vec<u64>,
    pub moderators: Vec<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelegram {
    pub enabled: bool,
    pub token: String,
    pub api_url: String,
    pub moderators: Vec<u64>,
    pub poll_timeout_secs: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    pub log_format: String,
    pub log_filter: String,
    pub metrics_listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    pub drain_secs: u64,
}

/// Layers the built-in defaults, `file` (when given) and the process's
/// `DIALOGD__…` environment variables.
pub fn load_raw(file: Option<&Path>) -> Result<RawSettings, SettingsError> {
    load_raw_with_env(file, std::env::vars())
}

/// [`load_raw`] with the environment given explicitly (for tests).
pub fn load_raw_with_env(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<RawSettings, SettingsError> {
    let mut builder =
        config::Config::builder().add_source(config::File::from_str(DEFAULT_TOML, config::FileFormat::Toml));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(SettingsError::MissingFile { path: path.display().to_string() });
        }
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml).required(true));
    }
    let env: config::Map<String, String> =
        env.into_iter().filter(|(k, _)| k.starts_with("DIALOGD__")).collect();
    builder = builder.add_source(
        config::Environment::with_prefix("DIALOGD").prefix_separator("__").separator("__").source(Some(env)),
    );
    Ok(builder.build()?.try_deserialize()?)
}

/// Loads and validates in one step.
pub fn load(file: Option<&Path>) -> Result<Settings, SettingsError> {
    load_raw(file)?.validate()
}

// ---- typed layer: what the daemon runs with ----

/// Validated settings.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub model: ModelSettings,
    pub generation: GenerationSettings,
    pub context: ContextSettings,
    pub adapters: AdapterSettings,
    pub rate_limit: RateLimitSettings,
    pub telemetry: TelemetrySettings,
    pub daemon: DaemonSettings,
    pub safety: SafetySettings,
    pub ranking: RankingSettings,
    pub collect: CollectSettings,
    pub jobs: JobSettings,
    pub personas: PersonaSettings,
}

/// What a job trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainMode {
    /// A persona's LoRA adapter.
    Lora,
    /// Every weight: a new base checkpoint.
    Full,
}

/// `[jobs]`: fine-tuning jobs (moderators' `/train`, `dialogd jobs`,
/// schedules), run as child processes, promoted through a gate.
#[derive(Debug, Clone, Serialize)]
pub struct JobSettings {
    pub enabled: bool,
    /// One folder per job under this.
    pub dir: std::path::PathBuf,
    /// The program run as `TRAINER train …`; `None`: this executable.
    #[serde(serialize_with = "serialize_opt_path")]
    pub trainer: Option<std::path::PathBuf>,
    /// The device jobs train on (one job at a time per device).
    pub device: String,
    pub mode: TrainMode,
    pub lora_rank: usize,
    pub steps: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub eval_fraction: f64,
    pub checkpoint_every: usize,
    /// A job with fewer collected exchanges fails at once.
    pub min_examples: usize,
    /// Gate: allowed relative rise of held-out perplexity.
    pub max_ppl_regression: f64,
    /// Gate: prompts the new model must answer with a non-empty reply that
    /// passes the safety filter.
    pub probes: Vec<String>,
    /// Tries of a job whose trainer was killed (each resumes).
    pub max_attempts: u32,
    #[serde(rename = "poll_ms", serialize_with = "serialize_millis")]
    pub poll: Duration,
    pub schedules: Vec<Schedule>,
}

/// One `[[jobs.schedules]]` entry.
#[derive(Debug, Clone, Serialize)]
pub struct Schedule {
    pub name: String,
    #[serde(serialize_with = "display")]
    pub cron: crate::jobs::cron::Cron,
    /// The persona trained (LoRA mode); empty: the base model (full mode).
    pub persona: String,
    /// Channels whose collected exchanges are used; empty: all.
    pub channels: Vec<String>,
}

fn serialize_opt_path<S: Serializer>(path: &Option<std::path::PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&path.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
}

fn display<T: fmt::Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&value.to_string())
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
}

/// Whether a persona name is acceptable: 1-32 of `a-z 0-9 _ -`.
pub fn persona_name_ok(name: &str) -> bool {
    (1..=32).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// `[collect]`: consented log collection for fine-tuning.
#[derive(Debug, Clone, Serialize)]
pub struct CollectSettings {
    pub enabled: bool,
    pub dir: std::path::PathBuf,
    /// Opted-in channels, `platform:channel_id`.
    pub channels: Vec<String>,
    pub segment_max_bytes: u64,
    pub segment_max_secs: u64,
    /// Segments older than this are deleted (0: kept forever).
    pub retention_days: u64,
    /// The key of the authors' keyed hash (a secret).
    pub author_key: Secret,
}

/// What happens to a message that fails the input filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ToxicInput {
    /// Answer with `safety.notice`.
    Notice,
    /// Say nothing.
    Silent,
}

/// `[safety]`: the toxicity filter on the way in and out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SafetySettings {
    pub policy: crate::safety::Policy,
    /// Per-channel policies, keyed `platform:channel_id`.
    pub channels: std::collections::BTreeMap<String, crate::safety::Policy>,
    pub toxic_input: ToxicInput,
    pub notice: String,
    /// Words blocked everywhere (moderators' lists add to these).
    pub blocked_words: Vec<String>,
    /// Rounds of candidates drawn before the bot gives up and stays silent.
    pub max_attempts: usize,
}

impl SafetySettings {
    pub fn policy_for(&self, channel: &str) -> crate::safety::Policy {
        self.channels.get(channel).copied().unwrap_or(self.policy)
    }
}

/// `[ranking]`: DialogRPT ensemble and MMI reranking of candidates.
#[derive(Debug, Clone, Serialize)]
pub struct RankingSettings {
    /// `[HEAD=]DIR[:WEIGHT]` per ranker; empty: no DialogRPT.
    pub rankers: Vec<String>,
    /// Reverse model folder for MMI; empty: off.
    pub mmi: String,
    pub dialogrpt_weight: f64,
    pub generator_weight: f64,
    pub mmi_weight: f64,
}

impl RankingSettings {
    pub fn weights(&self) -> crate::ranking::Weights {
        crate::ranking::Weights { dialogrpt: self.dialogrpt_weight, generator: self.generator_weight, mmi: self.mmi_weight }
    }
}

/// Per-user and per-channel limits on messages that reach generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLimitSettings {
    /// Messages per user per window (0: no limit).
    pub per_user: u32,
    /// Messages per channel per window (0: no limit).
    pub per_channel: u32,
    #[serde(rename = "window_secs", serialize_with = "serialize_secs")]
    pub window: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelSettings {
    pub path: String,
    pub device: String,
    pub dtype: String,
    /// `none` or `q8` (see [`crate::model::ServingOptions`]).
    pub quantize: String,
    /// `auto`, `f32` or `f16`.
    pub kv_cache: String,
}

/// The settings SIGHUP can change live.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationSettings {
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub no_repeat_ngram: usize,
    pub candidates: usize,
    pub queue_depth: usize,
    pub max_batch: usize,
    pub max_prefill_tokens: usize,
}

impl GenerationSettings {
    /// Sampling parameters for one reply (a fresh seed each time).
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram: self.no_repeat_ngram,
            min_new_tokens: 0,
            max_new_tokens: self.max_new_tokens,
            seed: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Redis,
    Memory,
}

#[derive(Debug, Clone, Serialize)]
pub struct ContextSettings {
    pub store: StoreKind,
    /// May hold a password, so it is a secret; [`redact_url`] shows it.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub redis_url: Secret,
    pub key_prefix: String,
    pub max_turns: usize,
    pub max_tokens: usize,
    /// `None`: contexts never expire.
    #[serde(rename = "ttl_secs", serialize_with = "serialize_opt_secs")]
    pub ttl: Option<Duration>,
    #[serde(rename = "redis_timeout_ms", serialize_with = "serialize_millis")]
    pub redis_timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdapterSettings {
    pub http: HttpSettings,
    pub console: ConsoleSettings,
    pub discord: DiscordSettings,
    pub telegram: TelegramSettings,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpSettings {
    pub enabled: bool,
    pub listen: SocketAddr,
    #[serde(serialize_with = "serialize_opt_secret")]
    pub token: Option<Secret>,
    pub max_body_bytes: usize,
    #[serde(rename = "header_timeout_secs", serialize_with = "serialize_secs")]
    pub header_timeout: Duration,
    #[serde(rename = "body_timeout_secs", serialize_with = "serialize_secs")]
    pub body_timeout: Duration,
    pub max_connections: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConsoleSettings {
    pub enabled: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiscordSettings {
    pub enabled: bool,
    #[serde(serialize_with = "serialize_opt_secret")]
    pub token: Option<Secret>,
    /// A REST proxy for every API call (empty: none).
    pub proxy_url: String,
    pub allowed_guilds: Vec<u64>,
    pub allowed_channels: Vec<u64>,
    pub open_channels: Vec<u64>,
    pub command_guilds: Vec<u64>,
    pub moderator_roles: Vec<u64>,
    pub moderators: Vec<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TelegramSettings {
    pub enabled: bool,
    #[serde(serialize_with = "serialize_opt_secret")]
    pub token: Option<Secret>,
    pub api_url: String,
    pub moderators: Vec<u64>,
    #[serde(rename = "poll_timeout_secs", serialize_with = "serialize_secs")]
    pub poll_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    pub log_filter: String,
    /// `None`: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DaemonSettings {
    #[serde(rename = "drain_secs", serialize_with = "serialize_secs")]
    pub drain: Duration,
}

fn serialize_redacted_url<S: Serializer>(url: &Secret, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url.expose()))
}

/// An unset secret shows as `""`, a set one as `[redacted]`.
fn serialize_opt_secret<S: Serializer>(secret: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(secret) => secret.serialize(s),
        None => s.serialize_str(""),
    }
}

fn serialize_opt_secs<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.map_or(0, |d| d.as_secs()))
}

fn serialize_secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

fn serialize_millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// A Redis URL with its secrets replaced (see [`crate::context::redis::redact_url`]).
pub fn redact_url(url: &str) -> String {
    crate::context::redis::redact_url(url)
}

fn secret(value: String) -> Option<Secret> {
    let value = value.trim().to_string();
    (!value.is_empty()).then_some(Secret(value))
}

fn socket_addr(key: &'static str, value: &str) -> Result<SocketAddr, SettingsError> {
    value.parse().map_err(|_| invalid(key, format!("{value:?} is not an address such as 127.0.0.1:8080")))
}

impl RawSettings {
    /// Checks every value; the first bad one is reported with its key.
    pub fn validate(self) -> Result<Settings, SettingsError> {
        let m = self.model;
        if m.path.trim().is_empty() {
            return Err(invalid("model.path", "must name a checkpoint folder or hub id"));
        }
        crate::model::parse_device(&m.device).map_err(|e| invalid("model.device", e.to_string()))?;
        if !["auto", "f32", "f16", "bf16"].contains(&m.dtype.as_str()) {
            return Err(invalid("model.dtype", format!("{:?} is not one of auto, f32, f16, bf16", m.dtype)));
        }
        if !["none", "q8"].contains(&m.quantize.as_str()) {
            return Err(invalid("model.quantize", format!("{:?} is not none or q8", m.quantize)));
        }
        if m.quantize == "q8" && (m.device != "cpu" || !["auto", "f32"].contains(&m.dtype.as_str())) {
            return Err(invalid("model.quantize", "q8 (8-bit weights) is a CPU option for f32 models: set model.device = \"cpu\" and model.dtype = \"auto\" or \"f32\""));
        }
        if !["auto", "f32", "f16", "q8"].contains(&m.kv_cache.as_str()) {
            return Err(invalid("model.kv_cache", format!("{:?} is not one of auto, f32, f16, q8", m.kv_cache)));
        }
        let generation = self.generation.validate()?;

        let c = self.context;
        let store = match c.store.as_str() {
            "redis" => StoreKind::Redis,
            "memory" => StoreKind::Memory,
            other => return Err(invalid("context.store", format!("{other:?} is not \"redis\" or \"memory\""))),
        };
        if store == StoreKind::Redis {
            redis_url_ok(&c.redis_url).map_err(|m| invalid("context.redis_url", m))?;
        }
        if c.key_prefix.is_empty() || c.key_prefix.contains(char::is_whitespace) {
            return Err(invalid("context.key_prefix", "must be a non-empty word without spaces"));
        }
        if c.max_turns == 0 || c.max_turns > 10_000 {
            return Err(invalid("context.max_turns", format!("{} is not in 1..=10000", c.max_turns)));
        }
        if c.max_tokens < 2 {
            return Err(invalid("context.max_tokens", "must be at least 2 (a turn and its separator)"));
        }
        if c.redis_timeout_ms == 0 {
            return Err(invalid("context.redis_timeout_ms", "must be at least 1"));
        }
        let store_is_redis = store == StoreKind::Redis;
        let context = ContextSettings {
            store,
            redis_url: Secret(c.redis_url),
            key_prefix: c.key_prefix,
            max_turns: c.max_turns,
            max_tokens: c.max_tokens,
            ttl: (c.ttl_secs > 0).then(|| Duration::from_secs(c.ttl_secs)),
            redis_timeout: Duration::from_millis(c.redis_timeout_ms),
        };

        let a = self.adapters;
        let http = HttpSettings {
            enabled: a.http.enabled,
            listen: socket_addr("adapters.http.listen", &a.http.listen)?,
            token: secret(a.http.token),
            max_body_bytes: a.http.max_body_bytes,
            header_timeout: Duration::from_secs(a.http.header_timeout_secs),
            body_timeout: Duration::from_secs(a.http.body_timeout_secs),
            max_connections: a.http.max_connections,
        };
        if http.max_body_bytes < 1024 {
            return Err(invalid("adapters.http.max_body_bytes", "must be at least 1024"));
        }
        for (key, secs) in [
            ("adapters.http.header_timeout_secs", a.http.header_timeout_secs),
            ("adapters.http.body_timeout_secs", a.http.body_timeout_secs),
        ] {
            if !(1..=3600).contains(&secs) {
                return Err(invalid(key, format!("{secs} is not in 1-3600")));
            }
        }
        if http.max_connections == 0 {
            return Err(invalid("adapters.http.max_connections", "must be at least 1"));
        }
        let d = a.discord;
        let discord = DiscordSettings {
            enabled: d.enabled,
            token: secret(d.token),
            proxy_url: d.proxy_url.trim().to_string(),
            allowed_guilds: d.allowed_guilds,
            allowed_channels: d.allowed_channels,
            open_channels: d.open_channels,
            command_guilds: d.command_guilds,
            moderator_roles: d.moderator_roles,
            moderators: d.moderators,
        };
        if discord.enabled && discord.token.is_none() {
            return Err(invalid(
                "adapters.discord.token",
                "the Discord adapter is enabled but has no token (set DIALOGD__ADAPTERS__DISCORD__TOKEN)",
            ));
        }
        if !(discord.proxy_url.is_empty() || discord.proxy_url.starts_with("http://") || discord.proxy_url.starts_with("https://")) {
            return Err(invalid("adapters.discord.proxy_url", "must be empty or an http(s) URL"));
        }
        let t = a.telegram;
        let telegram = TelegramSettings {
            enabled: t.enabled,
            token: secret(t.token),
            api_url: t.api_url.trim().trim_end_matches('/').to_string(),
            moderators: t.moderators,
            poll_timeout: Duration::from_secs(t.poll_timeout_secs),
        };
        if telegram.enabled && telegram.token.is_none() {
            return Err(invalid(
                "adapters.telegram.token",
                "the Telegram adapter is enabled but has no token (set DIALOGD__ADAPTERS__TELEGRAM__TOKEN)",
            ));
        }
        if !(telegram.api_url.starts_with("https://") || telegram.api_url.starts_with("http://")) {
            return Err(invalid("adapters.telegram.api_url", "must be an http(s) URL"));
        }
        // teloxide's HTTP client gives up on a request after 17 s.
        if !(1..=15).contains(&t.poll_timeout_secs) {
            return Err(invalid("adapters.telegram.poll_timeout_secs", format!("{} is not in 1..=15", t.poll_timeout_secs)));
        }
        let console = ConsoleSettings { enabled: a.console.enabled };
        if !(http.enabled || console.enabled || discord.enabled || telegram.enabled) {
            return Err(invalid(
                "adapters",
                "no adapter is enabled (adapters.http, adapters.console, adapters.discord, adapters.telegram)",
            ));
        }
        let r = self.rate_limit;
        if r.window_secs == 0 {
            return Err(invalid("rate_limit.window_secs", "must be at least 1"));
        }
        let rate_limit =
            RateLimitSettings { per_user: r.per_user, per_channel: r.per_channel, window: Duration::from_secs(r.window_secs) };

        let t = self.telemetry;
        let log_format = match t.log_format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(invalid("telemetry.log_format", format!("{other:?} is not \"text\" or \"json\""))),
        };
        tracing_subscriber::EnvFilter::try_new(&t.log_filter)
            .map_err(|e| invalid("telemetry.log_filter", e.to_string()))?;
        let metrics_listen = match t.metrics_listen.trim() {
            "" => None,
            addr => Some(socket_addr("telemetry.metrics_listen", addr)?),
        };
        if self.daemon.drain_secs == 0 {
            return Err(invalid("daemon.drain_secs", "must be at least 1"));
        }
        Ok(Settings {
            model: ModelSettings { path: m.path, device: m.device, dtype: m.dtype, quantize: m.quantize, kv_cache: m.kv_cache },
            generation,
            context,
            adapters: AdapterSettings { http, console, discord, telegram },
            rate_limit,
            telemetry: TelemetrySettings { log_format, log_filter: t.log_filter, metrics_listen },
            daemon: DaemonSettings { drain: Duration::from_secs(self.daemon.drain_secs) },
            safety: self.safety.validate()?,
            ranking: self.ranking.validate()?,
            collect: self.collect.validate()?,
            jobs: self.jobs.validate(store_is_redis)?,
            personas: self.personas.validate()?,
        })
    }
}

fn redis_url_ok(url: &str) -> Result<(), String> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://")) {
        return Err(format!("{:?} is not a redis://, rediss:// or unix:// URL", redact_url(url)));
    }
    // The URLs `run` would refuse are refused here too.
    crate::context::redis::check_url(url)
}

impl RawGeneration {
    fn validate(self) -> Result<GenerationSettings, SettingsError> {
        let g = GenerationSettings {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram: self.no_repeat_ngram,
            candidates: self.candidates,
            queue_depth: self.queue_depth,
            max_batch: self.max_batch,
            max_prefill_tokens: self.max_prefill_tokens,
        };
        if g.max_new_tokens == 0 || g.max_new_tokens > 1000 {
            return Err(invalid("generation.max_new_tokens", format!("{} is not in 1..=1000", g.max_new_tokens)));
        }
        if !g.temperature.is_finite() || g.temperature < 0.0 {
            return Err(invalid("generation.temperature", format!("{} is not 0 (greedy) or positive", g.temperature)));
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) {
            return Err(invalid("generation.top_p", format!("{} is not in (0, 1]", g.top_p)));
        }
        if !g.repetition_penalty.is_finite() || g.repetition_penalty <= 0.0 {
            return Err(invalid("generation.repetition_penalty", format!("{} is not positive", g.repetition_penalty)));
        }
        if g.candidates == 0 || g.candidates > 16 {
            return Err(invalid("generation.candidates", format!("{} is not in 1..=16", g.candidates)));
        }
        if g.queue_depth == 0 {
            return Err(invalid("generation.queue_depth", "must be at least 1"));
        }
        if g.max_batch < g.candidates || g.max_batch > 256 {
            return Err(invalid("generation.max_batch", format!("{} is not in generation.candidates..=256", g.max_batch)));
        }
        if g.max_prefill_tokens == 0 || g.max_prefill_tokens > 65_536 {
            return Err(invalid("generation.max_prefill_tokens", format!("{} is not in 1..=65536", g.max_prefill_tokens)));
        }
        Ok(g)
    }
}

impl RawSafety {
    fn validate(self) -> Result<SafetySettings, SettingsError> {
        let policy = self.policy.parse().map_err(|e: crate::safety::SafetyError| invalid("safety.policy", e.to_string()))?;
        let mut channels = std::collections::BTreeMap::new();
        for (channel, p) in self.channels {
            if dialogd_adapters::ChannelKey::parse(&channel).is_none() {
                return Err(invalid("safety.channels", format!("{channel:?} is not platform:channel_id")));
            }
            let p = p.parse().map_err(|e: crate::safety::SafetyError| invalid("safety.channels", format!("{channel}: {e}")))?;
            channels.insert(channel, p);
        }
        let toxic_input = match self.toxic_input.as_str() {
            "notice" => ToxicInput::Notice,
            "silent" => ToxicInput::Silent,
            other => return Err(invalid("safety.toxic_input", format!("{other:?} is not \"notice\" or \"silent\""))),
        };
        if toxic_input == ToxicInput::Notice && self.notice.trim().is_empty() {
            return Err(invalid("safety.notice", "must not be empty when toxic_input = \"notice\""));
        }
        if self.max_attempts == 0 || self.max_attempts > 5 {
            return Err(invalid("safety.max_attempts", format!("{} is not in 1..=5", self.max_attempts)));
        }
        if let Some(w) = self.blocked_words.iter().find(|w| w.trim().is_empty()) {
            return Err(invalid("safety.blocked_words", format!("{w:?} is empty")));
        }
        Ok(SafetySettings {
            policy,
            channels,
            toxic_input,
            notice: self.notice,
            blocked_words: self.blocked_words,
            max_attempts: self.max_attempts,
        })
    }
}

impl RawCollect {
    fn validate(self) -> Result<CollectSettings, SettingsError> {
        if self.enabled {
            if self.dir.trim().is_empty() {
                return Err(invalid("collect.dir", "must name a folder when collection is enabled"));
            }
            if self.author_key.len() < 16 {
                return Err(invalid(
                    "collect.author_key",
                    "must be at least 16 characters when collection is enabled (set DIALOGD__COLLECT__AUTHOR_KEY)",
                ));
            }
        }
        if let Some(c) = self.channels.iter().find(|c| dialogd_adapters::ChannelKey::parse(c).is_none()) {
            return Err(invalid("collect.channels", format!("{c:?} is not platform:channel_id")));
        }
        if self.segment_max_bytes < 1024 || self.segment_max_secs == 0 {
            return Err(invalid("collect.segment_max_bytes", "segments need at least 1024 bytes and 1 second"));
        }
        Ok(CollectSettings {
            enabled: self.enabled,
            dir: self.dir.into(),
            channels: self.channels,
            segment_max_bytes: self.segment_max_bytes,
            segment_max_secs: self.segment_max_secs,
            retention_days: self.retention_days,
            author_key: Secret(self.author_key),
        })
    }
}

impl RawJobs {
    fn validate(self, store_is_redis: bool) -> Result<JobSettings, SettingsError> {
        if self.enabled {
            if !store_is_redis {
                return Err(invalid("jobs.enabled", "jobs keep their records in Redis: set context.store = \"redis\""));
            }
            if self.dir.trim().is_empty() {
                return Err(invalid("jobs.dir", "must name a folder when jobs are enabled"));
            }
        }
        let mode = match self.mode.as_str() {
            "lora" => TrainMode::Lora,
            "full" => TrainMode::Full,
            other => return Err(invalid("jobs.mode", format!("{other:?} is not \"lora\" or \"full\""))),
        };
        crate::model::parse_device(&self.device).map_err(|e| invalid("jobs.device", e.to_string()))?;
        if self.lora_rank == 0 || self.lora_rank > 256 {
            return Err(invalid("jobs.lora_rank", format!("{} is not in 1..=256", self.lora_rank)));
        }
        if self.steps == 0 {
            return Err(invalid("jobs.steps", "must be at least 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(invalid("jobs.lr", format!("{} is not positive", self.lr)));
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return Err(invalid("jobs.batch_size", "batch_size and grad_accum must be at least 1"));
        }
        if self.max_seq_len < 2 {
            return Err(invalid("jobs.max_seq_len", "must be at least 2"));
        }
        if !(self.eval_fraction > 0.0 && self.eval_fraction < 1.0) {
            return Err(invalid("jobs.eval_fraction", format!("{} is not in (0, 1): the gate needs held-out data", self.eval_fraction)));
        }
        if !(self.max_ppl_regression.is_finite() && self.max_ppl_regression >= 0.0) {
            return Err(invalid("jobs.max_ppl_regression", "must be 0 or more"));
        }
        if self.max_attempts == 0 {
            return Err(invalid("jobs.max_attempts", "must be at least 1"));
        }
        if self.poll_ms < 10 {
            return Err(invalid("jobs.poll_ms", "must be at least 10"));
        }
        if let Some(p) = self.probes.iter().find(|p| p.trim().is_empty() || p.len() > 1000) {
            return Err(invalid("jobs.probes", format!("{p:?}: a probe must be 1-1000 bytes")));
        }
        let mut schedules = Vec::new();
        for s in self.schedules {
            let cron = crate::jobs::cron::Cron::parse(&s.cron).map_err(|e| invalid("jobs.schedules", format!("{}: {e}", s.name)))?;
            if s.name.trim().is_empty() {
                return Err(invalid("jobs.schedules", "every schedule needs a name"));
            }
            if !s.persona.is_empty() && !persona_name_ok(&s.persona) {
                return Err(invalid("jobs.schedules", format!("{}: {:?} is not a persona name", s.name, s.persona)));
            }
            if mode == TrainMode::Lora && s.persona.is_empty() {
                return Err(invalid("jobs.schedules", format!("{}: LoRA jobs (jobs.mode = \"lora\") train a persona: set persona", s.name)));
            }
            if let Some(c) = s.channels.iter().find(|c| dialogd_adapters::ChannelKey::parse(c).is_none()) {
                return Err(invalid("jobs.schedules", format!("{}: {c:?} is not platform:channel_id", s.name)));
            }
            schedules.push(Schedule { name: s.name, cron, persona: s.persona, channels: s.channels });
        }
        Ok(JobSettings {
            enabled: self.enabled,
            dir: self.dir.into(),
            trainer: (!self.trainer.trim().is_empty()).then(|| self.trainer.trim().into()),
            device: self.device,
            mode,
            lora_rank: self.lora_rank,
            steps: self.steps,
            lr: self.lr,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            max_seq_len: self.max_seq_len,
            eval_fraction: self.eval_fraction,
            checkpoint_every: self.checkpoint_every,
            min_examples: self.min_examples,
            max_ppl_regression: self.max_ppl_regression,
            probes: self.probes,
            max_attempts: self.max_attempts,
            poll: Duration::from_millis(self.poll_ms),
            schedules,
        })
    }
}

impl RawPersonas {
    fn validate(self) -> Result<PersonaSettings, SettingsError> {
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
            defined.push(PersonaSpec { name: p.name, adapter, seed: p.seed, created_in: None });
        }
        if !self.default.is_empty() && !defined.iter().any(|d| d.name == self.default) {
            return Err(invalid("personas.default", format!("{:?} is not in personas.defined", self.default)));
        }
        Ok(PersonaSettings { default: self.default, defined })
    }
}

impl RawRanking {
    fn validate(self) -> Result<RankingSettings, SettingsError> {
        for spec in &self.rankers {
            crate::cli::rank::parse_ranker(spec).map_err(|e| invalid("ranking.rankers", format!("{e:#}")))?;
        }
        let weights = crate::ranking::Weights {
            dialogrpt: self.dialogrpt_weight,
            generator: self.generator_weight,
            mmi: self.mmi_weight,
        };
        for (key, w) in [
            ("ranking.dialogrpt_weight", weights.dialogrpt),
            ("ranking.generator_weight", weights.generator),
            ("ranking.mmi_weight", weights.mmi),
        ] {
            if !w.is_finite() {
                return Err(invalid(key, "must be a number"));
            }
        }
        Ok(RankingSettings {
            rankers: self.rankers,
            mmi: self.mmi,
            dialogrpt_weight: weights.dialogrpt,
            generator_weight: weights.generator,
            mmi_weight: weights.mmi,
        })
    }
}

impl Settings {
    /// The effective settings as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot show settings: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_env(file_text: Option<&str>, env: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dialogd.toml");
        if let Some(text) = file_text {
            std::fs::write(&path, text).unwrap();
        }
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        load_raw_with_env(file_text.map(|_| path.as_path()), env)?.validate()
    }

    #[test]
    fn defaults_are_valid_and_layers_override_in_order() {
        let s = load_env(None, &[]).unwrap();
        assert_eq!(s.context.max_turns, 20);
        let s = load_env(Some("[context]\nmax_turns = 7\n"), &[]).unwrap();
        assert_eq!(s.context.max_turns, 7);
        let s = load_env(Some("[context]\nmax_turns = 7\n"), &[("DIALOGD__CONTEXT__MAX_TURNS", "9")]).unwrap();
        assert_eq!(s.context.max_turns, 9);
        let s = load_env(None, &[("DIALOGD__CONTEXT__REDIS_URL", "redis://10.0.0.1:6380/2")]).unwrap();
        assert_eq!(s.context.redis_url.expose(), "redis://10.0.0.1:6380/2");
    }

    #[test]
    fn the_example_settings_are_valid() {
        let s = load_env(Some(include_str!("../config/example.toml")), &[("DIALOGD__COLLECT__AUTHOR_KEY", "0123456789abcdef")]).unwrap();
        assert!(s.jobs.enabled && s.collect.enabled);
        assert_eq!(s.jobs.schedules[0].cron.next_after(0), Some(3 * 86_400 + 4 * 3600), "1970-01-04 was a Sunday");
        assert_eq!(s.personas.defined[0].name, "friendly");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: &[(&str, &str)] = &[
            ("[generation]\ntop_p = 1.5\n", "generation.top_p"),
            ("[model]\nquantize = \"q4\"\n", "model.quantize"),
            ("[generation]\nmax_prefill_tokens = 0\n", "generation.max_prefill_tokens"),
            ("[model]\nquantize = \"q8\"\ndtype = \"bf16\"\n", "model.quantize"),
            ("[model]\nkv_cache = \"bf16\"\n", "model.kv_cache"),
            ("[context]\nstore = \"sqlite\"\n", "context.store"),
            ("[adapters.http]\nlisten = \"nowhere\"\n", "adapters.http.listen"),
            ("[telemetry]\nlog_format = \"xml\"\n", "telemetry.log_format"),
            ("[generation]\ntemprature = 1.0\n", "temprature"),
            ("[context]\nmax_turns = \"many\"\n", "max_turns"),
            ("[adapters.telegram]\nenabled = true\n", "adapters.telegram.token"),
            ("[adapters.discord]\nenabled = true\n", "adapters.discord.token"),
            ("[adapters.telegram]\npoll_timeout_secs = 60\n", "adapters.telegram.poll_timeout_secs"),
            ("[rate_limit]\nwindow_secs = 0\n", "rate_limit.window_secs"),
            ("[context]\nstore = \"memory\"\n[jobs]\nenabled = true\n", "jobs.enabled"),
            ("[jobs]\nmode = \"half\"\n", "jobs.mode"),
            ("[jobs]\neval_fraction = 0.0\n", "jobs.eval_fraction"),
            ("[jobs]\ndevice = \"tpu\"\n", "jobs.device"),
            ("[jobs]\nschedules = [{ name = \"n\", cron = \"61 * * * *\", persona = \"p\" }]\n", "jobs.schedules: n: minute: 61"),
            ("[jobs]\nschedules = [{ name = \"n\", cron = \"@daily\" }]\n", "train a persona: set persona"),
            ("[jobs]\nprobes = [\" \"]\n", "jobs.probes"),
            ("[personas]\ndefault = \"pirate\"\n", "personas.default"),
            ("[personas]\ndefined = [{ name = \"Pirate Bob\" }]\n", "personas.defined"),
            ("[personas]\ndefined = [{ name = \"a\" }, { name = \"a\" }]\n", "defined twice"),
        ];
        for (text, key) in cases {
            let err = load_env(Some(text), &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
        let err = load_env(None, &[("DIALOGD__GENERATION__TOP_K", "lots")]).unwrap_err().to_string();
        assert!(err.contains("top_k"), "{err}");
    }

    #[test]
    fn secrets_never_print() {
        let s = load_env(
            Some("[context]\nredis_url = \"redis://u:hunter2@db:6379/0\"\n"),
            &[
                ("DIALOGD__ADAPTERS__HTTP__TOKEN", "tok-123456"),
                ("DIALOGD__ADAPTERS__TELEGRAM__TOKEN", "tg-987654"),
                ("DIALOGD__ADAPTERS__DISCORD__TOKEN", "dc-555777"),
            ],
        )
        .unwrap();
        assert_eq!(s.adapters.http.token.as_ref().unwrap().expose(), "tok-123456");
        for shown in [s.to_redacted_toml(), format!("{s:?}")] {
            for secret in ["hunter2", "tok-123456", "tg-987654", "dc-555777"] {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
        }
        assert!(s.to_redacted_toml().contains("redis://u:[redacted]@db:6379/0"));
    }

    #[test]
    fn printed_settings_use_the_keys_they_are_read_with() {
        let s = load_env(Some("[context]\nttl_secs = 60\n"), &[]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("printed.toml");
        std::fs::write(&path, s.to_redacted_toml()).unwrap();
        let again = load_raw_with_env(Some(&path), Vec::new()).unwrap().validate().unwrap();
        assert_eq!(again.context.ttl, Some(Duration::from_secs(60)));
        assert_eq!(again.to_redacted_toml(), s.to_redacted_toml());
    }

    #[test]
    fn urls_lose_only_their_password() {
        assert_eq!(redact_url("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0");
        assert_eq!(redact_url("redis://:pw@h:1/0"), "redis://:[redacted]@h:1/0");
        assert_eq!(redact_url("rediss://user:pw@h/0"), "rediss://user:[redacted]@h/0");
    }
}
