//! Shared test fixtures.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use dialogd::model::synthetic::{write_checkpoint, InitSpec};
use dialogd::model::Gpt2Config;
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// A golden file written by scripts/make_golden.py.
pub fn golden(name: &str) -> Value {
    let path = fixtures().join("golden").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

/// The config, seed and init rules of a golden model.
pub fn golden_model_spec(golden: &Value) -> (Gpt2Config, u64, InitSpec) {
    let config: Gpt2Config = serde_json::from_value(golden["config"].clone()).unwrap();
    let init: InitSpec = serde_json::from_value(golden["init"].clone()).unwrap();
    (config, golden["seed"].as_u64().unwrap(), init)
}

/// A checkpoint folder for a golden model. The committed `pico` model comes
/// in both file formats; the others are written once per test run from the
/// deterministic formula into a temporary folder.
pub fn model_dir(name: &str) -> PathBuf {
    match name {
        "pico-safetensors" | "pico-bin" => fixtures().join(name),
        _ => synthetic_dir(name),
    }
}

fn synthetic_dir(name: &str) -> PathBuf {
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    static MADE: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let root = ROOT.get_or_init(|| tempfile::tempdir().unwrap());
    let mut made = MADE.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    made.entry(name.to_string())
        .or_insert_with(|| {
            let (config, seed, init) = golden_model_spec(&golden(name));
            let dir = root.path().join(name);
            write_checkpoint(&dir, &config, seed, &init, &fixtures().join("gpt2")).unwrap();
            dir
        })
        .clone()
}

/// Runs the dialogd binary with a clean hub environment.
pub fn dialogd(args: &[&str]) -> Output {
    dialogd_with_env(args, &[])
}

pub fn dialogd_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dialogd"));
    cmd.args(args).env_remove("RUST_LOG").env_remove("HF_ENDPOINT").env_remove("HF_HUB_OFFLINE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run dialogd")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a clean failure: non-zero exit, a message containing `needle`,
/// and no panic.
pub fn assert_fails_with(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure, got success; stdout: {}", stdout(out));
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
}

/// The DialogRPT/MMI golden file (scripts/make_golden_rpt.py).
pub fn rpt_golden() -> &'static Value {
    static GOLDEN: OnceLock<Value> = OnceLock::new();
    GOLDEN.get_or_init(|| golden("rpt"))
}

/// A synthetic DialogRPT checkpoint (`rpt-updown`, `rpt-depth`, …) or the
/// MMI reverse model (`rpt-mmi`) of the golden file, written once per run.
pub fn ranker_dir(name: &str) -> PathBuf {
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    static MADE: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let root = ROOT.get_or_init(|| tempfile::tempdir().unwrap());
    let mut made = MADE.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    made.entry(name.to_string())
        .or_insert_with(|| {
            let g = rpt_golden();
            let init: InitSpec = serde_json::from_value(g["init"].clone()).unwrap();
            // Folder names like the published ones, so heads can be inferred.
            let dir = root.path().join(format!("DialogRPT-{name}"));
            if name == "mmi" {
                let config: Gpt2Config = serde_json::from_value(g["mmi"]["config"].clone()).unwrap();
                let seed = g["mmi"]["seed"].as_u64().unwrap();
                write_checkpoint(&dir, &config, seed, &init, &fixtures().join("gpt2")).unwrap();
            } else {
                let spec = &g["rankers"][name];
                let config: Gpt2Config = serde_json::from_value(spec["config"].clone()).unwrap();
                let seed = spec["seed"].as_u64().unwrap();
                dialogd::model::synthetic::write_ranker_checkpoint(&dir, &config, seed, &init, &fixtures().join("gpt2")).unwrap();
            }
            dir
        })
        .clone()
}

pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array().expect("number array").iter().map(|x| x.as_f64().unwrap()).collect()
}
