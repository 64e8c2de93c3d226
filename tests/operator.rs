//! The operator's path as the README writes it: the shipped example
//! settings and environment file, installed and checked with the README's
//! own commands.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use crate::support::{stderr, stdout};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).unwrap()
}

/// The README's install lines (`sudo install -m MODE SRC DEST`), as a map
/// from the installed path to the repository file it comes from.
fn installed_files(readme: &str) -> HashMap<String, PathBuf> {
    let mut map = HashMap::new();
    for line in readme.lines() {
        let words: Vec<&str> = line.split('#').next().unwrap().split_whitespace().collect();
        if let ["sudo", "install", "-m", _mode, src, dest] = words[..] {
            map.insert(dest.to_string(), repo().join(src));
        }
    }
    map
}

/// Runs one of the README's shell lines as written, with `sudo` left out,
/// the installed paths pointing at the repository's files and `dialogd`
/// being this build; no `DIALOGD…` variable of the test's own leaks in.
fn run_readme_line(line: &str, installed: &HashMap<String, PathBuf>) -> Output {
    let mut script = line.trim().strip_prefix("sudo ").expect("an install step runs with sudo").to_string();
    for (dest, src) in installed {
        script = script.replace(dest.as_str(), src.to_str().unwrap());
    }
    let bin = env!("CARGO_BIN_EXE_dialogd");
    script = script.replace("dialogd check-config", &format!("{bin} check-config"));
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(&script);
    for (key, _) in std::env::vars() {
        if key.starts_with("DIALOGD") || key == "RUST_LOG" || key.starts_with("HF_") {
            cmd.env_remove(key);
        }
    }
    cmd.output().unwrap()
}

/// The README's `check-config` step of the systemd install.
fn readme_check_line(readme: &str) -> String {
    let lines: Vec<&str> = readme.lines().filter(|l| l.contains("check-config --config /etc/dialogd/dialogd.toml")).collect();
    assert_eq!(lines.len(), 1, "one check-config step in the install section: {lines:?}");
    lines[0].to_string()
}

/// Issue #16 point 1: `config/example.toml` and `systemd/dialogd.env.example`,
/// installed and checked exactly as the README's systemd section says, are
/// valid; the example is the smallest config that works (a hub id, Redis,
/// one platform) and switches nothing else on.
#[test]
fn the_shipped_example_validates_as_the_readme_installs_it() {
    let readme = readme();
    let installed = installed_files(&readme);
    assert_eq!(installed.get("/etc/dialogd/dialogd.toml"), Some(&repo().join("config/example.toml")));
    assert_eq!(installed.get("/etc/dialogd/dialogd.env"), Some(&repo().join("systemd/dialogd.env.example")));
    let out = run_readme_line(&readme_check_line(&readme), &installed);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: toml::Table = stdout(&out).parse().unwrap();
    assert_eq!(shown["model"]["path"].as_str(), Some("microsoft/DialoGPT-small"), "a hub id");
    assert_eq!(shown["context"]["store"].as_str(), Some("redis"));
    assert_eq!(shown["adapters"]["http"]["enabled"].as_bool(), Some(true));
    // The environment file was read: its token is there, redacted.
    assert_eq!(shown["adapters"]["http"]["token"].as_str(), Some("[redacted]"));
    assert!(!stdout(&out).contains("change-me"), "{}", stdout(&out));
    for (section, what) in [("collect", "collection"), ("jobs", "training jobs")] {
        assert_eq!(shown[section]["enabled"].as_bool(), Some(false), "{what} is the operator's choice");
    }
    assert_eq!(shown["jobs"]["schedules"].as_array().map(Vec::len), Some(0));
    for platform in ["telegram", "discord"] {
        assert_eq!(shown["adapters"][platform]["enabled"].as_bool(), Some(false));
    }
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
}

/// Removes the `#` of commented-out settings (`#key = …`, `#[section]`,
/// `#KEY=value`), leaving prose comments (`# …`) alone.
fn uncomment(text: &str) -> String {
    text.lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest) if !rest.is_empty() && !rest.starts_with([' ', '#']) => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The example's commented extras (Telegram, Discord, collection, jobs with
/// a schedule, personas, quantize = "none") are valid settings once switched on, with the
/// environment file's commented secrets.
#[test]
fn the_examples_commented_extras_validate_when_switched_on() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, src: &str| -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, uncomment(&std::fs::read_to_string(repo().join(src)).unwrap())).unwrap();
        path
    };
    let readme = readme();
    let mut installed = installed_files(&readme);
    installed.insert("/etc/dialogd/dialogd.toml".into(), write("dialogd.toml", "config/example.toml"));
    installed.insert("/etc/dialogd/dialogd.env".into(), write("dialogd.env", "systemd/dialogd.env.example"));
    let out = run_readme_line(&readme_check_line(&readme), &installed);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: toml::Table = stdout(&out).parse().unwrap();
    for section in ["collect", "jobs"] {
        assert_eq!(shown[section]["enabled"].as_bool(), Some(true), "{section}");
    }
    for platform in ["telegram", "discord"] {
        assert_eq!(shown["adapters"][platform]["enabled"].as_bool(), Some(true), "{platform}");
        assert_eq!(shown["adapters"][platform]["token"].as_str(), Some("[redacted]"), "{platform}");
    }
    assert_eq!(shown["model"]["quantize"].as_str(), Some("none"));
    assert_eq!(shown["jobs"]["schedules"].as_array().map(Vec::len), Some(1));
    assert_eq!(shown["personas"]["defined"].as_array().map(Vec::len), Some(1));
}

/// Issue #16 point 7: `dialogd config defaults` prints the commented
/// defaults; `check-config` (like `run`) needs no `--config`; help shows
/// defaults and describes every flag (the unit test
/// `cli::tests::every_flag_has_a_description` walks them all).
#[test]
fn config_defaults_print_and_the_settings_file_is_optional() {
    let out = crate::support::dialogd(&["config", "defaults"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), std::fs::read_to_string(repo().join("config/default.toml")).unwrap());
    let out = crate::support::dialogd(&["check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: toml::Table = stdout(&out).parse().unwrap();
    assert_eq!(shown["model"]["path"].as_str(), Some("microsoft/DialoGPT-medium"));
    let help = stdout(&crate::support::dialogd(&["run", "--help"]));
    assert!(help.contains("Usage: dialogd run [OPTIONS]") && help.contains("--config <FILE>"), "{help}");
    let help = stdout(&crate::support::dialogd(&["generate", "--help"]));
    assert!(help.contains("[default: cpu]") && help.contains("[default: 0.8]"), "{help}");
}

/// Every command `dialogd --help` lists (not `help` itself).
fn command_names() -> Vec<String> {
    let help = stdout(&crate::support::dialogd(&["--help"]));
    let commands = help.split("Commands:").nth(1).expect("a Commands section").split("Options:").next().unwrap();
    let names: Vec<String> = commands
        .lines()
        .filter_map(|line| line.strip_prefix("  ").and_then(|l| l.split_whitespace().next()))
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect();
    for expected in ["run", "check-config", "jobs", "completions", "man", "generate"] {
        assert!(names.iter().any(|n| n == expected), "{expected} in {names:?}");
    }
    names
}

/// Issue #16 point 7: `dialogd completions bash|zsh|fish` print scripts
/// that complete every command (bash's is checked by `bash -n`; zsh and
/// fish are not installed here, so theirs are checked by their shape), and
/// a shell it does not know is refused.
#[test]
fn completions_for_each_shell_complete_every_command() {
    let names = command_names();
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = crate::support::dialogd(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        for name in &names {
            assert!(script.contains(name.as_str()), "{shell} completion lacks {name}");
        }
        match shell {
            "bash" => {
                let path = dir.path().join("dialogd.bash");
                std::fs::write(&path, &script).unwrap();
                let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
                assert!(check.status.success(), "bash -n: {}", stderr(&check));
                // Sourced, it registers the completion function for dialogd.
                let source = Command::new("bash")
                    .arg("-c")
                    .arg(format!("source {} && complete -p dialogd", path.display()))
                    .output()
                    .unwrap();
                assert!(stdout(&source).contains("_dialogd"), "{}{}", stdout(&source), stderr(&source));
                assert!(script.contains("--max-new-tokens") && script.contains("--config"), "flags too");
            }
            "zsh" => assert!(script.starts_with("#compdef dialogd"), "{script}"),
            _ => assert!(script.lines().filter(|l| !l.trim().is_empty()).all(|l| !l.starts_with("complete") || l.starts_with("complete -c dialogd"))),
        }
    }
    let out = crate::support::dialogd(&["completions", "tcsh"]);
    assert!(!out.status.success() && stderr(&out).contains("bash, zsh, fish"), "{}", stderr(&out));
}

/// Issue #16 point 7: `dialogd man` prints a manual page that names every
/// command and renders with `man -l`; `--dir` writes one page per command.
#[test]
fn the_manual_page_renders_and_names_every_command() {
    let names = command_names();
    let out = crate::support::dialogd(&["man"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let roff = stdout(&out);
    assert!(roff.contains(".TH dialogd 1"), "{roff}");
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("dialogd.1");
    std::fs::write(&page, &roff).unwrap();
    let rendered = Command::new("man").arg("-l").arg(&page).env("MANPAGER", "cat").env("MANWIDTH", "100").output().unwrap();
    assert!(rendered.status.success(), "{}", stderr(&rendered));
    let text = stdout(&rendered);
    assert!(text.contains("SUBCOMMANDS") && text.contains("DialoGPT chat bot daemon"), "{text}");
    for name in &names {
        assert!(text.contains(&format!("dialogd-{name}(1)")), "the page lists {name}: {text}");
    }
    let pages = dir.path().join("man1");
    let out = crate::support::dialogd(&["man", "--dir", pages.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for name in &names {
        let page = std::fs::read_to_string(pages.join(format!("dialogd-{name}.1"))).unwrap();
        assert!(page.contains(&format!(".TH dialogd-{name} 1")), "{page}");
    }
    let run = std::fs::read_to_string(pages.join("dialogd-run.1")).unwrap();
    assert!(run.contains("DIALOGD_CONFIG"), "{run}");
}

/// Issue #16 point 7: flags read from the environment say so in `--help`
/// (`[env: DIALOGD_CONFIG=]`), and the variable works; the optional
/// sampling flags show their effective defaults, greedy's off switches too.
#[test]
fn help_shows_env_variables_and_the_sampling_defaults() {
    for command in [&["run", "--help"][..], &["check-config", "--help"], &["worker", "--help"], &["jobs", "list", "--help"]] {
        let help = stdout(&crate::support::dialogd(command));
        assert!(help.contains("[env: DIALOGD_CONFIG="), "{command:?}: {help}");
    }
    let help = stdout(&crate::support::dialogd(&["generate", "--help"]));
    for (flag, default) in [
        ("--temperature", "0.8"),
        ("--top-k", "50"),
        ("--top-p", "0.95"),
        ("--repetition-penalty", "1.1"),
        ("--no-repeat-ngram", "3"),
        ("--min-new-tokens", "0"),
        ("--max-new-tokens", "64"),
    ] {
        let line = help.lines().find(|l| l.trim_start().starts_with(flag)).unwrap_or_else(|| panic!("{flag}: {help}"));
        assert!(line.ends_with(&format!("[default: {default}]")), "{line}");
    }
    // The defaults shown are the ones [generation] starts from.
    let defaults: toml::Table = std::fs::read_to_string(repo().join("config/default.toml")).unwrap().parse().unwrap();
    let generation = defaults["generation"].as_table().unwrap();
    assert_eq!(generation["temperature"].as_float(), Some(0.8));
    assert_eq!(generation["top_k"].as_integer(), Some(50));
    assert_eq!(generation["max_new_tokens"].as_integer(), Some(64));
    // DIALOGD_CONFIG stands for --config, and is not warned about.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.toml");
    std::fs::write(&file, "[context]\nmax_turns = 7\n").unwrap();
    let out = crate::support::dialogd_with_env(&["check-config"], &[("DIALOGD_CONFIG", file.to_str().unwrap())]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: toml::Table = stdout(&out).parse().unwrap();
    assert_eq!(shown["context"]["max_turns"].as_integer(), Some(7));
    assert!(!stderr(&out).contains("DIALOGD_CONFIG"), "{}", stderr(&out));
}
