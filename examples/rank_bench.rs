//! Ranking latency: 8 candidates scored by a DialogRPT-shaped ranker
//! (GPT-2 small, 768/12/12, synthetic weights) on the CPU: the shared-context
//! path (`DialogRpt::scores`), one full batch, and one candidate at a time.
//!
//! `cargo run --example rank_bench` (dependencies are optimised even in the
//! dev profile, which is where the model's time goes), or add `--release`.

use std::time::Instant;

use candle_core::Device;
use dialogd::model::synthetic::{ranker_init, synthetic_score, synthetic_tensors};
use dialogd::model::weights::TensorStore;
use dialogd::model::Gpt2Config;
use dialogd::ranking::DialogRpt;
use dialogd::tokenizer::DialogTokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let cfg = Gpt2Config::dialogpt_small();
    let init = ranker_init();
    let started = Instant::now();
    let mut tensors: std::collections::HashMap<_, _> = synthetic_tensors(&cfg, 1, &init)?.into_iter().collect();
    tensors.insert("score.weight".to_string(), synthetic_score(&cfg, 1, &init)?);
    let mut store = TensorStore::from_tensors("synthetic", tensors);
    let ranker = DialogRpt::from_store(cfg, &mut store, &Device::Cpu, std::path::Path::new("synthetic"))?;
    eprintln!("built a 768/12/12 ranker in {:.1}s", started.elapsed().as_secs_f64());

    let tok = DialogTokenizer::from_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2"))?;
    let turns: Vec<Vec<u32>> = [
        "Does money buy happiness?",
        "Depends how much money you spend on it.",
        "What is the best way to buy happiness?",
    ]
    .iter()
    .map(|t| tok.encode(t))
    .collect::<Result<_, _>>()?;
    let candidates: Vec<Vec<u32>> = [
        "You just have to be a millionaire by your early 20s, then you can be happy.",
        "Money can't buy happiness, but it can buy a boat.",
        "I don't know.",
        "Spend it on experiences, not things.",
        "Buy a dog. Dogs are happiness you can buy.",
        "lol",
        "Give it away. Helping people feels better than any purchase I ever made.",
        "Pay off your debts first, then worry about happiness.",
    ]
    .iter()
    .map(|t| tok.encode(t))
    .collect::<Result<_, _>>()?;
    let context_len: usize = turns.iter().map(|t| t.len() + 1).sum();
    let lens: Vec<usize> = candidates.iter().map(Vec::len).collect();
    println!("context {context_len} tokens; candidate lengths {lens:?}; threads {}", candle_core::utils::get_num_threads());

    let time = |f: &dyn Fn() -> Vec<f32>| -> (f64, Vec<f32>) {
        let out = f(); // warm-up
        let mut ms: Vec<f64> = (0..reps)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(f());
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        (ms[ms.len() / 2], out)
    };
    let (batched_ms, batched) = time(&|| ranker.logits(&turns, &candidates).unwrap());
    let (full_ms, full) = time(&|| ranker.logits_full_batch(&turns, &candidates).unwrap());
    let (single_ms, single) = time(&|| {
        candidates.iter().map(|c| ranker.logits_full_batch(&turns, std::slice::from_ref(c)).unwrap()[0]).collect()
    });
    let diff = |other: &[f32]| batched.iter().zip(other).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    println!("shared context (context once + 1 batched pass over 8 candidates): {batched_ms:.1} ms median of {reps}");
    println!("full batch (1 pass, 8 rows of context + candidate):             {full_ms:.1} ms");
    println!("one at a time (8 passes of context + candidate):               {single_ms:.1} ms");
    println!(
        "ratios: one-at-a-time / shared {:.2}x, full batch / shared {:.2}x, one-at-a-time / full batch {:.2}x; max logit difference vs shared: full {:.1e}, one-at-a-time {:.1e}",
        single_ms / batched_ms,
        full_ms / batched_ms,
        single_ms / full_ms,
        diff(&full),
        diff(&single)
    );
    println!("logits {batched:?}");
    Ok(())
}
