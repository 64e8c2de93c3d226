//! Whatever transformers and PEFT load with the same numbers, dialogd
//! loads with the same numbers, or refuses by naming the field: GPT-2
//! `config.json` variants (attention scaling, activations,
//! `layer_norm_epsilon`, `n_inner`, `reorder_and_upcast_attn`, `n_ctx`)
//! and PEFT `adapter_config.json` variants (`use_rslora`, `rank_pattern`,
//! `alpha_pattern`, `target_modules` forms, `fan_in_fan_out`,
//! `lora_dropout`, `layers_to_transform`), against logits computed by
//! transformers / PEFT (scripts/make_golden_variants.py,
//! scripts/make_golden_peft.py).

use std::path::PathBuf;

use candle_core::{DType, Device};
use dialogd::model::synthetic::{write_checkpoint, InitSpec};
use dialogd::model::{Gpt2, Gpt2Config};
use dialogd::training::lora::{load_persona, LoraAdapter};
use serde_json::Value;

use crate::support::{cached_checkpoint, fixtures, golden, ids};

/// The variant's checkpoint: the deterministic weights, and the
/// `config.json` transformers wrote for it (every field it knows).
fn variant_dir(name: &str, variant: &Value, g: &Value) -> PathBuf {
    let config_json = variant["config_json"].clone();
    let key = format!("variant {name} {config_json} {} {}", g["seed"], g["init"]);
    cached_checkpoint(&key, name, |dir| {
        let cfg = Gpt2Config::from_json(&config_json.to_string()).unwrap();
        let init: InitSpec = serde_json::from_value(g["init"].clone()).unwrap();
        write_checkpoint(dir, &cfg, g["seed"].as_u64().unwrap(), &init, &fixtures().join("gpt2")).unwrap();
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config_json).unwrap()).unwrap();
    })
}

/// The worst relative error of `model`'s last-position logits for `prompt`
/// against the reference values at `positions`.
fn worst_error(model: &Gpt2, prompt: &[u32], positions: &Value, values: &Value) -> f64 {
    let logits = model.forward(&model.tokens_tensor(prompt).unwrap(), &mut model.new_cache()).unwrap();
    let logits: Vec<f32> = logits.squeeze(0).unwrap().to_vec1().unwrap();
    ids(positions)
        .iter()
        .zip(values.as_array().unwrap())
        .map(|(&pos, want)| {
            let want = want.as_f64().unwrap();
            (logits[pos as usize] as f64 - want).abs() / want.abs().max(1.0)
        })
        .fold(0f64, f64::max)
}

#[test]
fn config_variants_give_transformers_logits() {
    let g = golden("variants");
    let variants = g["variants"].as_object().unwrap();
    assert!(variants.len() >= 13);
    for (name, variant) in variants {
        let dir = variant_dir(name, variant, &g);
        let model = Gpt2::load(&dir, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        for case in variant["cases"].as_array().unwrap() {
            let worst = worst_error(&model, &ids(&case["prompt_ids"]), &case["positions"], &case["values"]);
            assert!(worst < 1e-4, "{name}: worst relative logit error {worst}");
        }
    }
    // The variants differ from each other: the fields are really read.
    let first = |n: &str| variants[n]["cases"][0]["values"][0].as_f64().unwrap();
    for other in ["no_scale_attn_weights", "scale_by_inverse_layer_idx", "relu", "silu", "layer_norm_epsilon", "n_inner"] {
        assert!((first("base") - first(other)).abs() > 1e-3, "{other} gave the base model's logits");
    }
}

#[test]
fn config_fields_that_change_the_numbers_and_are_not_run_are_refused_by_name() {
    let g = golden("variants");
    let base = &g["variants"]["base"]["config_json"];
    for (field, value, needle) in [
        ("tie_word_embeddings", serde_json::json!(false), "tie_word_embeddings"),
        ("model_type", serde_json::json!("gpt_neo"), "model_type"),
        ("activation_function", serde_json::json!("quick_gelu"), "quick_gelu"),
    ] {
        let mut config = base.clone();
        config[field] = value;
        let err = Gpt2Config::from_json(&config.to_string()).unwrap_err().to_string();
        assert!(err.contains(needle), "{field}: {err}");
    }
}

#[test]
fn peft_adapter_variants_give_peft_logits() {
    let g = golden("variants");
    let base_dir = variant_dir("base", &g["variants"]["base"], &g);
    let base = Gpt2::load(&base_dir, DType::F32, &Device::Cpu).unwrap();
    let p = golden("peft");
    let prompt = ids(&p["prompt_ids"]);
    let mut served = 0;
    for (name, variant) in p["variants"].as_object().unwrap() {
        let dir = fixtures().join("peft").join(variant["dir"].as_str().unwrap());
        if let Some(field) = variant["refused_field"].as_str() {
            let err = LoraAdapter::load(&dir).unwrap_err().to_string();
            assert!(err.contains(field), "{name}: the error does not name `{field}`: {err}");
            continue;
        }
        // Merged into the base weights…
        let merged = load_persona(&base_dir, &dir, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        let worst = worst_error(&merged, &prompt, &variant["positions"], &variant["values"]);
        assert!(worst < 1e-4, "{name} (merged): worst relative logit error {worst}");
        // …and applied at run time over the shared base.
        let runtime = LoraAdapter::load(&dir).unwrap().runtime(base.config()).unwrap();
        let mut cache = base.new_seq_cache(prompt.len()).unwrap();
        let logits = base.forward_seqs_with(&[&prompt], &mut [&mut cache], &[Some(&runtime)]).unwrap();
        let row: Vec<f32> = logits.get(0).unwrap().to_vec1().unwrap();
        for (&pos, want) in ids(&variant["positions"]).iter().zip(variant["values"].as_array().unwrap()) {
            let want = want.as_f64().unwrap();
            let err = (row[pos as usize] as f64 - want).abs() / want.abs().max(1.0);
            assert!(err < 1e-4, "{name} (run time): logit {pos}: {} against {want}", row[pos as usize]);
        }
        served += 1;
    }
    assert_eq!(served, 8);
}
