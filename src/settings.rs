//! The daemon's settings: layered raw values, validated into typed settings.
//!
//! Two stages, as in ripgrep's flags: [`load_raw`] layers
//! `config/default.toml` (built in), the operator's file and `DIALOGD__…`
//! environment variables with the `config` crate into [`RawSettings`]
//! (unknown keys are errors); [`RawSettings::validate`] turns them into
//! [`Settings`], with an error naming the key for every bad value. Secrets
//! are [`Secret`]s: they print as `[redacted]` everywhere.
//!
//! One file per section under `settings/`, each with its raw and validated
//! types and its checks; `[adapters]` belongs to the adapters crate
//! ([`dialogd_adapters::settings`]), which owns every platform's settings.
//! Every type is re-exported here (`crate::settings::GenerationSettings`).

mod collect;
mod context;
mod daemon;
mod generation;
mod jobs;
mod model;
mod personas;
mod ranking;
mod rate_limit;
mod safety;
mod strict;
mod telemetry;
mod worker;

pub mod live;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

pub use self::collect::{CollectSettings, Consent, RawCollect};
pub use self::context::{redact_url, ContextSettings, RawContext, StoreKind};
pub use self::daemon::{DaemonSettings, RawDaemon};
pub use self::generation::{Backend, GenerationSettings, RawGeneration};
pub use self::jobs::{JobSettings, RawJobs, RawSchedule, Schedule, TrainMode};
pub use self::model::{ModelSettings, RawModel};
pub use self::personas::{persona_name_ok, PersonaSettings, PersonaSpec, RawPersona, RawPersonas};
pub use self::ranking::{RankingSettings, RawRanking};
pub use self::rate_limit::{RateLimitSettings, RawRateLimit};
pub use self::safety::{RawSafety, SafetySettings, ToxicInput};
pub use self::strict::ValueError;
pub use self::telemetry::{LogFormat, RawTelemetry, TelemetrySettings};
pub use self::worker::{RawWorker, WorkerSettings};
pub use dialogd_adapters::console::{ConsoleSettings, RawConsole};
pub use dialogd_adapters::discord::{DiscordSettings, RawDiscord};
pub use dialogd_adapters::http::{HttpSettings, RawHttp};
pub use dialogd_adapters::settings::{AdapterSettings, RawAdapters, Secret};
pub use dialogd_adapters::telegram::{RawTelegram, TelegramSettings};

/// The documented defaults, the bottom settings layer.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Settings failures; every one names the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{path}: no such settings file")]
    MissingFile { path: String },
    /// The settings file cannot be read or parsed: a folder, not UTF-8,
    /// not TOML. `path` is absolute.
    #[error("{path}: {message}")]
    File { path: String, message: String },
    /// A layering error from the config crate (it names the key).
    #[error("settings: {0}")]
    Layer(#[from] config::ConfigError),
    /// A value of the wrong kind (a float in an integer key); names the key.
    #[error(transparent)]
    Value(#[from] ValueError),
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
    /// A bad value in `[adapters]` (it names the key).
    #[error(transparent)]
    Adapters(#[from] dialogd_adapters::settings::SettingsError),
}

fn invalid(key: &'static str, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid { key, message: message.into() }
}

fn socket_addr(key: &'static str, value: &str) -> Result<SocketAddr, SettingsError> {
    value.parse().map_err(|_| invalid(key, format!("{value:?} is not an address such as 127.0.0.1:8080")))
}

fn serialize_secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

fn serialize_millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
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
    pub worker: RawWorker,
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
        builder = builder.add_source(read_file(path)?);
    }
    // List-valued keys are split here (the config crate splits lists only
    // when it also parses numbers, which would change tokens and keys).
    let lists = list_keys();
    let mut list_overrides = Vec::new();
    let env: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("DIALOGD__"))
        .filter_map(|(name, value)| {
            let key = name["DIALOGD__".len()..].to_lowercase().replace("__", ".");
            if lists.contains(&key) {
                let items: Vec<String> =
                    value.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
                list_overrides.push((key, items));
                None
            } else {
                Some((name, value))
            }
        })
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix("DIALOGD").prefix_separator("__").separator("__").source(Some(env)),
    );
    // Marked as the environment's text, which the strict reading converts
    // (an id list takes each item's digits).
    let origin = "the environment".to_string();
    for (key, items) in list_overrides {
        let items: Vec<config::Value> =
            items.into_iter().map(|item| config::Value::new(Some(&origin), config::ValueKind::String(item))).collect();
        builder = builder.set_override(key, config::Value::new(Some(&origin), config::ValueKind::Array(items)))?;
    }
    // The merged tree, each value with its origin (file or environment).
    let merged = config::Source::collect(&builder.build()?)?;
    Ok(strict::deserialize(config::Value::new(None, merged))?)
}

/// The operator's settings file, read and parsed once; its values
/// remember the file's absolute path, which every error names.
#[derive(Debug, Clone)]
struct SettingsFile(config::Map<String, config::Value>);

impl config::Source for SettingsFile {
    fn clone_into_box(&self) -> Box<dyn config::Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<config::Map<String, config::Value>, config::ConfigError> {
        Ok(self.0.clone())
    }
}

/// Reads and parses `path`: a folder, a missing file, bytes that are not
/// UTF-8 (never replaced) and bad TOML are errors naming the file by its
/// real path (canonical; absolute as given when it does not exist).
fn read_file(path: &Path) -> Result<SettingsFile, SettingsError> {
    let shown = std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string();
    let file_error = |message: String| SettingsError::File { path: shown.clone(), message };
    if path.is_dir() {
        return Err(file_error("is a directory, not a settings file".into()));
    }
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(SettingsError::MissingFile { path: shown }),
        Err(e) => return Err(file_error(format!("cannot read: {e}"))),
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
        file_error(format!("not UTF-8 text (line {line}, byte {at})"))
    })?;
    let table = config::Format::parse(&config::FileFormat::Toml, Some(&shown), &text)
        .map_err(|e| file_error(e.to_string().trim_end().to_string()))?;
    Ok(SettingsFile(table))
}

/// The keys whose values are lists of plain values (`adapters.discord.allowed_guilds`,
/// `safety.blocked_words`, …), read from the defaults: from the environment
/// they are given comma-separated (`DIALOGD__ADAPTERS__DISCORD__ALLOWED_GUILDS=1,2`).
/// Lists of tables (`jobs.schedules`, `personas.defined`) have no such form.
pub fn list_keys() -> Vec<String> {
    const TABLE_LISTS: &[&str] = &["jobs.schedules", "personas.defined"];
    fn walk(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
        for (name, value) in table {
            let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
            match value {
                toml::Value::Table(inner) => walk(&key, inner, out),
                toml::Value::Array(items) if !items.iter().any(|v| v.is_table()) && !TABLE_LISTS.contains(&key.as_str()) => {
                    out.push(key)
                }
                _ => {}
            }
        }
    }
    let mut keys = Vec::new();
    if let Ok(defaults) = DEFAULT_TOML.parse::<toml::Table>() {
        walk("", &defaults, &mut keys);
    }
    keys
}

/// The keys (`section.key`, `adapters.http.listen`) whose effective values
/// differ between `old` and `new`, sorted; secrets compare redacted
/// (a changed token is not seen).
pub fn changed_keys(old: &Settings, new: &Settings) -> Vec<String> {
    fn flatten(prefix: &str, value: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
        match value {
            toml::Value::Table(table) => {
                for (name, inner) in table {
                    let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
                    flatten(&key, inner, out);
                }
            }
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let as_list = |s: &Settings| {
        let mut out = Vec::new();
        if let Ok(value) = toml::Value::try_from(s) {
            flatten("", &value, &mut out);
        }
        out
    };
    let (old, new) = (as_list(old), as_list(new));
    let mut keys: Vec<String> = new
        .iter()
        .filter(|(key, value)| old.iter().find(|(k, _)| k == key).map(|(_, v)| v) != Some(value))
        .map(|(key, _)| key.clone())
        .collect();
    keys.extend(old.iter().filter(|(key, _)| !new.iter().any(|(k, _)| k == key)).map(|(key, _)| key.clone()));
    keys
}

/// The variable the commands taking `--config FILE` read it from when the
/// flag is not given.
pub const CONFIG_ENV: &str = "DIALOGD_CONFIG";

/// The names of environment variables that look meant for dialogd
/// (`DIALOGD…`, any case) but are not read as settings: not
/// `DIALOGD__SECTION__KEY` (a variable under that prefix naming no key is
/// already an error), nor [`CONFIG_ENV`], nor the kernels' switch
/// ([`crate::model::kernels::F32_KERNELS_ENV`]). Values are never looked at, so secrets in them
/// cannot leak through a warning.
pub fn stray_env_vars(env: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>) -> Vec<String> {
    let mut names: Vec<String> = env
        .into_iter()
        .map(|(name, _)| name.to_string_lossy().into_owned())
        .filter(|name| {
            name.to_ascii_uppercase().starts_with("DIALOGD")
                && !name.starts_with("DIALOGD__")
                && name != CONFIG_ENV
                && name != crate::model::kernels::F32_KERNELS_ENV
        })
        .collect();
    names.sort();
    names
}

/// Loads and validates in one step.
pub fn load(file: Option<&Path>) -> Result<Settings, SettingsError> {
    load_raw(file)?.validate()
}

/// The settings the `dialogd jobs` commands use ([context], [jobs],
/// [personas]): as [`load`], with collection and the chat platforms turned
/// off first, so their secrets (`collect.author_key`, the platform tokens)
/// need not be in the environment of whoever lists or queues jobs.
pub fn load_for_jobs(file: Option<&Path>) -> Result<Settings, SettingsError> {
    let mut raw = load_raw(file)?;
    raw.collect.enabled = false;
    raw.adapters.telegram.enabled = false;
    raw.adapters.discord.enabled = false;
    raw.validate()
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
    pub worker: WorkerSettings,
}

impl RawSettings {
    /// Checks every value; the first bad one is reported with its key.
    pub fn validate(self) -> Result<Settings, SettingsError> {
        let model = self.model.validate()?;
        let generation = self.generation.validate()?;
        let context = self.context.validate()?;
        let store_is_redis = context.store == StoreKind::Redis;
        let adapters = self.adapters.validate()?;
        let rate_limit = self.rate_limit.validate()?;
        let telemetry = self.telemetry.validate()?;
        let daemon = self.daemon.validate()?;
        Ok(Settings {
            model,
            generation,
            context,
            adapters,
            rate_limit,
            telemetry,
            daemon,
            safety: self.safety.validate()?,
            ranking: self.ranking.validate()?,
            collect: self.collect.validate()?,
            jobs: self.jobs.validate(store_is_redis)?,
            personas: self.personas.validate()?,
            worker: self.worker.validate()?,
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
    fn misspelled_environment_overrides_are_named() {
        let env = [
            ("DIALOGD_ADAPTERS__HTTP__TOKEN", "secret-1"),
            ("DIALOGD__CONTEXT__MAX_TURNS", "9"),
            ("DIALOGD_CONFIG", "/etc/dialogd/dialogd.toml"),
            ("DIALOGD_F32_KERNELS", "avx2"),
            ("dialogd__context__max_turns", "9"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.into(), v.into()));
        assert_eq!(stray_env_vars(env), ["DIALOGD_ADAPTERS__HTTP__TOKEN", "dialogd__context__max_turns"]);
    }

    #[test]
    fn list_settings_come_comma_separated_from_the_environment() {
        assert!(list_keys().contains(&"adapters.discord.allowed_guilds".to_string()), "{:?}", list_keys());
        assert!(!list_keys().iter().any(|k| k == "jobs.schedules" || k == "personas.defined"));
        let s = load_env(
            None,
            &[
                ("DIALOGD__ADAPTERS__DISCORD__ALLOWED_GUILDS", "11,22"),
                ("DIALOGD__SAFETY__BLOCKED_WORDS", "gronk,blorf"),
                ("DIALOGD__JOBS__PROBES", "Hi there?"),
            ],
        )
        .unwrap();
        assert_eq!(s.adapters.discord.allowed_guilds, [11, 22]);
        assert_eq!(s.safety.blocked_words, ["gronk", "blorf"]);
        assert_eq!(s.jobs.probes, ["Hi there?"]);
        // An empty value is an empty list.
        let s = load_env(None, &[("DIALOGD__JOBS__PROBES", "")]).unwrap();
        assert!(s.jobs.probes.is_empty());
        let err = load_env(None, &[("DIALOGD__ADAPTERS__DISCORD__ALLOWED_GUILDS", "11,x")]).unwrap_err().to_string();
        assert!(err.contains("allowed_guilds"), "{err}");
    }

    #[test]
    fn changed_keys_name_each_difference() {
        let old = load_env(None, &[]).unwrap();
        let new = load_env(Some("[context]\nmax_turns = 7\n[adapters.http]\nlisten = \"127.0.0.1:9\"\n"), &[]).unwrap();
        assert_eq!(changed_keys(&old, &new), ["adapters.http.listen", "context.max_turns"]);
        assert!(changed_keys(&old, &old).is_empty());
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
        let example = include_str!("../config/example.toml");
        let s = load_env(Some(example), &[]).unwrap();
        assert_eq!(s.model.path, "microsoft/DialoGPT-small");
        assert!(!s.jobs.enabled && !s.collect.enabled, "the operator's choice");
        // Its commented extras, switched on (`#key = …` lines uncommented).
        let extras: Vec<&str> = example
            .lines()
            .map(|l| l.strip_prefix('#').filter(|rest| !rest.is_empty() && !rest.starts_with([' ', '#'])).unwrap_or(l))
            .collect();
        let env = [
            ("DIALOGD__COLLECT__AUTHOR_KEY", "0123456789abcdef"),
            ("DIALOGD__ADAPTERS__TELEGRAM__TOKEN", "1:tg"),
            ("DIALOGD__ADAPTERS__DISCORD__TOKEN", "dc"),
        ];
        let s = load_env(Some(&extras.join("\n")), &env).unwrap();
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
            ("[collect]\nconsent = \"everyone\"\n", "collect.consent"),
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

    /// Every integer key of `config/default.toml` (so every one added
    /// later too) refuses a float instead of rounding it, naming the key.
    #[test]
    fn every_integer_key_refuses_a_float() {
        fn integer_keys(prefix: &str, table: &toml::Table, out: &mut Vec<(String, String)>) {
            for (key, value) in table {
                match value {
                    toml::Value::Integer(_) => out.push((prefix.to_string(), key.clone())),
                    toml::Value::Table(inner) => integer_keys(&format!("{prefix}{}{key}", if prefix.is_empty() { "" } else { "." }), inner, out),
                    _ => {}
                }
            }
        }
        let mut keys = Vec::new();
        integer_keys("", &DEFAULT_TOML.parse().unwrap(), &mut keys);
        assert!(keys.len() >= 30, "{keys:?}");
        for (section, key) in &keys {
            let err = load_env(Some(&format!("[{section}]\n{key} = 1.5\n")), &[]).unwrap_err().to_string();
            assert!(err.contains(&format!("{section}.{key}: expected an integer, found the number 1.5")), "{err}");
            assert!(err.contains("dialogd.toml"), "names the file: {err}");
            // A float with nothing after the point is still not an integer.
            assert!(load_env(Some(&format!("[{section}]\n{key} = 2.0\n")), &[]).is_err(), "{section}.{key} = 2.0");
        }
        let err = load_env(None, &[("DIALOGD__DAEMON__DRAIN_SECS", "1.5")]).unwrap_err().to_string();
        assert!(err.contains("daemon.drain_secs") && err.contains("the environment"), "{err}");
        // Integers from the environment are text, and still read.
        assert_eq!(load_env(None, &[("DIALOGD__DAEMON__DRAIN_SECS", "7")]).unwrap().daemon.drain, Duration::from_secs(7));
    }

    #[test]
    fn kinds_are_not_converted() {
        // A Discord id written as a float would be another id.
        let err = load_env(Some("[adapters.discord]\nmoderators = [1, 123456789012345678.0]\n"), &[]).unwrap_err().to_string();
        assert!(err.contains("adapters.discord.moderators[1]: expected an integer"), "{err}");
        let s = load_env(Some("[adapters.discord]\nmoderators = [123456789012345678]\n"), &[]).unwrap();
        assert_eq!(s.adapters.discord.moderators, [123456789012345678]);
        let err = load_env(Some("[adapters.http]\nenabled = 1\n"), &[]).unwrap_err().to_string();
        assert!(err.contains("adapters.http.enabled: expected true or false"), "{err}");
        let err = load_env(Some("[context]\nkey_prefix = 5\n"), &[]).unwrap_err().to_string();
        assert!(err.contains("context.key_prefix: expected a string"), "{err}");
        let err = load_env(Some("[jobs]\nschedules = [{ name = \"n\", cron = 5 }]\n"), &[]).unwrap_err().to_string();
        assert!(err.contains("jobs.schedules[0].cron: expected a string"), "{err}");
        // Floats take integers; booleans from the environment are text.
        assert_eq!(load_env(Some("[generation]\ntop_p = 1\n"), &[]).unwrap().generation.top_p, 1.0);
        let env = [("DIALOGD__ADAPTERS__CONSOLE__ENABLED", "on"), ("DIALOGD__GENERATION__TOP_P", "0.5")];
        let s = load_env(None, &env).unwrap();
        assert!(s.adapters.console.enabled);
        assert_eq!(s.generation.top_p, 0.5);
    }

    #[test]
    fn file_errors_name_the_file_by_its_absolute_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, b"[telemetry]\nlog_filter = \"info\xff\"\n").unwrap();
        let err = load_raw_with_env(Some(&path), Vec::new()).unwrap_err().to_string();
        assert_eq!(err, format!("{}: not UTF-8 text (line 2, byte 30)", path.canonicalize().unwrap().display()));

        let err = load_raw_with_env(Some(dir.path()), Vec::new()).unwrap_err().to_string();
        assert!(err.contains(&format!("{}: is a directory", dir.path().canonicalize().unwrap().display())), "{err}");

        // A relative path is shown as the file's real path, never as a
        // path relative to somewhere else.
        std::fs::write(&path, "[daemon]\ndrain_secs = \n").unwrap();
        let cwd = std::env::current_dir().unwrap();
        let relative: std::path::PathBuf =
            cwd.components().skip(1).map(|_| "..").collect::<std::path::PathBuf>().join(path.strip_prefix("/").unwrap());
        let err = load_raw_with_env(Some(&relative), Vec::new()).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}: ", path.canonicalize().unwrap().display())), "{err}");
        assert!(err.contains("line 2"), "{err}");
        assert_eq!(err.matches("bad.toml").count(), 1, "the file is named once: {err}");

        let err = load_raw_with_env(Some(&dir.path().join("none.toml")), Vec::new()).unwrap_err().to_string();
        assert!(err.contains("none.toml: no such settings file"), "{err}");
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
