//! Fine-tuning jobs end to end: a daemon in-process (real redis-server,
//! the real `dialogd train` binary as the child process, the tiny model),
//! driven the way moderators and operators drive it: chat commands and
//! `dialogd jobs`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dialogd::collect::Collector;
use dialogd::jobs::{JobRecord, JobState, JobStore, Target};
use dialogd_adapters::{Answer, ChannelKey, Core, Inbound, Platform};

use crate::support::{daemon_toml, dialogd, model_dir, stderr, stdout, RedisServer, TestDaemon};

const ROOM: &str = "room";

/// The tests that train take turns: each runs trainer processes that use
/// every core, and the rest of the suite runs beside them.
static TRAINING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Collects the training corpus in `http:room` through the collector, as
/// the daemon would: colour facts from twenty people, and one greeting
/// exchange repeated so that a trained model learns it by heart.
fn collect_corpus(dir: &Path) {
    let settings = crate::support::settings_from(&collect_toml(dir)).collect;
    let collector = Collector::open(&settings).unwrap();
    let things = [
        ("apple", "red"), ("sky", "blue"), ("grass", "green"), ("sun", "yellow"), ("sea", "blue"),
        ("snow", "white"), ("coal", "black"), ("rose", "red"), ("lemon", "yellow"), ("cloud", "grey"),
        ("frog", "green"), ("plum", "purple"), ("milk", "white"), ("ink", "black"), ("fire", "orange"),
        ("leaf", "green"), ("salt", "white"), ("gold", "yellow"), ("rust", "brown"), ("mint", "green"),
    ];
    let channel = format!("http:{ROOM}");
    for (i, (thing, colour)) in things.iter().enumerate() {
        let (q, a) = (format!("what colour is the {thing}?"), format!("the {thing} is {colour}."));
        assert!(collector.record(&channel, &[(&format!("user{i}"), &q, false), ("bot", &a, true)]).unwrap());
    }
    for i in 0..8 {
        collector.record(&channel, &[(&format!("user{i}"), "hello bot", false), ("bot", "hi there, friend!", true)]).unwrap();
    }
    // Someone who opted out: nothing of theirs is kept or trained on.
    collector.record(&channel, &[("mallory", "hello bot", false), ("bot", "go away", true)]).unwrap();
    assert_eq!(collector.opt_out("http:mallory").unwrap(), 1);
    assert!(!collector.record(&channel, &[("mallory", "hello bot", false), ("bot", "go away", true)]).unwrap());
}

fn collect_toml(dir: &Path) -> String {
    format!(
        "[collect]\nenabled = true\ndir = \"{}\"\nchannels = [\"http:{ROOM}\"]\nauthor_key = \"a-test-key-of-16-chars\"\n",
        dir.join("collected").display()
    )
}

/// Daemon settings: the tiny model, greedy replies, jobs on `redis`.
fn jobs_toml(redis: &RedisServer, dir: &Path, extra: &[(&str, &str)]) -> String {
    let model = format!("path = \"{}\"", model_dir("tiny").display());
    let collected = format!("dir = \"{}\"", dir.join("collected").display());
    let jobs_dir = format!("dir = \"{}\"", dir.join("jobs").display());
    let trainer = format!("trainer = \"{}\"", env!("CARGO_BIN_EXE_dialogd"));
    let mut lines: Vec<(&str, &str)> = vec![
        ("model", &model),
        ("generation", "temperature = 0.0"),
        ("generation", "candidates = 1"),
        ("generation", "repetition_penalty = 1.0"),
        ("generation", "no_repeat_ngram = 0"),
        ("context", "max_tokens = 64"),
        ("collect", "enabled = true"),
        ("collect", &collected),
        ("collect", "channels = [\"http:room\"]"),
        ("collect", "author_key = \"a-test-key-of-16-chars\""),
        ("jobs", "enabled = true"),
        ("jobs", &jobs_dir),
        ("jobs", &trainer),
        ("jobs", "mode = \"full\""),
        ("jobs", "steps = 100"),
        ("jobs", "lr = 0.003"),
        ("jobs", "eval_fraction = 0.2"),
        ("jobs", "checkpoint_every = 20"),
        ("jobs", "min_examples = 10"),
        ("jobs", "probes = [\"hello bot\", \"what colour is the sky?\"]"),
        ("jobs", "poll_ms = 100"),
    ];
    lines.extend_from_slice(extra);
    daemon_toml(Some(redis), &lines)
}

fn inbound(channel: &str, text: &str, moderator: bool) -> Inbound {
    Inbound {
        channel: ChannelKey::new(Platform::Http, channel),
        author: if moderator { "mod".into() } else { "someone".into() },
        text: text.into(),
        msg_id: None,
        addressed_to_bot: true,
        moderator,
        // The jobs' tests train the base model from a chat: as an operator
        // (a chat moderator alone is refused, tests/telegram.rs).
        operator: moderator,
        group: None,
        edit: None,
    }
}

/// What the bot says to `text` in `channel` (empty when it stays silent).
async fn say(d: &TestDaemon, channel: &str, text: &str, moderator: bool) -> String {
    match d.pipeline.handle(inbound(channel, text, moderator)).await.unwrap() {
        Answer::Reply(out) => out.text,
        other => format!("{other:?}"),
    }
}

async fn store(redis: &RedisServer) -> JobStore {
    JobStore::connect(&redis.url(), "dialogd", Duration::from_secs(2)).await.unwrap()
}

/// Polls job `id` until `done` holds (or panics after `limit`).
async fn wait_for(store: &JobStore, id: u64, limit: Duration, done: impl Fn(&JobRecord) -> bool) -> JobRecord {
    let started = Instant::now();
    loop {
        if let Some(record) = store.get(id).await.unwrap() {
            if done(&record) {
                return record;
            }
            assert!(started.elapsed() < limit, "job #{id} still {:?} after {limit:?}: {record:?}", record.state);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn log_of(record: &JobRecord) -> String {
    record.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
}

/// `dialogd jobs …` with the daemon's settings file.
fn jobs_cli(config: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["jobs", "--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    dialogd(&all)
}

fn write_config(dir: &Path, toml: &str) -> PathBuf {
    let path = dir.join("dialogd.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moderator_trains_promotes_and_rolls_back_while_the_bot_keeps_serving() {
    let _turn = TRAINING.lock().await;
    let redis = RedisServer::start();
    let tmp = tempfile::tempdir().unwrap();
    collect_corpus(tmp.path());
    let toml = jobs_toml(&redis, tmp.path(), &[]);
    let config = write_config(tmp.path(), &toml);
    let d = TestDaemon::start(&toml).await;
    let jobs = store(&redis).await;

    let before = say(&d, "check-0", "hello bot", false).await;
    assert_ne!(before, "hi there, friend!");
    // Not a moderator: refused, nothing queued.
    assert!(say(&d, ROOM, "/train", false).await.contains("only moderators"));
    assert!(jobs.list(10).await.unwrap().is_empty());
    assert!(say(&d, ROOM, "/collect", true).await.contains("are collected"));

    // Load on other channels for the whole run: nothing may be lost,
    // including across the swap.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let pipeline = d.pipeline.clone();
    let load = tokio::spawn(async move {
        let (mut sent, mut failed) = (0, Vec::new());
        while !*stop_rx.borrow() {
            let channel = format!("load-{}", sent % 4);
            match pipeline.handle(inbound(&channel, &format!("message {sent}"), false)).await {
                Ok(Answer::Reply(_) | Answer::Silent { .. }) => {}
                other => failed.push(format!("{other:?}")),
            }
            sent += 1;
        }
        (sent, failed)
    });

    let queued = say(&d, ROOM, "/train", true).await;
    assert!(queued.contains("job #1 queued for base"), "{queued}");
    let record = wait_for(&jobs, 1, Duration::from_secs(300), |r| r.state.is_final()).await;
    assert_eq!(record.state, JobState::Promoted, "{record:?}\nlog:\n{}", log_of(&record));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(true).unwrap();
    let (sent, failed) = load.await.unwrap();
    assert!(sent > 10 && failed.is_empty(), "{sent} sent; failures: {failed:?}");

    // The record: gate numbers, probes, the snapshot without the opted-out author.
    let metrics = record.metrics.as_ref().unwrap();
    let (b, a) = (metrics["eval_before"]["loss"].as_f64().unwrap(), metrics["eval_after"]["loss"].as_f64().unwrap());
    assert!(a < b, "held-out loss {b} → {a}");
    assert_eq!(record.examples, Some(28));
    assert_eq!(record.probes[0].reply, "hi there, friend!", "{:?}", record.probes);
    assert!(record.probes.iter().all(|p| p.failed.is_none()));
    let snapshot = std::fs::read_to_string(record.dir.as_ref().unwrap().join("data.jsonl")).unwrap();
    assert!(!snapshot.contains("go away"), "an opted-out author's exchange reached the dataset");
    assert_eq!(d.metric("dialogd_model_version").await, 1.0);
    assert_eq!(d.metric("dialogd_jobs_ended_total{state=\"promoted\"}").await, 1.0);
    assert_eq!(d.metric("dialogd_job_running").await, 0.0);
    // Its last progress stays in the record: every step done.
    let progress = record.progress.as_ref().expect("the job's progress");
    assert_eq!((progress.step, progress.total_steps, progress.eta_s), (100, 100, Some(0)), "{progress:?}");
    assert!(progress.loss.is_some_and(|l| l.is_finite()) && progress.tokens_per_s > 0.0, "{progress:?}");

    // Better replies: the promoted model answers as the community does.
    assert_eq!(say(&d, "check-1", "hello bot", false).await, "hi there, friend!");
    let status = say(&d, ROOM, "/train status", true).await;
    assert!(status.contains("#1 base promoted") && status.contains("hi there, friend!"), "{status}");

    // `dialogd jobs` sees the same records; rollback from the command line.
    let list = jobs_cli(&config, &["list", "--json"]);
    assert!(list.status.success(), "{}", stderr(&list));
    let listed: Vec<JobRecord> = serde_json::from_str(&stdout(&list)).unwrap();
    assert_eq!(listed, vec![record.clone()]);
    let rollback = jobs_cli(&config, &["rollback", "--base"]);
    assert!(stdout(&rollback).contains("Rolled back job #1"), "{}{}", stdout(&rollback), stderr(&rollback));
    let started = Instant::now();
    while d.metric("dialogd_model_version").await < 2.0 {
        assert!(started.elapsed() < Duration::from_secs(60), "the rollback was not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(say(&d, "check-2", "hello bot", false).await, before);
    assert_eq!(jobs.get(1).await.unwrap().unwrap().state, JobState::RolledBack);
    assert_eq!(jobs.versions(&Target::Base).await.unwrap(), Vec::<u64>::new());
    let again = jobs_cli(&config, &["rollback", "--base"]);
    assert!(stdout(&again).contains("already serves its original"), "{}", stdout(&again));

    // A job whose model fails a probe (its reply is now a blocked word) is
    // rejected and the serving model stays as it is.
    d.pipeline.set_safety(dialogd::settings::SafetySettings {
        blocked_words: vec!["friend".into()],
        ..d.pipeline.safety()
    });
    let run = jobs_cli(&config, &["run", "--base", "--channel", "http:room"]);
    assert!(stdout(&run).contains("queued job #2"), "{}{}", stdout(&run), stderr(&run));
    let rejected = wait_for(&jobs, 2, Duration::from_secs(300), |r| r.state.is_final()).await;
    assert_eq!(rejected.state, JobState::Rejected, "{rejected:?}");
    assert!(rejected.reason.as_deref().unwrap().contains("1 of 2 probe prompts failed"), "{rejected:?}");
    assert!(rejected.probes[0].failed.as_deref().unwrap().contains("safety filter"));
    assert_eq!(d.metric("dialogd_model_version").await, 2.0);
    assert_eq!(say(&d, "check-3", "hello bot", false).await, before);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_killed_and_cancelled_jobs_leave_serving_alone() {
    let _turn = TRAINING.lock().await;
    let redis = RedisServer::start();
    let tmp = tempfile::tempdir().unwrap();
    collect_corpus(tmp.path());
    let toml = jobs_toml(&redis, tmp.path(), &[("jobs", "checkpoint_every = 2")]);
    let config = write_config(tmp.path(), &toml);
    let d = TestDaemon::start(&toml).await;
    let jobs = store(&redis).await;
    let before = say(&d, "check-0", "hello bot", false).await;

    // Too little data: fails at once, with the reason.
    let none = jobs.create(Target::Base, "cli".into(), vec!["http:elsewhere".into()]).await.unwrap();
    let failed = wait_for(&jobs, none.id, Duration::from_secs(60), |r| r.state.is_final()).await;
    assert_eq!(failed.state, JobState::Failed);
    assert!(failed.reason.as_deref().unwrap().contains("only 0 exchange(s) collected in http:elsewhere"), "{failed:?}");

    // A trainer killed mid-run is resumed from its last checkpoint.
    let job = jobs.create(Target::Base, "cli".into(), vec![]).await.unwrap();
    let running = wait_for(&jobs, job.id, Duration::from_secs(120), |r| {
        r.pid.is_some() && r.dir.as_ref().is_some_and(|d| has_checkpoint(&d.join("output")))
    })
    .await;
    let pid = running.pid.unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-9", &pid]).status().unwrap().success());
    let resumed = wait_for(&jobs, job.id, Duration::from_secs(300), |r| r.state.is_final()).await;
    assert_eq!(resumed.state, JobState::Promoted, "{resumed:?}\nlog:\n{}", log_of(&resumed));
    assert_eq!(resumed.attempts, 2);
    assert_eq!(d.metric("dialogd_jobs_started_total").await, 2.0, "the failed job started no trainer; the killed one two");
    let from = resumed.metrics.as_ref().unwrap()["resumed_from_step"].as_u64();
    assert!(from.is_some_and(|step| step >= 2), "{:?}", resumed.metrics);
    assert!(log_of(&resumed).contains("attempt 2, resuming from its last checkpoint"), "{}", log_of(&resumed));

    // Cancelled while training: the trainer is stopped, nothing promoted.
    // The resumed job's record turns final just before its model is swapped
    // in here: wait for the swap, so the version read is the one served.
    let mut version = d.metric("dialogd_model_version").await;
    for _ in 0..600 {
        if version >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        version = d.metric("dialogd_model_version").await;
    }
    assert_eq!(version, 1.0, "the resumed job's model is served");
    let long = jobs.create(Target::Base, "cli".into(), vec![]).await.unwrap();
    let running = wait_for(&jobs, long.id, Duration::from_secs(120), |r| r.pid.is_some()).await;
    let cancel = jobs_cli(&config, &["cancel", &long.id.to_string()]);
    assert!(cancel.status.success(), "{}", stderr(&cancel));
    let cancelled = wait_for(&jobs, long.id, Duration::from_secs(60), |r| r.state.is_final()).await;
    assert_eq!(cancelled.state, JobState::Cancelled);
    let pid = running.pid.unwrap().to_string();
    let alive = std::process::Command::new("kill").args(["-0", &pid]).stderr(std::process::Stdio::null()).status().unwrap();
    assert!(!alive.success(), "the trainer still runs");
    assert_eq!(d.metric("dialogd_model_version").await, version);
    // The command line refuses what it cannot do, clearly.
    let missing = jobs_cli(&config, &["show", "99"]);
    assert!(!missing.status.success() && stderr(&missing).contains("there is no job #99"), "{}", stderr(&missing));
    let no_persona = jobs_cli(&config, &["run", "--persona", "nobody"]);
    assert!(stderr(&no_persona).contains("there is no persona \"nobody\""), "{}", stderr(&no_persona));
    let bad_channel = jobs_cli(&config, &["run", "--base", "--channel", "room"]);
    assert!(stderr(&bad_channel).contains("not platform:channel_id"), "{}", stderr(&bad_channel));
    let show = jobs_cli(&config, &["show", &job.id.to_string()]);
    assert!(stdout(&show).contains("attempts: 2") && stdout(&show).contains("probe \"hello bot\""), "{}", stdout(&show));
    // A finished job cannot be cancelled.
    let again = jobs_cli(&config, &["cancel", &long.id.to_string()]);
    assert!(!again.status.success() && stderr(&again).contains("already cancelled"), "{}", stderr(&again));

    // A trainer that crashes: the job fails with its last words; serving
    // is untouched.
    let script = tmp.path().join("broken-trainer");
    std::fs::write(&script, "#!/bin/sh\necho 'error: out of memory while loading weights' >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    d.stop().await;
    let toml = jobs_toml(&redis, tmp.path(), &[("jobs", &format!("trainer = \"{}\"", script.display()))]);
    let d = TestDaemon::start(&toml).await;
    // The restarted daemon serves the promoted version recorded in Redis
    // before it takes its first message.
    assert_eq!(d.metric("dialogd_model_version").await, 1.0);
    assert_eq!(say(&d, "check-1", "hello bot", false).await, "hi there, friend!");
    let broken = jobs.create(Target::Base, "cli".into(), vec![]).await.unwrap();
    let failed = wait_for(&jobs, broken.id, Duration::from_secs(60), |r| r.state.is_final()).await;
    assert_eq!(failed.state, JobState::Failed);
    assert!(failed.reason.as_deref().unwrap().contains("out of memory while loading weights"), "{failed:?}");
    assert_eq!(d.metric("dialogd_model_version").await, 1.0);
    assert_eq!(say(&d, "check-2", "hello bot", false).await, "hi there, friend!");
    assert_ne!(before, "hi there, friend!");
    d.stop().await;
}

fn has_checkpoint(output: &Path) -> bool {
    std::fs::read_dir(output.join("checkpoints"))
        .map(|entries| entries.filter_map(Result::ok).any(|e| e.path().join("state.json").is_file()))
        .unwrap_or(false)
}

#[tokio::test]
async fn schedules_fire_once_across_daemons() {
    let redis = RedisServer::start();
    let jobs = store(&redis).await;
    let settings = crate::support::settings_from(&format!(
        "[context]\nstore = \"redis\"\nredis_url = \"{}\"\n[jobs]\nmode = \"lora\"\nschedules = [{{ name = \"nightly\", cron = \"0 4 * * *\", persona = \"friendly\", channels = [\"discord:1\"] }}]\n",
        redis.url()
    ));
    let schedules = &settings.jobs.schedules;
    // 2026-11-22 03:59:30 UTC → 04:00 is due by 04:00:10, not before.
    let (before, due) = (1_795_305_600 + 4 * 3600 - 30, 1_795_305_600 + 4 * 3600 + 10);
    use dialogd::jobs::runner::fire_schedules;
    assert!(fire_schedules(&jobs, schedules, before - 60, before).await.unwrap().is_empty());
    let first = fire_schedules(&jobs, schedules, before, due).await.unwrap();
    // A second daemon looking at the same window queues nothing more.
    let second = fire_schedules(&jobs, schedules, before, due).await.unwrap();
    assert_eq!((first.len(), second.len()), (1, 0));
    let record = jobs.get(first[0]).await.unwrap().unwrap();
    assert_eq!(record.target, Target::Persona("friendly".into()));
    assert_eq!((record.trigger.as_str(), record.channels.as_slice()), ("schedule:nightly", &["discord:1".to_string()][..]));
    assert_eq!(jobs.queued().await.unwrap(), vec![record.id]);

    // `dialogd jobs` without a reachable Redis says so and where.
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), "[context]\nredis_url = \"redis://127.0.0.1:1/0\"\nredis_timeout_ms = 300\n");
    let out = jobs_cli(&config, &["list"]);
    assert!(!out.status.success() && stderr(&out).contains("connecting to redis://127.0.0.1:1/0"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persona_learns_its_channel_while_other_channels_keep_the_base_model() {
    let _turn = TRAINING.lock().await;
    let redis = RedisServer::start();
    let tmp = tempfile::tempdir().unwrap();
    collect_corpus(tmp.path());
    let extra = [("jobs", "mode = \"lora\""), ("jobs", "steps = 60"), ("jobs", "lr = 0.01"), ("jobs", "probes = [\"hello bot\"]")];
    let toml = jobs_toml(&redis, tmp.path(), &extra);
    let d = TestDaemon::start(&toml).await;
    let jobs = store(&redis).await;
    let before = say(&d, "check-0", "hello bot", false).await;
    assert!(!before.starts_with("hi there, friend"), "{before}");

    // Moderators opt a channel in and out of collection.
    assert!(say(&d, "check-c", "/collect", true).await.contains("are not collected"));
    assert!(say(&d, "check-c", "/collect on", true).await.starts_with("Collecting:"));
    assert!(say(&d, "check-c", "/collect", true).await.contains("are collected"));
    assert!(say(&d, "check-c", "/collect off", true).await.starts_with("Not collecting:"));
    assert!(say(&d, "check-c", "/collect", true).await.contains("are not collected"));

    // LoRA jobs train a persona: the channel needs one first.
    assert!(say(&d, ROOM, "/train", true).await.contains("/persona create NAME"));
    let created = say(&d, ROOM, "/persona create friendly", true).await;
    assert!(created.contains("Created persona friendly with 0 seed turn(s)"), "{created}");
    assert!(say(&d, ROOM, "/persona use friendly", true).await.contains("speak as friendly in this channel"));
    // Another channel's moderators cannot replace it; its own can.
    assert!(say(&d, "elsewhere", "/persona create friendly Arr!", true).await.contains("friendly belongs to another chat or server"));
    assert!(say(&d, ROOM, "/persona create friendly", true).await.contains("Created persona friendly"));
    assert!(say(&d, ROOM, "/persona list", true).await.contains("friendly"));
    let queued = say(&d, ROOM, "/train", true).await;
    assert!(queued.contains("job #1 queued for persona:friendly"), "{queued}");
    let record = wait_for(&jobs, 1, Duration::from_secs(300), |r| r.state.is_final()).await;
    assert_eq!(record.state, JobState::Promoted, "{record:?}\nlog:\n{}", log_of(&record));
    assert!(record.output.as_ref().unwrap().join("adapter_model.safetensors").is_file());

    // The persona's channel and a plain channel, answered side by side by
    // the same pool: only the persona's sequence runs through its adapter.
    // It belongs to the room: another channel may speak as it once shared.
    assert!(say(&d, "check-p", "/persona use friendly", true).await.contains("not shared"));
    assert!(say(&d, ROOM, "/persona share friendly", true).await.contains("friendly is shared"));
    assert!(say(&d, "check-p", "/persona use friendly", true).await.contains("speak as friendly"));
    let (persona, plain) = tokio::join!(say(&d, "check-p", "hello bot", false), say(&d, "check-n", "hello bot", false));
    assert!(persona.starts_with("hi there, friend"), "the persona did not learn: {persona:?}");
    assert_eq!(plain, before);
    assert!(say(&d, "check-p", "/persona", true).await.contains("adapter: trained by job #1"));
    assert_eq!(d.metric("dialogd_model_version").await, 0.0, "a persona job leaves the base model alone");

    // Rollback from chat: the persona goes back to no adapter.
    let rolled = say(&d, ROOM, "/train rollback", true).await;
    assert!(rolled.contains("Rolled back job #1: persona:friendly serves its original version"), "{rolled}");
    let started = Instant::now();
    while !say(&d, "check-p", "/persona", true).await.contains("adapter: none yet") {
        assert!(started.elapsed() < Duration::from_secs(30), "the rollback was not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(say(&d, "check-p2", "/persona use friendly", true).await.contains("friendly"));
    assert_eq!(say(&d, "check-p2", "hello bot", false).await, before);
    d.stop().await;
}

/// `/optout` reaches the next job end to end: the author's exchanges the
/// daemon collected are deleted, and lines of theirs that escaped the
/// deletion (a segment restored from a backup, under their current and
/// their legacy hash) are left out of the job's dataset too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_optout_the_next_jobs_dataset_leaves_the_author_out() {
    let _turn = TRAINING.lock().await;
    let redis = RedisServer::start();
    let tmp = tempfile::tempdir().unwrap();
    collect_corpus(tmp.path());
    let toml = jobs_toml(&redis, tmp.path(), &[("jobs", "steps = 2"), ("jobs", "checkpoint_every = 2")]);
    let d = TestDaemon::start(&toml).await;
    let jobs = store(&redis).await;
    let collector = Collector::open(&crate::support::settings_from(&collect_toml(tmp.path())).collect).unwrap();
    let ann = [collector.author_hash("http:ann"), collector.legacy_author_hash("http:ann")];
    let segments_text = || -> String { collector.segments().unwrap().iter().map(|p| std::fs::read_to_string(p).unwrap()).collect() };

    let as_ann = |text: &str| Inbound { author: "ann".into(), ..inbound(ROOM, text, false) };
    let answer = d.pipeline.handle(as_ann("my secret recipe uses saffron")).await.unwrap();
    assert!(matches!(answer, Answer::Reply(_)), "{answer:?}");
    assert!(segments_text().contains(&ann[0]), "ann's exchange was collected");
    let Answer::Reply(out) = d.pipeline.handle(as_ann("/optout")).await.unwrap() else { panic!("no answer to /optout") };
    assert!(out.text.contains("deleted 1"), "{}", out.text);
    assert!(!segments_text().contains(&ann[0]) && !segments_text().contains("saffron"));

    // Lines that escaped the deletion: a restored segment.
    let restored: String = ann
        .iter()
        .map(|hash| {
            let turns = [("restored saffron", hash.as_str()), ("noted", "bot")];
            let turns: Vec<_> = turns.iter().map(|(text, author)| serde_json::json!({"author": author, "text": text})).collect();
            format!("{}\n", serde_json::json!({"channel": "http:room", "time": 1, "turns": turns}))
        })
        .collect();
    std::fs::write(collector.dir().join("exchanges-0-restored.jsonl"), restored).unwrap();

    let queued = say(&d, ROOM, "/train", true).await;
    assert!(queued.contains("job #1 queued"), "{queued}");
    let record = wait_for(&jobs, 1, Duration::from_secs(300), |r| r.state.is_final()).await;
    assert_ne!(record.state, JobState::Failed, "{record:?}\nlog:\n{}", log_of(&record));
    let data = std::fs::read_to_string(record.dir.as_ref().unwrap().join("data.jsonl")).unwrap();
    assert_eq!(record.examples, Some(28), "the corpus, without ann's two restored lines");
    assert_eq!(data.lines().count(), 28);
    assert!(!data.contains("saffron") && !ann.iter().any(|h| data.contains(h.as_str())), "ann reached the dataset:\n{data}");
    assert!(data.contains("what colour is the sky?"));
    d.stop().await;
}

/// Issue #16 point 4: `dialogd jobs list` needs neither the collection
/// secret nor a platform token: the daemon's settings file, with
/// collection and Telegram on and their secrets only in the daemon's
/// environment, lists jobs, where `check-config` (as `run`) refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_list_needs_no_collection_key_or_platform_token() {
    let redis = RedisServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(
        tmp.path(),
        &format!(
            "[context]\nredis_url = \"{}\"\n[collect]\nenabled = true\ndir = \"{}\"\n[jobs]\nenabled = true\n[adapters.telegram]\nenabled = true\n",
            redis.url(),
            tmp.path().join("collected").display()
        ),
    );
    let check = dialogd(&["check-config", "--config", config.to_str().unwrap()]);
    let why = stderr(&check);
    assert!(!check.status.success() && (why.contains("collect.author_key") || why.contains("telegram")), "{why}");
    let out = jobs_cli(&config, &["list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "no jobs yet");
    let out = jobs_cli(&config, &["list", "--json"]);
    assert_eq!(stdout(&out).trim(), "[]", "{}", stderr(&out));
}

/// Issue #16 point 4: a training job shows its progress (step/total, loss,
/// tokens/s, ETA) while it runs, in its record (`jobs show`, text and
/// JSON), in `/train status` through the Telegram adapter, in `jobs run
/// --wait` (plain lines: stderr is a pipe here) and as the
/// `dialogd_job_step` and `dialogd_job_loss` gauges on /metrics, which
/// leave with the job. The job is long enough never to end by itself: the
/// test cancels it once it has seen everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_shows_its_progress_everywhere() {
    use std::io::BufRead as _;
    let _turn = TRAINING.lock().await;
    let redis = RedisServer::start();
    let tmp = tempfile::tempdir().unwrap();
    collect_corpus(tmp.path());
    const TOKEN: &str = "123456:TEST-secret-token-abcdef";
    let fake = crate::fakes::telegram::FakeTelegram::start(TOKEN).await;
    let telegram = [
        "enabled = true".to_string(),
        format!("token = \"{TOKEN}\""),
        format!("api_url = \"{}\"", fake.url),
        "poll_timeout_secs = 1".to_string(),
        "moderators = [9]".to_string(),
    ];
    let mut extra: Vec<(&str, &str)> = vec![("jobs", "steps = 100000"), ("jobs", "checkpoint_every = 0")];
    extra.extend(telegram.iter().map(|l| ("adapters.telegram", l.as_str())));
    let toml = jobs_toml(&redis, tmp.path(), &extra);
    let config = write_config(tmp.path(), &toml);
    let d = TestDaemon::start(&toml).await;
    let jobs = store(&redis).await;

    // `jobs run --wait` with stderr on a pipe: its lines, as they come.
    let mut waiting = std::process::Command::new(env!("CARGO_BIN_EXE_dialogd"))
        .args(["jobs", "--config", config.to_str().unwrap(), "run", "--base", "--wait"])
        .env_remove("RUST_LOG")
        .env_remove("DIALOGD_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let stderr_pipe = waiting.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut said = Vec::new();
    let progress_line = loop {
        let line = lines_rx.recv_timeout(Duration::from_secs(300)).unwrap_or_else(|e| panic!("{e}: no progress line in {said:?}"));
        said.push(line.clone());
        if line.starts_with("job #1: step ") && line.contains("/100000, loss ") {
            break line;
        }
    };
    assert!(said.iter().any(|l| l == "job #1: running"), "{said:?}");
    assert!(progress_line.contains(" tokens/s") && progress_line.contains(", ETA "), "{progress_line}");
    assert!(!said.concat().contains('\u{1b}'), "control codes on a pipe: {said:?}");

    // The record: where it stands, in the JSON `jobs show` prints.
    let record = wait_for(&jobs, 1, Duration::from_secs(60), |r| r.progress.as_ref().is_some_and(|p| p.step >= 1)).await;
    assert_eq!(record.state, JobState::Running, "{record:?}");
    let shown = jobs_cli(&config, &["show", "1", "--json"]);
    let shown: serde_json::Value = serde_json::from_str(&stdout(&shown)).unwrap_or_else(|e| panic!("{e}: {}", stderr(&shown)));
    let progress = &shown["progress"];
    assert!(progress["step"].as_u64().is_some_and(|s| s >= 1), "{shown}");
    assert_eq!(progress["total_steps"], 100_000, "{shown}");
    assert!(progress["loss"].as_f64().is_some_and(|l| l.is_finite() && l > 0.0), "{shown}");
    assert!(progress["tokens_per_s"].as_f64().is_some_and(|t| t > 0.0), "{shown}");
    assert!(progress["eta_s"].as_u64().is_some() && progress["updated"].as_u64().is_some(), "{shown}");
    let text = stdout(&jobs_cli(&config, &["show", "1"]));
    assert!(text.contains("#1 base running: step ") && text.contains("  progress: step ") && text.contains("/100000, loss "), "{text}");

    // `/train status` in a Telegram chat, from an operator.
    fake.say(-100, 9, "/train status", None);
    let status = crate::fakes::wait_for(Duration::from_secs(20), || fake.sent_to(-100).first().cloned())
        .await
        .expect("an answer to /train status");
    let status = status["text"].as_str().unwrap();
    assert!(status.contains("#1 base running: step ") && status.contains("/100000, loss "), "{status}");

    // The gauges, labelled with the job, in text promtool accepts.
    let text = d.http.get(&d.metrics_url).send().await.unwrap().text().await.unwrap();
    let series = "{job_id=\"1\",target=\"base\"}";
    assert!(crate::support::metric_value(&text, &format!("dialogd_job_step{series}")) >= 1.0, "{text}");
    assert!(crate::support::metric_value(&text, &format!("dialogd_job_loss{series}")) > 0.0, "{text}");
    assert!(text.contains("# TYPE dialogd_job_step gauge\n") && text.contains("# TYPE dialogd_job_loss gauge\n"), "{text}");
    crate::support::promtool_check(&text);

    // Cancelled: the waiting command says so and fails; the gauges go.
    let cancel = jobs_cli(&config, &["cancel", "1"]);
    assert!(cancel.status.success(), "{}", stderr(&cancel));
    let out = tokio::task::spawn_blocking(move || waiting.wait_with_output().unwrap()).await.unwrap();
    reader.join().unwrap();
    said.extend(lines_rx.try_iter());
    assert!(!out.status.success(), "{said:?}");
    assert!(said.iter().any(|l| l == "job #1: cancelled"), "{said:?}");
    let ended = jobs.get(1).await.unwrap().unwrap();
    assert_eq!(ended.state, JobState::Cancelled);
    assert!(ended.progress.as_ref().is_some_and(|p| p.step >= record.progress.as_ref().unwrap().step), "{ended:?}");
    let text = d.http.get(&d.metrics_url).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("dialogd_job_step{") && !text.contains("dialogd_job_loss{"), "{text}");
    assert_eq!(crate::support::metric_value(&text, "dialogd_job_running"), 0.0);
    crate::support::promtool_check(&text);
    d.stop().await;
}
