//! `dialogd generate` and `dialogd chat` as a user runs them.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::support::{assert_fails_with, dialogd, dialogd_with_env, fixtures, golden, ids, model_dir, stdout, strings};

fn generate_json(model: &Path, extra: &[&str], turns: &[String]) -> Value {
    // Exactly transformers' numbers: the weights as loaded (the default,
    // `auto`, is 8-bit on the CPU for the tiny and small shapes).
    let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--json", "--quantize", "none"];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend(turns.iter().map(|s| s.as_str()));
    let out = dialogd(&args);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "one JSON line: {text}");
    serde_json::from_str(&text).unwrap()
}

/// The acceptance check: `generate --greedy --json` gives the same
/// prompt_ids and output_ids as transformers' generate(do_sample=False).
#[test]
fn generate_greedy_json_matches_transformers() {
    for (model, golden_name) in [("pico-safetensors", "pico"), ("pico-bin", "pico"), ("pico-pkl", "pico"), ("tiny", "tiny"), ("small", "small")] {
        let g = golden(golden_name);
        let dir = model_dir(model);
        for case in g["greedy"].as_array().unwrap() {
            let max = case["max_new_tokens"].to_string();
            let mut extra = vec!["--greedy", "--max-new-tokens", &max];
            let (rp, nr, mn);
            if let Some(v) = case.get("repetition_penalty") {
                rp = v.to_string();
                extra.extend(["--repetition-penalty", &rp]);
            }
            if let Some(v) = case.get("no_repeat_ngram") {
                nr = v.to_string();
                extra.extend(["--no-repeat-ngram", &nr]);
            }
            if let Some(v) = case.get("min_new_tokens") {
                mn = v.to_string();
                extra.extend(["--min-new-tokens", &mn]);
            }
            let out = generate_json(&dir, &extra, &strings(&case["turns"]));
            assert_eq!(ids(&out["prompt_ids"]), ids(&case["prompt_ids"]), "{model}");
            assert_eq!(ids(&out["output_ids"]), ids(&case["output_ids"]), "{model}: {case}");
            assert_eq!(out["text"], case["text"], "{model}");
        }
    }
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let dir = model_dir("tiny");
    let turns = vec!["Hello, how are you?".to_string()];
    let run = |seed: &str| generate_json(&dir, &["--seed", seed, "--temperature", "1.0", "--max-new-tokens", "16"], &turns);
    let a = run("7");
    assert_eq!(a, run("7"));
    let others: Vec<Value> = ["8", "9", "10"].iter().map(|s| run(s)).collect();
    assert!(others.iter().any(|o| o["output_ids"] != a["output_ids"]), "different seeds, same replies");
}

#[test]
fn a_long_turn_keeps_its_end_within_the_context() {
    // pico has 64 positions; 24 are kept for the reply.
    let dir = model_dir("pico-bin");
    let long = "word ".repeat(500) + "the end";
    let out = generate_json(&dir, &["--greedy", "--max-new-tokens", "24"], &["an old turn".to_string(), long]);
    let prompt = ids(&out["prompt_ids"]);
    assert_eq!(prompt.len(), 64 - 24);
    assert_eq!(*prompt.last().unwrap(), 50256);
    // " the end" are the last text tokens: 262 = " the", 886 = " end".
    assert_eq!(&prompt[prompt.len() - 3..prompt.len() - 1], &[262, 886]);
    assert!(ids(&out["output_ids"]).len() <= 24);
}

#[test]
fn bad_input_fails_cleanly() {
    let pico = fixtures().join("pico-bin");
    let pico = pico.to_str().unwrap();
    assert_fails_with(&dialogd(&["generate", "--model", "/no/such/folder", "hi"]), "does not exist");
    assert_fails_with(&dialogd(&["generate", "--model", &format!("{pico}/config.json"), "hi"]), "is a file");
    assert_fails_with(&dialogd(&["generate", "--model", pico, "hello", "  "]), "turn 2 is empty");
    assert_fails_with(&dialogd(&["generate", "--model", pico, ""]), "turn 1 is empty");
    let huge = "x".repeat(40_000);
    assert_fails_with(&dialogd(&["generate", "--model", pico, &huge]), "more than the 32768");
    assert_fails_with(&dialogd(&["generate", "--model", pico, "--top-p", "0", "hi"]), "top_p");
    assert_fails_with(&dialogd(&["generate", "--model", pico, "--max-new-tokens", "64", "hi"]), "no room");
    assert_fails_with(&dialogd(&["generate", "--model", pico, "--device", "tpu:0", "hi"]), "not a device");
}

/// `--device cuda` where there is no GPU to use: a CPU build names the
/// missing feature, a CUDA build without a driver the driver's error; every
/// model-loading command fails with that line and no panic.
#[test]
fn device_cuda_without_a_gpu_fails_clearly() {
    let pico = fixtures().join("pico-bin");
    let pico = pico.to_str().unwrap();
    let needle = if cfg!(feature = "cuda") { "cannot open cuda" } else { "built without CUDA support" };
    for args in [
        vec!["generate", "--model", pico, "--device", "cuda", "hi"],
        vec!["bench", "--model", pico, "--device", "cuda:0", "--concurrency", "1", "--new-tokens", "2", "--prompt-tokens", "4"],
        vec!["rank", "--ranker", pico, "--device", "cuda", "--response", "yes", "hi"],
        vec!["train", "--base", pico, "--data", "/dev/null", "--out", "/nonexistent/out", "--device", "cuda"],
    ] {
        let out = dialogd(&args);
        assert_fails_with(&out, needle);
        let err = crate::support::stderr(&out);
        assert_eq!(err.lines().filter(|l| l.contains(needle)).count(), 1, "{args:?}: {err}");
        assert!(!err.contains("<unknown>"), "{args:?}: a backtrace: {err}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn broken_checkpoints_name_the_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("pico-safetensors");

    // Truncated safetensors.
    let truncated = tmp.path().join("truncated");
    copy_dir(&src, &truncated);
    let weights = truncated.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails_with(&dialogd(&["generate", "--model", truncated.to_str().unwrap(), "hi"]), "model.safetensors");

    // Garbage where the header should be.
    std::fs::write(&weights, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
    assert_fails_with(&dialogd(&["generate", "--model", truncated.to_str().unwrap(), "hi"]), "model.safetensors");

    // No weights at all.
    std::fs::remove_file(&weights).unwrap();
    assert_fails_with(&dialogd(&["generate", "--model", truncated.to_str().unwrap(), "hi"]), "no weights");

    // A pytorch_model.bin that is not a checkpoint.
    std::fs::write(truncated.join("pytorch_model.bin"), vec![0x5au8; 4096]).unwrap();
    assert_fails_with(&dialogd(&["generate", "--model", truncated.to_str().unwrap(), "hi"]), "pytorch_model.bin");

    // A config that does not match the weights: the tensor is named.
    let misshaped = tmp.path().join("misshaped");
    copy_dir(&src, &misshaped);
    let config = std::fs::read_to_string(misshaped.join("config.json")).unwrap();
    std::fs::write(misshaped.join("config.json"), config.replace("\"n_embd\": 8", "\"n_embd\": 16")).unwrap();
    assert_fails_with(&dialogd(&["generate", "--model", misshaped.to_str().unwrap(), "hi"]), "wte.weight");

    // A config that is not JSON.
    std::fs::write(misshaped.join("config.json"), "{ n_embd: ").unwrap();
    assert_fails_with(&dialogd(&["generate", "--model", misshaped.to_str().unwrap(), "hi"]), "config.json");

    // No tokenizer.
    let no_tok = tmp.path().join("no-tokenizer");
    copy_dir(&src, &no_tok);
    std::fs::remove_file(no_tok.join("tokenizer.json")).unwrap();
    assert_fails_with(&dialogd(&["generate", "--model", no_tok.to_str().unwrap(), "hi"]), "no tokenizer");
}

#[test]
fn hub_id_without_network_or_cache_says_how_to_pass_a_folder() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path().to_str().unwrap();
    let out = dialogd_with_env(
        &["generate", "--model", "microsoft/DialoGPT-small", "hi"],
        &[("HF_HOME", home), ("HF_HUB_OFFLINE", "1")],
    );
    assert_fails_with(&out, "--model /path/to/folder");
    // Online, but the hub is a closed loopback port.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let out = dialogd_with_env(
        &["generate", "--model", "microsoft/DialoGPT-small", "hi"],
        &[("HF_HOME", home), ("HF_ENDPOINT", &endpoint)],
    );
    assert_fails_with(&out, "--model /path/to/folder");
}

/// Issue #16 point 3: a hub download (a loopback fake through
/// `HF_ENDPOINT`) fills the standard cache, which the same command then
/// uses offline; the download is told on stderr by default (start and end
/// of each file), the same answer either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_download_is_told_and_fills_the_cache() {
    let hub = crate::fakes::hub::FakeHub::start("fake-org/pico", &fixtures().join("pico-safetensors"), None).await;
    let home = tempfile::tempdir().unwrap();
    let home = home.path().to_str().unwrap().to_string();
    let args = ["generate", "--model", "fake-org/pico", "--greedy", "--json", "--max-new-tokens", "24", "Hello, how are you?"];
    let (endpoint, h) = (hub.url.clone(), home.clone());
    let out = tokio::task::spawn_blocking(move || dialogd_with_env(&args, &[("HF_HOME", &h), ("HF_ENDPOINT", &endpoint)])).await.unwrap();
    let err = crate::support::stderr(&out);
    assert!(out.status.success(), "{err}");
    for file in ["config.json", "model.safetensors"] {
        assert!(err.lines().any(|l| l.contains("downloaded") && l.contains(&format!("file={file}"))), "{file}: {err}");
    }
    // Issue #16 point 8: no colour codes when stderr is not a terminal.
    assert!(!err.contains('\x1b'), "ANSI escapes in piped stderr: {err:?}");
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["output_ids"], golden("pico")["greedy"][0]["output_ids"]);
    drop(hub);
    let offline = tokio::task::spawn_blocking(move || dialogd_with_env(&args, &[("HF_HOME", &home), ("HF_HUB_OFFLINE", "1")])).await.unwrap();
    assert!(offline.status.success(), "{}", crate::support::stderr(&offline));
    assert_eq!(stdout(&offline), stdout(&out));
}

/// A hub download that stops sending bytes (the fake's weights stall
/// halfway, the connection left open) fails after `HF_HUB_DOWNLOAD_TIMEOUT`
/// seconds, naming the file, the stall and the variable, instead of
/// waiting forever; a bad value of the variable is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_hub_download_fails_naming_the_file() {
    let hub = crate::fakes::hub::FakeHub::start("fake-org/pico", &fixtures().join("pico-safetensors"), Some("model.safetensors")).await;
    let home = tempfile::tempdir().unwrap();
    let home = home.path().to_str().unwrap().to_string();
    let run = |timeout: &'static str| {
        let (endpoint, home) = (hub.url.clone(), home.clone());
        tokio::task::spawn_blocking(move || {
            let args = ["generate", "--model", "fake-org/pico", "hi"];
            dialogd_with_env(&args, &[("HF_HOME", &home), ("HF_ENDPOINT", &endpoint), ("HF_HUB_DOWNLOAD_TIMEOUT", timeout)])
        })
    };
    // Without the limit this would never return: the test's own bound.
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), run("1")).await.expect("a stalled download never ended").unwrap();
    assert_fails_with(&out, "the download stalled");
    let err = crate::support::stderr(&out);
    assert!(err.contains("model.safetensors: the download stalled") && err.contains("HF_HUB_DOWNLOAD_TIMEOUT"), "{err}");
    // The files before it came whole.
    assert!(err.lines().any(|l| l.contains("downloaded") && l.contains("file=config.json")), "{err}");
    let out = run("soon").await.unwrap();
    assert_fails_with(&out, "HF_HUB_DOWNLOAD_TIMEOUT=\"soon\"");
}

#[test]
fn hub_id_uses_a_complete_cache_offline() {
    // Lay out the standard cache by hand: refs/main names a snapshot.
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub").join("models--microsoft--DialoGPT-small");
    let snapshot = repo.join("snapshots").join("0123456789abcdef");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123456789abcdef").unwrap();
    copy_dir(&fixtures().join("pico-safetensors"), &snapshot);
    let out = dialogd_with_env(
        &["generate", "--model", "microsoft/DialoGPT-small", "--greedy", "--json", "--max-new-tokens", "24", "Hello, how are you?"],
        &[("HF_HOME", home.path().to_str().unwrap()), ("HF_HUB_OFFLINE", "1")],
    );
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["output_ids"], golden("pico")["greedy"][0]["output_ids"]);
}

/// `dialogd chat --config FILE` answers through the daemon's pipeline:
/// its filter (a blocked word gets the daemon's notice), its commands
/// (`/reset`, `/persona`), its personas; `/help` and unknown commands are
/// answered by chat itself; piped stdin is read line by line (rustyline
/// without a terminal) and the line history lands in the XDG state folder.
#[test]
fn chat_answers_through_the_daemons_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dialogd.toml");
    let settings = format!(
        "[model]\npath = \"{}\"\n[generation]\nmax_new_tokens = 16\n[context]\nstore = \"memory\"\n\
         [safety]\nblocked_words = [\"pineapple\"]\n\
         [personas]\ndefined = [{{ name = \"pirate\", seed = [\"Ahoy! I sail the seven seas.\"] }}]\n",
        model_dir("pico-bin").display()
    );
    std::fs::write(&config, settings).unwrap();
    let state = dir.path().join("state");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dialogd"))
        .args(["chat", "--config", config.to_str().unwrap()])
        .env("XDG_STATE_HOME", &state)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello, how are you?\n/help\n/frobnicate now\nI love pineapple\n/persona use pirate\nWhere do you sail?\n/reset\n/quit\nnever read\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    let replies: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("bot> ")).collect();
    // A reply; the help (chat's lines and the daemon's); the filter's
    // notice; the persona switch; a reply as the pirate; the reset.
    assert!(!replies[0].trim().is_empty(), "{text}");
    assert!(text.contains("(chat) /help: this list; /quit or Ctrl-D: leave"), "{text}");
    assert!(replies[1].starts_with("I'm a DialoGPT chat bot. Commands:"), "{text}");
    assert!(lines.contains(&"(unknown command /frobnicate: /help lists the commands)"), "{text}");
    assert_eq!(replies[2], "Let's keep it friendly.", "{text}");
    assert!(replies[3].contains("pirate"), "{text}");
    assert!(!replies[4].trim().is_empty(), "{text}");
    assert_eq!(replies[5], "Done: I've forgotten this channel's conversation.", "{text}");
    assert_eq!(replies.len(), 6, "nothing after /quit is read: {text}");
    assert!(crate::support::stderr(&out).contains("ready:"));
    // The typed lines are the history, in the XDG state folder.
    let history = std::fs::read_to_string(state.join("dialogd/chat_history")).unwrap();
    assert!(history.contains("Hello, how are you?") && history.contains("/frobnicate now"), "{history}");
}

/// Awkward turns (outer whitespace, a decomposed accent, tabs and newlines
/// inside, a typed separator, a byte-order mark and a zero-width space,
/// full-width letters and an emoji) make one prompt on every path: `dialogd
/// generate` (the binary), `chat` and `rank` (`cli::encode_turn`), training
/// data (`build_examples`), the MMI source, and the daemon (which stores
/// the normalised text it encodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_makes_one_prompt_of_awkward_turns() {
    use dialogd::prompt::{build_prompt, normalize_turn};
    use dialogd::tokenizer::DialogTokenizer;
    let turns: Vec<String> =
        ["  Cafe\u{301} ok ", "tabs\tand\nnew  lines", "I typed <|endoftext|>", "\u{FEFF}zero\u{200B}width ", "ＦＵＬＬ 🙂\r\n"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let dir = model_dir("pico-bin");
    let tok = DialogTokenizer::from_dir(&dir).unwrap();
    let eos = tok.eos_id();
    let encoded: Vec<Vec<u32>> = turns.iter().map(|t| tok.encode(&normalize_turn(t)).unwrap()).collect();
    let want = build_prompt(&encoded, eos, 60).unwrap().ids;
    let raw: Vec<Vec<u32>> = turns.iter().map(|t| tok.encode(t).unwrap()).collect();
    assert_ne!(build_prompt(&raw, eos, 60).unwrap().ids, want, "the turns are not awkward enough to tell");

    // generate: the binary's own prompt ids.
    let out = generate_json(&dir, &["--greedy", "--max-new-tokens", "4"], &turns);
    assert_eq!(ids(&out["prompt_ids"]), want, "generate");
    // chat and rank encode each turn with cli::encode_turn.
    let by_cli: Vec<Vec<u32>> = turns.iter().enumerate().map(|(i, t)| dialogd::cli::encode_turn(&tok, i + 1, t).unwrap()).collect();
    assert_eq!(by_cli, encoded, "chat / rank");
    // The MMI source is built from those same ids, newest turn first.
    let newest_first: Vec<Vec<u32>> = encoded.iter().rev().cloned().collect();
    assert_eq!(dialogd::ranking::mmi::reverse_source(&by_cli, eos, 1 << 20).unwrap(), build_prompt(&newest_first, eos, 1 << 20).unwrap().ids);
    // Training data.
    let dialogue = dialogd::training::data::Dialogue {
        turns: turns.iter().map(|t| dialogd::training::data::Turn { text: t.clone(), author: None, weight: 1.0 }).collect(),
        origin: "test:1".into(),
    };
    let (examples, _) = dialogd::training::data::build_examples(&[dialogue], &tok, 1024).unwrap();
    let full = build_prompt(&encoded, eos, 1 << 20).unwrap().ids;
    assert_eq!(examples[0].inputs, full[..full.len() - 1], "training data");
    // The daemon stores (and encodes) each message in the same form.
    let d = crate::support::TestDaemon::start(&crate::support::daemon_toml(None, &[])).await;
    for (n, turn) in turns.iter().enumerate() {
        let (status, _) = d.say("awkward", "ann", turn, Some(&format!("m{n}"))).await;
        assert_eq!(status, 200);
    }
    let stored: Vec<String> = d.turns("awkward").await.into_iter().filter(|(_, _, bot)| !bot).map(|(_, t, _)| t).collect();
    assert_eq!(stored, turns.iter().map(|t| normalize_turn(t)).collect::<Vec<_>>(), "daemon");
    d.stop().await;
}

/// Issue #16 point 6: a model folder cloned without git-lfs holds pointer
/// files where the weights should be; the error says so, names git-lfs and
/// what to run, for every weights format (and the daemon's `run` loads
/// through the same reader).
#[test]
fn git_lfs_pointers_are_named_with_what_to_run() {
    let tmp = tempfile::tempdir().unwrap();
    let pointer = "version https://git-lfs.github.com/spec/v1\n\
                   oid sha256:7c4ba2fd2ac9ec4e6c4f07e5cc6ee55ab5d7dd1f2f8b2c1f6b2ce2e4e2d2f3a1\n\
                   size 351265583\n";
    for (fixture, weights) in [("pico-safetensors", "model.safetensors"), ("pico-bin", "pytorch_model.bin")] {
        let dir = tmp.path().join(fixture);
        copy_dir(&fixtures().join(fixture), &dir);
        std::fs::write(dir.join(weights), pointer).unwrap();
        let out = dialogd(&["generate", "--model", dir.to_str().unwrap(), "hi"]);
        assert_fails_with(&out, "Git LFS pointer");
        let err = crate::support::stderr(&out);
        assert!(err.contains(weights) && err.contains("git lfs pull") && err.contains("git-lfs"), "{err}");
        assert!(!err.contains("pickle") && !err.contains("header of"), "{err}");
    }
}

/// `bench --long-prompt-tokens`: the mixed load (one long prompt arriving
/// while the others decode) reports that prompt's time to first token and
/// every level's token gaps; a long prompt that does not fit is refused.
#[test]
fn bench_runs_a_mixed_load_with_a_long_prompt() {
    let pico = fixtures().join("pico-safetensors");
    let pico = pico.to_str().unwrap();
    let bench = |extra: &[&str]| -> Vec<Value> {
        let mut args = vec!["bench", "--model", pico, "--concurrency", "1,3", "--prompt-tokens", "4", "--new-tokens", "12", "--json"];
        args.extend_from_slice(extra);
        let out = dialogd(&args);
        assert!(out.status.success(), "{}", crate::support::stderr(&out));
        stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    for level in bench(&["--long-prompt-tokens", "50", "--max-prefill-tokens", "8"]) {
        let long = level["long_prompt_ttft_ms"].as_f64().unwrap_or_else(|| panic!("no long_prompt_ttft_ms in {level}"));
        assert!(long > 0.0, "{level}");
        let (p50, max) = (level["token_gap_ms_p50"].as_f64().unwrap(), level["token_gap_ms_max"].as_f64().unwrap());
        assert!(p50 > 0.0 && max >= p50, "{level}");
        assert_eq!(level["aggregate_tokens_per_s"].as_f64().map(|v| v > 0.0), Some(true), "{level}");
    }
    let plain = bench(&[]);
    assert_eq!(plain.len(), 2);
    assert!(plain.iter().all(|l| l.get("long_prompt_ttft_ms").is_none() && l["token_gap_ms_max"].is_number()), "{plain:?}");
    let out = dialogd(&["bench", "--model", pico, "--long-prompt-tokens", "63", "--concurrency", "1", "--prompt-tokens", "4", "--new-tokens", "2"]);
    assert_fails_with(&out, "--long-prompt-tokens 63");
}
