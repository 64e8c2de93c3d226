//! Choosing the next token from logits, kept apart from the model.
//!
//! The processors follow Hugging Face `generate` semantics, so that a greedy
//! reply with a repetition penalty or an n-gram ban is the same token for
//! token: repetition penalty, then the no-repeat n-gram ban, then the
//! minimum-length end-of-text ban; for sampling then temperature, top-k and
//! top-p, and a draw from a seeded generator (the same seed gives the same
//! reply).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

/// How a reply is drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 turns this off.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 turns this off.
    pub top_p: f32,
    /// CTRL-style penalty on tokens already in the prompt or reply; 1 turns it off.
    pub repetition_penalty: f32,
    /// Never repeat an n-gram of this size; 0 turns this off.
    pub no_repeat_ngram: usize,
    /// End-of-text is banned until this many tokens are generated.
    pub min_new_tokens: usize,
    pub max_new_tokens: usize,
    /// `None` draws a fresh seed.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// Settings that make DialoGPT pleasant to talk to: some randomness,
    /// a mild repetition penalty (strong ones shrink replies) and a
    /// trigram ban against loops.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 50,
            top_p: 0.95,
            repetition_penalty: 1.1,
            no_repeat_ngram: 3,
            min_new_tokens: 0,
            max_new_tokens: 64,
            seed: None,
        }
    }
}

/// Rejected sampling settings.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("sampling: {0}")]
pub struct SamplingError(pub String);

impl SamplingParams {
    /// Greedy decoding with no processors.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            no_repeat_ngram: 0,
            min_new_tokens: 0,
            max_new_tokens,
            seed: None,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn validate(&self) -> Result<(), SamplingError> {
        let bad = |m: String| Err(SamplingError(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!("temperature must be 0 (greedy) or positive, not {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], not {}", self.top_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!("repetition_penalty must be positive, not {}", self.repetition_penalty));
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens must be at least 1".into());
        }
        if self.min_new_tokens > self.max_new_tokens {
            return bad(format!(
                "min_new_tokens ({}) is more than max_new_tokens ({})",
                self.min_new_tokens, self.max_new_tokens
            ));
        }
        Ok(())
    }
}

/// xoshiro256** seeded through splitmix64: small, fast and the same on
/// every platform, which is what "the same seed gives the same reply" needs.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self { s: [next(), next(), next(), next()] }
    }

    /// A seed from the process's hash randomness and the clock.
    pub fn fresh_seed() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
        h.finish()
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Draws tokens for one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    eos_id: u32,
}

impl Sampler {
    pub fn new(params: SamplingParams, eos_id: u32) -> Self {
        let seed = params.seed.unwrap_or_else(Rng::fresh_seed);
        Self { rng: Rng::new(seed), params, eos_id }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `history` is every id so far (prompt and reply),
    /// `n_generated` how many of them are the reply. `logits` is modified.
    pub fn next_token(&mut self, logits: &mut [f32], history: &[u32], n_generated: usize) -> u32 {
        let p = &self.params;
        apply_repetition_penalty(logits, history, p.repetition_penalty);
        ban_repeated_ngrams(logits, history, p.no_repeat_ngram);
        if n_generated < p.min_new_tokens {
            if let Some(l) = logits.get_mut(self.eos_id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        if p.is_greedy() {
            return argmax(logits) as u32;
        }
        sample(logits, p.temperature, p.top_k, p.top_p, &mut self.rng)
    }
}

/// The index of the first largest value (NaN never wins; 0 when the first
/// value is NaN or there are none), as `model::gpt2::argmax` finds it, but
/// over 16 lanes the compiler can vectorise: the maximum first, then the
/// first place it occurs.
fn argmax(values: &[f32]) -> usize {
    const LANES: usize = 16;
    if values.first().is_none_or(|v| v.is_nan()) {
        return 0;
    }
    let (chunks, rest) = values.as_chunks::<LANES>();
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = lanes.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let chunk = chunks.iter().position(|c| c.iter().fold(false, |seen, &v| seen | (v == max))).unwrap_or(chunks.len());
    values[chunk * LANES..].iter().position(|&v| v == max).map_or(0, |i| chunk * LANES + i)
}

/// Divides positive logits (multiplies negative ones) of seen tokens.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let seen: HashSet<u32> = history.iter().copied().collect();
    for id in seen {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// Bans every token that would complete an n-gram already in `history`.
pub fn ban_repeated_ngrams(logits: &mut [f32], history: &[u32], n: usize) {
    if n == 0 || history.len() + 1 < n {
        return;
    }
    if n == 1 {
        for &id in history {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        return;
    }
    let prefix = &history[history.len() - (n - 1)..];
    for window in history.windows(n) {
        if &window[..n - 1] == prefix {
            if let Some(l) = logits.get_mut(window[n - 1] as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// Temperature, top-k, top-p, then a draw.
fn sample(logits: &[f32], temperature: f32, top_k: usize, top_p: f32, rng: &mut Rng) -> u32 {
    let mut cands = candidates(logits, temperature, top_k);
    if cands.is_empty() {
        // Everything was banned; fall back to the least bad token.
        return argmax(logits) as u32;
    }
    cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let max = cands[0].1;
    let mut probs: Vec<f64> = cands.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if top_p < 1.0 {
        // Keep a token while the mass of strictly more likely tokens is < p.
        let mut above = 0.0;
        let mut keep = 0;
        for &p in &probs {
            if above >= top_p as f64 {
                break;
            }
            above += p;
            keep += 1;
        }
        let keep = keep.max(1);
        cands.truncate(keep);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut u = rng.next_f64();
    for (c, p) in cands.iter().zip(&probs) {
        if u < *p {
            return c.0;
        }
        u -= p;
    }
    cands[cands.len() - 1].0
}

/// `(id, logit / temperature)` for every finite logit, in id order; with
/// `top_k > 0`, only those at or above the k-th largest (ties kept, as
/// transformers does). Dividing by a positive temperature never reorders
/// values, so the k-th largest scaled value is the k-th largest logit
/// scaled, and only the kept ones become candidates.
fn candidates(logits: &[f32], temperature: f32, top_k: usize) -> Vec<(u32, f32)> {
    let floor = kth_largest_finite(logits, top_k).map(|kth| kth / temperature);
    logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i as u32, l / temperature))
        .filter(|c| floor.is_none_or(|floor| c.1 >= floor))
        .collect()
}

/// The k-th largest finite value, when more than k values are finite (so
/// that top-k drops some); `None` otherwise.
fn kth_largest_finite(logits: &[f32], k: usize) -> Option<f32> {
    let mut values: Vec<f32> = logits.iter().copied().filter(|l| l.is_finite()).collect();
    if k == 0 || k >= values.len() {
        return None;
    }
    Some(*values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_follows_transformers() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn ngram_ban_blocks_only_completions_of_seen_ngrams() {
        let mut l = vec![0.0; 10];
        // Seen trigrams: (1,2,3), (2,3,1), (3,1,2); last two tokens (1,2) -> ban 3.
        ban_repeated_ngrams(&mut l, &[1, 2, 3, 1, 2], 3);
        assert_eq!(l.iter().filter(|v| v.is_infinite()).count(), 1);
        assert!(l[3].is_infinite());
    }

    #[test]
    fn greedy_picks_the_first_maximum_and_respects_min_length() {
        let mut s = Sampler::new(SamplingParams::greedy(5), 2);
        assert_eq!(s.next_token(&mut [0.0, 3.0, 3.0], &[], 0), 1);
        let mut s = Sampler::new(SamplingParams { min_new_tokens: 1, ..SamplingParams::greedy(5) }, 2);
        assert_eq!(s.next_token(&mut [0.0, 1.0, 3.0], &[], 0), 1);
        assert_eq!(s.next_token(&mut [0.0, 1.0, 3.0], &[], 1), 2);
    }

    #[test]
    fn same_seed_same_draws_and_top_k_limits_the_choice() {
        let params = SamplingParams { temperature: 1.0, top_k: 3, top_p: 1.0, seed: Some(42), ..SamplingParams::greedy(8) };
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone(), 99);
            (0..200).map(|_| s.next_token(&mut logits.clone(), &[], 0)).collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        // Top 3 by value are the 6s, but ties are kept: every id ≡ 6 (mod 7).
        assert!(a.iter().all(|&id| id % 7 == 6), "{a:?}");
        let other = draw(&SamplingParams { seed: Some(43), ..params });
        assert_ne!(a, other);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities ~ [0.665, 0.245, 0.090]: p = 0.7 keeps two tokens.
        let logits = [2.0f32, 1.0, 0.0];
        let mut rng = Rng::new(1);
        let mut seen = HashSet::new();
        for _ in 0..500 {
            seen.insert(sample(&logits, 1.0, 0, 0.7, &mut rng));
        }
        assert_eq!(seen, HashSet::from([0, 1]));
        for _ in 0..200 {
            assert_eq!(sample(&logits, 1.0, 0, 0.5, &mut rng), 0);
        }
    }

    /// Rows with ties, banned (−∞) values, a NaN, signed zeros and lengths
    /// on and off the 16-lane chunks.
    fn awkward_rows() -> Vec<Vec<f32>> {
        let mut rng = Rng::new(9);
        let mut rows = vec![vec![], vec![f32::NAN, 1.0], vec![f32::NEG_INFINITY; 40], vec![-0.0, 0.0, -0.0]];
        for trial in 0..400 {
            let len = 1 + (rng.next_u64() % 300) as usize;
            let mut row: Vec<f32> = (0..len)
                .map(|_| if trial % 3 == 0 { (rng.next_u64() % 6) as f32 - 3.0 } else { (rng.next_f64() as f32 - 0.5) * 30.0 })
                .collect();
            if trial % 4 == 0 {
                for _ in 0..len / 3 {
                    row[(rng.next_u64() % len as u64) as usize] = f32::NEG_INFINITY;
                }
            }
            if trial % 7 == 0 {
                row[(rng.next_u64() % len as u64) as usize] = f32::NAN;
            }
            if trial % 5 == 0 {
                row.iter_mut().filter(|v| **v == 0.0).for_each(|v| *v = -0.0);
            }
            rows.push(row);
        }
        rows
    }

    #[test]
    fn argmax_finds_the_first_maximum_as_the_model_does() {
        for row in awkward_rows() {
            assert_eq!(argmax(&row), crate::model::gpt2::argmax(&row), "{row:?}");
        }
    }

    /// How `sample` chose its candidates before: every finite logit scaled,
    /// then those below the k-th largest scaled value dropped.
    fn candidates_reference(logits: &[f32], temperature: f32, top_k: usize) -> Vec<(u32, f32)> {
        let mut cands: Vec<(u32, f32)> =
            logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l / temperature)).collect();
        if top_k > 0 && top_k < cands.len() {
            let mut values: Vec<f32> = cands.iter().map(|c| c.1).collect();
            let kth = *values.select_nth_unstable_by(top_k - 1, |a, b| b.total_cmp(a)).1;
            cands.retain(|c| c.1 >= kth);
        }
        cands
    }

    #[test]
    fn top_k_keeps_the_candidates_it_kept_before() {
        let bits = |c: Vec<(u32, f32)>| c.into_iter().map(|(id, v)| (id, v.to_bits())).collect::<Vec<_>>();
        for row in awkward_rows() {
            for (temperature, top_k) in [(0.8, 50), (1.0, 0), (1.0, 1), (1.3, 7), (1e-30, 7), (0.7, 3), (2.0, 200)] {
                assert_eq!(
                    bits(candidates(&row, temperature, top_k)),
                    bits(candidates_reference(&row, temperature, top_k)),
                    "temperature {temperature}, top_k {top_k}: {row:?}"
                );
            }
        }
    }

    #[test]
    fn validation_names_the_setting() {
        assert!(SamplingParams::default().validate().is_ok());
        let e = SamplingParams { top_p: 0.0, ..Default::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("top_p"));
        let e = SamplingParams { min_new_tokens: 9, ..SamplingParams::greedy(4) }.validate().unwrap_err();
        assert!(e.to_string().contains("min_new_tokens"));
    }
}
