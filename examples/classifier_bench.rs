//! Safety-classifier latency on the CPU: a BERT-base-shaped
//! `BertForSequenceClassification` (768 hidden, 12 layers, 12 heads, 3072
//! inner, 30522 vocabulary, 6 Detoxify labels; random weights) reading one
//! user message, then a message's 8 candidates in one batch and one at a
//! time. The tokenizer is the parity tests' tiny WordPiece, which splits
//! words finer than BERT's, so the token counts printed are on the high side
//! for these texts.
//!
//! Beside it, in the same run, the reply it screens: a DialoGPT-small-shaped
//! model (synthetic weights, `model::synthetic`) in a generation pool drawing
//! 8 candidates (the daemon's default sampling, end-of-text ignored so every
//! candidate makes exactly the tokens asked) from a 48-token prompt, for 16
//! and 64 new tokens, with f32 weights and with `--quantize q8`'s 8-bit
//! weights. The classifier's share of a reply is its time over the sum.
//!
//! `cargo run --release --example classifier_bench [reps]` (default 10);
//! prints the median and best of `reps`, in ms.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use dialogd::model::synthetic::{default_init, synthetic_tensors};
use dialogd::model::weights::TensorStore;
use dialogd::model::{Gpt2, Gpt2Config};
use dialogd::pool::{GenerationPool, GenerationRequest, PoolConfig};
use dialogd::safety::{HfClassifier, ToxicityClassifier};
use dialogd::sampling::SamplingParams;

/// Prompt length of the generation reference, in tokens.
const PROMPT_TOKENS: usize = 48;

const MESSAGE: &str = "hey, did you see the game last night? I can't believe they lost again after leading the whole first half";
const CANDIDATES: [&str; 8] = [
    "Yeah, I watched it. The second half was painful to watch.",
    "I missed it, was it a good game?",
    "They always do that, I'm not even surprised anymore.",
    "No, I was at work. Who scored?",
    "I can't believe it either, what a collapse!",
    "That's sports for you. There's always next week.",
    "I don't really follow football, to be honest.",
    "Same here, I turned it off at halftime.",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let config = serde_json::json!({
        "architectures": ["BertForSequenceClassification"],
        "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 512,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0,
        "problem_type": "multi_label_classification",
        "id2label": {"0": "toxicity", "1": "severe_toxicity", "2": "obscene", "3": "threat", "4": "insult", "5": "identity_attack"},
    });
    let tokenizer_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/classifiers/bert.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| e.to_string())?;
    // A VarMap hands out fresh random tensors of whatever shape is asked.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = HfClassifier::from_parts(&config, tokenizer, vb)?;
    let tokens = |t: &str| model.windows(t).map(|w| w[0].len()).unwrap_or(0);
    println!(
        "BERT-base shape, random weights, CPU ({} threads); message {} tokens, candidates {:?} tokens",
        rayon::current_num_threads(),
        tokens(MESSAGE),
        CANDIDATES.iter().map(|c| tokens(c)).collect::<Vec<_>>()
    );
    model.probabilities(&[MESSAGE])?; // warm-up
    let time = |f: &dyn Fn() -> Result<(), dialogd::safety::SafetyError>| -> Result<(f64, f64), dialogd::safety::SafetyError> {
        let mut ms = Vec::with_capacity(reps);
        for _ in 0..reps {
            let start = Instant::now();
            f()?;
            ms.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        ms.sort_by(f64::total_cmp);
        Ok((ms[ms.len() / 2], ms[0]))
    };
    let one = time(&|| model.probabilities(&[MESSAGE]).map(drop))?;
    let batched = time(&|| model.probabilities(&CANDIDATES).map(drop))?;
    let singly = time(&|| CANDIDATES.iter().try_for_each(|c| model.probabilities(&[c]).map(drop)))?;
    println!("what                          median ms   best ms   (of {reps})");
    println!("1 message                     {:9.1} {:9.1}", one.0, one.1);
    println!("8 candidates, one batch       {:9.1} {:9.1}", batched.0, batched.1);
    println!("8 candidates, one at a time   {:9.1} {:9.1}", singly.0, singly.1);

    println!();
    println!("the reply it screens: DialoGPT-small shape, synthetic weights, 8 candidates from a {PROMPT_TOKENS}-token prompt");
    println!("weights  new tokens   generation median ms   best ms   classifier share (in + 8 out, batched, medians)");
    let small = Gpt2Config::dialogpt_small();
    let tensors = synthetic_tensors(&small, 1, &default_init())?;
    let f32_model = Gpt2::from_store(small.clone(), &mut TensorStore::from_tensors("synthetic", tensors.into_iter().collect()), &Device::Cpu)?;
    let q8_model = f32_model.quantize_q8()?;
    for (name, model) in [("f32", f32_model), ("q8", q8_model)] {
        let pool = GenerationPool::start(model, PoolConfig { max_batch: 8, queue_capacity: 8, max_candidates: 8, ..PoolConfig::default() })?;
        let handle = pool.handle();
        let eos = small.eos_token_id;
        let prompt: Vec<u32> = (1..PROMPT_TOKENS as u32).map(|i| (i * 7919) % 50000).chain([eos]).collect();
        let request = |new_tokens: usize, seed: u64| GenerationRequest {
            n_candidates: 8,
            ignore_eos: true,
            ..GenerationRequest::new(prompt.clone(), SamplingParams { max_new_tokens: new_tokens, seed: Some(seed), ..SamplingParams::default() })
        };
        handle.generate_blocking(request(4, 0))?; // warm-up
        for new_tokens in [16, 64] {
            let mut ms = Vec::with_capacity(reps);
            for rep in 0..reps {
                let result = handle.generate_blocking(request(new_tokens, rep as u64))?;
                assert!(result.candidates.iter().all(|c| c.output_ids.len() == new_tokens));
                ms.push(result.total.as_secs_f64() * 1000.0);
            }
            ms.sort_by(f64::total_cmp);
            let median = ms[ms.len() / 2];
            let screen = one.0 + batched.0;
            println!(
                "{name:>7}  {new_tokens:>10}   {median:>20.1} {:>9.1}   {:>5.1}% ({screen:.1} ms of {:.1} ms)",
                ms[0],
                100.0 * screen / (screen + median),
                screen + median
            );
        }
        drop(handle);
        pool.shutdown();
    }
    Ok(())
}
