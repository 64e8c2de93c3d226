#!/usr/bin/env python3
"""Golden outputs for dialogd's model-runtime parity tests.

Run once, by hand, with Hugging Face transformers and CPU torch installed:

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install numpy safetensors torch transformers
    /tmp/hf/bin/python scripts/make_golden.py

It writes `tests/fixtures/golden/*.json` (small) and the `pico` checkpoint
folders under `tests/fixtures/pico-*` (a few MB, written by transformers'
`save_pretrained` in both file formats). CI never runs this script; it only
reads what it produced.

Weights come from a deterministic formula that `src/model/synthetic.rs`
implements identically, so the Rust tests can rebuild the exact same
DialoGPT-small/-medium shaped checkpoints without committing hundreds of MB:

    z    = splitmix64(fnv1a64(name) ^ seed, index)
    u    = (z >> 11) * 2**-53                      # uniform in [0, 1)
    w    = center + scale * (2u - 1)                 # computed in f64, stored as f32

with `scale`/`center` chosen per tensor kind (the `init` object below, which is
copied into every golden file and read back by the Rust side).
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FIX = os.path.join(ROOT, "tests", "fixtures")
EOS = 50256
MASK64 = (1 << 64) - 1

# Larger-than-usual block weights and random LayerNorm gains/biases: with the
# usual std-0.02 init a GPT-2 only repeats its last token, and a greedy test
# would prove nothing.
INIT = {
    "wte": {"center": 0.0, "scale": 0.1, "fan_in": False},
    "wpe": {"center": 0.0, "scale": 0.5, "fan_in": False},
    "ln_weight": {"center": 1.0, "scale": 0.5, "fan_in": False},
    "ln_bias": {"center": 0.0, "scale": 0.3, "fan_in": False},
    "attn_c_attn": {"center": 0.0, "scale": 1.5, "fan_in": True},
    "attn_c_proj": {"center": 0.0, "scale": 1.5, "fan_in": True},
    "mlp_c_fc": {"center": 0.0, "scale": 2.5, "fan_in": True},
    "mlp_c_proj": {"center": 0.0, "scale": 1.5, "fan_in": True},
    "bias": {"center": 0.0, "scale": 0.2, "fan_in": False},
}


def fnv1a64(text):
    h = 0xCBF29CE484222325
    for b in text.encode("utf-8"):
        h ^= b
        h = (h * 0x100000001B3) & MASK64
    return h


def splitmix_uniform(key, n):
    """n values in [-1, 1): splitmix64 of (key + (i + 1) * golden gamma)."""
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(key) + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)
    return 2.0 * u - 1.0


def init_kind(name):
    # DialogRPT's head (GPT2ForSequenceClassification.score, [1, n_embd], no
    # bias); its rule lives in make_golden_rpt.py's init, not in INIT.
    if name == "score.weight":
        return "score"
    if name == "wte.weight":
        return "wte"
    if name == "wpe.weight":
        return "wpe"
    if ".ln_" in name or name.startswith("ln_f"):
        return "ln_weight" if name.endswith("weight") else "ln_bias"
    if name.endswith("bias"):
        return "bias"
    if ".attn.c_attn" in name:
        return "attn_c_attn"
    if ".attn.c_proj" in name:
        return "attn_c_proj"
    if ".mlp.c_fc" in name:
        return "mlp_c_fc"
    if ".mlp.c_proj" in name:
        return "mlp_c_proj"
    raise ValueError(name)


def synthetic_tensor(name, shape, seed, init):
    spec = init[init_kind(name)]
    n = int(np.prod(shape))
    scale = spec["scale"]
    if spec["fan_in"]:
        # Conv1D weights are [in, out]: fan-in is the first dimension.
        scale = scale / np.sqrt(np.float64(shape[0]))
    v = spec["center"] + scale * splitmix_uniform(fnv1a64(name) ^ seed, n)
    return v.astype(np.float32).reshape(shape)


def build_model(cfg, seed):
    config = GPT2Config(**cfg)
    model = GPT2LMHeadModel(config)
    model.eval()
    state = model.transformer.state_dict()
    new_state = {}
    for name, tensor in state.items():
        if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
            continue
        new_state[name] = torch.from_numpy(synthetic_tensor(name, tuple(tensor.shape), seed, INIT))
    missing, unexpected = model.transformer.load_state_dict(new_state, strict=False)
    assert not unexpected, unexpected
    assert all(m.endswith("attn.bias") or m.endswith("masked_bias") for m in missing), missing
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    return model


def tokenizer():
    return GPT2Tokenizer.from_pretrained(os.path.join(FIX, "gpt2"))


def encode_user(tok, text):
    # A user's literal "<|endoftext|>" is text, not a turn boundary.
    ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert EOS not in ids, (text, ids)
    return ids


def prompt_ids(tok, turns):
    ids = []
    for turn in turns:
        ids += encode_user(tok, turn) + [EOS]
    return ids


TOKEN_TEXTS = [
    "Hello, how are you?",
    "Does money buy happiness?",
    " leading space and  double  spaces ",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve co\u00f6perate \u00c5ngstr\u00f6m",
    "emoji \U0001F600\U0001F44D\U0001F3FD and flags \U0001F1EB\U0001F1F7",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u3053\u3093\u306b\u3061\u306f \ud55c\uad6d\uc5b4",
    "tabs\tand\nnewlines\r\n\n  indented",
    "numbers 3.14159 1,000,000 2026-11-21 0x1F 1e-9",
    "I typed <|endoftext|> in the middle",
    "<|endoftext|>",
    "can't won't I'm you're they'll we've she'd",
    "!!!??? ... --- ''' \"\"\" ```",
    "",
    "a" * 200,
]

PROMPTS = [
    ["Hello, how are you?"],
    ["Does money buy happiness?", "Depends how much money you spend on it.", "What is the best way to buy happiness?"],
    ["I typed <|endoftext|> to break you"],
    ["Caf\u00e9 \u4f60\u597d \U0001F600", "tabs\tand\nnewlines"],
]

GREEDY = [
    {"turns": PROMPTS[0], "max_new_tokens": 24},
    {"turns": PROMPTS[1], "max_new_tokens": 24},
    {"turns": PROMPTS[2], "max_new_tokens": 16},
    {"turns": PROMPTS[3], "max_new_tokens": 16},
    {"turns": PROMPTS[1], "max_new_tokens": 24, "repetition_penalty": 1.3},
    {"turns": PROMPTS[0], "max_new_tokens": 24, "no_repeat_ngram": 2},
    {"turns": PROMPTS[1], "max_new_tokens": 20, "min_new_tokens": 20},
]

MODELS = {
    # Committed checkpoint, written by save_pretrained in both formats.
    "pico": {"n_embd": 8, "n_layer": 2, "n_head": 2, "n_positions": 64, "seed": 7},
    "tiny": {"n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 128, "seed": 11},
    "small": {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "seed": 1},
    "medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16, "n_positions": 1024, "seed": 2},
}

# Logits are compared at these positions plus the reference's top 16.
LOGIT_STRIDE = 97


def golden_for(name, spec, tok):
    cfg = {k: v for k, v in spec.items() if k != "seed"}
    cfg.update({"vocab_size": 50257, "bos_token_id": EOS, "eos_token_id": EOS,
                "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5})
    model = build_model(cfg, spec["seed"])
    out = {"model": name, "config": cfg, "seed": spec["seed"], "init": INIT,
           "logits": [], "greedy": []}
    with torch.no_grad():
        for turns in PROMPTS:
            ids = prompt_ids(tok, turns)
            logits = model(torch.tensor([ids])).logits[0, -1].double().numpy()
            top = np.argsort(-logits)[:16].tolist()
            positions = sorted(set(range(0, 50257, LOGIT_STRIDE)) | set(top))
            out["logits"].append({
                "turns": turns, "prompt_ids": ids,
                "positions": positions, "values": [float(logits[p]) for p in positions],
                "argmax": int(np.argmax(logits)),
            })
        for case in GREEDY:
            ids = prompt_ids(tok, case["turns"])
            kwargs = dict(do_sample=False, max_new_tokens=case["max_new_tokens"],
                          pad_token_id=EOS, eos_token_id=EOS)
            if "repetition_penalty" in case:
                kwargs["repetition_penalty"] = case["repetition_penalty"]
            if "no_repeat_ngram" in case:
                kwargs["no_repeat_ngram_size"] = case["no_repeat_ngram"]
            if "min_new_tokens" in case:
                kwargs["min_new_tokens"] = case["min_new_tokens"]
            input_ids = torch.tensor([ids])
            gen = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
            new = gen[0, len(ids):].tolist()
            if EOS in new:
                new = new[: new.index(EOS)]
            entry = dict(case)
            entry.update({"prompt_ids": ids, "output_ids": new, "text": tok.decode(new)})
            out["greedy"].append(entry)
    return model, out


def main():
    only = sys.argv[1:]
    tok = tokenizer()
    gdir = os.path.join(FIX, "golden")
    os.makedirs(gdir, exist_ok=True)
    tokens = [{"text": t, "ids": encode_user(tok, t)} for t in TOKEN_TEXTS]
    with open(os.path.join(gdir, "tokenizer.json"), "w") as f:
        json.dump({"cases": tokens}, f, ensure_ascii=False, indent=1)
    for name, spec in MODELS.items():
        if only and name not in only:
            continue
        model, out = golden_for(name, spec, tok)
        for g in out["greedy"]:
            print(name, len(g["output_ids"]), repr(g["text"][:60]))
        with open(os.path.join(gdir, f"{name}.json"), "w") as f:
            json.dump(out, f, ensure_ascii=False)
        if name == "pico":
            # save_pretrained: model.safetensors + tokenizer.json.
            d = os.path.join(FIX, "pico-safetensors")
            shutil.rmtree(d, ignore_errors=True)
            model.save_pretrained(d)
            tok.save_pretrained(d)
            # The older layout: pytorch_model.bin (torch.save of the state
            # dict, zip format) + vocab.json and merges.txt.
            d = os.path.join(FIX, "pico-bin")
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            model.config.save_pretrained(d)
            torch.save(model.state_dict(), os.path.join(d, "pytorch_model.bin"))
            for f in ("vocab.json", "merges.txt"):
                os.symlink(os.path.join("..", "gpt2", f), os.path.join(d, f))


if __name__ == "__main__":
    main()
