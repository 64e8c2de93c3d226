//! Training data: dialogue files to weighted examples, the held-out split,
//! and padded batches.
//!
//! Two input formats, told apart by extension (`.jsonl`/`.json` versus
//! `.tsv`; anything else by whether its first line starts with `{`):
//!
//! - **JSONL**, what the log collector writes: one record per line,
//!   `{"turns": [...]}` where a turn is a string or an object
//!   `{"text": "...", "author": "<keyed hash>", "weight": 1.0}` (other
//!   fields such as `channel` and `time` are ignored). A turn without a
//!   weight is trained on (1.0) unless it is the first.
//! - **DialoGPT TSV** (`prepro.py`): `W text EOS W text ...\tW response`,
//!   every turn prefixed by its weight.
//!
//! A malformed line (bad JSON, no turns, an empty turn, a TSV line without
//! its tab or weights) is **reported and skipped**: logs are appended to by
//! a process that may die mid-line, and one torn line must not sink a job.
//! The skipped lines (file, line, reason) are returned in the
//! [`LoadReport`]; a missing or unreadable file, and a dataset left with no
//! examples, are errors.
//!
//! Opt-out: a record holding any turn by an opted-out author (the keyed
//! hash the logs carry) is dropped whole, so their lines reach no dataset,
//! not even as context. TSV has no authors and is not filtered.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Serialize;

use super::{file_error, fnv1a64, Result, SplitMix, TrainingError};
use crate::tokenizer::DialogTokenizer;

/// The longest turn accepted, in bytes (the limit `dialogd generate` puts
/// on a turn); a longer one makes its line malformed.
pub use crate::prompt::MAX_TURN_BYTES;

/// One turn of a dialogue with its loss weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub text: String,
    /// The author's keyed hash, when the source records one.
    pub author: Option<String>,
    /// Loss weight of this turn's tokens (0: context only). The first turn
    /// of an example is never trained on, whatever its weight.
    pub weight: f32,
}

/// A dialogue read from a data file, oldest turn first.
#[derive(Debug, Clone, PartialEq)]
pub struct Dialogue {
    pub turns: Vec<Turn>,
    /// `file:line`, for messages.
    pub origin: String,
}

/// Authors (keyed hashes) whose lines must never be trained on.
#[derive(Debug, Clone, Default)]
pub struct OptOut {
    authors: HashSet<String>,
}

impl OptOut {
    pub fn new(authors: impl IntoIterator<Item = String>) -> Self {
        Self { authors: authors.into_iter().map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect() }
    }

    /// Reads one author hash per line (blank lines and `#` comments skipped).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
        Ok(Self::new(text.lines().filter(|l| !l.trim_start().starts_with('#')).map(str::to_string)))
    }

    pub fn contains(&self, author: &str) -> bool {
        self.authors.contains(author)
    }

    pub fn is_empty(&self) -> bool {
        self.authors.is_empty()
    }

    /// Whether a dialogue may be used: none of its turns is by an opted-out
    /// author.
    pub fn allows(&self, dialogue: &Dialogue) -> bool {
        dialogue.turns.iter().all(|t| t.author.as_deref().is_none_or(|a| !self.contains(a)))
    }
}

/// A line that was not used, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SkippedLine {
    pub file: PathBuf,
    pub line: usize,
    pub reason: String,
}

/// What loading found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    /// Dialogues read and kept.
    pub dialogues: usize,
    /// Malformed lines, skipped.
    pub skipped: Vec<SkippedLine>,
    /// Records dropped because an opted-out author wrote one of their turns.
    pub opted_out: usize,
    /// Dialogues that gave no example (nothing to train on after the first
    /// turn, or nothing left after truncation).
    pub without_loss: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Jsonl,
    Tsv,
}

fn format_of(path: &Path, first_line: Option<&str>) -> Format {
    match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
        Some("jsonl" | "json" | "ndjson") => Format::Jsonl,
        Some("tsv") => Format::Tsv,
        _ if first_line.is_some_and(|l| l.trim_start().starts_with('{')) => Format::Jsonl,
        _ => Format::Tsv,
    }
}

/// Reads dialogues from data files, dropping opted-out authors' records and
/// skipping (and reporting) malformed lines.
pub fn load_dialogues(paths: &[PathBuf], opt_out: &OptOut) -> Result<(Vec<Dialogue>, LoadReport)> {
    if paths.is_empty() {
        return Err(TrainingError::Settings("no data files given (--data PATH)".into()));
    }
    let mut dialogues = Vec::new();
    let mut report = LoadReport::default();
    for path in paths {
        if !path.is_file() {
            return Err(file_error(path, "data file does not exist or is not a file"));
        }
        let bytes = std::fs::read(path).map_err(|e| file_error(path, e))?;
        let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
        let first = lines.iter().filter_map(|l| std::str::from_utf8(l).ok()).find(|l| !l.trim().is_empty());
        let format = format_of(path, first);
        for (idx, raw) in lines.iter().enumerate() {
            let line_no = idx + 1;
            let parsed = match std::str::from_utf8(raw) {
                Err(_) => Err("not valid UTF-8".to_string()),
                Ok(line) if line.trim().is_empty() => continue,
                Ok(line) => match format {
                    Format::Jsonl => parse_jsonl_line(line.trim_end_matches('\r')),
                    Format::Tsv => parse_tsv_line(line.trim_end_matches('\r')),
                },
            };
            match parsed {
                Ok(turns) => {
                    let dialogue = Dialogue { turns, origin: format!("{}:{line_no}", path.display()) };
                    if opt_out.allows(&dialogue) {
                        dialogues.push(dialogue);
                    } else {
                        report.opted_out += 1;
                    }
                }
                Err(reason) => {
                    tracing::warn!(file = %path.display(), line = line_no, %reason, "skipping a malformed line");
                    report.skipped.push(SkippedLine { file: path.clone(), line: line_no, reason });
                }
            }
        }
    }
    report.dialogues = dialogues.len();
    Ok((dialogues, report))
}

/// One JSONL record to turns.
pub fn parse_jsonl_line(line: &str) -> std::result::Result<Vec<Turn>, String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not a JSON object: {e}"))?;
    let turns = value
        .get("turns")
        .and_then(|t| t.as_array())
        .ok_or_else(|| "no `turns` array".to_string())?;
    if turns.len() < 2 {
        return Err(format!("{} turn(s): a dialogue needs a context and a response", turns.len()));
    }
    turns
        .iter()
        .enumerate()
        .map(|(idx, turn)| {
            let default_weight = if idx == 0 { 0.0 } else { 1.0 };
            let (text, author, weight) = match turn {
                serde_json::Value::String(s) => (s.clone(), None, default_weight),
                serde_json::Value::Object(o) => {
                    let text = o
                        .get("text")
                        .and_then(|t| t.as_str())
                        .ok_or_else(|| format!("turn {} has no `text` string", idx + 1))?
                        .to_string();
                    let author = match o.get("author") {
                        None | Some(serde_json::Value::Null) => None,
                        Some(serde_json::Value::String(a)) => Some(a.clone()),
                        Some(_) => return Err(format!("turn {}: `author` is not a string", idx + 1)),
                    };
                    let weight = match o.get("weight") {
                        None => default_weight,
                        Some(w) => w.as_f64().ok_or_else(|| format!("turn {}: `weight` is not a number", idx + 1))? as f32,
                    };
                    (text, author, weight)
                }
                _ => return Err(format!("turn {} is neither a string nor an object", idx + 1)),
            };
            check_turn(idx, &text, weight)?;
            Ok(Turn { text, author, weight })
        })
        .collect()
}

/// One `prepro.py` line, `W text EOS W text\tW response`, to turns.
pub fn parse_tsv_line(line: &str) -> std::result::Result<Vec<Turn>, String> {
    let (context, response) = line.split_once('\t').ok_or_else(|| "no tab between context and response".to_string())?;
    if response.contains('\t') {
        return Err("more than one tab (one context and one response per line)".into());
    }
    let weighted = |idx: usize, part: &str| -> std::result::Result<Turn, String> {
        let part = part.trim();
        let (weight, text) = part.split_once(' ').unwrap_or((part, ""));
        let weight: f32 = weight
            .parse()
            .map_err(|_| format!("turn {} does not start with a weight (`0.0 text` / `1.0 text`): {weight:?}", idx + 1))?;
        let text = text.trim().to_string();
        check_turn(idx, &text, weight)?;
        Ok(Turn { text, author: None, weight })
    };
    let mut turns = context.split(" EOS ").enumerate().map(|(i, p)| weighted(i, p)).collect::<std::result::Result<Vec<_>, _>>()?;
    turns.push(weighted(turns.len(), response)?);
    Ok(turns)
}

fn check_turn(idx: usize, text: &str, weight: f32) -> std::result::Result<(), String> {
    if text.trim().is_empty() {
        return Err(format!("turn {} is empty", idx + 1));
    }
    if text.len() > MAX_TURN_BYTES {
        return Err(format!("turn {} is {} bytes, more than {}", idx + 1, text.len(), MAX_TURN_BYTES));
    }
    if !weight.is_finite() || weight < 0.0 {
        return Err(format!("turn {} has weight {weight}; weights are finite and not negative", idx + 1));
    }
    Ok(())
}

/// One training sequence: `inputs[i]` predicts `targets[i]` with loss
/// weight `weights[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// Sum of the loss weights.
    pub fn weight(&self) -> f32 {
        self.weights.iter().sum()
    }

    /// A content hash (for the held-out split).
    fn fingerprint(&self) -> u64 {
        let bytes: Vec<u8> = self.inputs.iter().chain(&self.targets).flat_map(|id| id.to_le_bytes()).collect();
        fnv1a64(&bytes)
    }
}

/// A dialogue as one example of at most `max_seq_len` inputs, or `None`
/// when nothing in it is trained on.
///
/// The sequence is `turn₀ EOS turn₁ EOS … turnₙ EOS`; inputs are all but its
/// last id, targets all but its first. A target takes the weight of the
/// turn it belongs to (a turn's closing EOS included), except the first
/// turn's, which are 0: the labels of DialoGPT's `prepro.py`. Too long a
/// dialogue loses whole turns from its oldest end (the new first turn then
/// becomes context), then the beginning of its first turn, then, when the
/// last turn alone is too long, that turn's end. Trailing untrained
/// positions are cut off.
pub fn build_example(turns: &[Vec<u32>], weights: &[f32], eos: u32, max_seq_len: usize) -> Option<Example> {
    debug_assert_eq!(turns.len(), weights.len());
    if turns.len() < 2 || max_seq_len < 2 {
        return None;
    }
    let budget = max_seq_len + 1; // ids in the sequence
    let total = |range: &[Vec<u32>]| range.iter().map(|t| t.len() + 1).sum::<usize>();
    let mut first = 0;
    while turns.len() - first > 2 && total(&turns[first..]) > budget {
        first += 1;
    }
    let mut ids: Vec<u32> = Vec::with_capacity(budget);
    let mut id_weights: Vec<f32> = Vec::with_capacity(budget);
    for (idx, (turn, &w)) in turns[first..].iter().zip(&weights[first..]).enumerate() {
        let w = if idx == 0 { 0.0 } else { w };
        ids.extend_from_slice(turn);
        ids.push(eos);
        id_weights.extend(std::iter::repeat_n(w, turn.len() + 1));
    }
    if ids.len() > budget {
        // Cut the (untrained) first turn from its beginning, keeping at
        // least one id of it and its separator.
        let first_len = turns[first].len();
        let cut = (ids.len() - budget).min(first_len - 1);
        ids.drain(..cut);
        id_weights.drain(..cut);
        // Still too long: the last turn alone does not fit; keep its start.
        ids.truncate(budget);
        id_weights.truncate(budget);
    }
    let inputs = ids[..ids.len() - 1].to_vec();
    let targets = ids[1..].to_vec();
    let mut weights = id_weights[1..].to_vec();
    let last_trained = weights.iter().rposition(|&w| w > 0.0)?;
    let keep = last_trained + 1;
    weights.truncate(keep);
    Some(Example { inputs: inputs[..keep].to_vec(), targets: targets[..keep].to_vec(), weights })
}

/// Tokenizes dialogues into examples (see [`build_example`]); returns the
/// examples and how many dialogues gave none.
pub fn build_examples(
    dialogues: &[Dialogue],
    tokenizer: &DialogTokenizer,
    max_seq_len: usize,
) -> Result<(Vec<Example>, usize)> {
    let mut examples = Vec::with_capacity(dialogues.len());
    let mut without_loss = 0;
    for dialogue in dialogues {
        let turns = dialogue
            .turns
            .iter()
            .map(|t| tokenizer.encode(&crate::prompt::normalize_turn(&t.text)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let weights: Vec<f32> = dialogue.turns.iter().map(|t| t.weight).collect();
        match build_example(&turns, &weights, tokenizer.eos_id(), max_seq_len) {
            Some(example) => examples.push(example),
            None => without_loss += 1,
        }
    }
    Ok((examples, without_loss))
}

/// Splits examples into (train, held-out). The held-out set is the
/// `eval_fraction` of examples with the smallest content hash under `seed`
/// (at least one when the fraction is positive and there are two or more
/// examples), so the same data and seed always give the same split and an
/// example keeps its side as the data grows.
pub fn split(examples: Vec<Example>, eval_fraction: f64, seed: u64) -> Result<(Vec<Example>, Vec<Example>)> {
    if !(0.0..1.0).contains(&eval_fraction) {
        return Err(TrainingError::Settings(format!("--eval-fraction must be in [0, 1), not {eval_fraction}")));
    }
    let n = examples.len();
    let mut n_eval = (n as f64 * eval_fraction).round() as usize;
    if eval_fraction > 0.0 && n >= 2 {
        n_eval = n_eval.clamp(1, n - 1);
    }
    let mut keyed: Vec<(u64, usize, Example)> =
        examples.into_iter().enumerate().map(|(i, e)| (e.fingerprint() ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), i, e)).collect();
    keyed.sort_by_key(|&(h, i, _)| (h, i));
    let mut eval: Vec<(usize, Example)> = Vec::with_capacity(n_eval);
    let mut train: Vec<(usize, Example)> = Vec::with_capacity(n - n_eval);
    for (rank, (_, i, e)) in keyed.into_iter().enumerate() {
        if rank < n_eval {
            eval.push((i, e));
        } else {
            train.push((i, e));
        }
    }
    // Back to file order within each side.
    train.sort_by_key(|&(i, _)| i);
    eval.sort_by_key(|&(i, _)| i);
    Ok((train.into_iter().map(|(_, e)| e).collect(), eval.into_iter().map(|(_, e)| e).collect()))
}

/// The order examples are visited in epoch `epoch`: a Fisher-Yates shuffle
/// seeded by (`seed`, `epoch`), so any step's batch can be recomputed (this
/// is what makes `--resume` land on the same batches).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix::new(seed ^ (epoch as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        order.swap(i, j);
    }
    order
}

/// Examples right-padded to one length, with masks from their lengths.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, len]` u32; padding is the end-of-text id (never read as a
    /// token: masks come from `lengths`).
    pub input_ids: Tensor,
    /// `[batch, len]` u32 next-token targets (0 at padding).
    pub targets: Tensor,
    /// `[batch, len]` f32 loss weights (0 at padding).
    pub weights: Tensor,
    /// `[batch, 1, len, len]` additive attention bias: causal, and no query
    /// sees a padded key.
    pub attn_bias: Tensor,
    pub lengths: Vec<usize>,
    /// Real (unpadded) input tokens.
    pub n_tokens: usize,
    /// Sum of loss weights.
    pub total_weight: f32,
}

impl Batch {
    pub fn new(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Self> {
        if examples.is_empty() || examples.iter().any(|e| e.is_empty()) {
            return Err(TrainingError::Settings("a batch needs at least one non-empty example".into()));
        }
        let b = examples.len();
        let len = examples.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut ids = vec![pad_id; b * len];
        let mut targets = vec![0u32; b * len];
        let mut weights = vec![0f32; b * len];
        let mut bias = vec![f32::NEG_INFINITY; b * len * len];
        for (row, example) in examples.iter().enumerate() {
            let n = example.len();
            ids[row * len..row * len + n].copy_from_slice(&example.inputs);
            targets[row * len..row * len + n].copy_from_slice(&example.targets);
            weights[row * len..row * len + n].copy_from_slice(&example.weights);
            for q in 0..len {
                // A real query sees real keys up to itself; a padded query
                // sees the real keys (its row is ignored by the loss, but
                // must not be all -inf).
                let visible = if q < n { q + 1 } else { n };
                let base = (row * len + q) * len;
                bias[base..base + visible].iter_mut().for_each(|v| *v = 0.0);
            }
        }
        let lengths: Vec<usize> = examples.iter().map(|e| e.len()).collect();
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, len), device)?,
            targets: Tensor::from_vec(targets, (b, len), device)?,
            weights: Tensor::from_vec(weights, (b, len), device)?,
            attn_bias: Tensor::from_vec(bias, (b, 1, len, len), device)?,
            n_tokens: lengths.iter().sum(),
            total_weight: examples.iter().map(|e| e.weight()).sum(),
            lengths,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 99;

    #[test]
    fn labels_follow_prepro_never_the_first_turn() {
        let e = build_example(&[vec![1, 2], vec![3], vec![4, 5]], &[1.0, 1.0, 1.0], EOS, 64).unwrap();
        assert_eq!(e.inputs, vec![1, 2, EOS, 3, EOS, 4, 5]);
        assert_eq!(e.targets, vec![2, EOS, 3, EOS, 4, 5, EOS]);
        // Targets of turn 0 (2 and its EOS) are context; turn 1 is `3 EOS`,
        // turn 2 is `4 5 EOS`.
        assert_eq!(e.weights, vec![0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn a_zero_weight_middle_turn_is_context_and_trailing_context_is_cut() {
        let e = build_example(&[vec![1], vec![2], vec![3]], &[0.0, 1.0, 0.0], EOS, 64).unwrap();
        assert_eq!(e.inputs, vec![1, EOS, 2]);
        assert_eq!(e.targets, vec![EOS, 2, EOS]);
        assert_eq!(e.weights, vec![0.0, 1.0, 1.0]);
        assert!(build_example(&[vec![1], vec![2]], &[1.0, 0.0], EOS, 64).is_none());
    }

    #[test]
    fn long_dialogues_drop_old_turns_then_cut() {
        let turns = [vec![1, 1, 1], vec![2, 2], vec![3, 3]];
        // 3 turns need 10 ids; a budget of 6 inputs (7 ids) keeps the last
        // two turns (6 ids), the second becoming untrained context.
        let e = build_example(&turns, &[0.0, 1.0, 1.0], EOS, 6).unwrap();
        assert_eq!(e.inputs, vec![2, 2, EOS, 3, 3]);
        assert_eq!(e.weights, vec![0.0, 0.0, 1.0, 1.0, 1.0]);
        // Budget 4 (5 ids): the first kept turn keeps its last id.
        let e = build_example(&turns, &[0.0, 1.0, 1.0], EOS, 4).unwrap();
        assert_eq!(e.inputs, vec![2, EOS, 3, 3]);
        assert_eq!(e.targets, vec![EOS, 3, 3, EOS]);
        // A response longer than the budget keeps its start.
        let e = build_example(&[vec![1], (10..20).collect()], &[0.0, 1.0], EOS, 4).unwrap();
        assert_eq!(e.inputs, vec![1, EOS, 10, 11]);
        assert_eq!(e.targets, vec![EOS, 10, 11, 12]);
        assert!(e.len() <= 4);
    }

    #[test]
    fn tsv_and_jsonl_lines_parse() {
        let turns = parse_tsv_line("0.0 hello there EOS 1.0 hi\t1.0 how are you").unwrap();
        assert_eq!(turns.iter().map(|t| (t.text.as_str(), t.weight)).collect::<Vec<_>>(), vec![
            ("hello there", 0.0),
            ("hi", 1.0),
            ("how are you", 1.0)
        ]);
        assert!(parse_tsv_line("0.0 hello").unwrap_err().contains("tab"));
        assert!(parse_tsv_line("hello\t1.0 x").unwrap_err().contains("weight"));
        let turns = parse_jsonl_line(r#"{"turns":["a",{"text":"b","author":"h1"}],"channel":"c"}"#).unwrap();
        assert_eq!((turns[0].weight, turns[1].weight), (0.0, 1.0));
        assert_eq!(turns[1].author.as_deref(), Some("h1"));
        assert!(parse_jsonl_line(r#"{"turns":["a"]}"#).is_err());
        assert!(parse_jsonl_line(r#"{"turns":["a",""]}"#).unwrap_err().contains("empty"));
        assert!(parse_jsonl_line(r#"{"turns":["a","b"]"#).is_err());
    }

    #[test]
    fn split_is_deterministic_and_disjoint() {
        let examples: Vec<Example> = (0..20u32)
            .map(|i| Example { inputs: vec![i, EOS], targets: vec![EOS, i], weights: vec![0.0, 1.0] })
            .collect();
        let (train, eval) = split(examples.clone(), 0.2, 5).unwrap();
        assert_eq!((train.len(), eval.len()), (16, 4));
        let (train2, eval2) = split(examples.clone(), 0.2, 5).unwrap();
        assert_eq!((train, eval.clone()), (train2, eval2));
        let (_, eval3) = split(examples, 0.2, 6).unwrap();
        assert_ne!(eval, eval3);
        assert!(split(vec![], 1.5, 0).is_err());
    }

    #[test]
    fn epoch_orders_are_permutations_that_differ() {
        let a = epoch_order(50, 1, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(a, epoch_order(50, 1, 1));
        assert_eq!(a, epoch_order(50, 1, 0));
    }

    #[test]
    fn batch_masks_come_from_lengths() {
        // The pad id is the separator id: masks must not look at ids.
        let a = Example { inputs: vec![5, EOS, 6], targets: vec![EOS, 6, EOS], weights: vec![0.0, 1.0, 1.0] };
        let b = Example { inputs: vec![7], targets: vec![EOS], weights: vec![1.0] };
        let batch = Batch::new(&[&a, &b], EOS, &Device::Cpu).unwrap();
        assert_eq!(batch.lengths, vec![3, 1]);
        assert_eq!(batch.n_tokens, 4);
        let bias = batch.attn_bias.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let at = |row: usize, q: usize, k: usize| bias[(row * 3 + q) * 3 + k];
        assert_eq!(at(0, 1, 1), 0.0);
        assert_eq!(at(0, 1, 2), f32::NEG_INFINITY);
        assert_eq!(at(1, 2, 0), 0.0);
        assert_eq!(at(1, 2, 1), f32::NEG_INFINITY);
        let w = batch.weights.to_vec2::<f32>().unwrap();
        assert_eq!(w[1], vec![1.0, 0.0, 0.0]);
    }
}
