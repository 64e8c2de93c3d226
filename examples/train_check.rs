//! What dialogd computes for a trained checkpoint or persona adapter, for
//! `scripts/check_training.py` to compare with transformers and PEFT:
//! every position's logits (written to a safetensors file) and the greedy
//! reply (printed as one JSON line).
//!
//! `cargo run --example train_check -- MODEL_DIR [ADAPTER_DIR|-] LOGITS_OUT TURN...`

use candle_core::{DType, Device};
use dialogd::generate::generate;
use dialogd::model::Gpt2;
use dialogd::prompt::build_prompt;
use dialogd::sampling::SamplingParams;
use dialogd::tokenizer::DialogTokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        return Err("usage: train_check MODEL_DIR ADAPTER_DIR|- LOGITS_OUT TURN...".into());
    }
    let model_dir = std::path::Path::new(&args[0]);
    let model = if args[1] == "-" {
        Gpt2::load(model_dir, DType::F32, &Device::Cpu)?
    } else {
        dialogd::training::load_persona(model_dir, std::path::Path::new(&args[1]), DType::F32, &Device::Cpu)?
    };
    let tok = DialogTokenizer::from_dir(model_dir)?;
    let turns = args[3..].iter().map(|t| tok.encode(t)).collect::<Result<Vec<_>, _>>()?;
    let prompt = build_prompt(&turns, tok.eos_id(), 64)?;
    let logits = model.forward_all(&model.tokens_tensor(&prompt.ids)?, &mut model.new_cache())?.squeeze(0)?;
    candle_core::safetensors::save(&std::collections::HashMap::from([("logits".to_string(), logits)]), &args[2])?;
    let out = generate(&model, &prompt.ids, &SamplingParams::greedy(16), |_| true)?;
    println!("{}", serde_json::json!({"prompt_ids": prompt.ids, "output_ids": out.output_ids, "text": tok.decode(&out.output_ids)?}));
    Ok(())
}
