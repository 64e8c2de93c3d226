#!/usr/bin/env python3
"""Golden logits for GPT-2 config.json variants (issue #20: whatever
transformers loads with the same numbers, dialogd must load with the same
numbers, or refuse it by name).

Run once, by hand, in the environment of scripts/make_golden.py:

    /tmp/hf/bin/python scripts/make_golden_variants.py

For each variant of a tiny GPT-2 (the deterministic weights of
make_golden.py, so the Rust side rebuilds them) it records the config.json
transformers writes (`config.to_dict()`, every field it knows) and the
logits at the last position of two prompts. Written to
tests/fixtures/golden/variants.json; CI never runs this script.

Variants: attention scaling (`scale_attn_weights`,
`scale_attn_by_inverse_layer_idx`), `reorder_and_upcast_attn` (the same
numbers in f32), each activation GPT-2 accepts that dialogd runs
(`gelu_new`, `gelu_fast`, `gelu_pytorch_tanh`, `gelu`, `relu`, `silu`,
`swish`), `layer_norm_epsilon`, an `n_inner` that is not 4 × n_embd, and
the legacy `n_ctx` field.
"""

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_golden as mg  # noqa: E402

BASE = {"n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 64, "vocab_size": 50257,
        "bos_token_id": mg.EOS, "eos_token_id": mg.EOS, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5}
SEED = 41
VARIANTS = {
    "base": {},
    "no_scale_attn_weights": {"scale_attn_weights": False},
    "scale_by_inverse_layer_idx": {"scale_attn_by_inverse_layer_idx": True},
    "reorder_and_upcast_attn": {"reorder_and_upcast_attn": True, "scale_attn_by_inverse_layer_idx": True},
    "gelu_fast": {"activation_function": "gelu_fast"},
    "gelu_pytorch_tanh": {"activation_function": "gelu_pytorch_tanh"},
    "gelu": {"activation_function": "gelu"},
    "relu": {"activation_function": "relu"},
    "silu": {"activation_function": "silu"},
    "swish": {"activation_function": "swish"},
    "layer_norm_epsilon": {"layer_norm_epsilon": 1e-2},
    "n_inner": {"n_inner": 40},
    "n_ctx": {"n_ctx": 64},
}
PROMPTS = [["Does money buy happiness?"], ["Hello", "Caf\u00e9 \u4f60\u597d \U0001F600 and more"]]
STRIDE = 211


def main():
    tok = mg.tokenizer()
    out = {"init": mg.INIT, "seed": SEED, "variants": {}}
    for name, change in VARIANTS.items():
        cfg = dict(BASE)
        cfg.update(change)
        model = mg.build_model(cfg, SEED)
        cases = []
        with torch.no_grad():
            for turns in PROMPTS:
                ids = mg.prompt_ids(tok, turns)
                logits = model(torch.tensor([ids])).logits[0, -1].double().numpy()
                top = np.argsort(-logits)[:8].tolist()
                positions = sorted(set(range(0, 50257, STRIDE)) | set(top))
                cases.append({"prompt_ids": ids, "positions": positions,
                              "values": [float(logits[p]) for p in positions]})
        config_json = model.config.to_dict()
        config_json.pop("transformers_version", None)
        out["variants"][name] = {"config_json": config_json, "cases": cases}
        print(name, ["%.4f" % c["values"][0] for c in cases])
    path = os.path.join(mg.FIX, "golden", "variants.json")
    with open(path, "w") as f:
        json.dump(out, f, ensure_ascii=False)
    print("wrote", path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
