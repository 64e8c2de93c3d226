#!/usr/bin/env python3
"""dialogd's CPU generation speed beside the engines a user would pick instead.

One run measures, on the same machine and the same random-weight DialoGPT
checkpoint (written with transformers' save_pretrained):

  - PyTorch + transformers (f32, eager), as in bench/compare_hf.py;
  - CTranslate2 `Generator.generate_batch`, converted with
    `ct2-transformers-converter` to float32 and to int8, greedy, exactly N new
    tokens (min_length = max_length = N, prompt forwarded at once with
    include_prompt_in_result=False), intra_threads = --threads;
  - `dialogd bench --json` with `--quantize none` and `--quantize q8`;

and prints each dialogd figure as a ratio against its peer from the same
round (8-bit against CTranslate2 int8, f32 against CTranslate2 float32 and
PyTorch). Rounds run back to back; each round has its own peer runs, so a
slow patch of a shared machine hits both sides of a ratio.

Optional dependencies (CI never runs this):

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install numpy torch transformers safetensors ctranslate2
    cargo build --release
    /tmp/hf/bin/python bench/compare_peers.py [--shape small|medium] [--rounds 3] [--threads N]

Figures per engine and concurrency C (C prompts of P tokens, N new tokens):
  batch-1 TTFT (a 1-token generation), batch-1 decode tokens/s
  ((N - 1) / (total - TTFT)), aggregate tokens/s (C * N / wall) for C > 1.
dialogd's figures come from its own bench (continuous batching, arrivals at
once), the peers' from one static batch of C prompts: the same work, measured
as each engine is used. The raw results go to
bench/results/YYYY-MM-DD-<shape>-cpu-peers.json with the CPU's model name.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_hf  # noqa: E402  (same folder: checkpoint, prompts, PyTorch and dialogd runs)

ROOT = compare_hf.ROOT


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def convert(path, quantization):
    out = f"{path}-ct2-{quantization}"
    if not os.path.exists(os.path.join(out, "model.bin")):
        beside = os.path.join(os.path.dirname(sys.executable), "ct2-transformers-converter")
        tool = beside if os.path.exists(beside) else "ct2-transformers-converter"
        subprocess.run([tool, "--model", path, "--output_dir", out,
                        "--quantization", quantization, "--force"], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def ctranslate2_run(model_dir, compute_type, path, prompt_tokens, new_tokens, levels, threads):
    import ctranslate2

    vocab = json.load(open(os.path.join(path, "vocab.json")))
    token_of = {i: t for t, i in vocab.items()}
    gen = ctranslate2.Generator(model_dir, device="cpu", compute_type=compute_type,
                                inter_threads=1, intra_threads=threads)

    def tokens(n, seed):
        return [[token_of[int(i)] for i in row] for row in compare_hf.prompts(n, prompt_tokens, seed)]

    def generate(batch, n):
        results = gen.generate_batch(batch, max_length=n, min_length=n, sampling_topk=1,
                                     include_prompt_in_result=False)
        got = {len(r.sequences_ids[0]) for r in results}
        if got != {n}:
            raise SystemExit(f"CTranslate2 generated {sorted(got)} tokens, not exactly {n}")

    generate(tokens(1, 99), 4)  # warm-up
    x = tokens(1, 1)
    t0 = time.perf_counter()
    generate(x, 1)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    generate(x, new_tokens)
    total = time.perf_counter() - t0
    out = {1: {"ttft_ms": ttft * 1e3, "decode_tokens_per_s": (new_tokens - 1) / (total - ttft),
               "aggregate_tokens_per_s": new_tokens / total}}
    for c in levels:
        if c == 1:
            continue
        x = tokens(c, c)
        t0 = time.perf_counter()
        generate(x, new_tokens)
        out[c] = {"aggregate_tokens_per_s": c * new_tokens / (time.perf_counter() - t0)}
    return out


def one_round(args, path, ct2_dirs, levels):
    r = {"pytorch": compare_hf.reference(path, args.prompt_tokens, args.new_tokens, levels, args.threads)}
    for q, d in ct2_dirs.items():
        r[f"ctranslate2 {q}"] = ctranslate2_run(d, q, path, args.prompt_tokens, args.new_tokens, levels, args.threads)
    r["dialogd f32"] = compare_hf.dialogd(args.dialogd, path, args.prompt_tokens, args.new_tokens, levels, "none")
    r["dialogd q8"] = compare_hf.dialogd(args.dialogd, path, args.prompt_tokens, args.new_tokens, levels, "q8")
    return r


def figures(rows, levels):
    """(metric name, value, higher-is-better) for one engine's rows."""
    one = rows[1]
    out = [("batch-1 decode tok/s", one["decode_tokens_per_s"], True),
           ("batch-1 TTFT ms", one.get("ttft_ms", one.get("ttft_ms_p50")), False)]
    for c in levels:
        if c != 1:
            out.append((f"aggregate tok/s @{c}", rows[c]["aggregate_tokens_per_s"], True))
    return out


def print_tables(rounds, levels, header):
    pairs = [("dialogd q8", "ctranslate2 int8"), ("dialogd f32", "ctranslate2 float32"), ("dialogd f32", "pytorch")]
    print(header, file=sys.stderr)
    print("| dialogd | peer | metric | peer (rounds) | dialogd (rounds) | ratio, >1 = dialogd better |", file=sys.stderr)
    print("|---|---|---|---|---|---|", file=sys.stderr)
    for ours, peer in pairs:
        per_round = [(figures(r[ours], levels), figures(r[peer], levels)) for r in rounds]
        for k, (name, _, higher) in enumerate(per_round[0][0]):
            o = [pr[0][k][1] for pr in per_round]
            p = [pr[1][k][1] for pr in per_round]
            ratio = [(a / b) if higher else (b / a) for a, b in zip(o, p)]
            fmt = lambda xs, f: " / ".join(f.format(x) for x in xs)  # noqa: E731
            print(f"| {ours} | {peer} | {name} | {fmt(p, '{:.1f}')} | {fmt(o, '{:.1f}')} | "
                  f"{fmt(ratio, '{:.2f}x')} |", file=sys.stderr)
    for ours in ("dialogd f32", "dialogd q8"):
        for c in levels:
            if c != 1:
                p99 = [r[ours][c]["ttft_ms_p99"] for r in rounds]
                print(f"| {ours} | | TTFT p99 @{c} ms | | {' / '.join(f'{x:.0f}' for x in p99)} | |", file=sys.stderr)
        rss = [max(row["peak_rss_mb"] for row in r[ours].values()) for r in rounds]
        print(f"| {ours} | | peak RSS MB | | {' / '.join(f'{x:.0f}' for x in rss)} | |", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="small", choices=sorted(compare_hf.SHAPES))
    ap.add_argument("--model-dir", default=None, help="checkpoint folder (made here when missing)")
    ap.add_argument("--dialogd", default=os.path.join(ROOT, "target", "release", "dialogd"))
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/DATE-SHAPE-cpu-peers.json)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if 1 not in levels:
        levels.insert(0, 1)
    path = args.model_dir or f"/tmp/dialogd-bench-{args.shape}"
    compare_hf.make_checkpoint(path, args.shape)
    ct2_dirs = {"float32": convert(path, "float32"), "int8": convert(path, "int8")}
    rounds = [one_round(args, path, ct2_dirs, levels) for _ in range(args.rounds)]
    cpu = cpu_name()
    result = {"date": datetime.date.today().isoformat(), "cpu": cpu, "threads": args.threads,
              "shape": args.shape, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "concurrency": levels, "dialogd": os.path.abspath(args.dialogd),
              "load_average": os.getloadavg(), "rounds": rounds}
    out = args.out or os.path.join(ROOT, "bench", "results",
                                   f"{result['date']}-{args.shape}-cpu-peers.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(out)
    print_tables(rounds, levels,
                 f"\n{cpu}, {args.threads} threads; DialoGPT-{args.shape} shape, random weights, "
                 f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, {args.rounds} rounds")


if __name__ == "__main__":
    main()
