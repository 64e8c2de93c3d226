//! Sends each channel's answers in order, one at a time.
//!
//! The core answers one channel's messages in the order they were handed
//! to it; an adapter must also *send* them in that order, even when one
//! reply takes several platform calls (typing, split pieces, retries). An
//! [`Outbox`] runs the sending futures of one channel one after another on
//! a worker task that exists while the channel has work (as the pipeline
//! does), and different channels concurrently.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::BoxFuture;

/// Per-channel ordered senders. Cheap to clone.
#[derive(Clone, Default)]
pub struct Outbox {
    /// Channels with queued or running work. A std mutex: held only to
    /// look up, insert or remove, never across an await.
    channels: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<BoxFuture<'static, ()>>>>>,
    /// The workers, so shutdown can wait for the last sends.
    workers: Arc<Mutex<JoinSet<()>>>,
}

impl Outbox {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `send` behind the channel's earlier work.
    pub fn push(&self, channel: &str, send: BoxFuture<'static, ()>) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let sender = channels.entry(channel.to_string()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            // Reap finished workers so the set does not grow.
            while workers.try_join_next().is_some() {}
            workers.spawn(worker(self.channels.clone(), channel.to_string(), rx));
            tx
        });
        if let Err(mpsc::error::SendError(send)) = sender.send(send) {
            // Unreachable while the entry exists (the worker removes it
            // before it stops); run it alone rather than lose it.
            tokio::spawn(send);
        }
    }

    /// Waits until every queued send has run.
    pub async fn flush(&self) {
        loop {
            let next = {
                let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
                if workers.is_empty() {
                    return;
                }
                // Take the set out so we do not hold the lock across await.
                std::mem::take(&mut *workers)
            };
            let mut next = next;
            while next.join_next().await.is_some() {}
        }
    }
}

async fn worker(
    channels: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<BoxFuture<'static, ()>>>>>,
    key: String,
    mut queue: mpsc::UnboundedReceiver<BoxFuture<'static, ()>>,
) {
    loop {
        let send = match queue.try_recv() {
            Ok(send) => send,
            Err(_) => {
                let mut map = channels.lock().unwrap_or_else(|e| e.into_inner());
                match queue.try_recv() {
                    Ok(send) => send,
                    Err(_) => {
                        map.remove(&key);
                        return;
                    }
                }
            }
        };
        // A panic in one send is that message's failure only.
        if let Err(e) = tokio::spawn(send).await {
            tracing::error!(channel = %key, error = %e, "sending an answer panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_channel_runs_in_order_and_flush_waits() {
        let outbox = Outbox::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        for i in 0..5u64 {
            let log = log.clone();
            outbox.push(
                "c",
                Box::pin(async move {
                    // Later items are quicker: order must come from the queue.
                    tokio::time::sleep(Duration::from_millis(10 * (5 - i))).await;
                    log.lock().unwrap().push(i);
                }),
            );
        }
        outbox.push("d", Box::pin(async { panic!("one failing send") }));
        outbox.flush().await;
        assert_eq!(*log.lock().unwrap(), [0, 1, 2, 3, 4]);
    }
}
