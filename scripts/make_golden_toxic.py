#!/usr/bin/env python3
"""Golden probabilities for dialogd's toxicity-classifier parity tests.

Run once, by hand, with Hugging Face transformers and CPU torch installed
(the same environment as scripts/make_golden.py):

    /tmp/hf/bin/python scripts/make_golden_toxic.py

It writes, under `tests/fixtures/classifiers/`:

- `bert.json`, `roberta.json`, `xlmr.json`: tiny tokenizers (WordPiece as
  BERT's and DistilBERT's, byte-level BPE as RoBERTa's, Unigram with
  Metaspace as XLM-R's), trained here on a few lines of text;
- `golden.json` (small): per model its `config.json`, the names and shapes
  of its tensors, and the probabilities transformers gives for 20 texts;
- `distilbert-single/pytorch_model.bin` (about 90 KB): one model kept as a
  pickle, so the `.bin` path is tested on a file torch itself wrote.

CI never runs this script. The weights are not committed (but for that one
`.bin`): every tensor follows the formula of make_golden.py
(`src/model/synthetic.rs`), keyed by its name and this model's seed, with
rules per kind of tensor (`init_kind` below, `safety::synthetic` in Rust),
so the Rust tests write the very same `model.safetensors`.

Eight models: BertForSequenceClassification, RobertaForSequenceClassification,
XLMRobertaForSequenceClassification and DistilBertForSequenceClassification,
each multi-label (Detoxify's six labels, `problem_type =
"multi_label_classification"`: a sigmoid per label) and single-label
(`neutral`/`toxic`, softmax; the RoBERTa one leaves `problem_type` unset,
as s-nlp/roberta_toxicity_classifier does).

Long texts: a model reads at most `max_position_embeddings` tokens (minus
`pad_token_id + 1` for RoBERTa and XLM-R, whose positions start after the
pad). dialogd does not cut a long text there: the tokenizer's truncation
with overflow splits it into windows of that many tokens (special tokens
included) overlapping by `stride` = window / 8 tokens, every window is
classified, and each label takes its highest probability over the windows
(toxicity anywhere in the text counts). This script does the same through
the `tokenizers` library (what transformers' fast tokenizers run), so the
windows are the library's. The tiny models have 64-token windows so the
long texts here cover several.
"""

import json
import os
import sys

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_golden as mg  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "tests", "fixtures", "classifiers")

# Rules per kind of tensor (see init_kind): center + scale * U(-1, 1), the
# scale divided by sqrt(fan-in) for projection matrices (torch's Linear is
# [out, in]: fan-in is the second dimension). Larger than a trained model's
# spread, so the random classifiers' probabilities cover (0, 1).
INIT = {
    "embedding": {"center": 0.0, "scale": 1.0, "fan_in": False},
    "norm_weight": {"center": 1.0, "scale": 0.5, "fan_in": False},
    "norm_bias": {"center": 0.0, "scale": 0.3, "fan_in": False},
    "linear": {"center": 0.0, "scale": 2.0, "fan_in": True},
    "head": {"center": 0.0, "scale": 4.0, "fan_in": True},
    "bias": {"center": 0.0, "scale": 0.2, "fan_in": False},
}

HEADS = ("classifier.weight", "classifier.out_proj.weight")


def init_kind(name):
    if "norm" in name.lower():
        return "norm_weight" if name.endswith("weight") else "norm_bias"
    if "embeddings" in name:
        return "embedding"
    if name.endswith("bias"):
        return "bias"
    if name in HEADS:
        return "head"
    return "linear"


def synthetic_tensor(name, shape, seed):
    spec = INIT[init_kind(name)]
    n = int(np.prod(shape))
    scale = spec["scale"]
    if spec["fan_in"]:
        scale = scale / np.sqrt(np.float64(shape[1]))
    v = spec["center"] + scale * mg.splitmix_uniform(mg.fnv1a64(name) ^ seed, n)
    return v.astype(np.float32).reshape(shape)


CORPUS = [
    "you are a wonderful person and i like talking to you",
    "shut up you stupid idiot, nobody wants you here",
    "the weather in scunthorpe is grey again today",
    "I will find you and hurt you",
    "what a lovely day for a walk in the park",
    "go away, you worthless piece of garbage",
    "Thanks for the help with my homework!",
    "this movie was absolute trash and so are you",
    "can you recommend a good book about history?",
    "Café, naïve, résumé: accents are words too",
    "Ünïcödé tëxt ånd émoji 🙂🔥 are fine",
    "日本語のテキストも少しあります",
    "русский текст тоже встречается",
    "مرحبا بالعالم",
    "lol ok 123 456 7890 http://example.com/path?q=1",
    "hate hate hate kill kill die",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "The quick brown fox jumps over the lazy dog.",
]

TEXTS = [
    "hello there, how are you?",
    "you are a stupid idiot",
    "",
    "   ",
    "!",
    "I will find you and hurt you",
    "Thanks for the help with my homework!",
    "Café naïve résumé",
    "Ünïcödé 🙂🔥 emoji only 🙂🙂🙂",
    "日本語のテキスト",
    "русский текст",
    "مرحبا بالعالم",
    "lol ok 123 http://example.com/path?q=1",
    "SHUT UP YOU WORTHLESS PIECE OF GARBAGE",
    "the weather in scunthorpe is grey",
    "a\nnew\tline and tabs",
    # Past the tiny models' 64-token window: a few windows, the insult at the end.
    " ".join(["what a lovely day for a walk in the park"] * 8) + " go away you worthless garbage",
    # Past 512 tokens too, for any window: many windows.
    " ".join(["can you recommend a good book about history"] * 70),
    "hate " * 40,
    "zzzz qqqq xxxx unseen wordpieces",
]

DETOXIFY = ["toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"]
SINGLE = ["neutral", "toxic"]
WINDOW_TOKENS = 64


def train_tokenizer(kind):
    if kind == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        trainer = trainers.WordPieceTrainer(vocab_size=220, special_tokens=special)
        tok.train_from_iterator(CORPUS, trainer)
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        tok.decoder = decoders.WordPiece()
    elif kind == "roberta":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        trainer = trainers.BpeTrainer(
            vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(CORPUS, trainer)
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        tok.decoder = decoders.ByteLevel()
    else:
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        special = ["<s>", "<pad>", "</s>", "<unk>"]
        trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=special, unk_token="<unk>")
        tok.train_from_iterator(CORPUS, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
        tok.decoder = decoders.Metaspace()
    return tok


def model_config(arch, vocab, labels, problem_type):
    common = dict(
        num_labels=len(labels),
        id2label={i: l for i, l in enumerate(labels)},
        label2id={l: i for i, l in enumerate(labels)},
    )
    if problem_type is not None:
        common["problem_type"] = problem_type
    if arch == "distilbert":
        return DistilBertConfig(
            vocab_size=vocab, dim=24, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=WINDOW_TOKENS,
            activation="gelu", pad_token_id=0, **common,
        )
    if arch == "bert":
        return BertConfig(
            vocab_size=vocab, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=WINDOW_TOKENS, type_vocab_size=2, pad_token_id=0, hidden_act="gelu", **common,
        )
    cls = RobertaConfig if arch == "roberta" else XLMRobertaConfig
    return cls(
        vocab_size=vocab, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=WINDOW_TOKENS + 2, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, hidden_act="gelu", **common,
    )


MODEL_CLASSES = {
    "bert": BertForSequenceClassification,
    "roberta": RobertaForSequenceClassification,
    "xlmr": XLMRobertaForSequenceClassification,
    "distilbert": DistilBertForSequenceClassification,
}
TOKENIZER_OF = {"bert": "bert", "distilbert": "bert", "roberta": "roberta", "xlmr": "xlmr"}

# name -> (architecture, labels, problem_type, seed)
MODELS = {
    "bert-multi": ("bert", DETOXIFY, "multi_label_classification", 31),
    "bert-single": ("bert", SINGLE, "single_label_classification", 32),
    "roberta-multi": ("roberta", DETOXIFY, "multi_label_classification", 33),
    "roberta-single": ("roberta", SINGLE, None, 34),
    "xlmr-multi": ("xlmr", DETOXIFY, "multi_label_classification", 35),
    "xlmr-single": ("xlmr", SINGLE, "single_label_classification", 36),
    "distilbert-multi": ("distilbert", DETOXIFY, "multi_label_classification", 37),
    "distilbert-single": ("distilbert", SINGLE, "single_label_classification", 38),
}


def build(arch, config, seed):
    model = MODEL_CLASSES[arch](config)
    model.eval()
    state = model.state_dict()
    tensors = []
    new_state = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        new_state[name] = torch.from_numpy(synthetic_tensor(name, tuple(tensor.shape), seed))
        tensors.append([name, list(tensor.shape)])
    missing, unexpected = model.load_state_dict(new_state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return model, tensors


def window_of(arch, config):
    if arch in ("roberta", "xlmr"):
        return config.max_position_embeddings - config.pad_token_id - 1
    return config.max_position_embeddings


def windows(tok, text, window):
    tok.enable_truncation(max_length=window, stride=window // 8)
    enc = tok.encode(text)
    tok.no_truncation()
    return [enc] + list(enc.overflowing)


@torch.no_grad()
def probabilities(model, config, ids):
    pad = config.pad_token_id
    longest = max(len(w) for w in ids)
    input_ids = torch.tensor([w + [pad] * (longest - len(w)) for w in ids])
    mask = torch.tensor([[1] * len(w) + [0] * (longest - len(w)) for w in ids])
    logits = model(input_ids=input_ids, attention_mask=mask).logits.double()
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def main():
    torch.set_grad_enabled(False)
    os.makedirs(FIX, exist_ok=True)
    toks = {}
    for kind in ("bert", "roberta", "xlmr"):
        tok = train_tokenizer(kind)
        tok.save(os.path.join(FIX, f"{kind}.json"), pretty=False)
        toks[kind] = Tokenizer.from_file(os.path.join(FIX, f"{kind}.json"))
    out = {"init": INIT, "texts": TEXTS, "models": {}}
    for name, (arch, labels, problem_type, seed) in MODELS.items():
        tok = toks[TOKENIZER_OF[arch]]
        config = model_config(arch, tok.get_vocab_size(), labels, problem_type)
        model, tensors = build(arch, config, seed)
        window = window_of(arch, config)
        probs, n_windows, first_ids = [], [], []
        for text in TEXTS:
            ws = windows(tok, text, window)
            assert all(len(w.ids) <= window for w in ws)
            p = probabilities(model, config, [w.ids for w in ws]).max(dim=0).values
            # Each window alone gives the same as the padded batch.
            for i, w in enumerate(ws):
                alone = probabilities(model, config, [w.ids])[0]
                batch = probabilities(model, config, [x.ids for x in ws])[i]
                assert torch.allclose(alone, batch, atol=1e-5), (name, text)
            probs.append([round(float(x), 7) for x in p])
            n_windows.append(len(ws))
            first_ids.append(ws[0].ids)
        config_dict = config.to_dict()
        config_dict["architectures"] = [MODEL_CLASSES[arch].__name__]
        for key in ("transformers_version", "dtype", "torch_dtype", "output_attentions"):
            config_dict.pop(key, None)
        out["models"][name] = {
            "architecture": MODEL_CLASSES[arch].__name__,
            "tokenizer": TOKENIZER_OF[arch],
            "seed": seed,
            "window": window,
            "config": config_dict,
            "tensors": tensors,
            "windows": n_windows,
            "first_window_ids": first_ids,
            "probabilities": probs,
        }
        if name == "distilbert-single":
            folder = os.path.join(FIX, name)
            os.makedirs(folder, exist_ok=True)
            torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
            with open(os.path.join(folder, "config.json"), "w") as f:
                json.dump(config_dict, f, indent=1, sort_keys=True)
        spread = np.array(probs)
        print(f"{name}: {arch}, window {window}, probabilities {spread.min():.3f}..{spread.max():.3f}, "
              f"windows {max(n_windows)} at most")
    with open(os.path.join(FIX, "golden.json"), "w") as f:
        json.dump(out, f, separators=(",", ":"), ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
