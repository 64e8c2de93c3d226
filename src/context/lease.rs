//! Per-channel order across daemons: a short lease per channel in the store.
//!
//! One daemon's queues already run a channel's messages one at a time.
//! When several daemons share one Redis and one channel's messages can
//! reach more than one of them (HTTP behind a load balancer, two webhook
//! receivers), each message is handled under the channel's lease
//! ([`ContextStore::take_lease`]: `SET P:lease:C holder PX ttl` when free
//! or already this holder's, in one script), renewed every third of its
//! TTL while the message runs and deleted (if still this holder's) when it
//! ends. So a channel's messages run one at a time across daemons, each
//! seeing the turns stored by those before it; two messages reaching
//! different daemons at the same moment go in the order they take the
//! lease. A holder that dies leaves its lease to expire after the TTL.
//!
//! The lease never stops a message: with the store unreachable, or after
//! waiting [`MAX_WAIT`], the message runs without it (one daemon's order
//! still holds), with a warning.
//!
//! The same lease, on a key of its own, lets one process at a time run an
//! adapter that a platform allows only once per bot ([`Sole`]: Telegram's
//! one `getUpdates` poller per token).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dialogd_adapters::{Adapter, AdapterError, BoxFuture, ChannelKey, Core, Platform, Shutdown};
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use super::ContextStore;

/// How long a lease lives unless renewed (a dead holder's is free after this).
pub const TTL: Duration = Duration::from_secs(10);

/// The longest a message waits for its channel's lease.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// The longest pause between two tries to take a busy lease.
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// Runs `work` holding `channel`'s lease as `holder` (unique per daemon):
/// waits for it (up to `max_wait`), renews it every `ttl / 3` while `work`
/// runs, and gives it back after. Returns `work`'s output.
pub async fn exclusive<T>(
    store: &dyn ContextStore,
    channel: &ChannelKey,
    holder: &str,
    ttl: Duration,
    max_wait: Duration,
    work: impl Future<Output = T>,
) -> T {
    if !take(store, channel, holder, ttl, max_wait).await {
        return work.await;
    }
    let renew = async {
        loop {
            tokio::time::sleep(ttl / 3).await;
            match store.take_lease(channel, holder, ttl).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!(%channel, "channel lease: another daemon took it while a message ran"),
                Err(e) => tracing::debug!(%channel, error = %e, "channel lease: renewal failed"),
            }
        }
    };
    let output = tokio::select! {
        output = work => output,
        () = renew => unreachable!("the renewal loop never ends"),
    };
    if let Err(e) = store.drop_lease(channel, holder).await {
        tracing::debug!(%channel, error = %e, "channel lease: not given back; it expires");
    }
    output
}

/// Takes the lease, waiting while another holder has it. `false`: running
/// without it (store unreachable, or waited `max_wait`).
async fn take(store: &dyn ContextStore, channel: &ChannelKey, holder: &str, ttl: Duration, max_wait: Duration) -> bool {
    let started = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        match store.take_lease(channel, holder, ttl).await {
            Ok(true) => return true,
            Ok(false) if started.elapsed() < max_wait => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
            Ok(false) => {
                tracing::warn!(%channel, waited_ms = max_wait.as_millis() as u64, "channel lease: still held by another daemon; running without it");
                return false;
            }
            Err(e) => {
                tracing::debug!(%channel, error = %e, "channel lease: store unreachable; running without it");
                return false;
            }
        }
    }
}

/// An adapter that one process at a time may run per bot (Telegram allows
/// one `getUpdates` poller per token): it runs only while this process
/// holds the bot's lease in the store, renewed every third of [`TTL`]
/// while it runs and given back when it stops. Another process holding
/// it is an [`AdapterError`] at start (the daemon stops non-zero); losing
/// it to another process while running ends the adapter the same way. A
/// store that does not answer when renewing keeps the adapter running
/// (with a warning): the lease is still this process's until it expires.
/// The memory store grants every lease (one process sees no other).
pub struct Sole {
    adapter: Box<dyn Adapter>,
    store: Arc<dyn ContextStore>,
    /// The lease's key in the store: `P:lease:{platform}:poller-{hash}`.
    lease: ChannelKey,
    holder: String,
}

impl Sole {
    /// `adapter` under the lease of the bot whose token is `token`: the
    /// key holds the first 16 bytes of the token's SHA-256 (in hex), never
    /// the token. `holder`: this process's unique name.
    pub fn new(adapter: Box<dyn Adapter>, platform: Platform, token: &str, store: Arc<dyn ContextStore>, holder: String) -> Self {
        Self { adapter, store, lease: poller_lease(platform, token), holder }
    }

    /// The lease's key under the store's prefix (for logs and errors).
    pub fn lease(&self) -> &ChannelKey {
        &self.lease
    }
}

/// The lease key of `platform`'s bot with `token`: a hash, never the token.
fn poller_lease(platform: Platform, token: &str) -> ChannelKey {
    let digest = Sha256::new().chain_update(b"dialogd poller lease\0").chain_update(token.as_bytes()).finalize();
    let hash: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    ChannelKey::new(platform, format!("poller-{hash}"))
}

impl Adapter for Sole {
    fn name(&self) -> &'static str {
        self.adapter.name()
    }

    fn run(self: Box<Self>, core: Arc<dyn Core>, shutdown: Shutdown) -> BoxFuture<'static, Result<(), AdapterError>> {
        Box::pin(async move {
            let Self { adapter, store, lease, holder } = *self;
            let name = adapter.name();
            let refused = |message: String| AdapterError::Platform { adapter: name, message };
            match store.take_lease(&lease, &holder, TTL).await {
                Ok(true) => tracing::info!(adapter = name, lease = %lease, "holding the bot's poller lease: this process runs the adapter"),
                Ok(false) => {
                    return Err(refused(format!(
                        "another dialogd instance already runs the {name} adapter for this bot token (the store's lease \
                         `lease:{lease}` is held; {name} allows one poller per token): disable adapters.{name} here, \
                         or stop the other instance (its lease expires {} s after it stops)",
                        TTL.as_secs()
                    )))
                }
                Err(e) => return Err(refused(format!("cannot take the bot's poller lease `lease:{lease}` in the store: {e}"))),
            }
            let renew = async {
                loop {
                    tokio::time::sleep(TTL / 3).await;
                    match store.take_lease(&lease, &holder, TTL).await {
                        Ok(true) => {}
                        Ok(false) => return format!("another dialogd instance took the bot's poller lease `lease:{lease}` while this one polled"),
                        Err(e) => tracing::warn!(adapter = name, error = %e, "poller lease: renewal failed; polling on"),
                    }
                }
            };
            let ran = tokio::select! {
                ran = adapter.run(core, shutdown) => ran,
                lost = renew => Err(refused(lost)),
            };
            match store.drop_lease(&lease, &holder).await {
                Ok(()) => tracing::info!(adapter = name, "poller lease given back"),
                Err(e) => tracing::warn!(adapter = name, error = %e, "poller lease not given back; it expires"),
            }
            ran
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poller_leases_hash_the_token() {
        let lease = poller_lease(Platform::Telegram, "123456:secret-token");
        let shown = lease.to_string();
        assert!(shown.starts_with("telegram:poller-") && shown.len() == "telegram:poller-".len() + 32, "{shown}");
        assert!(!shown.contains("secret") && !shown.contains("123456"), "{shown}");
        assert_eq!(lease, poller_lease(Platform::Telegram, "123456:secret-token"), "one key per token");
        assert_ne!(lease, poller_lease(Platform::Telegram, "123456:other-token"));
    }
}
