//! Safety and ranking end to end, through the daemon's HTTP adapter: a toxic
//! message is neither stored nor echoed, a flagged candidate is never sent,
//! and candidates are ranked by DialogRPT when rankers are configured.
//! Scripted models (a GPT-2 built so its next token depends only on the
//! current one, `synthetic::bigram_tensors`) give replies of a known shape:
//! a complete reply beats a cut-off repeat, and an emoji-only reply is
//! sent.

use std::path::PathBuf;

use dialogd::model::synthetic::write_bigram_checkpoint;
use dialogd::model::Gpt2Config;

use crate::support::{cached_checkpoint, daemon_toml, fixtures, ranker_dir, TestDaemon};

const EOS: u32 = 50256;
/// GPT-2 tokens: "yes", " no", " 🙂", and ten punctuation tokens ("!", ".",
/// "?", "...", "?!", "!?", "!!", "!!!", "..", ":").
const YES: u32 = 8505;
const NO: u32 = 645;
const SMILE: u32 = 32485;
const PUNCT: [u32; 10] = [0, 13, 30, 986, 12248, 22857, 3228, 10185, 492, 25];

/// A one-layer GPT-2 that follows `script` (token → followers and logits).
fn scripted_model(name: &str, script: &[(u32, Vec<(u32, f32)>)]) -> PathBuf {
    let mut cfg = Gpt2Config::with_shape(64, 1, 2);
    cfg.n_positions = 96;
    cfg.n_inner = Some(64);
    cached_checkpoint(&format!("bigram {name} {cfg:?} {script:?}"), name, |dir| {
        write_bigram_checkpoint(dir, &cfg, script, &fixtures().join("gpt2")).unwrap()
    })
}

/// "yes" (p 0.9), then one of ten punctuation marks (0.1 each), then the
/// end of the turn: a finished reply of mean log-probability
/// (ln 0.9 + ln 0.1) / 2 = −1.20. Or " no" (p 0.1), repeated for sure: cut
/// off at 3 tokens with mean (ln 0.1) / 3 = −0.77, the higher score.
fn yes_or_no_model() -> PathBuf {
    let punct: Vec<(u32, f32)> = PUNCT.iter().map(|&p| (p, 30.0)).collect();
    let mut script = vec![(EOS, vec![(YES, 30.0 + 9f32.ln()), (NO, 30.0)]), (YES, punct), (NO, vec![(NO, 30.0)])];
    script.extend(PUNCT.iter().map(|&p| (p, vec![(EOS, 30.0)])));
    scripted_model("yes-or-no", &script)
}

/// Plain sampling, `candidates` drawn, at most 3 new tokens.
fn scripted_toml(model: &std::path::Path, candidates: usize) -> String {
    let path = format!("path = \"{}\"", model.display());
    let candidates = format!("candidates = {candidates}");
    daemon_toml(
        None,
        &[
            ("model", path.as_str()),
            ("generation", candidates.as_str()),
            ("generation", "max_new_tokens = 3"),
            ("generation", "temperature = 1.0"),
            ("generation", "top_k = 0"),
            ("generation", "top_p = 1.0"),
            ("generation", "repetition_penalty = 1.0"),
            ("generation", "no_repeat_ngram = 0"),
        ],
    )
}

#[test]
fn the_scripted_model_says_what_its_script_says() {
    use candle_core::{DType, Device};
    let dir = yes_or_no_model();
    let model = dialogd::model::Gpt2::load(&dir, DType::F32, &Device::Cpu).unwrap();
    // After some user text and the separator; after "yes"; after " no".
    for (ids, want) in [(vec![40, 588, EOS], vec![(YES, 0.9), (NO, 0.1)]), (vec![EOS, YES], vec![(13, 0.1), (0, 0.1)]), (vec![EOS, NO], vec![(NO, 1.0)])] {
        let input = model.tokens_tensor(&ids).unwrap();
        let mut cache = model.new_cache();
        let logits = model.forward(&input, &mut cache).unwrap().squeeze(0).unwrap();
        let probs: Vec<f32> = candle_nn::ops::softmax_last_dim(&logits).unwrap().to_vec1().unwrap();
        for (token, p) in want {
            assert!((probs[token as usize] - p).abs() < 1e-3, "after {ids:?}: p({token}) = {} not {p}", probs[token as usize]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_reply_beats_a_cut_off_repeat() {
    let model = yes_or_no_model();
    let d = TestDaemon::start(&scripted_toml(&model, 8)).await;
    // Among 8 candidates a "yes…" comes with probability 1 − 0.1⁸; the
    // cut-off " no no no" scores higher and used to win every time.
    for channel in 0..12 {
        let (status, answer) = d.say(&format!("fresh-{channel}"), "ann", "are you there?", None).await;
        assert_eq!(status, 200, "{answer}");
        let reply = answer["reply"].as_str().unwrap_or_else(|| panic!("no reply: {answer}"));
        assert!(reply.starts_with("yes") && reply.len() > 3, "channel {channel}: {reply:?}");
    }
    assert_eq!(d.metric("dialogd_replies_cut_off_total").await, 0.0);
    d.stop().await;

    // When nothing finishes, the cut-off reply is sent, and counted.
    let only_no = scripted_model("only-no", &[(EOS, vec![(NO, 30.0)]), (NO, vec![(NO, 30.0)])]);
    let d = TestDaemon::start(&scripted_toml(&only_no, 8)).await;
    let (_, answer) = d.say("c", "ann", "are you there?", None).await;
    assert_eq!(answer["reply"], "no no no", "{answer}");
    assert_eq!(d.metric("dialogd_replies_cut_off_total").await, 1.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emoji_only_reply_is_sent() {
    // " 🙂" then the end of the turn: the reply is "🙂".
    let model = scripted_model("smile", &[(EOS, vec![(SMILE, 30.0)]), (SMILE, vec![(EOS, 30.0)])]);
    let d = TestDaemon::start(&scripted_toml(&model, 2)).await;
    let (status, answer) = d.say("c", "ann", "how do you feel?", None).await;
    assert_eq!(status, 200);
    assert_eq!(answer, serde_json::json!({ "reply": "🙂" }));
    assert_eq!(d.metric("dialogd_refusals_total{reason=\"no_safe_candidate\"}").await, 0.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toxic_message_is_answered_by_policy_and_never_stored() {
    let d = TestDaemon::start(&daemon_toml(None, &[])).await;
    let (status, answer) = d.say("c", "troll", "you are a f*cking idiot", Some("m1")).await;
    assert_eq!(status, 200);
    assert_eq!(answer["reply"], "Let's keep it friendly.", "{answer}");
    assert!(d.turns("c").await.is_empty(), "a toxic message was stored");
    // An innocent message that naive filters flag goes through.
    let (_, answer) = d.say("c", "ann", "Scunthorpe has a fine cocktail bar", None).await;
    assert!(answer["reply"].is_string(), "{answer}");
    assert_eq!(d.turns("c").await.len(), 2);
    assert_eq!(d.metric("dialogd_refusals_total{reason=\"toxic_input\"}").await, 1.0);
    d.stop().await;

    let d = TestDaemon::start(&daemon_toml(None, &[("safety", "toxic_input = \"silent\"")])).await;
    let (_, answer) = d.say("c", "troll", "sh1t for brains", None).await;
    assert_eq!(answer, serde_json::json!({ "reply": null, "reason": "toxic_input" }));
    assert!(d.turns("c").await.is_empty());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flagged_candidate_is_never_sent() {
    let greedy = [("generation", "temperature = 0.0"), ("generation", "candidates = 2")];
    // What the model says to this message, unfiltered.
    let d = TestDaemon::start(&daemon_toml(None, &greedy)).await;
    let (_, answer) = d.say("c", "ann", "What is your name?", None).await;
    let reply = answer["reply"].as_str().unwrap_or_else(|| panic!("no reply: {answer}")).to_string();
    d.stop().await;
    let word = reply
        .split(|c: char| !c.is_alphabetic())
        .filter(|w| w.len() >= 4)
        .max_by_key(|w| w.len())
        .expect("a word to block")
        .to_lowercase();

    // Block that word: every candidate (greedy, so all alike) is flagged in
    // every attempt, and the bot stays silent rather than send it.
    let blocked = format!("blocked_words = [\"{word}\"]");
    let mut extra = greedy.to_vec();
    extra.push(("safety", blocked.as_str()));
    extra.push(("safety", "max_attempts = 3"));
    let d = TestDaemon::start(&daemon_toml(None, &extra)).await;
    let (_, answer) = d.say("c", "ann", "What is your name?", None).await;
    assert_eq!(answer, serde_json::json!({ "reply": null, "reason": "no_safe_candidate" }), "blocked {word:?} in {reply:?}");
    // The user's turn is kept; no bot turn was stored.
    let turns = d.turns("c").await;
    assert_eq!(turns.len(), 1);
    assert!(!turns[0].2);
    assert_eq!(d.metric("dialogd_candidates_drawn_total").await, 6.0);
    assert_eq!(d.metric("dialogd_candidates_flagged_total").await, 3.0, "one flagged, one screened as a duplicate, per attempt");
    assert_eq!(d.metric("dialogd_refusals_total{reason=\"no_safe_candidate\"}").await, 1.0);
    d.stop().await;
}

/// " no" (p 0.6) or "yes" (p 0.4), then a punctuation mark, then the end
/// of the turn: "no." scores (ln 0.6 + ln 0.1) / 2 = −1.41, above "yes."
/// at −1.61, so unfiltered the bot says "no…" whenever a candidate does.
fn no_or_yes_model() -> PathBuf {
    let punct: Vec<(u32, f32)> = PUNCT.iter().map(|&p| (p, 30.0)).collect();
    let mut script = vec![(EOS, vec![(NO, 30.0 + 1.5f32.ln()), (YES, 30.0)]), (YES, punct.clone()), (NO, punct)];
    script.extend(PUNCT.iter().map(|&p| (p, vec![(EOS, 30.0)])));
    scripted_model("no-or-yes", &script)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_classifier_refuses_input_and_drops_candidates() {
    let model = no_or_yes_model();
    // Unfiltered: the favourite "no…" is sent (8 candidates hold one but
    // with probability 0.4⁸).
    let d = TestDaemon::start(&scripted_toml(&model, 8)).await;
    let mut said_no = 0;
    for channel in 0..4 {
        let (_, answer) = d.say(&format!("plain-{channel}"), "ann", "are you there?", None).await;
        said_no += answer["reply"].as_str().is_some_and(|r| r.starts_with("no")) as usize;
    }
    assert!(said_no >= 3, "the unfiltered favourite is \"no\" ({said_no} of 4)");
    d.stop().await;

    // A classifier that flags the word "no" (no word list knows it).
    let detector = cached_checkpoint("word detector no", "detector-no", |dir| {
        dialogd::safety::classifier::synthetic::write_word_detector(dir, "no").unwrap()
    });
    let toml = scripted_toml(&model, 8)
        .replace("[safety]\n", "")
        + &format!(
            "[safety]\nclassifier = \"{}\"\nclassifier_thresholds = {{ toxicity = 0.7 }}\nmax_attempts = 3\n",
            detector.display()
        );
    let d = TestDaemon::start(&toml).await;
    for channel in 0..4 {
        let (status, answer) = d.say(&format!("c-{channel}"), "ann", "are you there?", None).await;
        assert_eq!(status, 200);
        let reply = answer["reply"].as_str().unwrap_or_else(|| panic!("no reply: {answer}"));
        assert!(reply.starts_with("yes"), "a flagged candidate was sent: {reply:?}");
    }
    let flagged = d.metric("dialogd_candidates_flagged_total").await;
    assert!(flagged >= 4.0);
    // Per label and direction: only the classifier flags here, so every
    // flagged candidate is one `toxicity` out; `insult` has no threshold.
    let by_label = |label: &str, direction: &str| format!("dialogd_classifier_flagged_total{{label=\"{label}\",direction=\"{direction}\"}}");
    assert_eq!(d.metric(&by_label("toxicity", "out")).await, flagged);
    assert_eq!(d.metric(&by_label("toxicity", "in")).await, 0.0);
    assert_eq!(d.metric(&by_label("insult", "out")).await, 0.0);
    // A flagged message: the notice, nothing stored, nothing generated.
    let drawn = d.metric("dialogd_candidates_drawn_total").await;
    let (_, answer) = d.say("c-0", "troll", "No way, NO!", None).await;
    assert_eq!(answer["reply"], "Let's keep it friendly.", "{answer}");
    assert_eq!(d.turns("c-0").await.len(), 2, "only the first exchange is stored");
    assert_eq!(d.metric("dialogd_refusals_total{reason=\"toxic_input\"}").await, 1.0);
    assert_eq!(d.metric("dialogd_candidates_drawn_total").await, drawn);
    assert_eq!(d.metric(&by_label("toxicity", "in")).await, 1.0);
    assert_eq!(d.metric(&by_label("toxicity", "out")).await, flagged);
    assert_eq!(d.metric(&by_label("insult", "in")).await, 0.0);
    d.stop().await;

    // Thresholds that name a label the classifier lacks stop the daemon, by name.
    let bad = toml.replace("{ toxicity = 0.7 }", "{ toxic = 0.7 }");
    let err = TestDaemon::try_start(&bad).await.err().expect("refused").to_string();
    assert!(err.contains("safety.classifier") && err.contains("`toxic`") && err.contains("toxicity, insult"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidates_are_ranked_by_dialogrpt() {
    let rankers = format!("rankers = [\"updown={}\", \"{}\"]", ranker_dir("updown").display(), ranker_dir("human-vs-rand").display());
    let extra = [
        ("generation", "candidates = 4"),
        ("generation", "temperature = 1.5"),
        ("generation", "top_k = 0"),
        ("ranking", rankers.as_str()),
    ];
    let d = TestDaemon::start(&daemon_toml(None, &extra)).await;
    for i in 0..3 {
        let (status, answer) = d.say("c", "ann", &format!("Tell me something, number {i}"), None).await;
        assert_eq!(status, 200);
        assert!(answer["reply"].is_string(), "{answer}");
    }
    let drawn = d.metric("dialogd_candidates_drawn_total").await;
    let ranked = d.metric("dialogd_candidates_ranked_total").await;
    assert_eq!(drawn, 12.0);
    assert!(ranked >= 2.0, "nothing ranked ({ranked} of {drawn})");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ranking_and_safety_settings_name_their_key() {
    for (section, line, key) in [
        ("safety", "policy = \"lenient\"", "safety.policy"),
        ("safety", "max_attempts = 0", "safety.max_attempts"),
        ("safety", "channels = { \"nowhere\" = \"strict\" }", "safety.channels"),
        ("ranking", "rankers = [\"sideways=/x\"]", "ranking.rankers"),
        // A group whose weights sum to zero: `run` refused it, so must
        // `check-config` (same validation).
        ("ranking", "rankers = [\"prior=/a:1\", \"prior=/b:-1\", \"updown=/c\"]", "ranking.rankers"),
        ("generation", "max_batch = 1", "generation.max_batch"),
    ] {
        let toml = daemon_toml(None, &[(section, line)]);
        let err = crate::support::settings_result(&toml).unwrap_err().to_string();
        assert!(err.contains(key), "{line}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_changes_the_safety_settings_live() {
    let toml = daemon_toml(None, &[]);
    let d = TestDaemon::start(&toml).await;
    let (_, answer) = d.say("c", "troll", "you are a f*cking idiot", None).await;
    assert_eq!(answer["reply"], "Let's keep it friendly.");
    // The same file with a silent policy and a new blocked word, reloaded
    // as SIGHUP does.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dialogd.toml");
    std::fs::write(&path, daemon_toml(None, &[("safety", "toxic_input = \"silent\""), ("safety", "blocked_words = [\"pineapple\"]")])).unwrap();
    let metrics = dialogd::telemetry::Metrics::new();
    assert!(dialogd::daemon::reload(&d.pipeline, Some(&path), &dialogd::settings::load(None).unwrap(), &metrics).unwrap());
    let (_, answer) = d.say("c", "troll", "you are a f*cking idiot", None).await;
    assert_eq!(answer, serde_json::json!({ "reply": null, "reason": "toxic_input" }));
    let (_, answer) = d.say("c", "ann", "I love p1neapple on pizza", None).await;
    assert_eq!(answer, serde_json::json!({ "reply": null, "reason": "toxic_input" }));
    assert!(d.turns("c").await.is_empty());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_consented_exchanges_are_collected_and_forget_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let folder = format!("dir = \"{}\"", dir.path().display());
    let extra = [
        ("collect", "enabled = true"),
        ("collect", folder.as_str()),
        ("collect", "channels = [\"http:c\"]"),
        ("collect", "author_key = \"0123456789abcdef-test\""),
        ("generation", "temperature = 0.0"),
    ];
    let d = TestDaemon::start(&daemon_toml(None, &extra)).await;
    for (channel, author, text) in [("c", "ann", "What is your name?"), ("c", "bob", "Tell me more"), ("d", "ann", "Not collected here")] {
        let (_, answer) = d.say(channel, author, text, None).await;
        assert!(answer["reply"].is_string() || answer["reason"] == "no_safe_candidate", "{answer}");
    }
    // A toxic message is never collected.
    d.say("c", "troll", "you are a f*cking idiot", None).await;
    let lines = |dir: &std::path::Path| -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            out.extend(text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()));
        }
        out
    };
    let collected = lines(dir.path());
    let replies = d.turns("c").await.iter().filter(|t| t.2).count();
    assert_eq!(collected.len(), replies, "{collected:?}");
    for record in &collected {
        assert_eq!(record["channel"], "http:c");
        let text = record.to_string();
        assert!(!text.contains("\"ann\"") && !text.contains("\"bob\"") && !text.contains("idiot"), "{text}");
    }
    // Greedy, "What is your name?" gets a clean reply from pico.
    assert!(!collected.is_empty(), "nothing collected");
    let (_, answer) = d.say("c", "ann", "/forget", None).await;
    assert!(answer["reply"].as_str().unwrap().starts_with("Done"), "{answer}");
    let left = lines(dir.path());
    assert!(left.len() < collected.len(), "ann's exchanges are still collected");
    d.stop().await;
}
