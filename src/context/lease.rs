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

use std::future::Future;
use std::time::Duration;

use dialogd_adapters::ChannelKey;
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
