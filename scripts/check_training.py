#!/usr/bin/env python3
"""Checks what `dialogd train` writes against Hugging Face transformers and PEFT.

Run by hand (CI never runs it), from the repository root, after
`cargo build --bin dialogd --example train_check`:

    /work/pyenv/venv/bin/python scripts/check_training.py    # any venv with torch, transformers, peft, safetensors

It builds the `tiny` golden GPT-2 (the formula of make_golden.py), writes a
small dialogue corpus, and runs `dialogd train` twice: a full fine-tune and a
LoRA persona adapter. Then:

- the full checkpoint is loaded with `GPT2LMHeadModel.from_pretrained`, and
  its logits at every position of a few prompts and its greedy replies
  (`generate(do_sample=False)`) are compared with dialogd's (`dialogd
  generate --greedy --json`, and the `train_check` example for logits);
- the adapter is loaded onto the base with `PeftModel.from_pretrained`, and
  compared the same way with dialogd's `training::load_persona` (adapter
  merged into the weights).

Prints one line per check and exits non-zero on a mismatch.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from make_golden import build_model  # noqa: E402

DIALOGD = os.path.join(ROOT, "target", "debug", "dialogd")
CHECK = os.path.join(ROOT, "target", "debug", "examples", "train_check")
EOS = 50256
PROMPTS = [["hello bot"], ["what colour is the sky?"], ["what colour is the frog?"], ["hi", "hello bot"]]
TOL = 1e-4


def corpus(path):
    things = [("apple", "red"), ("sky", "blue"), ("grass", "green"), ("sun", "yellow"), ("sea", "blue"),
              ("snow", "white"), ("coal", "black"), ("rose", "red"), ("lemon", "yellow"), ("cloud", "grey"),
              ("frog", "green"), ("plum", "purple"), ("milk", "white"), ("ink", "black"), ("fire", "orange"),
              ("leaf", "green"), ("salt", "white"), ("gold", "yellow"), ("rust", "brown"), ("mint", "green")]
    with open(path, "w") as f:
        for thing, colour in things:
            f.write(json.dumps({"turns": [f"what colour is the {thing}?", f"the {thing} is {colour}."]}) + "\n")
        for _ in range(8):
            f.write(json.dumps({"turns": [{"text": "hello bot", "author": "a1"}, {"text": "hi there, friend!"}]}) + "\n")


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return out.stdout


def dialogd_side(model_dir, adapter, turns, tmp):
    logits_path = os.path.join(tmp, "logits.safetensors")
    line = run([CHECK, model_dir, adapter or "-", logits_path, *turns])
    return json.loads(line), load_file(logits_path)["logits"]


def hf_side(model, prompt_ids):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        logits = model(ids).logits[0]
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                             eos_token_id=EOS, pad_token_id=EOS)[0, len(prompt_ids):].tolist()
    if EOS in gen:
        gen = gen[:gen.index(EOS)]
    return logits, gen


def compare(name, model, model_dir, adapter, tmp):
    ok = True
    for turns in PROMPTS:
        ours, our_logits = dialogd_side(model_dir, adapter, turns, tmp)
        hf_logits, hf_ids = hf_side(model, ours["prompt_ids"])
        diff = (our_logits - hf_logits).abs().max().item()
        same = ours["output_ids"] == hf_ids
        good = diff < TOL and same
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {name}: {turns!r}: max |Δlogit| {diff:.2e} over {tuple(hf_logits.shape)}; "
              f"greedy {'identical' if same else 'DIFFERS'}: {ours['text']!r}")
        if adapter is None:
            # The command line as users run it gives the same reply.
            cli = json.loads(run([DIALOGD, "generate", "--model", model_dir, "--greedy", "--json",
                                  "--max-new-tokens", "16", "--", *turns]))
            if cli["output_ids"] != hf_ids:
                ok = False
                print(f"FAIL {name}: dialogd generate gave {cli['output_ids']}, transformers {hf_ids}")
    return ok


def main():
    for path in (DIALOGD, CHECK):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: cargo build --bin dialogd --example train_check")
    tmp = tempfile.mkdtemp(prefix="check_training_")
    golden = json.load(open(os.path.join(ROOT, "tests", "fixtures", "golden", "tiny.json")))
    base_dir = os.path.join(tmp, "base")
    build_model(golden["config"], golden["seed"]).save_pretrained(base_dir)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(ROOT, "tests", "fixtures", "gpt2", f), base_dir)
    data = os.path.join(tmp, "corpus.jsonl")
    corpus(data)

    full_dir = os.path.join(tmp, "full")
    summary = json.loads(run([DIALOGD, "train", "--base", base_dir, "--data", data, "--out", full_dir, "--steps", "100",
                              "--lr", "3e-3", "--eval-fraction", "0.2", "--json"]))
    print(f"full fine-tune: held-out loss {summary['eval_before']['loss']:.3f} -> {summary['eval_after']['loss']:.3f}")
    lora_dir = os.path.join(tmp, "lora")
    summary = json.loads(run([DIALOGD, "train", "--base", base_dir, "--data", data, "--out", lora_dir, "--steps", "60",
                              "--lr", "1e-2", "--lora-rank", "8", "--eval-fraction", "0.2", "--json"]))
    print(f"LoRA r=8: held-out loss {summary['eval_before']['loss']:.3f} -> {summary['eval_after']['loss']:.3f}")

    ok = True
    full = GPT2LMHeadModel.from_pretrained(full_dir).eval()
    ok &= compare("full checkpoint (from_pretrained)", full, full_dir, None, tmp)

    from peft import PeftModel
    base = GPT2LMHeadModel.from_pretrained(base_dir).eval()
    persona = PeftModel.from_pretrained(base, lora_dir).eval()
    n_lora = sum(1 for name, _ in persona.named_parameters() if "lora_" in name)
    print(f"PEFT loaded {n_lora} LoRA tensors from {lora_dir}")
    ok &= compare("LoRA adapter (PeftModel)", persona, base_dir, lora_dir, tmp)
    print("all checks passed" if ok else "MISMATCH")
    shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
