//! Writes a synthetic GPT-2 checkpoint folder of a DialoGPT shape (the
//! deterministic weights of `model::synthetic`), e.g. to measure training:
//!
//! `cargo run --example write_synthetic -- small /tmp/dialogpt-small-synthetic`

use dialogd::model::synthetic::{default_init, write_checkpoint};
use dialogd::model::Gpt2Config;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (shape, dir) = match args.as_slice() {
        [shape, dir] => (shape.as_str(), std::path::PathBuf::from(dir)),
        _ => return Err("usage: write_synthetic small|medium|large DIR".into()),
    };
    let cfg = match shape {
        "small" => Gpt2Config::dialogpt_small(),
        "medium" => Gpt2Config::dialogpt_medium(),
        "large" => Gpt2Config::dialogpt_large(),
        other => return Err(format!("unknown shape {other}").into()),
    };
    let tokenizer = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2");
    write_checkpoint(&dir, &cfg, 1, &default_init(), &tokenizer)?;
    eprintln!("wrote {}", dir.display());
    Ok(())
}
