//! DialogRPT and MMI against Hugging Face transformers (golden file from
//! scripts/make_golden_rpt.py), batched versus one-at-a-time scoring, the
//! ensemble, and `dialogd rank` as users run it, bad input included.

use candle_core::{DType, Device};
use dialogd::model::EOS_TOKEN_ID;
use dialogd::prompt::build_prompt;
use dialogd::ranking::{DialogRpt, Ensemble, Head, Member, MmiScorer, RankingError};
use dialogd::tokenizer::DialogTokenizer;
use serde_json::Value;

use crate::support::{assert_fails_with, dialogd, floats, ids, model_dir, ranker_dir, rpt_golden, stdout, strings};

const HEADS: [&str; 5] = ["updown", "depth", "width", "human-vs-rand", "human-vs-machine"];

fn load(name: &str) -> (DialogRpt, DialogTokenizer) {
    let dir = ranker_dir(name);
    (DialogRpt::load(&dir, DType::F32, &Device::Cpu).unwrap(), DialogTokenizer::from_dir(&dir).unwrap())
}

fn encode_all(tok: &DialogTokenizer, texts: &[String]) -> Vec<Vec<u32>> {
    texts.iter().map(|t| tok.encode(t).unwrap()).collect()
}

fn cases(name: &str) -> &'static [Value] {
    rpt_golden()["rankers"][name]["cases"].as_array().unwrap()
}

#[test]
fn dialogrpt_scores_match_transformers() {
    let mut worst_score = 0f64;
    let mut worst_logit = 0f64;
    for name in HEADS {
        let (ranker, tok) = load(name);
        for case in cases(name) {
            let turns = encode_all(&tok, &strings(&case["turns"]));
            let candidates = encode_all(&tok, &strings(&case["candidates"]));
            // The inputs are the ones transformers saw.
            assert_eq!(build_prompt(&turns, EOS_TOKEN_ID, 1 << 20).unwrap().ids, ids(&case["context_ids"]), "{name}");
            let want_candidates: Vec<Vec<u32>> = case["candidate_ids"].as_array().unwrap().iter().map(ids).collect();
            assert_eq!(candidates, want_candidates, "{name}");
            let logits = ranker.logits(&turns, &candidates).unwrap();
            let scores = ranker.scores(&turns, &candidates).unwrap();
            // The single-pass batch (context repeated per row) agrees.
            let full = ranker.logits_full_batch(&turns, &candidates).unwrap();
            for (a, b) in logits.iter().zip(&full) {
                assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{name}: shared context {a} vs full batch {b}");
            }
            for (i, (want_logit, want_score)) in floats(&case["logits"]).into_iter().zip(floats(&case["scores"])).enumerate() {
                let logit_err = (logits[i] as f64 - want_logit).abs() / want_logit.abs().max(1.0);
                let score_err = (scores[i] as f64 - want_score).abs();
                worst_logit = worst_logit.max(logit_err);
                worst_score = worst_score.max(score_err);
                assert!(score_err < 1e-4, "{name} candidate {i}: score {} vs {want_score}", scores[i]);
                assert!(logit_err < 1e-4, "{name} candidate {i}: logit {} vs {want_logit}", logits[i]);
            }
        }
    }
    eprintln!("DialogRPT parity: worst score error {worst_score:.2e}, worst relative logit error {worst_logit:.2e}");
}

#[test]
fn batched_scores_equal_one_at_a_time() {
    for name in ["updown", "width"] {
        let (ranker, tok) = load(name);
        for case in cases(name) {
            let turns = encode_all(&tok, &strings(&case["turns"]));
            let candidates = encode_all(&tok, &strings(&case["candidates"]));
            let batched = ranker.scores(&turns, &candidates).unwrap();
            for (i, candidate) in candidates.iter().enumerate() {
                let alone = ranker.scores(&turns, std::slice::from_ref(candidate)).unwrap()[0];
                assert!((alone - batched[i]).abs() < 1e-5, "{name} candidate {i}: alone {alone}, batched {}", batched[i]);
            }
            // Different candidates get different scores (the symptom of
            // picking the position by pad id was one score for all).
            let spread = batched.iter().fold(f32::MIN, |m, &s| m.max(s)) - batched.iter().fold(f32::MAX, |m, &s| m.min(s));
            assert!(spread > 0.05, "{name}: scores barely differ: {batched:?}");
        }
    }
}

#[test]
fn a_typed_separator_does_not_split_a_turn() {
    let (ranker, tok) = load("updown");
    let case = &cases("updown")[2];
    let turns_text = strings(&case["turns"]);
    assert!(turns_text[0].contains("<|endoftext|>"));
    let turns = encode_all(&tok, &turns_text);
    let context = ids(&case["context_ids"]);
    // One separator per turn, each at a turn's end.
    assert_eq!(context.iter().filter(|&&id| id == EOS_TOKEN_ID).count(), turns.len());
    assert_eq!(context[turns[0].len()], EOS_TOKEN_ID);
    // Had the typed text become a separator, the scores would differ.
    let candidates = encode_all(&tok, &strings(&case["candidates"]));
    let honest = ranker.scores(&turns, &candidates).unwrap();
    let (before, after) = turns_text[0].split_once("<|endoftext|>").unwrap();
    let forged: Vec<Vec<u32>> =
        [before.trim(), after.trim(), &turns_text[1]].iter().map(|t| tok.encode(t).unwrap()).collect();
    let forged = ranker.scores(&forged, &candidates).unwrap();
    assert!(honest.iter().zip(&forged).any(|(a, b)| (a - b).abs() > 1e-3), "{honest:?} vs {forged:?}");
    // A candidate's typed separator stays text too, and is scored as such.
    let candidate = tok.encode("I don't know <|endoftext|> maybe").unwrap();
    assert!(!candidate.contains(&EOS_TOKEN_ID));
}

#[test]
fn ensemble_matches_ensemble_yml() {
    let members: Vec<Member> = HEADS
        .iter()
        .map(|name| {
            let head = Head::parse(name).unwrap();
            Member { name: name.to_string(), group: head.group(), weight: head.default_weight(), ranker: load(name).0 }
        })
        .collect();
    let ensemble = Ensemble::new(members).unwrap();
    let tok = load("updown").1;
    let mut worst = 0f64;
    for (idx, want) in rpt_golden()["ensemble_final"].as_array().unwrap().iter().enumerate() {
        let case = &cases("updown")[idx];
        let turns = encode_all(&tok, &strings(&case["turns"]));
        let candidates = encode_all(&tok, &strings(&case["candidates"]));
        let got = ensemble.scores(&turns, &candidates).unwrap();
        assert_eq!(got.members.len(), 5);
        for (g, w) in got.final_scores.iter().zip(floats(want)) {
            worst = worst.max((*g as f64 - w).abs());
        }
    }
    eprintln!("ensemble parity: worst final score error {worst:.2e}");
    assert!(worst < 1e-4, "worst {worst}");
}

#[test]
fn mmi_matches_transformers() {
    let dir = ranker_dir("mmi");
    let scorer = MmiScorer::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let tok = DialogTokenizer::from_dir(&dir).unwrap();
    let mut worst = 0f64;
    let cases = rpt_golden()["mmi"]["cases"].as_array().unwrap();
    // Multi-turn contexts, one of them too long for the model (its oldest
    // turns are dropped), are in the golden file.
    assert!(cases.iter().filter(|c| c["turns_kept"].as_u64().unwrap() >= 2).count() >= 4);
    assert!(cases.iter().any(|c| c["turns_kept"].as_u64().unwrap() < c["turns"].as_array().unwrap().len() as u64));
    for case in cases {
        let turns = encode_all(&tok, &strings(&case["turns"]));
        let candidates = encode_all(&tok, &strings(&case["candidates"]));
        // The source is the reference's, newest turn first.
        let longest = candidates.iter().map(Vec::len).max().unwrap();
        let source = dialogd::ranking::mmi::reverse_source(&turns, EOS_TOKEN_ID, 128 - longest - 1).unwrap();
        assert_eq!(source, ids(&case["source_ids"]), "{}", case["turns"]);
        let got = scorer.scores(&turns, &candidates).unwrap();
        for (g, w) in got.iter().zip(floats(&case["scores"])) {
            worst = worst.max((*g as f64 - w).abs() / w.abs().max(1.0));
        }
        // Read oldest first, a multi-turn source scores differently: the
        // golden numbers tell the two orders apart.
        if let Some(oldest_first) = case.get("scores_oldest_first") {
            let apart = got.iter().zip(floats(oldest_first)).map(|(g, w)| (*g as f64 - w).abs()).fold(0f64, f64::max);
            assert!(apart > 1e-2, "{}: the oldest-first scores are within {apart} of ours", case["turns"]);
        }
    }
    eprintln!("MMI parity: worst relative error {worst:.2e}");
    assert!(worst < 1e-4, "worst {worst}");
}

#[test]
fn a_long_context_loses_its_oldest_turns() {
    let (ranker, tok) = load("depth");
    let candidates = vec![tok.encode("Sure, why not.").unwrap(), tok.encode("No.").unwrap()];
    let filler: Vec<Vec<u32>> = (0..12).map(|i| tok.encode(&format!("This is older turn number {i} of a long chat.")).unwrap()).collect();
    let n_positions = ranker.config().n_positions;
    assert!(filler.iter().map(|t| t.len() + 1).sum::<usize>() > n_positions);
    let scores = ranker.scores(&filler, &candidates).unwrap();
    // The same as scoring the turns that fit beside the longest candidate.
    let kept = build_prompt(&filler, EOS_TOKEN_ID, n_positions - candidates[0].len()).unwrap().turns_kept;
    assert!(kept < filler.len());
    let reference = ranker.scores(&filler[filler.len() - kept..], &candidates).unwrap();
    assert_eq!(scores, reference);
}

#[test]
fn bad_ranker_input_is_a_clear_error() {
    let (ranker, tok) = load("updown");
    let turns = vec![tok.encode("hi").unwrap()];
    assert!(matches!(ranker.scores(&turns, &[]), Err(RankingError::NoCandidates)));
    assert!(matches!(ranker.scores(&turns, &[vec![31373], vec![]]), Err(RankingError::EmptyCandidate(2))));
    assert!(matches!(ranker.scores(&turns, &[vec![1; 127]]), Err(RankingError::CandidateTooLong { idx: 1, .. })));
    assert!(ranker.scores(&turns, &[vec![60000]]).unwrap_err().to_string().contains("outside the vocabulary"));
    assert!(ranker.scores(&[], &[vec![1]]).unwrap_err().to_string().contains("no turns"));
    let missing = std::env::temp_dir().join("dialogd-no-such-ranker");
    assert!(DialogRpt::load(&missing, DType::F32, &Device::Cpu).unwrap_err().to_string().contains("does not exist"));
    // A language model is not a ranker.
    let err = DialogRpt::load(&model_dir("pico-safetensors"), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("not a DialogRPT checkpoint") && err.contains("score.weight"), "{err}");
}

fn rank_json(args: &[&str]) -> Vec<f64> {
    let out = dialogd(args);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "one JSON line: {text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 1, "{text}");
    floats(&v["scores"])
}

fn rank_args<'a>(rankers: &'a [String], case: &'a Value, owned: &'a mut Vec<String>) -> Vec<&'a str> {
    owned.clear();
    for r in rankers {
        owned.extend(["--ranker".to_string(), r.clone()]);
    }
    for c in strings(&case["candidates"]) {
        owned.extend(["--response".to_string(), c]);
    }
    owned.push("--json".into());
    owned.push("--".into());
    owned.extend(strings(&case["turns"]));
    owned.iter().map(String::as_str).collect()
}

#[test]
fn rank_json_matches_transformers() {
    let case = &cases("updown")[1];
    let rankers = vec![ranker_dir("updown").to_string_lossy().into_owned()];
    let mut owned = Vec::new();
    let mut args = vec!["rank"];
    args.extend(rank_args(&rankers, case, &mut owned));
    let got = rank_json(&args);
    let want = floats(&case["scores"]);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-4, "{got:?} vs {want:?}");
    }
}

#[test]
fn rank_ensemble_from_the_command_line() {
    // Heads inferred from folder names (DialogRPT-width, …) with the
    // ensemble.yml weights, except one given explicitly.
    let case = &cases("updown")[3];
    let mut rankers: Vec<String> = HEADS.iter().map(|h| ranker_dir(h).to_string_lossy().into_owned()).collect();
    rankers[2] = format!("width={}:-0.5", ranker_dir("width").display());
    let mut owned = Vec::new();
    let mut args = vec!["rank"];
    args.extend(rank_args(&rankers, case, &mut owned));
    let got = rank_json(&args);
    let want = floats(&rpt_golden()["ensemble_final"][3]);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-4, "{got:?} vs {want:?}");
    }
}

#[test]
fn rank_bad_input_fails_cleanly() {
    let ranker = ranker_dir("updown");
    let ranker = ranker.to_str().unwrap();
    let out = dialogd(&["rank", "--ranker", "/no/such/ranker", "--response", "hi", "hello"]);
    assert_fails_with(&out, "/no/such/ranker");
    let out = dialogd(&["rank", "--ranker", ranker, "--response", "fine", "--response", "  ", "hello"]);
    assert_fails_with(&out, "response 2 is empty");
    let out = dialogd(&["rank", "--ranker", ranker, "--response", "fine", "--", ""]);
    assert_fails_with(&out, "turn 1 is empty");
    let lm = model_dir("pico-safetensors");
    let out = dialogd(&["rank", "--ranker", lm.to_str().unwrap(), "--response", "fine", "hello"]);
    assert_fails_with(&out, "not a DialogRPT checkpoint");
    let out = dialogd(&["rank", "--ranker", &format!("karma={ranker}"), "--response", "fine", "hello"]);
    assert_fails_with(&out, "not a head");
    // Corrupt weights.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(format!("{ranker}/config.json"), dir.path().join("config.json")).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), b"not safetensors at all").unwrap();
    let out = dialogd(&["rank", "--ranker", dir.path().to_str().unwrap(), "--response", "fine", "hello"]);
    assert_fails_with(&out, "model.safetensors");
    // Weights that sum to zero in a group.
    let out = dialogd(&["rank", "--ranker", &format!("cond={ranker}:1"), "--ranker", &format!("cond={ranker}:-1"), "--response", "x", "hello"]);
    assert_fails_with(&out, "sum to 0");
}

/// `[ranking] device`: the rankers follow `model.device` unless it is set;
/// a device this build cannot open is refused with the key or the device
/// named, before anything is scored.
#[test]
fn rankers_run_on_the_models_device_unless_ranking_device_says_otherwise() {
    use dialogd::pipeline::rank::Ranker;
    use dialogd::settings::load_raw_with_env;
    let mmi = ranker_dir("mmi");
    let toml = crate::support::section_toml("ranking", &[format!("mmi = \"{}\"", mmi.display()), "mmi_weight = 1.0".into()]);
    let mut settings = crate::support::settings_from(&toml);
    assert_eq!(settings.ranking.device, "");
    assert!(Ranker::load(&settings.ranking, &settings.model).unwrap().is_some(), "cpu, as model.device");
    if !cfg!(feature = "cuda") {
        settings.model.device = "cuda".into();
        let err = Ranker::load(&settings.ranking, &settings.model).err().expect("no CUDA here").to_string();
        assert!(err.contains("built without CUDA support"), "{err}");
        settings.ranking.device = "cpu".into();
        assert!(Ranker::load(&settings.ranking, &settings.model).unwrap().is_some(), "ranking.device wins");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dialogd.toml");
        std::fs::write(&path, format!("{toml}\n").replace("[ranking]\n", "[ranking]\ndevice = \"cuda:1\"\n")).unwrap();
        let err = load_raw_with_env(Some(&path), Vec::new()).unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("ranking.device"), "{err}");
    }
}
