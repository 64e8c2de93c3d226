#!/usr/bin/env python3
"""Legacy (pre-1.6, non-zip) torch.save fixtures for dialogd's loader tests.

Run once, by hand, after make_golden.py, with the same environment:

    /tmp/hf/bin/python scripts/make_legacy.py

It writes, from the same `pico` model as tests/fixtures/pico-safetensors:

- tests/fixtures/pico-pkl/: the original DialoGPT layout, a `.pkl` state
  dict without the `transformer.` prefix and with the tied head as
  `lm_head.decoder.weight` (sharing the embedding's storage), f32, written
  by `torch.save(..., _use_new_zipfile_serialization=False)`, beside
  config.json and the tokenizer.
- tests/fixtures/legacy/pico-f16.bin: transformers' naming, f16 storages.
- tests/fixtures/legacy/views.pt: views with offsets and strides into shared
  storages, and old-style storage views (view metadata in the persistent id,
  as torch before 1.0 wrote; built here by hand and read back by torch), with
  views.safetensors holding what each must load as.
- tests/fixtures/legacy/big-endian.pt: a file whose system info says
  big-endian (to be refused).
- tests/fixtures/legacy/os-system.pkl: a legacy header followed by a pickle
  that calls os.system; this script checks that an unrestricted unpickler
  really runs it (torch.load(weights_only=False) creates the marker file).

CI never runs this script; it only reads what it produced.
"""

import collections
import copy
import io
import json
import os
import pickle
import shutil
import struct
import sys

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_golden  # noqa: E402

FIX = make_golden.FIX
LEGACY = os.path.join(FIX, "legacy")
# What the malicious pickle's command creates when an unpickler runs it.
MARKER = "/tmp/dialogd-legacy-pickle-ran"


def legacy_save(obj, path):
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def pico_model():
    spec = make_golden.MODELS["pico"]
    cfg = {k: v for k, v in spec.items() if k != "seed"}
    cfg.update({"vocab_size": 50257, "bos_token_id": make_golden.EOS, "eos_token_id": make_golden.EOS,
                "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5})
    model = make_golden.build_model(cfg, spec["seed"])
    # The committed safetensors copy holds these very weights.
    committed = load_file(os.path.join(FIX, "pico-safetensors", "model.safetensors"))
    for name, value in model.state_dict().items():
        if name in committed:
            assert np.array_equal(committed[name], value.numpy()), name
    return model


def dialogpt_state_dict(model):
    """The original .pkl naming: no `transformer.`, `lm_head.decoder.weight`."""
    out = collections.OrderedDict()
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            out["lm_head.decoder.weight"] = tensor
        else:
            out[name.removeprefix("transformer.")] = tensor
    assert out["lm_head.decoder.weight"].data_ptr() == out["wte.weight"].data_ptr(), "tied"
    return out


def write_pico_pkl(model):
    d = os.path.join(FIX, "pico-pkl")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    model.config.save_pretrained(d)
    path = os.path.join(d, "pico_ft.pkl")
    legacy_save(dialogpt_state_dict(model), path)
    for f in ("vocab.json", "merges.txt"):
        os.symlink(os.path.join("..", "gpt2", f), os.path.join(d, f))
    with open(path, "rb") as f:
        assert not f.read(4).startswith(b"PK"), "legacy, not zip"
    back = torch.load(path, weights_only=True)
    assert back["lm_head.decoder.weight"].data_ptr() == back["wte.weight"].data_ptr(), "tie survives"


def write_f16(model):
    half = copy.deepcopy(model).half()
    state = half.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    legacy_save(state, os.path.join(LEGACY, "pico-f16.bin"))


class Storage:
    """A root storage for the hand-written file: a 1-D tensor and its key."""

    def __init__(self, key, values):
        self.key = key
        self.values = values


class View:
    """`_rebuild_tensor_v2(storage, offset, size, stride, False, {})`, with
    the storage optionally an old-style view `(view_key, offset, numel)`."""

    def __init__(self, storage, offset, size, stride, view=None):
        self.storage, self.offset, self.size, self.stride, self.view = storage, offset, size, stride, view

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (StorageId(self.storage, self.view), self.offset, tuple(self.size), tuple(self.stride),
                 False, collections.OrderedDict()))


class StorageId:
    def __init__(self, storage, view):
        self.storage, self.view = storage, view


STORAGE_TYPES = {torch.float32: torch.FloatStorage, torch.float16: torch.HalfStorage}


class LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageId):
            s = obj.storage
            return ("storage", STORAGE_TYPES[s.values.dtype], s.key, "cpu", s.values.numel(), obj.view)
        return None


def write_by_hand(path, entries, storages):
    """_legacy_save's layout, with persistent ids we choose."""
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True,
                     "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
        LegacyPickler(f, protocol=2).dump(entries)
        keys = sorted(s.key for s in storages)
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            s = next(s for s in storages if s.key == key)
            f.write(struct.pack("<q", s.values.numel()))
            f.write(s.values.numpy().tobytes())


def write_views():
    g = torch.Generator().manual_seed(5)
    flat = torch.randn(20, generator=g)
    half = torch.randn(12, generator=g).half()
    a = Storage("100", flat)
    h = Storage("200", half)
    base = flat[:12].view(3, 4)
    entries = collections.OrderedDict([
        ("base", View(a, 0, (3, 4), (4, 1))),
        ("rows", View(a, 4, (2, 4), (4, 1))),          # base[1:]
        ("transposed", View(a, 0, (4, 3), (1, 4))),    # base.t()
        ("column", View(a, 2, (3,), (4,))),            # base[:, 2]
        ("tail_view", View(a, 1, (2, 3), (3, 1), view=("101", 12, 8))),   # a storage view
        ("tail_view_t", View(a, 0, (2, 2), (1, 2), view=("101", 12, 8))),
        ("half_t", View(h, 0, (4, 3), (1, 4))),
    ])
    expected = {
        "base": base,
        "rows": base[1:],
        "transposed": base.t(),
        "column": base[:, 2],
        "tail_view": flat[12:20][1:7].view(2, 3),
        "tail_view_t": flat[12:20][:4].view(2, 2).t(),
        "half_t": half.view(3, 4).t(),
    }
    path = os.path.join(LEGACY, "views.pt")
    write_by_hand(path, entries, [a, h])
    # torch reads the hand-written file as we say it means.
    back = torch.load(path, weights_only=False)
    for name, want in expected.items():
        assert back[name].dtype == want.dtype and torch.equal(back[name], want), name
    save_file({k: v.contiguous().numpy() for k, v in expected.items()}, os.path.join(LEGACY, "views.safetensors"))


def write_big_endian():
    state = collections.OrderedDict([("wte.weight", torch.arange(6, dtype=torch.float32).view(2, 3))])
    real = sys.byteorder
    try:
        sys.byteorder = "big"
        legacy_save(state, os.path.join(LEGACY, "big-endian.pt"))
    finally:
        sys.byteorder = real
    with open(os.path.join(LEGACY, "big-endian.pt"), "rb") as f:
        f.read(21)
        assert pickle.load(f)["little_endian"] is False


def write_os_system():
    path = os.path.join(LEGACY, "os-system.pkl")
    command = f"touch {MARKER}".encode()
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True,
                     "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
        # os.system("touch MARKER"), by hand: GLOBAL, the argument tuple, REDUCE.
        f.write(b"\x80\x02cos\nsystem\nq\x00X" + struct.pack("<I", len(command)) + command + b"q\x01\x85q\x02Rq\x03.")
    # Proof that it is a real exploit: an unrestricted load runs the command.
    if os.path.exists(MARKER):
        os.remove(MARKER)
    try:
        torch.load(path, weights_only=False)
    except Exception:
        pass  # it runs the command, then finds no storages
    assert os.path.exists(MARKER), "the malicious pickle did not run under an unrestricted load"
    os.remove(MARKER)
    # And torch's own safe loader refuses it.
    try:
        torch.load(path, weights_only=True)
        raise AssertionError("weights_only accepted os.system")
    except pickle.UnpicklingError as e:
        assert "system" in str(e), e


def main():
    os.makedirs(LEGACY, exist_ok=True)
    model = pico_model()
    write_pico_pkl(model)
    write_f16(model)
    write_views()
    write_big_endian()
    write_os_system()
    sizes = {f: os.path.getsize(os.path.join(LEGACY, f)) for f in sorted(os.listdir(LEGACY))}
    print(json.dumps(sizes, indent=1))


if __name__ == "__main__":
    main()
