#!/usr/bin/env python3
"""Golden outputs for dialogd's ranking parity tests (DialogRPT and MMI).

Run once, by hand, with Hugging Face transformers and CPU torch installed
(the same environment as scripts/make_golden.py):

    /tmp/hf/bin/python scripts/make_golden_rpt.py

It writes `tests/fixtures/golden/rpt.json` (small). CI never runs this
script; the Rust tests rebuild the same checkpoints from the deterministic
formula of make_golden.py (`src/model/synthetic.rs`), which this script
extends with one rule, `score` (the head `score.weight`, `[1, n_embd]`).

Rankers are `GPT2ForSequenceClassification` (num_labels 1, no bias), the
layout of microsoft/DialogRPT-*. Input: the context turns, each followed by
<|endoftext|>, then the candidate with no separator after it. The reference
score is sigmoid(logit at the candidate's last token): we take the logits of
every position (`score(transformer(ids).last_hidden_state)`) and index
position len - 1 ourselves, instead of trusting the pooled position
transformers picks (older releases counted non-pad tokens, and 50256 is both
the pad and the turn separator). A batched, right-padded run with an
attention mask is checked against the one-at-a-time reference here too.

MMI: a reverse GPT-2 LM scores -mean NLL of the source tokens given
`candidate <|endoftext|>`. The source is the context turns *newest first*,
each followed by <|endoftext|>: DialoGPT's reverse models were trained on
data made by the original `prepro.py --reverse` (microsoft/DialoGPT), which
reverses the whole list of turns [context..., response] before joining them
with <|endoftext|>, so the model reads the response, then the turn it
answered, then the one before. Only whole turns that fit the budget
(n_positions - longest candidate - 1) are kept, the newest ones, as for a
forward prompt; a single newest turn too long for it keeps its end. Each
multi-turn case also records the scores of the oldest-first source, the
order dialogd used to get wrong, so the test shows the two differ.
"""

import json
import os
import sys

import numpy as np
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_golden as mg  # noqa: E402

EOS = mg.EOS
INIT = dict(mg.INIT)
INIT["score"] = {"center": 0.0, "scale": 0.25, "fan_in": False}

# One tiny ranker per DialogRPT head, each its own shape and seed.
RANKERS = {
    "updown": {"n_embd": 64, "n_layer": 3, "n_head": 4, "seed": 21},
    "depth": {"n_embd": 32, "n_layer": 2, "n_head": 2, "seed": 22},
    "width": {"n_embd": 48, "n_layer": 2, "n_head": 4, "seed": 23},
    "human-vs-rand": {"n_embd": 64, "n_layer": 2, "n_head": 8, "seed": 24},
    "human-vs-machine": {"n_embd": 32, "n_layer": 1, "n_head": 4, "seed": 25},
}
# DialogRPT's restore/ensemble.yml.
ENSEMBLE = {
    "prior": [["human-vs-rand", 0.5], ["human-vs-machine", 0.5]],
    "cond": [["updown", 1.0], ["depth", 0.48], ["width", -0.5]],
}
MMI = {"n_embd": 64, "n_layer": 2, "n_head": 4, "seed": 31}

CONTEXTS = [
    ["Does money buy happiness?"],
    ["Does money buy happiness?", "Depends how much money you spend on it.", "What is the best way to buy happiness?"],
    ["I typed <|endoftext|> to break you", "haha nice try"],
    ["Caf\u00e9 \u4f60\u597d \U0001F600", "tabs\tand\nnewlines"],
]
CANDIDATES = [
    "Yes.",
    "You just have to be a millionaire by your early 20s, then you can be happy.",
    "I don't know <|endoftext|> maybe",
    "lol",
    "Money can't buy happiness, but it can buy a boat.",
]


def config_for(spec):
    cfg = {k: v for k, v in spec.items() if k != "seed"}
    cfg.update({"vocab_size": 50257, "n_positions": 128, "bos_token_id": EOS, "eos_token_id": EOS,
                "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5})
    return cfg


def build_ranker(cfg, seed):
    config = GPT2Config(**cfg, num_labels=1, pad_token_id=EOS)
    model = GPT2ForSequenceClassification(config)
    model.eval()
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
            continue
        canonical = name[len("transformer."):] if name.startswith("transformer.") else name
        state[name] = torch.from_numpy(mg.synthetic_tensor(canonical, tuple(tensor.shape), seed, INIT))
    assert "score.weight" in state and tuple(state["score.weight"].shape) == (1, cfg["n_embd"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(m.endswith("attn.bias") or m.endswith("masked_bias") for m in missing), missing
    assert model.score.bias is None
    return model


def all_position_logits(model, ids, attention_mask=None):
    hidden = model.transformer(input_ids=ids, attention_mask=attention_mask).last_hidden_state
    return model.score(hidden)[..., 0].double()


def ranker_cases(model, tok):
    cases = []
    with torch.no_grad():
        for turns in CONTEXTS:
            context_ids = mg.prompt_ids(tok, turns)
            candidate_ids = [mg.encode_user(tok, c) for c in CANDIDATES]
            seqs = [context_ids + c for c in candidate_ids]
            logits, pooled = [], []
            for seq in seqs:
                ids = torch.tensor([seq])
                logits.append(float(all_position_logits(model, ids)[0, len(seq) - 1]))
                pooled.append(float(model(ids).logits[0, 0]))
            # Batched, right-padded, mask from lengths: same numbers.
            width = max(len(s) for s in seqs)
            batch = torch.tensor([s + [EOS] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            batched = all_position_logits(model, batch, mask)
            for row, seq in enumerate(seqs):
                assert abs(float(batched[row, len(seq) - 1]) - logits[row]) < 1e-4, (row, turns)
            scores = [float(1 / (1 + np.exp(-x))) for x in logits]
            cases.append({"turns": turns, "candidates": CANDIDATES, "context_ids": context_ids,
                          "candidate_ids": candidate_ids, "logits": logits, "scores": scores,
                          "hf_pooled_logits": pooled})
    return cases


# Multi-turn contexts for MMI beyond CONTEXTS: the example, a
# four-turn exchange, and one too long for the 128 positions of the tiny
# reverse model (its oldest turns are dropped).
MMI_CONTEXTS = CONTEXTS + [
    ["I like pizza", "why pizza?"],
    ["hi", "hello there, how are you?", "fine thanks. and you?", "great, just got back from Paris"],
    ["turn one is about the weather and how cold it was last winter in the mountains near the lake"] * 1
    + ["turn %d goes on about trains, timetables, platforms and the coffee at the station kiosk" % i for i in range(2, 7)],
]


def reverse_source(tok, turns, budget):
    """The MMI source: the newest turns that fit `budget`, newest first,
    each followed by <|endoftext|> (prepro.py --reverse)."""
    encoded = [mg.encode_user(tok, t) for t in turns]
    kept, used = [], 0
    for ids in reversed(encoded):
        if used + len(ids) + 1 > budget:
            break
        kept.append(ids)
        used += len(ids) + 1
    if not kept:
        return encoded[-1][len(encoded[-1]) - (budget - 1):] + [EOS], 1
    return [i for ids in kept for i in ids + [EOS]], len(kept)


def source_score(model, cand_ids, source):
    ids = cand_ids + [EOS] + source
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    start = len(cand_ids) + 1
    nll = [-float(logp[pos - 1, ids[pos]]) for pos in range(start, len(ids))]
    return -float(np.mean(nll))


def mmi_cases(model, tok, n_positions):
    cases = []
    with torch.no_grad():
        for turns in MMI_CONTEXTS:
            cand_ids = [mg.encode_user(tok, c) for c in CANDIDATES]
            budget = n_positions - max(len(c) for c in cand_ids) - 1
            source, kept = reverse_source(tok, turns, budget)
            scores = [source_score(model, c, source) for c in cand_ids]
            case = {"turns": turns, "candidates": CANDIDATES, "turns_kept": kept, "source_ids": source, "scores": scores}
            if kept > 1:
                oldest_first = mg.prompt_ids(tok, turns[len(turns) - kept:])
                case["scores_oldest_first"] = [source_score(model, c, oldest_first) for c in cand_ids]
            cases.append(case)
    return cases


def main():
    tok = mg.tokenizer()
    out = {"init": INIT, "ensemble": ENSEMBLE, "rankers": {}, "mmi": {}}
    for name, spec in RANKERS.items():
        cfg = config_for(spec)
        model = build_ranker(cfg, spec["seed"])
        cases = ranker_cases(model, tok)
        for c in cases:
            print(name, ["%.4f" % s for s in c["scores"]])
        out["rankers"][name] = {"config": cfg, "seed": spec["seed"], "cases": cases}
    # The ensemble of DialogRPT's ensemble.yml: weighted means, then a product.
    final = []
    for idx in range(len(CONTEXTS)):
        def avg(group):
            num = sum(w * np.array(out["rankers"][n]["cases"][idx]["scores"]) for n, w in ENSEMBLE[group])
            return num / sum(w for _, w in ENSEMBLE[group])
        final.append((avg("prior") * avg("cond")).tolist())
    out["ensemble_final"] = final
    cfg = config_for(MMI)
    mmi = mg.build_model(cfg, MMI["seed"])
    out["mmi"] = {"config": cfg, "seed": MMI["seed"], "cases": mmi_cases(mmi, tok, cfg["n_positions"])}
    print("mmi", [["%.3f" % s for s in c["scores"]] for c in out["mmi"]["cases"]])
    path = os.path.join(mg.FIX, "golden", "rpt.json")
    with open(path, "w") as f:
        json.dump(out, f, ensure_ascii=False)
    print("wrote", path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
