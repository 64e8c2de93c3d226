//! Choosing the reply among the candidates that survived screening and the
//! safety filter.
//!
//! A candidate that ended with `<|endoftext|>` (finished) beats one cut off
//! by `max_new_tokens` or the context size, whatever their scores: a
//! cut-off candidate is often a repetition loop (`no no no …`) whose tokens,
//! each predicted with near certainty, give it a high mean log-probability
//! and often a high DialogRPT score too. gpt2bot and the DialoGPT authors
//! treat unfinished candidates as worse; so do we. Among finished
//! candidates (or, when none finished, among cut-off ones) the highest
//! score wins: the ranker's when one ran, else the generator's mean
//! log-probability. Ties go to the earlier candidate.

/// One surviving candidate, as selection sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Contender {
    /// Ended with `<|endoftext|>`.
    pub finished: bool,
    /// Higher is better: the ranker's score, or the mean log-probability.
    pub score: f32,
}

/// The index (into `contenders`) of the reply to send, and whether it was
/// cut off (every contender was). `None` for no contenders.
pub fn choose(contenders: &[Contender]) -> Option<(usize, bool)> {
    // NaN scores rank below every number.
    let key = |c: &Contender| (c.finished, if c.score.is_nan() { f32::NEG_INFINITY } else { c.score });
    let mut best: Option<usize> = None;
    for (idx, contender) in contenders.iter().enumerate() {
        if best.is_none_or(|b| key(contender) > key(&contenders[b])) {
            best = Some(idx);
        }
    }
    best.map(|b| (b, !contenders[b].finished))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(finished: bool, score: f32) -> Contender {
        Contender { finished, score }
    }

    #[test]
    fn a_finished_candidate_beats_a_cut_off_one_whatever_the_scores() {
        // The cut-off repeat scores higher (mean log-probability −0.77
        // against −1.20); the finished reply still wins.
        assert_eq!(choose(&[c(false, -0.77), c(true, -1.2), c(false, -0.5)]), Some((1, false)));
        // Ranker scores in (0, 1) the same way.
        assert_eq!(choose(&[c(false, 0.9), c(true, 0.1), c(true, 0.3)]), Some((2, false)));
        // Only cut-off candidates: the best of them, marked as cut off.
        assert_eq!(choose(&[c(false, -2.0), c(false, -1.0)]), Some((1, true)));
        // Ties go to the earlier candidate; NaN never wins over a number.
        assert_eq!(choose(&[c(true, 0.5), c(true, 0.5)]), Some((0, false)));
        assert_eq!(choose(&[c(true, f32::NAN), c(true, -3.0)]), Some((1, false)));
        assert_eq!(choose(&[]), None);
    }
}
