//! The Redis context and persona stores against a real redis-server.

use std::sync::Arc;
use std::time::Duration;

use dialogd::context::redis::RedisStore;
use dialogd::context::{Appended, ContextError, ContextStore, EditChange, Edited, Limits, Turn};
use dialogd::telemetry::Metrics;
use dialogd_adapters::{ChannelKey, Platform};
use redis::Commands as _;

use crate::support::RedisServer;

async fn store(redis: &RedisServer, max_turns: usize, ttl: Option<Duration>) -> RedisStore {
    store_with(redis, max_turns, ttl, Metrics::new()).await
}

async fn store_with(redis: &RedisServer, max_turns: usize, ttl: Option<Duration>, metrics: Arc<Metrics>) -> RedisStore {
    RedisStore::connect(&redis.url(), "t", Limits::new(max_turns, ttl), Duration::from_millis(500), metrics)
        .await
        .unwrap()
}

fn key(id: &str) -> ChannelKey {
    ChannelKey::new(Platform::Http, id)
}

fn texts(turns: &[Turn]) -> Vec<&str> {
    turns.iter().map(|t| t.text.as_str()).collect()
}

#[tokio::test]
async fn turns_round_trip_with_every_field() {
    let redis = RedisServer::start();
    let store = store(&redis, 10, None).await;
    let a = key("room-1");
    let user = Turn::user("ann", "Does money buy happiness?", Some("m1".into()));
    let bot = Turn::bot("Depends how much money you spend on it.", "ann");
    assert_eq!(store.append(&a, &[user.clone(), bot.clone()], Some("m1")).await.unwrap(), Appended::Stored);
    assert_eq!(store.turns(&a).await.unwrap(), vec![user, bot]);
    assert!(store.turns(&key("room-2")).await.unwrap().is_empty());
    // The channel lives under its documented key.
    let mut conn = redis.client();
    assert_eq!(conn.llen::<_, usize>("t:ctx:http:room-1").unwrap(), 2);
    store.clear(&a).await.unwrap();
    assert!(store.turns(&a).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_window_keeps_the_newest_turns() {
    let redis = RedisServer::start();
    let store = store(&redis, 4, None).await;
    let a = key("w");
    for i in 0..5 {
        let turns = [Turn::user("ann", format!("q{i}"), None), Turn::bot(format!("a{i}"), "ann")];
        store.append(&a, &turns, None).await.unwrap();
    }
    assert_eq!(texts(&store.turns(&a).await.unwrap()), ["q3", "a3", "q4", "a4"]);
}

#[tokio::test]
async fn idle_channels_expire() {
    let redis = RedisServer::start();
    let store = store(&redis, 10, Some(Duration::from_secs(1))).await;
    let a = key("ttl");
    store.append(&a, &[Turn::user("ann", "hello", Some("m1".into()))], Some("m1")).await.unwrap();
    let mut conn = redis.client();
    let ttl: i64 = conn.pttl("t:ctx:http:ttl").unwrap();
    assert!(ttl > 0 && ttl <= 1000, "ttl {ttl}");
    assert!(conn.pttl::<_, i64>("t:seen:http:ttl").unwrap() > 0);
    // Redis expires the key; wait for it, boundedly.
    let mut gone = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if store.turns(&a).await.unwrap().is_empty() {
            gone = true;
            break;
        }
    }
    assert!(gone, "context still there after 6 s with a 1 s TTL");
}

#[tokio::test]
async fn a_message_id_is_stored_once() {
    let redis = RedisServer::start();
    let store = store(&redis, 10, None).await;
    let a = key("dup");
    let turns = [Turn::user("ann", "hi", Some("m7".into())), Turn::bot("hello", "ann")];
    assert!(!store.seen(&a, "m7").await.unwrap());
    assert_eq!(store.append(&a, &turns, Some("m7")).await.unwrap(), Appended::Stored);
    assert!(store.seen(&a, "m7").await.unwrap());
    assert_eq!(store.append(&a, &turns, Some("m7")).await.unwrap(), Appended::Duplicate);
    assert_eq!(store.turns(&a).await.unwrap().len(), 2);
    // Ids are per channel.
    assert_eq!(store.append(&key("other"), &turns, Some("m7")).await.unwrap(), Appended::Stored);
}

#[tokio::test]
async fn concurrent_appends_to_one_channel_are_each_stored_once() {
    let redis = RedisServer::start();
    let store = Arc::new(store(&redis, 1000, None).await);
    let a = key("busy");
    let mut tasks = tokio::task::JoinSet::new();
    // 50 messages, each delivered twice, all at once.
    for i in 0..100 {
        let (store, a) = (store.clone(), a.clone());
        tasks.spawn(async move {
            let id = format!("m{}", i % 50);
            let turns = [Turn::user("ann", format!("q{}", i % 50), Some(id.clone())), Turn::bot(format!("a{}", i % 50), "ann")];
            store.append(&a, &turns, Some(&id)).await.unwrap()
        });
    }
    let mut stored = 0;
    while let Some(outcome) = tasks.join_next().await {
        stored += usize::from(outcome.unwrap() == Appended::Stored);
    }
    assert_eq!(stored, 50);
    let turns = store.turns(&a).await.unwrap();
    assert_eq!(turns.len(), 100);
    // Each pair is whole: a question is always followed by its answer.
    for pair in turns.chunks(2) {
        assert_eq!(pair[0].text[1..], pair[1].text[1..], "{pair:?}");
        assert!(!pair[0].bot && pair[1].bot);
    }
}

#[tokio::test]
async fn forget_removes_an_author_everywhere() {
    let redis = RedisServer::start();
    let store = store(&redis, 100, Some(Duration::from_secs(3600))).await;
    for channel in ["f1", "f2"] {
        let turns = [
            Turn::user("ann", "ann here", None),
            Turn::bot("hi ann", "ann"),
            Turn::user("bob", "bob here", None),
            Turn::bot("hi bob", "bob"),
        ];
        store.append(&key(channel), &turns, None).await.unwrap();
    }
    assert_eq!(store.forget_author(Platform::Http, "ann").await.unwrap(), 4);
    for channel in ["f1", "f2"] {
        assert_eq!(texts(&store.turns(&key(channel)).await.unwrap()), ["bob here", "hi bob"]);
    }
    // The TTL survives the rewrite.
    assert!(redis.client().pttl::<_, i64>("t:ctx:http:f1").unwrap() > 0);
    assert_eq!(store.forget_author(Platform::Http, "ann").await.unwrap(), 0);
}

#[tokio::test]
async fn the_store_recovers_when_redis_comes_back() {
    let mut redis = RedisServer::start();
    let metrics = Metrics::new();
    let store = store_with(&redis, 10, None, metrics.clone()).await;
    let a = key("r");
    store.append(&a, &[Turn::user("ann", "one", None)], None).await.unwrap();
    redis.kill();
    let err = store.append(&a, &[Turn::user("ann", "two", None)], None).await.unwrap_err();
    assert!(matches!(err, ContextError::Unavailable(_)), "{err}");
    assert!(!store.is_up());
    // While down, calls fail without trying Redis (no new Redis error);
    // only the watcher knocks.
    let errors = metrics.redis_errors.get();
    assert!(errors >= 1);
    assert!(store.turns(&a).await.is_err());
    assert_eq!(metrics.redis_errors.get(), errors, "a call went to Redis while it was down");
    // Long enough down for the watcher's backoff to reach its cap.
    tokio::time::sleep(Duration::from_secs(8)).await;
    redis.restart();
    let back = back_within(&store, Duration::from_secs(5)).await.expect("store did not see redis back within 5 s");
    println!("store back {back:?} after redis");
    store.append(&a, &[Turn::user("ann", "three", None)], None).await.unwrap();
    // The old data died with the server (no persistence); the new is there.
    assert_eq!(texts(&store.turns(&a).await.unwrap()), ["three"]);
}

#[tokio::test]
async fn edits_replace_or_remove_only_the_authors_latest_turn() {
    let redis = RedisServer::start();
    let store = store(&redis, 10, Some(Duration::from_secs(600))).await;
    let a = key("edits");
    store.append(&a, &[Turn::user("ann", "one", Some("m1".into())), Turn::bot("re one", "ann")], Some("m1")).await.unwrap();
    store.append(&a, &[Turn::user("ann", "two", Some("m2".into())), Turn::bot("re two", "ann")], Some("m2")).await.unwrap();
    store.append(&a, &[Turn::user("bob", "three", Some("m3".into()))], Some("m3")).await.unwrap();
    let before = store.turns(&a).await.unwrap();
    // An older message of ann's, and someone else's message: untouched.
    assert_eq!(store.edit_turn(&a, "ann", "m1", EditChange::Replace("x")).await.unwrap(), Edited::Ignored);
    assert_eq!(store.edit_turn(&a, "bob", "m2", EditChange::Replace("x")).await.unwrap(), Edited::Ignored);
    assert_eq!(store.edit_turn(&a, "ann", "m9", EditChange::Replace("x")).await.unwrap(), Edited::Ignored);
    assert_eq!(store.turns(&a).await.unwrap(), before);
    // Replaced in place, every other field kept (JSON rewritten by the script).
    let text = "two, edited: caf\u{e9} \u{1F600} \"quoted\" / slash";
    assert_eq!(store.edit_turn(&a, "ann", "m2", EditChange::Replace(text)).await.unwrap(), Edited::Replaced);
    let after = store.turns(&a).await.unwrap();
    let mut want = before.clone();
    want[2].text = text.to_string();
    assert_eq!(after, want);
    // Removed with the reply stored after it; the TTL is kept.
    assert_eq!(store.edit_turn(&a, "ann", "m2", EditChange::Remove).await.unwrap(), Edited::Removed { replies: 1 });
    assert_eq!(texts(&store.turns(&a).await.unwrap()), ["one", "re one", "three"]);
    let ttl: i64 = redis.client().ttl("t:ctx:http:edits").unwrap();
    assert!(ttl > 500, "{ttl}");
    // ann's latest turn is m1 again; a re-answered edit's id (m1#…) is m1.
    store.append(&a, &[Turn::user("ann", "uno", Some("m1#e1".into()))], Some("m1#e1")).await.unwrap();
    assert_eq!(store.edit_turn(&a, "ann", "m1", EditChange::Replace("uno!")).await.unwrap(), Edited::Replaced);
    assert_eq!(store.edit_turn(&a, "ann", "m", EditChange::Replace("no")).await.unwrap(), Edited::Ignored);
    assert_eq!(texts(&store.turns(&a).await.unwrap()), ["one", "re one", "three", "uno!"]);
}

/// How long after now the store reports itself up, if within `bound`.
async fn back_within(store: &RedisStore, bound: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    while started.elapsed() < bound {
        if store.is_up() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A connection to `port` as `password` for the test's own commands.
fn admin(port: u16, password: Option<&str>) -> redis::Connection {
    let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
    redis::Client::open(format!("redis://{auth}127.0.0.1:{port}/0")).unwrap().get_connection().unwrap()
}

fn config_set(conn: &mut redis::Connection, key: &str, value: &str) {
    redis::cmd("CONFIG").arg("SET").arg(key).arg(value).query::<()>(conn).unwrap();
}

/// A wrong password is a store fault (down, counted, refused at once), not
/// silence; once Redis accepts the password the store is back within 5 s.
#[tokio::test]
async fn a_wrong_password_is_a_store_fault_until_it_is_right() {
    let redis = RedisServer::start_with(&["--requirepass", "right-pass-1"]);
    let metrics = Metrics::new();
    let url = format!("redis://:wrong-pass-2@127.0.0.1:{}/0", redis.port);
    let store = RedisStore::connect(&url, "t", Limits::new(10, None), Duration::from_millis(500), metrics.clone())
        .await
        .unwrap();
    assert!(!store.is_up());
    assert!(!metrics.store_is_up());
    assert!(metrics.redis_errors.get() >= 1);
    let err = store.append(&key("p"), &[Turn::user("ann", "one", None)], None).await.unwrap_err();
    assert!(matches!(err, ContextError::Unavailable(_)), "{err}");
    assert!(!err.to_string().contains("wrong-pass-2"), "{err}");

    config_set(&mut admin(redis.port, Some("right-pass-1")), "requirepass", "wrong-pass-2");
    back_within(&store, Duration::from_secs(5)).await.expect("not back within 5 s of the password fix");
    assert!(metrics.store_is_up());
    store.append(&key("p"), &[Turn::user("ann", "two", None)], None).await.unwrap();
    assert_eq!(texts(&store.turns(&key("p")).await.unwrap()), ["two"]);
}

/// Redis out of memory (`maxmemory` reached, `noeviction`) refuses the
/// append script: a store fault, seen by the watcher's write probe too;
/// back within 5 s once memory is there again.
#[tokio::test]
async fn out_of_memory_is_a_store_fault_until_memory_is_back() {
    let redis = RedisServer::start();
    let metrics = Metrics::new();
    let store = store_with(&redis, 10, None, metrics.clone()).await;
    let a = key("m");
    store.append(&a, &[Turn::user("ann", "one", None)], None).await.unwrap();
    let mut admin = admin(redis.port, None);
    config_set(&mut admin, "maxmemory-policy", "noeviction");
    config_set(&mut admin, "maxmemory", "1");
    let err = store.append(&a, &[Turn::user("ann", "two", None)], None).await.unwrap_err();
    assert!(matches!(err, ContextError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("OOM"), "{err}");
    assert!(!store.is_up());
    assert!(!metrics.store_is_up());

    config_set(&mut admin, "maxmemory", "0");
    back_within(&store, Duration::from_secs(5)).await.expect("not back within 5 s of memory");
    store.append(&a, &[Turn::user("ann", "three", None)], None).await.unwrap();
    assert_eq!(texts(&store.turns(&a).await.unwrap()), ["one", "three"]);

    // Out of memory with no message coming: the watcher's probe notices.
    config_set(&mut admin, "maxmemory", "1");
    let mut down = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if !store.is_up() {
            down = true;
            break;
        }
    }
    assert!(down, "the watcher did not notice Redis out of memory within 5 s");
}

/// A read-only replica refuses writes: a store fault; promoted to a
/// master, it is back within 5 s.
#[tokio::test]
async fn a_read_only_replica_is_a_store_fault_until_promoted() {
    let master = RedisServer::start();
    let port = master.port.to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    let metrics = Metrics::new();
    let store = store_with(&replica, 10, None, metrics.clone()).await;
    assert!(!store.is_up(), "a read-only replica was taken for a working store");
    let err = store.append(&key("ro"), &[Turn::user("ann", "one", None)], None).await.unwrap_err();
    assert!(matches!(err, ContextError::Unavailable(_)), "{err}");

    redis::cmd("REPLICAOF").arg("NO").arg("ONE").query::<()>(&mut admin(replica.port, None)).unwrap();
    back_within(&store, Duration::from_secs(5)).await.expect("not back within 5 s of the promotion");
    store.append(&key("ro"), &[Turn::user("ann", "one", None)], None).await.unwrap();
}

/// `check-config` (settings validation, then `check_url`) refuses exactly
/// the Redis URLs the daemon refuses (the same validation, then the store's
/// `connect`), and says why once, without the password.
#[tokio::test]
async fn check_config_refuses_the_urls_the_store_refuses() {
    let urls = [
        "redis://127.0.0.1:1/0",
        "redis://:pw-1@127.0.0.1:1/notadb",
        "redis://0.0.0.0:6379/0",
        "redis://user:pw-2@[::1]:1/3",
        "redis://",
        "rediss://127.0.0.1:1/0",
        "unix:///nonexistent/redis.sock?db=1&pass=pw-3",
        "unix:///nonexistent/redis.sock?db=x",
        "unix://",
        "redis+unix:///nonexistent/redis.sock",
        "http://127.0.0.1:1/0",
    ];
    let mut refused = 0;
    for url in urls {
        let validated = dialogd::settings::load_raw_with_env(None, [("DIALOGD__CONTEXT__REDIS_URL".into(), url.into())])
            .and_then(|raw| raw.validate());
        let checked = validated.as_ref().map_err(ToString::to_string).and_then(|_| dialogd::context::redis::check_url(url));
        let run = match validated {
            Err(e) => Err(e.to_string()),
            Ok(_) => RedisStore::connect(url, "t", Limits::new(10, None), Duration::from_millis(200), Metrics::new())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        assert_eq!(checked.is_ok(), run.is_ok(), "{url}: check-config {checked:?}, run {run:?}");
        if let Err(e) = checked {
            refused += 1;
            assert!(!e.contains("pw-"), "{e}");
            assert!(!e.contains("InvalidClientConfig"), "{e}");
        }
    }
    assert!(refused >= 5, "{refused}");
    let why = dialogd::context::redis::check_url("redis://:pw-1@127.0.0.1:1/notadb").unwrap_err();
    assert_eq!(why, "\"redis://:[redacted]@127.0.0.1:1/notadb\" cannot be used: Invalid database number");
}

/// A key of the wrong type under one channel is that channel's problem:
/// an error for it (counted), while the store stays up for the others.
#[tokio::test]
async fn a_wrong_type_under_one_channel_leaves_the_store_up() {
    let redis = RedisServer::start();
    let metrics = Metrics::new();
    let store = store_with(&redis, 10, None, metrics.clone()).await;
    redis.client().set::<_, _, ()>("t:ctx:http:odd", "not a list").unwrap();
    let errors = metrics.redis_errors.get();
    let err = store.turns(&key("odd")).await.unwrap_err();
    assert!(matches!(err, ContextError::Corrupt(_)), "{err}");
    let err = store.append(&key("odd"), &[Turn::user("ann", "x", None)], None).await.unwrap_err();
    assert!(matches!(err, ContextError::Corrupt(_)), "{err}");
    assert_eq!(metrics.redis_errors.get(), errors + 2);
    assert!(store.is_up());
    store.append(&key("fine"), &[Turn::user("ann", "x", None)], None).await.unwrap();
}

/// The persona stores (Redis, memory) behave the same through the
/// registry: creation, ownership, choices per channel and server, the
/// default, a persona that disappears; and Redis keeps it for the next
/// registry (a restarted daemon).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persona_stores_behave_alike_and_redis_keeps_choices() {
    use dialogd::personas::memory::MemoryPersonaStore;
    use dialogd::personas::redis::RedisPersonaStore;
    use dialogd::personas::{PersonaError, PersonaStore, Personas};
    use dialogd::settings::{PersonaSettings, PersonaSpec};

    let redis = RedisServer::start();
    let settings = PersonaSettings {
        default: "plain".into(),
        defined: vec![PersonaSpec { name: "plain".into(), adapter: None, seed: vec!["Hello.".into()], created_in: None, shared: false }],
    };
    let url = redis.url();
    let connect = || RedisPersonaStore::connect(&url, "t", Duration::from_secs(2));
    let stores: Vec<(&str, Arc<dyn PersonaStore>)> =
        vec![("memory", Arc::new(MemoryPersonaStore::new())), ("redis", Arc::new(connect().await.unwrap()))];
    let mut seen = Vec::new();
    for (kind, store) in stores {
        let personas = Personas::new(settings.clone(), store);
        let (room, other) = (key("room"), key("other"));
        let mut trace = Vec::new();
        trace.push(format!("{:?}", personas.chosen(&room, Some("g1")).await));
        trace.push(format!("{:?}", personas.create("pirate", vec!["Ahoy!".into()], "http:group:g1").await.map(|p| p.seed)));
        trace.push(format!("{:?}", personas.create("pirate", vec![], "http:other").await));
        trace.push(format!("{:?}", personas.create("plain", vec![], "http:group:g1").await));
        trace.push(format!("{:?}", personas.choose("http:group:g1", Some("pirate"), "http:group:g1").await));
        trace.push(format!("{:?}", personas.chosen(&room, Some("g1")).await));
        trace.push(format!("{:?}", personas.choose("http:room", Some("plain"), "http:group:g1").await));
        trace.push(format!("{:?}", personas.chosen(&room, Some("g1")).await));
        trace.push(format!("{:?}", personas.chosen(&other, None).await));
        trace.push(format!("{:?}", personas.choose("http:other", Some("ghost"), "http:other").await));
        trace.push(format!("{:?}", personas.all().await.map(|all| all.into_iter().map(|p| p.name).collect::<Vec<_>>())));
        trace.push(format!("{:?}", personas.for_channel(&room, Some("g1")).await.map(|p| p.map(|p| (p.name, p.seed)))));
        trace.push(format!("{:?}", personas.choose("http:room", None, "http:group:g1").await));
        trace.push(format!("{:?}", personas.chosen(&room, Some("g1")).await));
        assert!(matches!(personas.choose("http:other", Some("ghost"), "http:other").await, Err(PersonaError::Refused(_))), "{kind}");
        // Another scope's persona, not shared: refused, until shared.
        assert!(matches!(personas.choose("http:other", Some("pirate"), "http:other").await, Err(PersonaError::Refused(_))), "{kind}");
        assert!(matches!(personas.share("pirate", true, "http:other", false).await, Err(PersonaError::Refused(_))), "{kind}");
        assert!(personas.share("pirate", true, "http:group:g1", false).await.unwrap().shared, "{kind}");
        personas.choose("http:other", Some("pirate"), "http:other").await.unwrap();
        assert!(personas.for_channel(&other, None).await.unwrap().is_some(), "{kind}");
        personas.share("pirate", false, "http:group:g1", false).await.unwrap();
        assert!(personas.for_channel(&other, None).await.unwrap().is_none(), "unshared: no longer served ({kind})");
        personas.choose("http:other", None, "http:other").await.unwrap();
        seen.push((kind, trace));
    }
    assert_eq!(seen[0].1, seen[1].1, "memory and Redis differ");
    assert_eq!(seen[0].1[5], "Ok(Some(\"pirate\"))", "the server's choice");
    assert_eq!(seen[0].1[7], "Ok(Some(\"plain\"))", "the channel's choice wins over the server's");
    assert_eq!(seen[0].1[8], "Ok(Some(\"plain\"))", "the default");

    // A new registry on the same Redis (a restarted daemon) sees it all.
    let again = Personas::new(settings, Arc::new(connect().await.unwrap()));
    assert_eq!(again.chosen(&key("room"), Some("g1")).await.unwrap().as_deref(), Some("pirate"));
    assert_eq!(again.get("pirate").await.unwrap().unwrap().seed, ["Ahoy!"]);
}
