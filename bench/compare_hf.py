#!/usr/bin/env python3
"""dialogd's generation speed beside a PyTorch + transformers reference.

Both run on the same random-weight checkpoint (written here with
transformers' save_pretrained), on the same machine, in the same run, so the
ratios it prints are comparable. Optional dependency: needs torch and
transformers; CI never runs it.

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install numpy torch transformers safetensors
    cargo build --release
    /tmp/hf/bin/python bench/compare_hf.py [--shape small|medium] [--threads 2]

It measures, for the reference:
  - batch 1: time to first token (a 1-token generate) and decode tokens/s
    ((N - 1) / (total - ttft)) for a P-token prompt and N new tokens;
  - C prompts in one generate call (C = 8, 32): aggregate tokens/s.
and runs `dialogd bench --json` on the same checkpoint three ways: f32
weights with the default (f16) key/value cache, f32 weights with an f32
cache (`--kv-cache f32`, exactly transformers' numbers), and 8-bit weights
(`--quantize q8`, default cache); then prints a table of ratios.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EOS = 50256
SHAPES = {"small": (768, 12, 12), "medium": (1024, 24, 16)}


def make_checkpoint(path, shape):
    if os.path.exists(os.path.join(path, "config.json")):
        return
    n_embd, n_layer, n_head = SHAPES[shape]
    torch.manual_seed(0)
    config = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=50257,
                        n_positions=1024, bos_token_id=EOS, eos_token_id=EOS)
    GPT2LMHeadModel(config).save_pretrained(path)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(ROOT, "tests", "fixtures", "gpt2", f), path)


def prompts(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50000, (n, length), generator=g)
    ids[:, -1] = EOS
    return ids


def reference(path, prompt_tokens, new_tokens, levels, threads, device="cpu", dtype=torch.float32):
    """PyTorch + transformers eager `generate` on `device` in `dtype` (scripts/gpu_check.py uses it on a GPU)."""
    torch.set_num_threads(threads)
    model = GPT2LMHeadModel.from_pretrained(path, torch_dtype=dtype).to(device).eval()
    kw = dict(do_sample=False, pad_token_id=EOS, eos_token_id=None)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    out = {}
    with torch.inference_mode():
        model.generate(prompts(1, prompt_tokens, 99).to(device), max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        x = prompts(1, prompt_tokens, 1).to(device)
        sync()
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        sync()
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        sync()
        total = time.perf_counter() - t0
        out[1] = {"ttft_ms": ttft * 1e3, "decode_tokens_per_s": (new_tokens - 1) / (total - ttft),
                  "aggregate_tokens_per_s": new_tokens / total}
        for c in levels:
            if c == 1:
                continue
            x = prompts(c, prompt_tokens, c).to(device)
            sync()
            t0 = time.perf_counter()
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, **kw)
            sync()
            wall = time.perf_counter() - t0
            out[c] = {"aggregate_tokens_per_s": c * new_tokens / wall}
    return out


def dialogd(binary, path, prompt_tokens, new_tokens, levels, quantize, kv_cache="auto"):
    cmd = [binary, "bench", "--model", path, "--json", "--prompt-tokens", str(prompt_tokens),
           "--new-tokens", str(new_tokens), "--concurrency", ",".join(map(str, levels)), "--quantize", quantize,
           "--kv-cache", kv_cache]
    run = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return {r["concurrency"]: r for r in map(json.loads, run.stdout.splitlines())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--dialogd", default=os.path.join(ROOT, "target", "release", "dialogd"))
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-q8", action="store_true")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    path = args.model_dir or f"/tmp/dialogd-bench-{args.shape}"
    make_checkpoint(path, args.shape)
    ref = reference(path, args.prompt_tokens, args.new_tokens, levels, args.threads)
    ours = {"f32": dialogd(args.dialogd, path, args.prompt_tokens, args.new_tokens, levels, "none"),
            "f32, f32 cache": dialogd(args.dialogd, path, args.prompt_tokens, args.new_tokens, levels, "none", "f32")}
    if not args.skip_q8:
        ours["q8"] = dialogd(args.dialogd, path, args.prompt_tokens, args.new_tokens, levels, "q8")
    weights_mb = os.path.getsize(os.path.join(path, "model.safetensors")) / 2**20
    result = {"shape": args.shape, "weights_mb": weights_mb, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "pytorch": ref, "dialogd": ours}
    print(json.dumps(result))
    print(f"\nDialoGPT-{args.shape} shape, random weights, {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens, {args.threads} threads", file=sys.stderr)
    print("| weights | metric | PyTorch | dialogd | ratio |", file=sys.stderr)
    print("|---|---|---|---|---|", file=sys.stderr)
    for kind, rows in ours.items():
        r1 = rows[1]
        print(f"| {kind} | batch-1 decode tok/s | {ref[1]['decode_tokens_per_s']:.1f} | "
              f"{r1['decode_tokens_per_s']:.1f} | {r1['decode_tokens_per_s'] / ref[1]['decode_tokens_per_s']:.2f}x |",
              file=sys.stderr)
        print(f"| {kind} | batch-1 TTFT ms | {ref[1]['ttft_ms']:.0f} | {r1['ttft_ms_p50']:.0f} | "
              f"{ref[1]['ttft_ms'] / r1['ttft_ms_p50']:.2f}x faster |", file=sys.stderr)
        for c in levels:
            if c == 1:
                continue
            print(f"| {kind} | {c} concurrent aggregate tok/s | {ref[c]['aggregate_tokens_per_s']:.1f} | "
                  f"{rows[c]['aggregate_tokens_per_s']:.1f} | "
                  f"{rows[c]['aggregate_tokens_per_s'] / ref[c]['aggregate_tokens_per_s']:.2f}x |", file=sys.stderr)
            print(f"| {kind} | {c} concurrent TTFT p99 / batch-1 p50 | | "
                  f"{rows[c]['ttft_ms_p99']:.0f} / {r1['ttft_ms_p50']:.0f} ms | "
                  f"{rows[c]['ttft_ms_p99'] / r1['ttft_ms_p50']:.1f}x |", file=sys.stderr)
            print(f"| {kind} | {c} concurrent TTFT p99 / PyTorch batch-1 | {ref[1]['ttft_ms']:.0f} ms | "
                  f"{rows[c]['ttft_ms_p99']:.0f} ms | {rows[c]['ttft_ms_p99'] / ref[1]['ttft_ms']:.2f}x |", file=sys.stderr)
        peak = max(r['peak_rss_mb'] for r in rows.values())
        print(f"| {kind} | peak RSS MB (checkpoint {weights_mb:.0f} MB) | | {peak:.0f} | {peak - weights_mb:+.0f} MB |",
              file=sys.stderr)


if __name__ == "__main__":
    main()
