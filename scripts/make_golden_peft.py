#!/usr/bin/env python3
"""PEFT LoRA adapter variants and their reference logits (issue #20:
whatever PEFT loads with the same numbers, dialogd must load with the same
numbers, or refuse it naming the field).

Run once, by hand, in the environment of scripts/make_golden.py plus peft:

    /tmp/hf/bin/pip install peft
    /tmp/hf/bin/python scripts/make_golden_peft.py

The base is the `base` model of scripts/make_golden_variants.py (the
deterministic weights of make_golden.py, rebuilt by the Rust tests). Each
variant is made with PEFT (`LoraConfig`, `get_peft_model`), given
deterministic non-zero LoRA weights, saved with `save_pretrained` under
tests/fixtures/peft/<name>/ (a few KB each, committed), loaded back with
`PeftModel.from_pretrained` and run on a prompt; the logits at the last
position go to tests/fixtures/golden/peft.json. Variants PEFT loads with
numbers dialogd cannot reproduce are saved too (no logits): dialogd must
refuse them, naming the field.
"""

import json
import os
import shutil
import sys
import warnings

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_golden as mg  # noqa: E402
import make_golden_variants as mv  # noqa: E402

STRIDE = 211
PROMPT = ["Does money buy happiness?", "Depends how much money you spend on it."]
T = ["c_attn", "c_proj", "c_fc"]
VARIANTS = {
    "default": dict(r=4, lora_alpha=8, target_modules=T, fan_in_fan_out=True),
    # PEFT corrects fan_in_fan_out to true for GPT-2's Conv1D (with a
    # warning); the saved file is edited back to false below.
    "fan_in_fan_out_false": dict(r=4, lora_alpha=8, target_modules=T, fan_in_fan_out=True),
    "rslora": dict(r=4, lora_alpha=8, target_modules=T, fan_in_fan_out=True, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules=T, fan_in_fan_out=True,
                     rank_pattern={"c_fc": 2, "h.1.attn.c_proj": 6}, alpha_pattern={"attn.c_attn": 16, "c_fc": 3}),
    "regex_targets": dict(r=4, lora_alpha=8, target_modules=r".*\.h\.[02]\.(attn\.c_attn|mlp\.c_fc)", fan_in_fan_out=True),
    "all_linear": dict(r=4, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=True),
    "dropout": dict(r=4, lora_alpha=8, target_modules=T, fan_in_fan_out=True, lora_dropout=0.1),
    "layers_to_transform": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                layers_to_transform=[1], layers_pattern="h"),
    # Refused: these change the numbers in ways dialogd does not run.
    "bias_all": dict(r=4, lora_alpha=8, target_modules=T, fan_in_fan_out=True, bias="all"),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=T, fan_in_fan_out=True, modules_to_save=["ln_f"]),
    "dora": dict(r=4, lora_alpha=8, target_modules=T, fan_in_fan_out=True, use_dora=True),
    "lora_bias": dict(r=4, lora_alpha=8, target_modules=T, fan_in_fan_out=True, lora_bias=True),
}
REFUSED = {"bias_all": "bias", "modules_to_save": "modules_to_save", "dora": "use_dora", "lora_bias": "lora_bias"}


def base_model():
    cfg = dict(mv.BASE)
    return mg.build_model(cfg, mv.SEED)


def main():
    tok = mg.tokenizer()
    ids = mg.prompt_ids(tok, PROMPT)
    root = os.path.join(mg.FIX, "peft")
    shutil.rmtree(root, ignore_errors=True)
    out = {"base": {"config": mv.BASE, "seed": mv.SEED}, "prompt_ids": ids, "variants": {}}
    for n, (name, kwargs) in enumerate(VARIANTS.items()):
        torch.manual_seed(0)
        model = get_peft_model(base_model(), LoraConfig(task_type="CAUSAL_LM", **kwargs))
        rng = np.random.RandomState(100 + n)
        for pname, p in model.named_parameters():
            if "lora_" in pname or (name == "bias_all" and pname.endswith(".bias")) or ("modules_to_save" in pname):
                p.data = torch.from_numpy(rng.uniform(-0.3, 0.3, size=tuple(p.shape)).astype(np.float32))
        d = os.path.join(root, name)
        model.save_pretrained(d)
        for extra in ("README.md",):
            if os.path.exists(os.path.join(d, extra)):
                os.remove(os.path.join(d, extra))
        if name == "fan_in_fan_out_false":
            path = os.path.join(d, "adapter_config.json")
            with open(path) as f:
                c = json.load(f)
            c["fan_in_fan_out"] = False
            with open(path, "w") as f:
                json.dump(c, f, indent=2)
        entry = {"dir": name}
        if name in REFUSED:
            entry["refused_field"] = REFUSED[name]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = PeftModel.from_pretrained(base_model(), d)
            loaded.eval()
            with torch.no_grad():
                logits = loaded(torch.tensor([ids])).logits[0, -1].double().numpy()
                base_logits = base_model()(torch.tensor([ids])).logits[0, -1].double().numpy()
            assert np.abs(logits - base_logits).max() > 1e-3, name
            top = np.argsort(-logits)[:8].tolist()
            positions = sorted(set(range(0, 50257, STRIDE)) | set(top))
            entry.update({"positions": positions, "values": [float(logits[p]) for p in positions]})
            print(name, "%.4f" % logits[positions[0]], "max |delta| vs base %.3f" % np.abs(logits - base_logits).max())
        out["variants"][name] = entry
    path = os.path.join(mg.FIX, "golden", "peft.json")
    with open(path, "w") as f:
        json.dump(out, f)
    print("wrote", path)


if __name__ == "__main__":
    main()
