#!/usr/bin/env python3
"""The GPU check of issue #14, driven by scripts/gpu-check.sh (see there).

For each shape (DialoGPT-small and -medium by default) it writes the
synthetic checkpoint of tests/fixtures/golden/SHAPE.json (the weights
formula of scripts/make_golden.py, which src/model/synthetic.rs
implements identically), then:

1. parity: every golden greedy case through `dialogd generate --greedy
   --json` on DEVICE in f32 and bf16, against the golden ids (transformers
   on the CPU in f32, which the CPU build matches: tests/cli.rs
   generate_greedy_json_matches_transformers) and against transformers'
   `generate(do_sample=False)` on DEVICE in the same dtype; plus, in
   transformers, the worst last-position logit difference of DEVICE
   (f32, bf16) against the golden logits (dialogd's CLI does not print
   logits, so its own logit error is not measured here);
2. speed: `dialogd bench --device DEVICE --json` at the given concurrency
   levels (the daemon's default GPU settings: dtype auto = bf16), GPU
   memory from nvidia-smi polled during the run, and the same workload in
   PyTorch + transformers on DEVICE in the same run (batch 1: TTFT and
   decode tokens/s; batch C: one generate call, aggregate tokens/s), in
   bf16, so every number has its ratio.

It writes one JSON file (--out). CI never runs it.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import compare_hf  # noqa: E402  (the PyTorch reference)
import make_golden  # noqa: E402  (the weights formula and the prompt rule)

EOS = 50256
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}] gpu_check:", *a, file=sys.stderr, flush=True)


def golden(shape):
    with open(os.path.join(ROOT, "tests", "fixtures", "golden", f"{shape}.json")) as f:
        return json.load(f)


def write_checkpoint(g, path):
    """The golden model, written by save_pretrained with the tokenizer files."""
    if not os.path.exists(os.path.join(path, "config.json")):
        model = make_golden.build_model(g["config"], g["seed"])
        model.save_pretrained(path)
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(os.path.join(ROOT, "tests", "fixtures", "gpt2", f), path)
    return path


def case_flags(case):
    flags = ["--greedy", "--max-new-tokens", str(case["max_new_tokens"])]
    for key, flag in (("repetition_penalty", "--repetition-penalty"), ("no_repeat_ngram", "--no-repeat-ngram"),
                      ("min_new_tokens", "--min-new-tokens")):
        if key in case:
            flags += [flag, str(case[key])]
    return flags


def dialogd_generate(binary, model, device, dtype, case):
    cmd = [binary, "generate", "--model", model, "--device", device, "--dtype", dtype, "--json"] + case_flags(case)
    cmd += ["--"] + case["turns"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:9])}…: {run.stderr.strip()[-2000:]}")
    return json.loads(run.stdout)["output_ids"]


def hf_generate(model, device, prompt, case):
    kw = dict(do_sample=False, max_new_tokens=case["max_new_tokens"], pad_token_id=EOS, eos_token_id=EOS)
    if "repetition_penalty" in case:
        kw["repetition_penalty"] = case["repetition_penalty"]
    if "no_repeat_ngram" in case:
        kw["no_repeat_ngram_size"] = case["no_repeat_ngram"]
    if "min_new_tokens" in case:
        kw["min_new_tokens"] = case["min_new_tokens"]
    x = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), **kw)[0, len(prompt):].tolist()
    return out[: out.index(EOS)] if EOS in out else out


def agreement(a, b):
    """Positions where two continuations agree, up to the first difference
    (after it, the inputs differ), and the positions compared."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n, max(len(a), len(b))


def parity(binary, shape, g, model_dir, device):
    tok = make_golden.tokenizer()
    out = {}
    for dtype in ("f32", "bf16"):
        hf = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=DTYPES[dtype]).to(device).eval()
        cases = []
        agree_golden = [0, 0]
        agree_hf = [0, 0]
        for case in g["greedy"]:
            prompt = make_golden.prompt_ids(tok, case["turns"])
            want = case["output_ids"]
            got = dialogd_generate(binary, model_dir, device, dtype, case)
            ref = hf_generate(hf, device, prompt, case)
            a, n = agreement(got, want)
            agree_golden[0] += a
            agree_golden[1] += n
            b, m = agreement(got, ref)
            agree_hf[0] += b
            agree_hf[1] += m
            cases.append({"turns": case["turns"], "dialogd": got, "transformers_device": ref, "golden": want,
                          "equal_golden": got == want, "equal_transformers_device": got == ref})
        # Transformers' own logit error on DEVICE against the golden (CPU f32).
        worst = 0.0
        top1 = [0, 0]
        with torch.inference_mode():
            for case in g["logits"]:
                x = torch.tensor([case["prompt_ids"]], device=device)
                logits = hf(x).logits[0, -1].float().cpu()
                want = torch.tensor(case["values"], dtype=torch.float64)
                got = logits[case["positions"]].double()
                scale = want.abs().max().item()
                worst = max(worst, ((got - want).abs().max() / scale).item())
                top1[0] += int(int(logits.argmax()) == case["argmax"])
                top1[1] += 1
        out[dtype] = {
            "cases_equal_golden": sum(c["equal_golden"] for c in cases),
            "cases_equal_transformers_device": sum(c["equal_transformers_device"] for c in cases),
            "cases": len(cases),
            "token_agreement_golden": agree_golden[0] / max(agree_golden[1], 1),
            "token_agreement_transformers_device": agree_hf[0] / max(agree_hf[1], 1),
            "transformers_device_worst_logit_error_vs_golden": worst,
            "transformers_device_top1_vs_golden": f"{top1[0]}/{top1[1]}",
            "detail": cases,
        }
        log(shape, dtype, {k: v for k, v in out[dtype].items() if k != "detail"})
        del hf
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


class GpuMemory:
    """Peak `nvidia-smi` memory.used (MiB) while running, polled every 0.2 s."""

    def __init__(self, enabled):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.peak = None
        self.stop = threading.Event()

    def read(self):
        run = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True)
        return max(int(x) for x in run.stdout.split()) if run.returncode == 0 and run.stdout.strip() else None

    def __enter__(self):
        if self.enabled:
            self.base = self.read()
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def poll(self):
        while not self.stop.is_set():
            v = self.read()
            if v is not None:
                self.peak = v if self.peak is None else max(self.peak, v)
            self.stop.wait(0.2)

    def __exit__(self, *exc):
        if self.enabled:
            self.stop.set()
            self.thread.join()

    def result(self):
        return {"baseline_mib": getattr(self, "base", None), "peak_mib": self.peak} if self.enabled else None


def dialogd_bench(binary, model_dir, device, levels, prompt_tokens, new_tokens, on_gpu):
    cmd = [binary, "bench", "--model", model_dir, "--device", device, "--json", "--prompt-tokens", str(prompt_tokens),
           "--new-tokens", str(new_tokens), "--concurrency", ",".join(map(str, levels))]
    log(" ".join(cmd))
    with GpuMemory(on_gpu) as mem:
        run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"bench failed: {run.stderr.strip()[-2000:]}")
    rows = {r["concurrency"]: r for r in map(json.loads, run.stdout.splitlines())}
    return {"command": " ".join(cmd), "levels": rows, "gpu_memory": mem.result()}


def reference(model_dir, device, dtype, levels, prompt_tokens, new_tokens):
    """PyTorch + transformers eager `generate` on DEVICE (bench/compare_hf.py's reference)."""
    out = compare_hf.reference(model_dir, prompt_tokens, new_tokens, levels, os.cpu_count(), device, DTYPES[dtype])
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def ratios(bench, ref):
    out = {}
    for c, r in ref.items():
        d = bench["levels"].get(c)
        if d is None:
            continue
        out[c] = {"aggregate": d["aggregate_tokens_per_s"] / r["aggregate_tokens_per_s"]}
        if c == 1:
            out[c]["decode"] = d["decode_tokens_per_s"] / r["decode_tokens_per_s"]
            out[c]["ttft_speedup"] = r["ttft_ms"] / max(d["ttft_ms_p50"], 1e-9)
    return out


def machine(device):
    info = {"python": sys.version.split()[0], "torch": torch.__version__}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except Exception:
        pass
    if shutil.which("nvidia-smi"):
        run = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["gpu"] = run.stdout.strip()
    if device.startswith("cuda") and torch.cuda.is_available():
        info["torch_device"] = torch.cuda.get_device_name(0)
    run = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    info["commit"] = run.stdout.strip()
    return info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dialogd", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="small,medium")
    ap.add_argument("--bench-shapes", default="small")
    ap.add_argument("--concurrency", default="1,8,32,128")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--work", default="/tmp/dialogd-gpu-check")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    levels = [int(c) for c in args.concurrency.split(",")]
    on_gpu = args.device.startswith("cuda")
    result = {"date": datetime.date.today().isoformat(), "device": args.device, "machine": machine(args.device),
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "parity": {}, "bench": {}}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for shape in args.shapes.split(","):
        g = golden(shape)
        model_dir = write_checkpoint(g, os.path.join(args.work, shape))
        log(shape, "parity")
        try:
            result["parity"][shape] = parity(args.dialogd, shape, g, model_dir, args.device)
        except Exception as e:  # keep what the other parts measure
            result["parity"][shape] = {"error": str(e)}
            log(shape, "parity failed:", e)
        save()
    for shape in filter(None, args.bench_shapes.split(",")):
        g = golden(shape)
        model_dir = write_checkpoint(g, os.path.join(args.work, shape))
        entry = {}
        try:
            entry["dialogd"] = dialogd_bench(args.dialogd, model_dir, args.device, levels, args.prompt_tokens,
                                             args.new_tokens, on_gpu)
            log(shape, "dialogd", entry["dialogd"]["levels"])
        except Exception as e:
            entry["dialogd_error"] = str(e)
            log(shape, "bench failed:", e)
        save()
        ref_dtype = "bf16" if on_gpu else "f32"
        log(shape, "PyTorch reference", ref_dtype)
        entry["pytorch"] = {"dtype": ref_dtype,
                            "levels": reference(model_dir, args.device, ref_dtype, levels, args.prompt_tokens, args.new_tokens)}
        if "dialogd" in entry:
            entry["ratios"] = ratios(entry["dialogd"], entry["pytorch"]["levels"])
            log(shape, "ratios", entry["ratios"])
        result["bench"][shape] = entry
        save()
    log("wrote", args.out)


if __name__ == "__main__":
    main()
