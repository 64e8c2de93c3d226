//! The pipeline without a model: a [`ScriptedEngine`] answers, a memory
//! store keeps the context, the pico checkpoint's tokenizer encodes. Each
//! test runs in milliseconds.

use std::path::Path;
use std::sync::Arc;

use dialogd_adapters::{Answer, ChannelKey, Core, CoreError, Inbound, Platform};

use super::engine::{Drawn, EngineError, ScriptedEngine};
use super::{Parts, Pipeline};
use crate::context::memory::MemoryStore;
use crate::context::{ContextStore, Limits};
use crate::personas::memory::MemoryPersonaStore;
use crate::personas::Personas;
use crate::safety::{HfClassifier, SafetyError, ToxicityClassifier};
use crate::settings::live::LiveSettings;
use crate::settings::{PersonaSpec, Settings};
use crate::telemetry::Metrics;
use crate::tokenizer::DialogTokenizer;

struct Fixture {
    pipeline: Pipeline,
    engine: Arc<ScriptedEngine>,
    store: Arc<MemoryStore>,
    tokenizer: DialogTokenizer,
    settings: Settings,
}

fn tokenizer() -> DialogTokenizer {
    DialogTokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pico-safetensors")).unwrap()
}

/// A pipeline over the default settings as `edit` changes them.
fn fixture(edit: impl FnOnce(&mut Settings)) -> Fixture {
    fixture_with(edit, None)
}

/// [`fixture`] with a safety classifier.
fn fixture_with(edit: impl FnOnce(&mut Settings), classifier: Option<Arc<dyn ToxicityClassifier>>) -> Fixture {
    let mut settings = crate::settings::load(None).unwrap();
    settings.generation.candidates = 2;
    edit(&mut settings);
    let engine = Arc::new(ScriptedEngine::new(1024));
    let store = Arc::new(MemoryStore::new(Limits::new(settings.context.max_turns, None)));
    let personas = Personas::new(settings.personas.clone(), Arc::new(MemoryPersonaStore::new()));
    let pipeline = Pipeline::new(Parts {
        engine: engine.clone(),
        store: store.clone(),
        tokenizer: tokenizer(),
        model_name: "scripted".into(),
        live: Arc::new(LiveSettings::new(settings.generation.clone(), settings.safety.clone())),
        max_tokens: settings.context.max_tokens,
        rate_limit: settings.rate_limit,
        ranker: None,
        classifier,
        words: Arc::new(crate::safety::WordStore::memory()),
        collector: None,
        personas,
        jobs: None,
        metrics: Metrics::new(),
    });
    Fixture { pipeline, engine, store, tokenizer: tokenizer(), settings }
}

fn message(channel: &str, text: &str, moderator: bool) -> Inbound {
    Inbound {
        channel: ChannelKey::new(Platform::Http, channel),
        author: "ann".into(),
        text: text.into(),
        msg_id: None,
        addressed_to_bot: true,
        moderator,
        operator: false,
        group: None,
        edit: None,
    }
}

impl Fixture {
    /// A candidate that ended with `<|endoftext|>`.
    fn drawn(&self, text: &str, logprob: f32) -> Drawn {
        Drawn { ids: self.tokenizer.encode(text).unwrap(), logprob, finished: true }
    }

    /// A candidate cut off by `max_new_tokens`.
    fn cut_off(&self, text: &str, logprob: f32) -> Drawn {
        Drawn { finished: false, ..self.drawn(text, logprob) }
    }

    async fn say(&self, channel: &str, text: &str) -> Result<Answer, CoreError> {
        self.pipeline.handle(message(channel, text, false)).await
    }

    async fn command(&self, channel: &str, text: &str) -> String {
        match self.pipeline.handle(message(channel, text, true)).await.unwrap() {
            Answer::Reply(out) => out.text,
            other => panic!("{text}: no reply: {other:?}"),
        }
    }

    /// The ids the engine was asked to continue, call by call.
    fn prompts(&self) -> Vec<Vec<u32>> {
        self.engine.calls.lock().unwrap().iter().map(|(ids, _)| ids.clone()).collect()
    }

    fn turns_ids(&self, turns: &[&str]) -> Vec<u32> {
        let mut ids = Vec::new();
        for turn in turns {
            ids.extend(self.tokenizer.encode(turn).unwrap());
            ids.push(self.tokenizer.eos_id());
        }
        ids
    }
}

fn text_of(answer: Answer) -> String {
    match answer {
        Answer::Reply(out) => out.text,
        Answer::Silent { reason } => format!("(silent: {reason})"),
    }
}

#[tokio::test]
async fn a_message_is_answered_and_the_exchange_becomes_context() {
    let f = fixture(|_| {});
    f.engine.then(vec![f.drawn(" Hello there", -2.0), f.drawn(" Good day to you", -6.0)]);
    assert_eq!(text_of(f.say("c", "hi bot").await.unwrap()), "Hello there", "the likelier by mean log-probability");
    f.engine.then(vec![f.drawn(" Fine, thanks", -1.0)]);
    assert_eq!(text_of(f.say("c", "how are you?").await.unwrap()), "Fine, thanks");
    let prompts = f.prompts();
    assert_eq!(prompts[0], f.turns_ids(&["hi bot"]));
    assert_eq!(prompts[1], f.turns_ids(&["hi bot", "Hello there", "how are you?"]));
    assert_eq!(f.engine.calls.lock().unwrap()[0].1, 2, "generation.candidates candidates");
    let stored = f.store.turns(&ChannelKey::new(Platform::Http, "c")).await.unwrap();
    let texts: Vec<(&str, bool)> = stored.iter().map(|t| (t.text.as_str(), t.bot)).collect();
    assert_eq!(texts, [("hi bot", false), ("Hello there", true), ("how are you?", false), ("Fine, thanks", true)]);
}

#[tokio::test]
async fn a_finished_candidate_beats_a_cut_off_one_and_emoji_are_a_reply() {
    let f = fixture(|_| {});
    // " no no no" (cut off) has the higher mean log-probability (−0.77
    // against −1.2); the finished reply is sent.
    f.engine.then(vec![f.cut_off(" no no no", -2.3), f.drawn(" yes!", -2.4)]);
    assert_eq!(text_of(f.say("c", "are you there?").await.unwrap()), "yes!");
    // Nothing finished: the best cut-off candidate is sent.
    f.engine.then(vec![f.cut_off(" no no no", -2.3), f.cut_off(" maybe maybe", -4.0)]);
    assert_eq!(text_of(f.say("d", "are you there?").await.unwrap()), "no no no");
    // Emoji, CJK and punctuation are content, not empty replies.
    for (channel, reply) in [("e", " 🙂 🙂 🙂"), ("f", " 你好"), ("g", " ...?!")] {
        f.engine.then(vec![f.drawn(reply, -1.0)]);
        assert_eq!(text_of(f.say(channel, "how do you feel?").await.unwrap()), reply.trim());
    }
    // Only formatting characters: screened out, nothing sent.
    f.engine.then(vec![f.drawn(" \u{200B}", -1.0)]).then(vec![f.drawn(" \u{FEFF}", -1.0)]);
    assert_eq!(text_of(f.say("h", "hello?").await.unwrap()), "(silent: no_safe_candidate)");
}

#[tokio::test]
async fn screened_and_flagged_candidates_are_dropped_and_drawn_again() {
    let f = fixture(|s| {
        s.safety.blocked_words = vec!["pineapple".into()];
        s.safety.max_attempts = 2;
    });
    // Round 1: an echo of the message and a blocked word; round 2: a good one.
    f.engine.then(vec![f.drawn(" tell me a story", -0.1), f.drawn(" pineapple pizza rules", -0.2)]);
    f.engine.then(vec![f.drawn(" Once upon a time", -3.0)]);
    assert_eq!(text_of(f.say("c", "tell me a story").await.unwrap()), "Once upon a time");
    assert_eq!(f.prompts().len(), 2);

    // Every round flagged: silent, the user's turn kept, nothing sent.
    f.engine.then(vec![f.drawn(" pineapple", -0.1)]).then(vec![f.drawn(" more pineapple", -0.1)]);
    assert_eq!(text_of(f.say("d", "and then?").await.unwrap()), "(silent: no_safe_candidate)");
    let stored = f.store.turns(&ChannelKey::new(Platform::Http, "d")).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert!(!stored[0].bot);
}

#[tokio::test]
async fn moderators_words_hold_in_their_scope_in_and_out() {
    let f = fixture(|s| s.safety.policy = crate::safety::Policy::Strict);
    assert!(text_of(f.say("c", "/block pineapple").await.unwrap()).contains("only moderators"));
    assert_eq!(f.command("c", "/block Pineapple").await, "Blocked here: pineapple.");
    assert_eq!(f.command("c", "/block").await, "Usage: /block WORD… (one or more words, separated by spaces)");
    // Out: the likelier candidate holds the word and is dropped here…
    f.engine.then(vec![f.drawn(" pineapple pizza rules", -0.1), f.drawn(" Once upon a time", -3.0)]);
    assert_eq!(text_of(f.say("c", "tell me a story").await.unwrap()), "Once upon a time");
    // …and sent in another channel, whose scope blocked nothing.
    f.engine.then(vec![f.drawn(" pineapple pizza rules", -0.1), f.drawn(" Once upon a time", -3.0)]);
    assert_eq!(text_of(f.say("d", "tell me a story").await.unwrap()), "pineapple pizza rules");
    // In: refused here only.
    assert_eq!(text_of(f.say("c", "PINEAPPLES!").await.unwrap()), f.settings.safety.notice);
    // Allowed: a word the strict rules flag passes here, not elsewhere.
    assert_eq!(text_of(f.say("d", "damn").await.unwrap()), f.settings.safety.notice);
    assert_eq!(f.command("c", "/allow damn").await, "Allowed here: damn.");
    f.engine.then(vec![f.drawn(" Indeed", -1.0)]);
    assert_eq!(text_of(f.say("c", "damn").await.unwrap()), "Indeed");
    assert_eq!(f.command("c", "/blocklist").await, "Blocked here: pineapple. Allowed here: damn.");
    assert_eq!(f.command("c", "/disallow damn").await, "No longer allowed: damn.");
    assert_eq!(f.command("c", "/unblock pineapple tomato").await, "Unblocked: pineapple. tomato not blocked.");
    assert_eq!(f.command("c", "/blocklist").await, "Blocked here: none. Allowed here: none.");
}

#[tokio::test]
async fn toxic_input_is_refused_and_never_stored() {
    let f = fixture(|s| s.safety.blocked_words = vec!["pineapple".into()]);
    let answer = text_of(f.say("c", "I love pineapple").await.unwrap());
    assert_eq!(answer, f.settings.safety.notice);
    assert!(f.prompts().is_empty(), "nothing was generated");
    assert!(f.store.turns(&ChannelKey::new(Platform::Http, "c")).await.unwrap().is_empty());
}

/// A classifier that records the size of each batch it is given.
struct Counting {
    inner: HfClassifier,
    batches: std::sync::Mutex<Vec<usize>>,
}

impl ToxicityClassifier for Counting {
    fn labels(&self) -> &[String] {
        self.inner.labels()
    }

    fn probabilities(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, SafetyError> {
        self.batches.lock().unwrap().push(texts.len());
        self.inner.probabilities(texts)
    }
}

#[tokio::test]
async fn the_classifier_refuses_input_and_drops_candidates_in_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    crate::safety::classifier::synthetic::write_word_detector(dir.path(), "grumpkin").unwrap();
    let inner = HfClassifier::load(dir.path(), &candle_core::Device::Cpu).unwrap();
    let counting = Arc::new(Counting { inner, batches: Default::default() });
    let f = fixture_with(
        |s| {
            s.safety.classifier = dir.path().display().to_string();
            s.safety.classifier_thresholds.labels.insert("toxicity".into(), 0.7);
            s.generation.candidates = 3;
        },
        Some(counting.clone()),
    );
    // The word filter knows nothing of "grumpkin"; the classifier does.
    assert_eq!(text_of(f.say("c", "you grumpkin").await.unwrap()), f.settings.safety.notice);
    assert!(f.prompts().is_empty(), "nothing was generated");
    assert!(f.store.turns(&ChannelKey::new(Platform::Http, "c")).await.unwrap().is_empty());
    assert_eq!(*counting.batches.lock().unwrap(), vec![1]);
    // Three candidates, one batch; the flagged favourite is dropped.
    f.engine.then(vec![f.drawn(" what a grumpkin", -0.1), f.drawn(" Nice to meet you", -2.0), f.drawn(" Hello!", -3.0)]);
    assert_eq!(text_of(f.say("d", "hello there").await.unwrap()), "Nice to meet you");
    assert_eq!(*counting.batches.lock().unwrap(), vec![1, 1, 3]);
    // `insult` has no threshold: reported, never acted on (it is low here anyway),
    // and a threshold the classifier has no label for is refused by name.
    let mut t = f.settings.safety.classifier_thresholds.clone();
    t.labels.insert("threat".into(), 0.5);
    assert!(t.check_labels(counting.labels()).unwrap_err().to_string().contains("`threat`"));
}

#[tokio::test]
async fn engine_refusals_reach_the_adapter_as_errors() {
    let f = fixture(|_| {});
    f.engine.then_fail(EngineError::Busy).then_fail(EngineError::Failed("out of memory".into()));
    assert!(matches!(f.say("c", "hi").await, Err(CoreError::Busy)));
    assert!(matches!(f.say("c", "hi").await, Err(CoreError::Internal(e)) if e.contains("out of memory")));
    assert!(matches!(f.say("c", "   ").await, Err(CoreError::Invalid(_))));
    let huge = "a".repeat(crate::prompt::MAX_TURN_BYTES + 1);
    assert!(matches!(f.say("c", &huge).await, Err(CoreError::Invalid(e)) if e.contains("bytes")));
    let mut unaddressed = message("c", "just chatting", false);
    unaddressed.addressed_to_bot = false;
    assert_eq!(text_of(f.pipeline.handle(unaddressed).await.unwrap()), "(silent: not_addressed)");
}

#[tokio::test]
async fn a_persona_prompt_is_the_same_in_serving_and_in_the_gate() {
    let seed = vec!["Ahoy, I'm a pirate.".to_string(), "What be yer business?".to_string()];
    let f = fixture(|s| {
        s.personas.defined.push(PersonaSpec { name: "pirate".into(), adapter: None, seed: seed.clone(), created_in: None, shared: false });
        s.personas.default = "pirate".into();
        s.context.max_tokens = 4096;
    });
    f.engine.then(vec![f.drawn(" Arr", -1.0)]);
    f.say("c", "hello bot").await.unwrap();
    let served = f.prompts().remove(0);
    let params = f.settings.generation.sampling();
    let gate = crate::jobs::gate::probe_prompt(&f.tokenizer, &seed, "hello bot", 1024, &params).unwrap();
    assert_eq!(served, gate.ids);
    let mut with_seed: Vec<&str> = seed.iter().map(String::as_str).collect();
    with_seed.push("hello bot");
    assert_eq!(served, f.turns_ids(&with_seed), "seed turns first, each followed by <|endoftext|>");
}

#[tokio::test]
async fn moderator_commands_are_refused_to_others_and_mute_works() {
    let f = fixture(|_| {});
    let refused = text_of(f.say("c", "/mute").await.unwrap());
    assert_eq!(refused, "Sorry, only moderators can use /mute.");
    assert!(f.command("c", "/mute").await.starts_with("Muted"));
    assert_eq!(text_of(f.say("c", "hello").await.unwrap()), "(silent: muted)");
    assert!(f.command("c", "/help").await.contains("/ask TEXT"), "commands still work while muted");
    assert!(f.command("c", "/unmute").await.starts_with("Unmuted"));
    f.engine.then(vec![f.drawn(" Hi", -1.0)]);
    assert_eq!(text_of(f.say("c", "hello").await.unwrap()), "Hi");
}

#[tokio::test]
async fn everyday_commands_answer_without_generating() {
    let f = fixture(|_| {});
    f.engine.then(vec![f.drawn(" Hi", -1.0)]);
    f.say("c", "hello").await.unwrap();
    assert!(f.command("c", "/start").await.starts_with("Hello!"));
    assert!(f.command("c", "/nonsense").await.contains("Commands:"), "unknown commands get the help");
    assert_eq!(f.command("c", "/ask").await, "Ask me something: /ask how are you?");
    assert!(f.command("c", "/reset").await.contains("forgotten"));
    assert!(f.store.turns(&ChannelKey::new(Platform::Http, "c")).await.unwrap().is_empty());
    assert!(f.command("c", "/train").await.contains("Training is off"));
    assert!(f.command("c", "/collect").await.contains("Collection is off"));
    assert!(f.command("c", "/optout").await.contains("Nothing is collected"));
    assert!(f.command("c", "/forget").await.starts_with("Done"));
    f.engine.then(vec![f.drawn(" Sure", -1.0)]);
    assert_eq!(f.command("c", "/ask@dialogd_bot is it sunny?").await, "Sure");
    assert_eq!(f.prompts().last().unwrap(), &f.turns_ids(&["is it sunny?"]));
}

#[tokio::test]
async fn personas_are_created_chosen_shown_and_cleared() {
    let f = fixture(|_| {});
    assert!(f.command("c", "/persona").await.contains("no persona"));
    assert!(f.command("c", "/persona list").await.contains("no personas yet"));
    assert!(f.command("c", "/persona create Bad!Name hi").await.contains("is not a persona name"));
    let created = f.command("c", "/persona create pirate Ahoy! | What be yer business?").await;
    assert!(created.starts_with("Created persona pirate with 2 seed turn(s)"), "{created}");
    assert!(f.command("other", "/persona create pirate Arr").await.contains("belongs to another chat or server"));
    assert!(f.command("c", "/persona use ghost").await.contains("there is no persona"));
    assert!(f.command("c", "/persona use pirate server").await.contains("belongs to no server"));
    assert!(f.command("c", "/persona use pirate").await.contains("speak as pirate in this channel"));
    assert!(f.command("c", "/persona").await.contains("I speak as pirate here (2 seed turn(s); adapter: none yet)"));
    assert!(f.command("c", "/persona list").await.contains("pirate"));
    f.engine.then(vec![f.drawn(" Arr", -1.0)]);
    f.say("c", "hello").await.unwrap();
    assert_eq!(f.prompts()[0], f.turns_ids(&["Ahoy!", "What be yer business?", "hello"]));
    assert!(f.command("c", "/persona off").await.contains("Persona cleared"));
    assert!(f.command("c", "/persona").await.contains("no persona"));
    assert!(f.command("c", "/persona dance").await.starts_with("Usage: /persona"));
}

#[test]
fn commands_parse() {
    use super::commands::{CollectCommand, Command, PersonaCommand, TrainCommand};
    assert_eq!(Command::parse("/reset"), Some(Command::Reset));
    assert_eq!(Command::parse("/RESET@dialogd_bot now"), Some(Command::Reset));
    assert_eq!(Command::parse("/ask  how are you? "), Some(Command::Ask("how are you?")));
    assert_eq!(Command::parse("/ hi"), None);
    assert_eq!(Command::parse("hello /reset"), None);
    assert_eq!(Command::parse("/-)"), None);
    assert_eq!(Command::parse("/train ROLLBACK"), Some(Command::Train(TrainCommand::Rollback)));
    assert_eq!(Command::parse("/train now"), Some(Command::Train(TrainCommand::Usage)));
    assert_eq!(Command::parse("/collect on"), Some(Command::Collect(CollectCommand::On)));
    assert_eq!(Command::parse("/collect"), Some(Command::Collect(CollectCommand::Status)));
    assert_eq!(
        Command::parse("/persona create Pirate Ahoy | | Arr "),
        Some(Command::Persona(PersonaCommand::Create { name: Some("pirate".into()), seed: vec!["Ahoy".into(), "Arr".into()] }))
    );
    assert_eq!(
        Command::parse("/persona use pirate server"),
        Some(Command::Persona(PersonaCommand::Use { name: Some("pirate".into()), scope: Some("server".into()) }))
    );
    assert_eq!(Command::parse("/persona"), Some(Command::Persona(PersonaCommand::Show)));
    assert_eq!(Command::parse("/dance"), Some(Command::Unknown("dance".into())));
    assert!(Command::parse("/mute").unwrap().moderators_only());
    assert!(!Command::parse("/forget").unwrap().moderators_only());
}
