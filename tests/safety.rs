//! The safety filter on a labelled set (precision and recall floors),
//! obfuscated abuse, innocent words that naive filters flag, moderator
//! words, and `dialogd moderate` as users run it.

use dialogd::safety::{Category, Filter, Policy, WordLists};
use serde_json::Value;

use crate::support::{assert_fails_with, dialogd, fixtures, stdout};

/// (should block, text) from tests/fixtures/safety/labelled.tsv.
fn labelled() -> Vec<(bool, String)> {
    let path = fixtures().join("safety").join("labelled.tsv");
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (label, text) = l.split_once('\t').expect("LABEL<TAB>TEXT");
            (label == "1", text.to_string())
        })
        .collect()
}

#[test]
fn labelled_set_precision_and_recall() {
    let filter = Filter::new();
    let set = labelled();
    // 100 sentences at first, 50 abusive; issue #20 added 105 innocent
    // (names, places, word boundaries, platform markup) and 52 abusive.
    assert!(set.len() >= 257 && set.iter().filter(|(y, _)| *y).count() >= 102);
    for policy in [Policy::Standard, Policy::Strict] {
        let (mut tp, mut fp, mut fn_) = (0, 0, 0);
        for (label, text) in &set {
            let flagged = filter.check(text, policy, None).unwrap().flagged;
            match (label, flagged) {
                (true, true) => tp += 1,
                (false, true) => {
                    fp += 1;
                    eprintln!("{policy:?} false positive: {text}");
                }
                (true, false) => {
                    fn_ += 1;
                    eprintln!("{policy:?} missed: {text}");
                }
                _ => {}
            }
        }
        let precision = tp as f64 / (tp + fp) as f64;
        let recall = tp as f64 / (tp + fn_) as f64;
        eprintln!("{policy:?}: precision {precision:.3} recall {recall:.3} (tp {tp}, fp {fp}, fn {fn_}, n {})", set.len());
        // Precision: a floor a little under what the filter measured when
        // the set was last extended (see README, "Safety"; 0.879 standard,
        // 0.872 strict): a regression fails, noise does not. Recall: every
        // abusive sentence is caught, as before the set grew.
        assert!(precision >= 0.86, "{policy:?} precision {precision}");
        assert_eq!(fn_, 0, "{policy:?} recall {recall}");
    }
}

#[test]
fn innocent_words_that_contain_bad_ones_pass() {
    let filter = Filter::new();
    let innocents = [
        "Scunthorpe is a town in Lincolnshire",
        "an assassin was never caught",
        "I played Assassin's Creed all weekend",
        "a cocktail before dinner",
        "the analysis is done",
        "Penistone and Clitheroe are towns too",
        "I'll pass, thanks",
        "she spoke with a hint of sarcasm",
    ];
    for text in innocents {
        for policy in [Policy::Standard, Policy::Strict] {
            let v = filter.check(text, policy, None).unwrap();
            assert!(!v.flagged, "{policy:?} flagged {text:?}: {v:?}");
        }
    }
    // Known rustrict quirk: "the assassin" reads as mild profanity, which
    // strict (and only strict) blocks.
    assert!(!filter.check("the assassin was never caught", Policy::Standard, None).unwrap().flagged);
}

#[test]
fn mentions_markup_names_and_word_boundaries_pass() {
    let filter = Filter::new();
    // The cases of issue #20, which the filter used to flag.
    for text in ["don't I think", "Shital", "Nishit", "(ok)", "<@456>", "<@123456789012345678> hi", "<@&77> <#88> <@!99>",
        "<:pepeok:1122> and <a:party:455>", "https://example.com/?id=455", "`shiitake`", "isn't it nice"]
    {
        for policy in [Policy::Standard, Policy::Strict] {
            let v = filter.check(text, policy, None).unwrap();
            assert!(!v.flagged, "{policy:?} flagged {text:?}: {v:?}");
        }
    }
    // Markup does not hide abuse: the words around it, inside code spans and
    // in an emoji's name are still read.
    for text in ["<@123456789012345678> you are a fucking idiot", "`fuck you`", "<:fuck_you:1234>", "||you dumb bitch||",
        "https://example.com read it, you asshole", "Nishit, you shit"]
    {
        let v = filter.check(text, Policy::Standard, None).unwrap();
        assert!(v.flagged, "missed {text:?}: {v:?}");
    }
}

#[test]
fn obfuscated_abuse_is_caught() {
    let filter = Filter::new();
    for text in ["f*ck you", "f u c k you", "fuuuuck you", "sh1t", "ƒυ¢κ you", "FUCK", "a$$hole", "you b!tch", "s.h.i.t"] {
        let v = filter.check(text, Policy::Standard, None).unwrap();
        assert!(v.flagged, "missed {text:?}: {v:?}");
    }
}

#[test]
fn policies_differ_and_off_lets_everything_through() {
    let filter = Filter::new();
    // Mild profanity: strict blocks it, standard lets it through.
    let mild = "damn, that was close";
    assert!(filter.check(mild, Policy::Strict, None).unwrap().flagged);
    assert!(!filter.check(mild, Policy::Standard, None).unwrap().flagged);
    let abuse = "you stupid bitch";
    let v = filter.check(abuse, Policy::Standard, None).unwrap();
    assert!(v.flagged && !v.categories.is_empty(), "{v:?}");
    let off = filter.check(abuse, Policy::Off, None).unwrap();
    assert!(!off.flagged && off.hits.is_empty());
}

#[test]
fn moderator_words_block_and_allow_per_scope() {
    let filter = Filter::new();
    let mut lists = WordLists::default();
    lists.block("discord:guild:1", "pineapple").unwrap();
    lists.allow("discord:guild:2", "damn").unwrap();
    let guild1 = lists.get("discord:guild:1");
    let v = filter.check("I like Pineapples on pizza", Policy::Standard, guild1).unwrap();
    assert_eq!(v.categories, vec![Category::Blocked], "{v:?}");
    for disguised in ["p i n e a p p l e", "P.I.N.E.A.P.P.L.E", "piiineapple", "p1neapple", "pine-apple"] {
        let v = filter.check(disguised, Policy::Standard, guild1).unwrap();
        assert!(v.categories.contains(&Category::Blocked), "{disguised}: {v:?}");
    }
    assert!(!filter.check("pineapple", Policy::Off, guild1).unwrap().flagged);
    // Another scope does not see guild 1's word.
    assert!(!filter.check("pineapple pizza", Policy::Standard, lists.get("discord:guild:2")).unwrap().flagged);
    // An allowed word passes strict there, and only there.
    assert!(!filter.check("damn, that was close", Policy::Strict, lists.get("discord:guild:2")).unwrap().flagged);
    assert!(filter.check("damn, that was close", Policy::Strict, guild1).unwrap().flagged);
    // The lists survive a round trip through their persisted form.
    assert_eq!(WordLists::from_json(&lists.to_json()).unwrap(), lists);
}

#[test]
fn candidates_are_checked_together() {
    let filter = Filter::new();
    let verdicts = filter.check_batch(&["have a nice day", "go fuck yourself", "sure thing"], Policy::Standard, None).unwrap();
    assert_eq!(verdicts.iter().map(|v| v.flagged).collect::<Vec<_>>(), vec![false, true, false]);
    assert!(filter.check(&"a".repeat(70_000), Policy::Standard, None).is_err());
}

fn moderate_json(args: &[&str]) -> Value {
    let mut all = vec!["moderate", "--json"];
    all.extend_from_slice(args);
    let out = dialogd(&all);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn moderate_command() {
    let v = moderate_json(&["you are a piece of sh1t"]);
    assert_eq!(v["flagged"], true, "{v}");
    assert!(v["categories"].as_array().unwrap().iter().any(|c| c == "profanity"), "{v}");
    assert_eq!(v["policy"], "standard");
    let v = moderate_json(&["Scunthorpe United won on Saturday"]);
    assert_eq!(v["flagged"], false, "{v}");
    assert!(v["categories"].as_array().unwrap().is_empty());
    let v = moderate_json(&["--block", "pineapple", "I like pineapples"]);
    assert_eq!(v["categories"], serde_json::json!(["blocked"]), "{v}");
    let v = moderate_json(&["--policy", "off", "fuck"]);
    assert_eq!(v["flagged"], false);
    let out = dialogd(&["moderate", "go f*ck yourself"]);
    assert!(out.status.success());
    assert!(stdout(&out).starts_with("flagged: "), "{}", stdout(&out));
    assert_eq!(stdout(&dialogd(&["moderate", "hello there"])).trim(), "ok");
    assert_fails_with(&dialogd(&["moderate", "  "]), "empty");
    assert_fails_with(&dialogd(&["moderate", "--policy", "lenient", "hi"]), "not a policy");
    assert_fails_with(&dialogd(&["moderate", "--block", "!!", "hi"]), "no letters");
}

#[test]
fn moderate_with_a_classifier() {
    let detector = crate::support::cached_checkpoint("word detector grumpkin", "detector-grumpkin", |dir| {
        dialogd::safety::classifier::synthetic::write_word_detector(dir, "grumpkin").unwrap()
    });
    let dir = detector.display().to_string();
    let v = moderate_json(&["--classifier", &dir, "--threshold", "toxicity=0.7", "you grumpkin"]);
    assert_eq!(v["flagged"], true, "{v}");
    assert_eq!(v["categories"], serde_json::json!(["toxicity"]), "{v}");
    let hit = v["hits"].as_array().unwrap().iter().find(|h| h["source"] == "classifier").expect("a classifier hit");
    assert!(hit["detail"].as_str().unwrap().starts_with("toxicity 1.000"), "{v}");
    assert!(v["classifier"]["toxicity"].as_f64().unwrap() > 0.999, "{v}");
    // `insult` has no threshold: reported, not acted on.
    assert!(v["classifier"]["insult"].as_f64().unwrap() < 0.01, "{v}");
    let v = moderate_json(&["--classifier", &dir, "--threshold", "toxicity=0.7", "you pumpkin"]);
    assert_eq!(v["flagged"], false, "{v}");
    assert!(v["classifier"]["toxicity"].as_f64().unwrap() < 0.01, "{v}");
    // Without thresholds: reported only. The words flagged it, and the classifier still reports.
    let v = moderate_json(&["--classifier", &dir, "grumpkin sh1t"]);
    assert_eq!(v["categories"], serde_json::json!(["profanity"]), "{v}");
    assert!(v["classifier"]["toxicity"].as_f64().unwrap() > 0.999, "{v}");
    assert_fails_with(&dialogd(&["moderate", "--classifier", &dir, "--threshold", "toxic=0.5", "hi"]), "`toxic`");
    assert_fails_with(&dialogd(&["moderate", "--classifier", &dir, "--threshold", "toxicity", "hi"]), "LABEL=P");
    assert_fails_with(&dialogd(&["moderate", "--classifier", "/nonexistent/classifier", "hi"]), "does not exist");
}
