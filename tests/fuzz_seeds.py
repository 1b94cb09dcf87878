#!/usr/bin/env python3
"""Small model.bin files for tests/test_hostile.py and the fuzz seeds of `make fuzz`.

    python3 tests/fuzz_seeds.py LOAD_DIR TOK_DIR
        writes a few small valid model files into LOAD_DIR (the seeds of tests/fuzz_load)
        and a few texts into TOK_DIR (the seeds of tests/fuzz_tok)

A model file is built from a header dict (the README's field names, see FIELDS), a tokenizer
section and random weights of the size the header implies: fp32, or with build_q8 int8 codes
and fp32 scales (weight type 1). The header of every file here is written by pack_header, so
that a test can patch one field and leave the rest valid.
"""
import struct
import sys

import numpy as np

HEADER = struct.Struct("<4s15i2f4Q4i")
FIELDS = ["magic", "version", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
          "head_dim", "vocab_size", "seq_len", "shared_classifier", "kind", "bos", "eos",
          "chat_start", "chat_end", "rope_theta", "norm_eps", "tok_off", "tok_bytes", "w_off",
          "w_bytes", "add_bos", "pretok", "weight_type", "group"]


def pack_header(h):
    b = HEADER.pack(*[h[k] for k in FIELDS])
    return b + bytes(256 - len(b))


def read_header(data):
    return dict(zip(FIELDS, HEADER.unpack_from(data, 0)))


def matrix_sizes(h):
    """Numbers in each weight group of the file, in file order: (name, count, is a matrix)."""
    d, hid, L, V = h["dim"], h["hidden_dim"], h["n_layers"], h["vocab_size"]
    qd, kvd = h["n_heads"] * h["head_dim"], h["n_kv_heads"] * h["head_dim"]
    groups = [("tok_emb", V * d, True), ("rms_att", L * d, False), ("wq", L * qd * d, True),
              ("wk", L * kvd * d, True), ("wv", L * kvd * d, True), ("wo", L * d * qd, True),
              ("rms_ffn", L * d, False), ("w1", L * hid * d, True), ("w2", L * d * hid, True),
              ("w3", L * hid * d, True), ("rms_final", d, False)]
    return groups + ([] if h["shared_classifier"] else [("wcls", V * d, True)])


def weights_floats(h):
    return sum(n for _, n, _ in matrix_sizes(h))


def pack_tokenizer(tokens, scores=None, flags=None, merges=(), ranges=()):
    """The tokenizer section (README, "Tokenizer"); tokens are bytes."""
    scores = scores or [0.0] * len(tokens)
    flags = flags or [0] * len(tokens)
    out = [struct.pack("<ii", len(tokens), max(map(len, tokens)))]
    for t, s, f in zip(tokens, scores, flags):
        out.append(struct.pack("<fii", s, f, len(t)) + t)
    out.append(struct.pack("<i", len(merges)) + b"".join(struct.pack("<ii", a, b) for a, b in merges))
    out.append(struct.pack("<i", len(ranges)) + b"".join(struct.pack("<IIi", *r) for r in ranges))
    return b"".join(out)


def config(**kw):
    """A small valid header (dim 16, 2 layers, 2 heads of 8, 1 KV head); kw overrides."""
    h = dict(magic=b"TQLM", version=1, dim=16, hidden_dim=32, n_layers=2, n_heads=2,
             n_kv_heads=1, head_dim=8, vocab_size=0, seq_len=64, shared_classifier=1, kind=2,
             bos=-1, eos=-1, chat_start=-1, chat_end=-1, rope_theta=10000.0, norm_eps=1e-5,
             tok_off=256, tok_bytes=0, w_off=0, w_bytes=0, add_bos=0, pretok=1, weight_type=0,
             group=0)
    h.update(kw)
    return h


def build(h, section, seed=0, weights=True):
    """The bytes of a model file: header h (tok_bytes, w_off and w_bytes filled in),
    section, padding, random weights (zeros when weights is False)."""
    h = dict(h)
    h["tok_bytes"] = len(section)
    h["w_off"] = -(-(256 + len(section)) // 64) * 64
    n = weights_floats(h)
    h["w_bytes"] = 4 * n
    w = (0.5 * np.random.default_rng(seed).standard_normal(n)).astype("<f4").tobytes() \
        if weights else bytes(4 * n)
    return pack_header(h) + section + bytes(h["w_off"] - 256 - len(section)) + w


def build_q8(h, section, seed=0):
    """Like build, with int8 weights (README: each matrix group's codes, then one fp32 scale
    per 64 of them; RMSNorm weights fp32): random codes in [-127, 127], scales 0.5 / 127."""
    h = dict(h, weight_type=1, group=64)
    h["tok_bytes"] = len(section)
    h["w_off"] = -(-(256 + len(section)) // 64) * 64
    rng = np.random.default_rng(seed)
    parts = []
    for _, n, matrix in matrix_sizes(h):
        if matrix:
            parts.append(rng.integers(-127, 128, n, dtype=np.int8).tobytes())
            parts.append(np.full(n // 64, 0.5 / 127, dtype="<f4").tobytes())
        else:
            parts.append((1 + 0.1 * rng.standard_normal(n)).astype("<f4").tobytes())
    w = b"".join(parts)
    h["w_bytes"] = len(w)
    return pack_header(h) + section + bytes(h["w_off"] - 256 - len(section)) + w


def smollm2_tokenizer(model_path):
    """(header, tokenizer section) of the real model.bin: a tiny model with SmolLM2's
    tokenizer is config(**special ids of the header) + this section."""
    with open(model_path, "rb") as f:
        h = read_header(f.read(256))
        f.seek(h["tok_off"])
        return h, f.read(h["tok_bytes"])


def tiny_gpt2_section():
    """A byte-level BPE of 256 byte tokens, a few merges and two special tokens; ASCII
    classes only (letters, digits, whitespace)."""
    toks = [bytes([b]) for b in range(256)] + [b"th", b"the", b" the", b"<|im_start|>",
                                                b"<|im_end|>", b"12"]
    flags = [0] * 259 + [1, 1, 0]
    ids = {t: i for i, t in enumerate(toks)}
    merges = [(ids[b"t"], ids[b"h"]), (ids[b"th"], ids[b"e"]), (ids[b" "], ids[b"the"])]
    ranges = [(9, 13, 3), (32, 32, 3), (48, 57, 2), (65, 90, 1), (97, 122, 1)]
    return pack_tokenizer(toks, flags=flags, merges=merges, ranges=ranges)


def tiny_sp_section():
    """llama2.c-style: <unk> <s> </s>, 256 <0xXX> byte tokens, a few scored pieces."""
    toks = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % i for i in range(256)] + \
           [b" ", b"a", b"b", b" a", b"ab", b"\xc3\xa9"]
    scores = [0.0] * 259 + [-10, -10, -10, -1, -2, -10]
    flags = [0, 1, 1] + [0] * 262
    return pack_tokenizer(toks, scores=scores, flags=flags)


def seeds():
    """name -> bytes of small valid models (a few KB each, for the loader fuzzer)."""
    g, s = tiny_gpt2_section(), tiny_sp_section()
    small = dict(dim=8, hidden_dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8)
    q8 = dict(dim=64, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32)  # rows of 64
    return {
        "gpt2.bin": build(config(vocab_size=262, pretok=1, chat_start=259, chat_end=260, **small), g),
        "gpt2_untied.bin": build(config(vocab_size=262, pretok=2, shared_classifier=0, **small), g),
        "sp.bin": build(config(vocab_size=265, kind=1, pretok=0, bos=1, eos=2, add_bos=1, **small), s),
        "gpt2_q8.bin": build_q8(config(vocab_size=262, pretok=1, **q8), g),
        "sp_q8_untied.bin": build_q8(config(vocab_size=265, kind=1, pretok=0, bos=1, eos=2, add_bos=1,
                                            shared_classifier=0, **q8), s),
    }


TEXT_SEEDS = ["Hello, world!", "  leading and trailing  \n\n", "don't I'LL they're 's",
              "2024-01-31 3.14 \u00bd \u0663\u0664", "\u00e9migr\u00e9 e\u0301 \u65e5\u672c\u8a9e \U0001F44B\u200d",
              "<|im_start|>user\nhi<|im_end|>\n", "<|im_start|<|im_end|", "\t\u00a0\u3000\u2028 x\r\n",
              "a" * 300 + " " * 100 + "-=" * 50]


if __name__ == "__main__":
    import os
    if len(sys.argv) != 3:
        sys.exit("usage: fuzz_seeds.py LOAD_DIR TOK_DIR")
    for out, files in ((sys.argv[1], seeds()),
                       (sys.argv[2], {f"text{i}": t.encode() for i, t in enumerate(TEXT_SEEDS)})):
        os.makedirs(out, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(out, name), "wb") as f:
                f.write(data)
