//! Per-channel ordered queues: one channel's messages run one at a time, in
//! the order they were pushed; channels run concurrently.
//!
//! A channel has a bounded queue and a worker task only while it has work
//! (the worker removes the channel when its queue is empty, under the map
//! lock where pushes happen, so nothing is left behind). Each job runs in
//! its own task, so a panic is that message's failure only. An in-flight
//! count, decremented when a job's answer is sent (or the job is dropped),
//! lets shutdown wait for the drain; when the drain's bound passes,
//! [`Queues::abandon`] answers every job still waiting or running with
//! [`CoreError::ShuttingDown`], so adapters can say so (HTTP 503).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dialogd_adapters::{Answer, BoxFuture, ChannelKey, CoreError};
use tokio::sync::{mpsc, oneshot, Notify};

/// Messages waiting per channel at most; more are refused as busy.
pub const CHANNEL_QUEUE: usize = 32;

/// A message's work, started when its turn comes.
pub type Job = Box<dyn FnOnce() -> BoxFuture<'static, Result<Answer, CoreError>> + Send>;

/// Where a job's answer goes.
pub type AnswerReceiver = oneshot::Receiver<Result<Answer, CoreError>>;

/// One accepted job on its way through a channel's queue.
struct Work {
    job: Job,
    answer: oneshot::Sender<Result<Answer, CoreError>>,
    /// Counts the job as in flight until it is answered or dropped.
    _in_flight: InFlight,
}

/// Jobs accepted and not yet answered, and a wake-up when none are left.
#[derive(Default)]
struct Flight {
    count: AtomicUsize,
    idle: Notify,
    /// Set (and `abandon` notified) once the drain is over.
    abandoned: std::sync::atomic::AtomicBool,
    abandon: Notify,
}

/// Decrements the in-flight count when the job is done.
struct InFlight(Arc<Flight>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

type Channels = Arc<Mutex<HashMap<ChannelKey, mpsc::Sender<Work>>>>;

/// Every channel's queue. Cheap to clone.
#[derive(Clone, Default)]
pub struct Queues {
    /// Channels with queued or running work. A std mutex: held only to
    /// look up, insert or remove, never across an await.
    channels: Channels,
    flight: Arc<Flight>,
}

impl Queues {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `job` on `channel` (in call order), starting the channel's
    /// worker when it has none. Errors: [`CoreError::Busy`] when the
    /// channel already has [`CHANNEL_QUEUE`] jobs waiting.
    pub fn push(&self, channel: ChannelKey, job: Job) -> Result<AnswerReceiver, CoreError> {
        let (answer, receiver) = oneshot::channel();
        self.flight.count.fetch_add(1, Ordering::AcqRel);
        let work = Work { job, answer, _in_flight: InFlight(self.flight.clone()) };
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let sender = channels.entry(channel.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(CHANNEL_QUEUE);
            tokio::spawn(worker(self.channels.clone(), channel, rx));
            tx
        });
        sender.try_send(work).map_err(|_| CoreError::Busy)?;
        Ok(receiver)
    }

    /// Jobs accepted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.flight.count.load(Ordering::Acquire)
    }

    /// The answer a [`Self::push`] receiver brings, or
    /// [`CoreError::ShuttingDown`] once [`Self::abandon`] is called first.
    pub fn answer(&self, receiver: AnswerReceiver) -> BoxFuture<'static, Result<Answer, CoreError>> {
        let flight = self.flight.clone();
        Box::pin(async move {
            let abandoned = async {
                loop {
                    let notified = flight.abandon.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if flight.abandoned.load(Ordering::Acquire) {
                        return;
                    }
                    notified.await;
                }
            };
            tokio::select! {
                biased;
                answer = receiver => answer.unwrap_or(Err(CoreError::Internal("message was dropped".into()))),
                () = abandoned => Err(CoreError::ShuttingDown),
            }
        })
    }

    /// Gives up on every job accepted and not yet answered: their answers
    /// become [`CoreError::ShuttingDown`] (the jobs themselves are left to
    /// end with the process).
    pub fn abandon(&self) {
        self.flight.abandoned.store(true, Ordering::Release);
        self.flight.abandon.notify_waiters();
    }

    /// Resolves when no job is in flight.
    pub async fn drained(&self) {
        loop {
            let notified = self.flight.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Runs one channel's jobs in order; ends when its queue is empty.
async fn worker(channels: Channels, key: ChannelKey, mut queue: mpsc::Receiver<Work>) {
    loop {
        let work = match queue.try_recv() {
            Ok(work) => work,
            Err(_) => {
                // Remove the channel under the map lock, where senders
                // send, so nothing can arrive after the last look.
                let mut channels = channels.lock().unwrap_or_else(|e| e.into_inner());
                match queue.try_recv() {
                    Ok(work) => work,
                    Err(_) => {
                        channels.remove(&key);
                        return;
                    }
                }
            }
        };
        let Work { job, answer, _in_flight } = work;
        // A panic inside one message is that message's failure only.
        let result = tokio::spawn(job()).await.unwrap_or_else(|e| {
            tracing::error!(channel = %key, error = %e, "message handling panicked");
            Err(CoreError::Internal("message handling failed".into()))
        });
        let _ = answer.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dialogd_adapters::Platform;

    fn job(log: Arc<Mutex<Vec<u32>>>, n: u32, panic: bool) -> Job {
        Box::new(move || {
            Box::pin(async move {
                tokio::task::yield_now().await;
                assert!(!panic, "a panicking message");
                log.lock().unwrap().push(n);
                Ok(Answer::Silent { reason: n.to_string() })
            })
        })
    }

    #[tokio::test]
    async fn one_channel_runs_in_order_and_a_panic_fails_one_job() {
        let queues = Queues::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (a, b) = (ChannelKey::new(Platform::Http, "a"), ChannelKey::new(Platform::Http, "b"));
        let mut answers = Vec::new();
        for n in 0..10 {
            let channel = if n % 2 == 0 { a.clone() } else { b.clone() };
            answers.push(queues.push(channel, job(log.clone(), n, n == 4)).unwrap());
        }
        assert_eq!(queues.in_flight(), 10);
        let mut results = Vec::new();
        for answer in answers {
            results.push(answer.await.unwrap());
        }
        assert!(matches!(results[4], Err(CoreError::Internal(_))), "{:?}", results[4]);
        queues.drained().await;
        assert_eq!(queues.in_flight(), 0);
        let log = log.lock().unwrap().clone();
        let of = |parity: u32| log.iter().copied().filter(|n| n % 2 == parity).collect::<Vec<_>>();
        assert_eq!(of(0), [0, 2, 6, 8], "channel a in push order, the panicking job missing");
        assert_eq!(of(1), [1, 3, 5, 7, 9]);
        // Idle channels are removed.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(queues.channels.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_full_channel_is_busy_and_others_are_not() {
        let queues = Queues::new();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let channel = ChannelKey::new(Platform::Http, "full");
        let blocked = |gate: Arc<tokio::sync::Semaphore>| -> Job {
            Box::new(move || {
                Box::pin(async move {
                    let _ = gate.acquire().await;
                    Ok(Answer::Silent { reason: "done".into() })
                })
            })
        };
        let mut accepted = Vec::new();
        // The worker takes the first job off the queue, so one more fits.
        for _ in 0..=CHANNEL_QUEUE {
            accepted.push(queues.push(channel.clone(), blocked(gate.clone())).unwrap());
            tokio::task::yield_now().await;
        }
        assert!(matches!(queues.push(channel.clone(), blocked(gate.clone())), Err(CoreError::Busy)));
        let other = queues.push(ChannelKey::new(Platform::Http, "other"), blocked(gate.clone())).unwrap();
        gate.add_permits(1000);
        for answer in accepted {
            assert!(answer.await.unwrap().is_ok());
        }
        assert!(other.await.unwrap().is_ok());
        queues.drained().await;
    }

    #[tokio::test]
    async fn abandoned_jobs_answer_shutting_down_and_finished_ones_keep_their_answer() {
        let queues = Queues::new();
        let channel = ChannelKey::new(Platform::Http, "slow");
        let done = queues.push(channel.clone(), Box::new(|| Box::pin(async { Ok(Answer::Silent { reason: "done".into() }) }))).unwrap();
        let done = queues.answer(done);
        let stuck: Job = Box::new(|| Box::pin(std::future::pending()));
        let running = queues.answer(queues.push(channel.clone(), stuck).unwrap());
        let waiting = queues.answer(queues.push(channel, Box::new(|| Box::pin(async { Ok(Answer::Silent { reason: "late".into() }) }))).unwrap());
        assert_eq!(done.await, Ok(Answer::Silent { reason: "done".into() }));
        queues.abandon();
        assert_eq!(running.await, Err(CoreError::ShuttingDown));
        assert_eq!(waiting.await, Err(CoreError::ShuttingDown));
    }
}
