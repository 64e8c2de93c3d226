//! The in-memory context store: one process, lost at exit.
//!
//! Only writes create a channel's entry; reads of an unknown channel leave
//! the map as it was. Expired channels are dropped when read and swept
//! from the whole map on writes, at most once per sweep interval, so the
//! map holds only channels written within about the TTL.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use dialogd_adapters::{BoxFuture, ChannelKey, Platform};
use tokio::time::Instant;

use super::{is_message, Appended, ContextError, ContextStore, EditChange, Edited, Limits, Turn};

/// One channel's state.
#[derive(Default)]
struct Channel {
    turns: VecDeque<Turn>,
    /// Recent message ids, oldest first, and the same as a set.
    seen_order: VecDeque<String>,
    seen: HashSet<String>,
    touched: Option<Instant>,
}

/// Channels in a map behind a std mutex: it is never held across an await.
pub struct MemoryStore {
    limits: Limits,
    state: Mutex<State>,
}

struct State {
    channels: HashMap<ChannelKey, Channel>,
    muted: HashSet<ChannelKey>,
    /// Rate-limit windows: when each started and its hits.
    windows: HashMap<String, (Instant, u64)>,
    /// When expired channels were last swept from the whole map.
    swept: Instant,
}

/// The longest time between sweeps (shorter when the TTL is).
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl MemoryStore {
    pub fn new(limits: Limits) -> Self {
        Self { limits, state: Mutex::new(State {
                channels: HashMap::new(),
                muted: HashSet::new(),
                windows: HashMap::new(),
                swept: Instant::now(),
            }), }
    }

    /// How many channels the store holds (expired ones not yet swept
    /// included).
    pub fn channel_count(&self) -> usize {
        self.lock().channels.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn expired(&self, channel: &Channel, now: Instant) -> bool {
        self.limits.ttl.is_some_and(|ttl| channel.touched.is_some_and(|t| now.duration_since(t) >= ttl))
    }

    /// Runs `f` on the channel's live state, or gives `None` for a channel
    /// not stored (or expired, which is then dropped); never creates one.
    /// Uses tokio's clock, so tests can pause time.
    fn read<T>(&self, channel: &ChannelKey, f: impl FnOnce(&mut Channel) -> T) -> Option<T> {
        let mut state = self.lock();
        let now = Instant::now();
        if state.channels.get(channel).is_some_and(|c| self.expired(c, now)) {
            state.channels.remove(channel);
        }
        state.channels.get_mut(channel).map(f)
    }

    /// Runs `f` on the channel's live state, created if need be, after
    /// sweeping expired channels when a sweep is due.
    fn write<T>(&self, channel: &ChannelKey, f: impl FnOnce(&mut Channel) -> T) -> T {
        let mut state = self.lock();
        let now = Instant::now();
        if let Some(ttl) = self.limits.ttl {
            if now.duration_since(state.swept) >= ttl.min(SWEEP_EVERY) {
                state.channels.retain(|_, c| !self.expired(c, now));
                state.swept = now;
            }
        }
        if state.channels.get(channel).is_some_and(|c| self.expired(c, now)) {
            state.channels.remove(channel);
        }
        f(state.channels.entry(channel.clone()).or_default())
    }
}

impl ContextStore for MemoryStore {
    fn turns<'a>(&'a self, channel: &'a ChannelKey) -> BoxFuture<'a, Result<Vec<Turn>, ContextError>> {
        let turns = self.read(channel, |c| c.turns.iter().cloned().collect()).unwrap_or_default();
        Box::pin(async move { Ok(turns) })
    }

    fn seen<'a>(&'a self, channel: &'a ChannelKey, msg_id: &'a str) -> BoxFuture<'a, Result<bool, ContextError>> {
        let seen = self.read(channel, |c| c.seen.contains(msg_id)).unwrap_or(false);
        Box::pin(async move { Ok(seen) })
    }

    fn append<'a>(
        &'a self,
        channel: &'a ChannelKey,
        turns: &'a [Turn],
        msg_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Appended, ContextError>> {
        let limits = &self.limits;
        let outcome = self.write(channel, |c| {
            if let Some(id) = msg_id {
                if !c.seen.insert(id.to_string()) {
                    return Appended::Duplicate;
                }
                c.seen_order.push_back(id.to_string());
                while c.seen_order.len() > limits.seen_ids {
                    if let Some(old) = c.seen_order.pop_front() {
                        c.seen.remove(&old);
                    }
                }
            }
            c.turns.extend(turns.iter().cloned());
            while c.turns.len() > limits.max_turns {
                c.turns.pop_front();
            }
            c.touched = Some(Instant::now());
            Appended::Stored
        });
        Box::pin(async move { Ok(outcome) })
    }

    fn edit_turn<'a>(
        &'a self,
        channel: &'a ChannelKey,
        author: &'a str,
        msg_id: &'a str,
        change: EditChange<'a>,
    ) -> BoxFuture<'a, Result<Edited, ContextError>> {
        // An edit never creates a channel (nor renews its TTL).
        let edited = self.read(channel, |c| {
            let Some(at) = c.turns.iter().rposition(|t| !t.bot && t.author == author) else { return Edited::Ignored };
            if !is_message(&c.turns[at], msg_id) {
                return Edited::Ignored;
            }
            match change {
                EditChange::Replace(text) => {
                    c.turns[at].text = text.to_string();
                    Edited::Replaced
                }
                EditChange::Remove => {
                    let replies = c.turns.iter().skip(at + 1).take_while(|t| t.bot && t.reply_to.as_deref() == Some(author)).count();
                    c.turns.drain(at..at + 1 + replies);
                    Edited::Removed { replies }
                }
            }
        });
        let edited = edited.unwrap_or(Edited::Ignored);
        Box::pin(async move { Ok(edited) })
    }

    fn clear<'a>(&'a self, channel: &'a ChannelKey) -> BoxFuture<'a, Result<(), ContextError>> {
        self.read(channel, |c| c.turns.clear());
        Box::pin(async { Ok(()) })
    }

    fn forget_author<'a>(&'a self, platform: Platform, author: &'a str) -> BoxFuture<'a, Result<usize, ContextError>> {
        let mut state = self.lock();
        let mut removed = 0;
        for (_, channel) in state.channels.iter_mut().filter(|(key, _)| key.platform == platform) {
            let before = channel.turns.len();
            channel.turns.retain(|t| !about(t, author));
            removed += before - channel.turns.len();
        }
        Box::pin(async move { Ok(removed) })
    }

    fn muted<'a>(&'a self, channel: &'a ChannelKey) -> BoxFuture<'a, Result<bool, ContextError>> {
        let muted = self.lock().muted.contains(channel);
        Box::pin(async move { Ok(muted) })
    }

    fn set_muted<'a>(&'a self, channel: &'a ChannelKey, muted: bool) -> BoxFuture<'a, Result<(), ContextError>> {
        let mut state = self.lock();
        if muted {
            state.muted.insert(channel.clone());
        } else {
            state.muted.remove(channel);
        }
        Box::pin(async { Ok(()) })
    }

    fn count_hits<'a>(
        &'a self,
        keys: &'a [String],
        window: std::time::Duration,
    ) -> BoxFuture<'a, Result<Vec<(u64, std::time::Duration)>, ContextError>> {
        let now = Instant::now();
        let mut state = self.lock();
        if state.windows.len() > 10_000 {
            state.windows.retain(|_, (started, _)| now.duration_since(*started) < window);
        }
        let counts = keys
            .iter()
            .map(|key| {
                let (started, hits) = state.windows.entry(key.clone()).or_insert((now, 0));
                if now.duration_since(*started) >= window {
                    (*started, *hits) = (now, 0);
                }
                *hits += 1;
                (*hits, window.saturating_sub(now.duration_since(*started)))
            })
            .collect();
        Box::pin(async move { Ok(counts) })
    }

    /// One process: its queues already run a channel's messages in order.
    fn take_lease<'a>(
        &'a self,
        _channel: &'a ChannelKey,
        _holder: &'a str,
        _ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<bool, ContextError>> {
        Box::pin(async { Ok(true) })
    }

    fn drop_lease<'a>(&'a self, _channel: &'a ChannelKey, _holder: &'a str) -> BoxFuture<'a, Result<(), ContextError>> {
        Box::pin(async { Ok(()) })
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn is_up(&self) -> bool {
        true
    }
}

/// Whether a turn is by `author` or a bot reply to them.
pub(crate) fn about(turn: &Turn, author: &str) -> bool {
    if turn.bot {
        turn.reply_to.as_deref() == Some(author)
    } else {
        turn.author == author
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn key(id: &str) -> ChannelKey {
        ChannelKey::new(Platform::Http, id)
    }

    #[tokio::test]
    async fn window_dedup_and_forget() {
        let store = MemoryStore::new(Limits::new(3, None));
        let a = key("a");
        for i in 0..5 {
            let id = format!("m{i}");
            let turns = [Turn::user("ann", format!("hi {i}"), Some(id.clone()))];
            assert_eq!(store.append(&a, &turns, Some(&id)).await.unwrap(), Appended::Stored);
        }
        let texts: Vec<String> = store.turns(&a).await.unwrap().into_iter().map(|t| t.text).collect();
        assert_eq!(texts, ["hi 2", "hi 3", "hi 4"]);
        assert!(store.seen(&a, "m1").await.unwrap());
        assert_eq!(store.append(&a, &[Turn::user("ann", "again", None)], Some("m4")).await.unwrap(), Appended::Duplicate);
        store.append(&a, &[Turn::user("bob", "yo", None), Turn::bot("hey", "bob")], None).await.unwrap();
        assert_eq!(store.forget_author(Platform::Http, "bob").await.unwrap(), 2);
        assert_eq!(store.forget_author(Platform::Discord, "ann").await.unwrap(), 0);
    }

    #[tokio::test]
    async fn edits_touch_only_the_authors_latest_turn() {
        let store = MemoryStore::new(Limits::new(10, None));
        let a = key("a");
        store.append(&a, &[Turn::user("ann", "one", Some("m1".into())), Turn::bot("re one", "ann")], Some("m1")).await.unwrap();
        store.append(&a, &[Turn::user("ann", "two", Some("m2".into())), Turn::bot("re two", "ann")], Some("m2")).await.unwrap();
        store.append(&a, &[Turn::user("bob", "three", Some("m3".into()))], Some("m3")).await.unwrap();
        // m1 is older than ann's latest turn; bob cannot edit ann's.
        assert_eq!(store.edit_turn(&a, "ann", "m1", EditChange::Replace("x")).await.unwrap(), Edited::Ignored);
        assert_eq!(store.edit_turn(&a, "bob", "m2", EditChange::Replace("x")).await.unwrap(), Edited::Ignored);
        assert_eq!(store.edit_turn(&a, "ann", "m2", EditChange::Replace("two!")).await.unwrap(), Edited::Replaced);
        let texts = |turns: Vec<Turn>| turns.into_iter().map(|t| t.text).collect::<Vec<_>>();
        assert_eq!(texts(store.turns(&a).await.unwrap()), ["one", "re one", "two!", "re two", "three"]);
        assert_eq!(store.edit_turn(&a, "ann", "m2", EditChange::Remove).await.unwrap(), Edited::Removed { replies: 1 });
        assert_eq!(texts(store.turns(&a).await.unwrap()), ["one", "re one", "three"]);
        // Now m1 is ann's latest turn.
        assert_eq!(store.edit_turn(&a, "ann", "m1", EditChange::Replace("uno")).await.unwrap(), Edited::Replaced);
    }

    #[tokio::test]
    async fn apply_edit_replaces_drops_or_makes_way() {
        use crate::context::{apply_edit, EditOutcome};
        let store = MemoryStore::new(Limits::new(10, None));
        let a = key("a");
        let texts = |turns: Vec<Turn>| turns.into_iter().map(|t| t.text).collect::<Vec<_>>();
        store.append(&a, &[Turn::user("ann", "hi", Some("m1".into())), Turn::bot("hello", "ann")], Some("m1")).await.unwrap();
        assert_eq!(apply_edit(&store, &a, "ann", "m1", "hi!", false, false).await.unwrap(), EditOutcome::Done("edited"));
        assert_eq!(texts(store.turns(&a).await.unwrap()), ["hi!", "hello"]);
        let EditOutcome::AnswerAs(id) = apply_edit(&store, &a, "ann", "m1", "hey", false, true).await.unwrap() else { panic!() };
        assert!(id.starts_with("m1#"));
        assert!(store.turns(&a).await.unwrap().is_empty(), "the turn and its reply make way");
        store.append(&a, &[Turn::user("ann", "hey", Some(id.clone())), Turn::bot("yo", "ann")], Some(&id)).await.unwrap();
        // The same edit again: already answered, nothing removed.
        assert_eq!(apply_edit(&store, &a, "ann", "m1", "hey", false, true).await.unwrap(), EditOutcome::Done("duplicate"));
        assert_eq!(texts(store.turns(&a).await.unwrap()), ["hey", "yo"]);
        // A flagged edit takes the exchange out.
        assert_eq!(apply_edit(&store, &a, "ann", "m1", "bad", true, false).await.unwrap(), EditOutcome::Done("edit_flagged"));
        assert!(store.turns(&a).await.unwrap().is_empty());
        assert_eq!(apply_edit(&store, &a, "ann", "m1", "x", false, false).await.unwrap(), EditOutcome::Done("edit_ignored"));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_channels_expire() {
        let store = MemoryStore::new(Limits::new(10, Some(Duration::from_secs(60))));
        let a = key("a");
        store.append(&a, &[Turn::user("ann", "hi", None)], None).await.unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(store.turns(&a).await.unwrap().len(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(store.turns(&a).await.unwrap().is_empty());
    }

    /// Reads never create a channel, and expired channels are swept by
    /// later writes elsewhere without being read again.
    #[tokio::test(start_paused = true)]
    async fn reads_create_nothing_and_expired_channels_are_swept() {
        let store = MemoryStore::new(Limits::new(10, Some(Duration::from_secs(60))));
        for i in 0..100 {
            assert!(store.turns(&key(&format!("r{i}"))).await.unwrap().is_empty());
            assert!(!store.seen(&key(&format!("r{i}")), "m").await.unwrap());
            store.clear(&key(&format!("r{i}"))).await.unwrap();
        }
        assert_eq!(store.channel_count(), 0);
        for i in 0..100 {
            store.append(&key(&format!("w{i}")), &[Turn::user("ann", "hi", None)], None).await.unwrap();
        }
        assert_eq!(store.channel_count(), 100);
        tokio::time::advance(Duration::from_secs(61)).await;
        store.append(&key("fresh"), &[Turn::user("ann", "hi", None)], None).await.unwrap();
        assert_eq!(store.channel_count(), 1, "expired channels were kept");
        assert_eq!(store.turns(&key("fresh")).await.unwrap().len(), 1);
    }
}
