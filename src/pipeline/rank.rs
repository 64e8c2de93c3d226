//! The ranker behind the pipeline: the DialogRPT ensemble and the MMI
//! reverse model on their own OS thread (model compute never runs on tokio
//! workers), fed by a bounded queue.

use std::sync::mpsc::{self, TrySendError};

use dialogd_adapters::BoxFuture;
use tokio::sync::oneshot;

use crate::ranking::{DialogRpt, Ensemble, Member, MmiScorer, Weights};
use crate::settings::{ModelSettings, RankingSettings};

/// The scores behind one candidate's rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// What the candidates are ordered by.
    pub score: f64,
    /// The DialogRPT ensemble's final score (prior × cond).
    pub dialogrpt: Option<f32>,
    /// −mean NLL of the context given the candidate.
    pub mmi: Option<f32>,
}

struct Job {
    turns: Vec<Vec<u32>>,
    candidates: Vec<Vec<u32>>,
    mean_logprobs: Vec<f32>,
    answer: oneshot::Sender<Result<Vec<Scored>, String>>,
}

/// Why the rankers named in `[ranking]` could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RankerError {
    #[error(transparent)]
    Spec(#[from] crate::ranking::SpecError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Ranking(#[from] crate::ranking::RankingError),
    #[error("cannot start the ranker thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// A loaded ranker on its thread.
pub struct Ranker {
    queue: mpsc::SyncSender<Job>,
}

impl Ranker {
    /// Loads the rankers named in `[ranking]`; `None` when none are. They
    /// run on `ranking.device`, else on the model's device (`model`: its
    /// `[model]` settings), sharing the process's one device, in the
    /// model's dtype.
    pub fn load(settings: &RankingSettings, model: &ModelSettings) -> Result<Option<Self>, RankerError> {
        if settings.rankers.is_empty() && settings.mmi.is_empty() {
            return Ok(None);
        }
        let device = crate::serving::device(if settings.device.is_empty() { &model.device } else { &settings.device })?;
        let dtype = crate::model::parse_dtype(&model.dtype, &device)?;
        let mut members = Vec::new();
        for spec in &settings.rankers {
            let spec = crate::ranking::parse_ranker(spec)?;
            let dir = crate::model::hub::resolve_model(&spec.path)?;
            let ranker = DialogRpt::load(&dir, dtype, &device)?;
            members.push(Member { name: spec.name, group: spec.group, weight: spec.weight, ranker });
        }
        let ensemble = if members.is_empty() { None } else { Some(Ensemble::new(members)?) };
        let mmi = if settings.mmi.is_empty() {
            None
        } else {
            Some(MmiScorer::load(&crate::model::hub::resolve_model(&settings.mmi)?, dtype, &device)?)
        };
        let weights = settings.weights();
        let (queue, jobs) = mpsc::sync_channel::<Job>(64);
        std::thread::Builder::new().name("dialogd-ranker".into()).spawn(move || {
            for job in jobs {
                if job.answer.is_closed() {
                    continue;
                }
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    score(ensemble.as_ref(), mmi.as_ref(), &weights, &job)
                }))
                .unwrap_or_else(|_| Err("ranker panicked".into()));
                let _ = job.answer.send(result);
            }
        })?;
        Ok(Some(Self { queue }))
    }

    /// Scores candidates (ids) after context turns (ids, oldest first).
    pub fn score(
        &self,
        turns: Vec<Vec<u32>>,
        candidates: Vec<Vec<u32>>,
        mean_logprobs: Vec<f32>,
    ) -> BoxFuture<'static, Result<Vec<Scored>, String>> {
        let (answer, receiver) = oneshot::channel();
        let sent = self.queue.try_send(Job { turns, candidates, mean_logprobs, answer });
        Box::pin(async move {
            match sent {
                Ok(()) => receiver.await.unwrap_or_else(|_| Err("ranker stopped".into())),
                Err(TrySendError::Full(_)) => Err("ranker queue is full".into()),
                Err(TrySendError::Disconnected(_)) => Err("ranker stopped".into()),
            }
        })
    }
}

fn score(ensemble: Option<&Ensemble>, mmi: Option<&MmiScorer>, weights: &Weights, job: &Job) -> Result<Vec<Scored>, String> {
    let rpt = match ensemble {
        Some(e) => Some(e.scores(&job.turns, &job.candidates).map_err(|e| e.to_string())?.final_scores),
        None => None,
    };
    let mmi_scores = match mmi {
        Some(m) => Some(m.scores(&job.turns, &job.candidates).map_err(|e| e.to_string())?),
        None => None,
    };
    Ok((0..job.candidates.len())
        .map(|i| {
            let dialogrpt = rpt.as_ref().map(|s| s[i]);
            let mmi = mmi_scores.as_ref().map(|s| s[i]);
            Scored { score: weights.mix(dialogrpt, job.mean_logprobs.get(i).copied(), mmi), dialogrpt, mmi }
        })
        .collect())
}
