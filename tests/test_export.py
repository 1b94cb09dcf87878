"""Tests for export.py: build tiny random models (GGUF, Hugging Face folder, llama2.c .bin),
export them, read model.bin back with an independent reader and compare with the sources."""
import json
import os
import pathlib
import struct
import subprocess
import sys
import time
import unicodedata

import numpy as np

from conftest import SMOL_GGUF_PATHS, bytes_to_unicode  # noqa: E402
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXPORT = ROOT / "export.py"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ("The quick brown fox jumps over the lazy dog. In 2024 there were 12345 foxes, "
        "then 678 more; the dog said: hello there! Ünïcödé wörds and the thé. ") * 20


# ----------------------------------------------------------------------------------------
# an independent model.bin reader

def read_model(path):
    data = pathlib.Path(path).read_bytes()
    h = {}
    assert data[:4] == b"TQLM"
    names = ["version", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
             "vocab_size", "seq_len", "shared_classifier", "kind", "bos", "eos", "chat_start",
             "chat_end"]
    for i, n in enumerate(names):
        h[n] = struct.unpack_from("<i", data, 4 + 4 * i)[0]
    h["rope_theta"], h["norm_eps"] = struct.unpack_from("<ff", data, 64)
    h["tok_off"], h["tok_bytes"], h["w_off"], h["w_bytes"] = struct.unpack_from("<4Q", data, 72)
    h["add_bos"], h["pretok"] = struct.unpack_from("<ii", data, 104)
    h["weight_type"], h["group"] = struct.unpack_from("<ii", data, 112)
    assert (h["weight_type"], h["group"]) in ((0, 0), (1, 64)), (h["weight_type"], h["group"])
    assert data[120:256] == bytes(136), "header padding must be zero"
    assert h["tok_off"] == 256
    assert h["w_off"] % 64 == 0
    assert h["w_off"] >= h["tok_off"] + h["tok_bytes"]
    assert data[h["tok_off"] + h["tok_bytes"]:h["w_off"]] == bytes(h["w_off"] - h["tok_off"]
                                                                  - h["tok_bytes"])
    assert len(data) == h["w_off"] + h["w_bytes"], "file must end right after the weights"

    # tokenizer
    p = h["tok_off"]
    n_vocab, max_len = struct.unpack_from("<ii", data, p)
    p += 8
    toks, scores, flags = [], [], []
    for _ in range(n_vocab):
        s, f, n = struct.unpack_from("<fii", data, p)
        p += 12
        toks.append(data[p:p + n])
        p += n
        scores.append(s)
        flags.append(f)
    (n_merges,) = struct.unpack_from("<i", data, p)
    p += 4
    merges = [tuple(x) for x in
              np.frombuffer(data, "<i4", 2 * n_merges, p).reshape(-1, 2).tolist()]
    p += 8 * n_merges
    (n_ranges,) = struct.unpack_from("<i", data, p)
    p += 4
    ranges = [struct.unpack_from("<IIi", data, p + 12 * i) for i in range(n_ranges)]
    p += 12 * n_ranges
    assert p == h["tok_off"] + h["tok_bytes"], "tokenizer_bytes must match its content"
    assert n_vocab == h["vocab_size"]
    assert max_len == max(len(t) for t in toks)
    tok = dict(tokens=toks, scores=scores, flags=flags, merges=merges, ranges=ranges)

    # weights
    d, hd, L, V = h["dim"], h["head_dim"], h["n_layers"], h["vocab_size"]
    nq, nkv, hid = h["n_heads"] * hd, h["n_kv_heads"] * hd, h["hidden_dim"]
    layout = [("tok_emb", (V, d)), ("rms_att", (L, d)), ("wq", (L, nq, d)), ("wk", (L, nkv, d)),
              ("wv", (L, nkv, d)), ("wo", (L, d, nq)), ("rms_ffn", (L, d)),
              ("w1", (L, hid, d)), ("w2", (L, d, hid)), ("w3", (L, hid, d)),
              ("rms_final", (d,))]
    if not h["shared_classifier"]:
        layout.append(("wcls", (V, d)))
    w = {}
    p = h["w_off"]
    for name, shape in layout:
        n = int(np.prod(shape))
        if h["weight_type"] == 1 and name not in ("rms_att", "rms_ffn", "rms_final"):
            # int8: the codes of the whole group (all layers), then one fp32 scale per 64
            w[name] = np.frombuffer(data, "<i1", n, p).reshape(shape)
            p += n
            w[name + ".scale"] = np.frombuffer(data, "<f4", n // 64, p).reshape(
                shape[:-1] + (shape[-1] // 64,))
            p += 4 * (n // 64)
        else:
            w[name] = np.frombuffer(data, "<f4", n, p).reshape(shape)
            p += 4 * n
    assert p == len(data), "weights_bytes must equal the sum of the listed tensors"
    return h, tok, w


def run_export(*args, check=True):
    p = subprocess.run([sys.executable, str(EXPORT)] + [str(a) for a in args],
                       capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, p.stderr
    return p




B2U = bytes_to_unicode()
U2B = {c: b for b, c in B2U.items()}


def unmap(s):
    return bytes(U2B[c] for c in s)


# ----------------------------------------------------------------------------------------
# a small byte-level BPE vocabulary, trained with the tokenizers library

@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    t.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator([TEXT], trainer=tr)
    j = json.loads(t.to_str())
    vocab = j["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in j["model"]["merges"]]
    tokens = [None] * len(vocab)
    for s, i in vocab.items():
        tokens[i] = s
    assert None not in tokens and len(tokens) > 280
    return dict(tokenizer=t, json=j, tokens=tokens, merges=merges)


def expected_gpt2_tokens(tokens):
    return [s.encode() if s in SPECIALS else unmap(s) for s in tokens]


def check_gpt2_tokenizer(tok, bpe, pretok_ranges=True):
    tokens = bpe["tokens"]
    exp = expected_gpt2_tokens(tokens)
    assert tok["tokens"][:len(exp)] == exp
    for i, s in enumerate(tokens):
        assert tok["flags"][i] == (1 if s in SPECIALS else 0), s
    assert all(s == 0.0 for s in tok["scores"])
    ids = {s: i for i, s in enumerate(tokens)}
    assert tok["merges"] == [(ids[a], ids[b]) for a, b in bpe["merges"]]
    for l, r in tok["merges"]:     # every merge produces a vocabulary token
        assert tok["tokens"][l] + tok["tokens"][r] in exp
    # the tokenizers library's own encoding decodes, via our bytes, to the text
    text = "the lazy fox, 12 foxes. Ünïcödé thé!"
    enc = bpe["tokenizer"].encode(text).ids
    assert b"".join(tok["tokens"][i] for i in enc) == text.encode()
    if pretok_ranges:
        check_ranges(tok["ranges"])


def check_ranges(ranges):
    assert ranges, "GPT-2 kind needs Unicode ranges"
    prev_hi = -1
    prev = None
    for lo, hi, c in ranges:
        assert lo <= hi and lo > prev_hi and c in (1, 2, 3)
        if prev is not None and prev[1] + 1 == lo:
            assert prev[2] != c, "ranges must be maximal"
        prev, prev_hi = (lo, hi, c), hi

    def cls(ch):
        cp = ord(ch)
        for lo, hi, c in ranges:
            if lo <= cp <= hi:
                return c
        return 0
    for ch, c in [("a", 1), ("Z", 1), ("é", 1), ("中", 1), ("5", 2), ("½", 2), ("٣", 2),
                  (" ", 3), ("\t", 3), ("\n", 3), ("\u00a0", 3), ("\u3000", 3), ("\u2028", 3),
                  ("!", 0), ("_", 0), ("\x1c", 0), ("\x00", 0), ("😀", 0)]:
        assert cls(ch) == c, (hex(ord(ch)), c)
    # exhaustive against unicodedata on a sample of the code space
    rng = np.random.default_rng(0)
    for cp in list(range(0x3000)) + rng.integers(0, 0x110000, 3000).tolist():
        ch = chr(cp)
        cat = unicodedata.category(ch)[0]
        exp = 1 if cat == "L" else 2 if cat == "N" else (
            3 if ch.isspace() and not 0x1C <= cp <= 0x1F else 0)
        assert cls(ch) == exp, hex(cp)


# ----------------------------------------------------------------------------------------
# random weights in "HF/torch layout" (out, in); q/k rows in interleaved order for GGUF

def random_weights(rng, dim, hidden, L, nh, nkv, hd, V, untied):
    w = {"tok_emb": rng.standard_normal((V, dim)).astype(np.float32),
         "rms_final": (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32)}
    for l in range(L):
        w[("rms_att", l)] = (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32)
        w[("rms_ffn", l)] = (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32)
        for n, s in [("wq", (nh * hd, dim)), ("wk", (nkv * hd, dim)), ("wv", (nkv * hd, dim)),
                     ("wo", (dim, nh * hd)), ("w1", (hidden, dim)), ("w2", (dim, hidden)),
                     ("w3", (hidden, dim))]:
            w[(n, l)] = (0.1 * rng.standard_normal(s)).astype(np.float32)
    if untied:
        w["wcls"] = rng.standard_normal((V, dim)).astype(np.float32)
    return w


def compare_weights(out, expect, L):
    """out: dict from read_model; expect: function(name, layer) -> array."""
    for name, arr in out.items():
        if arr.ndim >= 2 and name not in ("tok_emb", "wcls") or name in ("rms_att", "rms_ffn"):
            for l in range(L):
                np.testing.assert_array_equal(arr[l], expect(name, l), err_msg=f"{name}[{l}]")
        else:
            np.testing.assert_array_equal(arr, expect(name, None), err_msg=name)


GGUF_NAMES = {"tok_emb": "token_embd.weight", "rms_att": "blk.{}.attn_norm.weight",
              "wq": "blk.{}.attn_q.weight", "wk": "blk.{}.attn_k.weight",
              "wv": "blk.{}.attn_v.weight", "wo": "blk.{}.attn_output.weight",
              "rms_ffn": "blk.{}.ffn_norm.weight", "w1": "blk.{}.ffn_gate.weight",
              "w2": "blk.{}.ffn_down.weight", "w3": "blk.{}.ffn_up.weight",
              "rms_final": "output_norm.weight", "wcls": "output.weight"}


def gguf_name(name, layer):
    t = GGUF_NAMES[name]
    return t.format(layer) if layer is not None else t


def write_gguf(path, *, arch="llama", dim=64, hidden=96, L=2, nh=4, nkv=2, hd=16,
               key_length=None, tokenizer="gpt2", pre="smollm", bpe=None, qtypes=None,
               untied=False, seed=0, skip=(), extra_kv=None, theta=50000.0):
    """Writes a tiny GGUF; returns the float32 weights it was built from."""
    rng = np.random.default_rng(seed)
    if tokenizer == "gpt2":
        tokens = bpe["tokens"]
    else:
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
                 ["▁the", "▁a", "he", "▁t", "▁fox", "<|im_start|>", "<|im_end|>"]
    V = len(tokens)
    w = random_weights(rng, dim, hidden, L, nh, nkv, hd, V, untied)
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_block_count(L)
    wr.add_context_length(512)
    wr.add_embedding_length(dim)
    wr.add_feed_forward_length(hidden)
    wr.add_head_count(nh)
    wr.add_head_count_kv(nkv)
    if key_length:
        wr.add_key_length(key_length)
        wr.add_value_length(key_length)
    wr.add_rope_freq_base(theta)
    wr.add_layer_norm_rms_eps(1e-6)
    wr.add_tokenizer_model(tokenizer)
    wr.add_token_list(tokens)
    if tokenizer == "gpt2":
        wr.add_tokenizer_pre(pre)
        wr.add_token_types([3 if s in SPECIALS else 1 for s in tokens])
        wr.add_token_merges([f"{a} {b}" for a, b in bpe["merges"]])
        wr.add_bos_token_id(0)
        wr.add_eos_token_id(2)
    else:
        types = [2, 3, 3] + [6] * 256 + [1] * 5 + [4, 4]
        wr.add_token_types(types)
        wr.add_token_scores([0.0, 0.0, 0.0] + [0.0] * 256 + [-1.0, -2.0, -3.0, -4.0, -5.0,
                                                             0.0, 0.0])
        wr.add_bos_token_id(1)
        wr.add_eos_token_id(2)
    for k, v in (extra_kv or {}).items():
        v(wr)
    for key, arr in w.items():
        name, layer = key if isinstance(key, tuple) else (key, None)
        n = gguf_name(name, layer)
        if n in skip:
            continue
        qt = (qtypes or {}).get(name, Q.F32) if arr.ndim == 2 else Q.F32
        if qt == Q.F32:
            wr.add_tensor(n, arr)
        elif qt == Q.F16:
            wr.add_tensor(n, arr.astype(np.float16))
        elif qt.name.endswith("_K"):
            # no numpy quantizer for K-quants: random blocks, all bytes < 0x7C so that every
            # fp16 scale in them is finite
            blk, size = gguf.GGML_QUANT_SIZES[qt]
            raw = rng.integers(0, 0x7C, (arr.shape[0], arr.shape[1] // blk * size), np.uint8)
            wr.add_tensor(n, raw, raw_dtype=qt)
        else:
            wr.add_tensor(n, gguf.quants.quantize(arr, qt), raw_dtype=qt)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return w, tokens


def gguf_expect(path):
    r = gguf.GGUFReader(str(path))
    ts = {t.name: t for t in r.tensors}

    def expect(name, layer):
        t = ts[gguf_name(name, layer)]
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(
            tuple(int(x) for x in reversed(t.shape)))
    return expect


# ----------------------------------------------------------------------------------------
# (a) GGUF

def test_gguf_f32_gpt2(tmp_path, bpe):
    src, out = tmp_path / "m.gguf", tmp_path / "model.bin"
    w, tokens = write_gguf(src, bpe=bpe, key_length=24, hd=24)
    p = run_export(src, out)
    assert "wrote" in p.stdout
    h, tok, ow = read_model(out)
    assert (h["version"], h["dim"], h["hidden_dim"], h["n_layers"], h["n_heads"],
            h["n_kv_heads"], h["head_dim"], h["vocab_size"], h["seq_len"]) == \
        (1, 64, 96, 2, 4, 2, 24, len(tokens), 512)
    assert h["shared_classifier"] == 1 and h["kind"] == 2 and h["pretok"] == 1
    assert (h["bos"], h["eos"]) == (0, 2)
    assert (h["chat_start"], h["chat_end"]) == (tokens.index("<|im_start|>"),
                                                tokens.index("<|im_end|>"))
    assert h["add_bos"] == 0
    assert h["rope_theta"] == 50000.0
    assert h["norm_eps"] == np.float32(1e-6)
    check_gpt2_tokenizer(tok, bpe)
    # F32: bit-exact copies of the source, q/k as is
    compare_weights(ow, lambda n, l: w[(n, l)] if l is not None else w[n], 2)
    compare_weights(ow, gguf_expect(src), 2)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_gguf_quantized(tmp_path, bpe):
    src, out = tmp_path / "m.gguf", tmp_path / "model.bin"
    qt = {"tok_emb": Q.Q8_0, "wq": Q.Q4_1, "wk": Q.Q4_1, "wv": Q.Q8_0, "wo": Q.Q4_0,
          "w1": Q.Q8_0, "w2": Q.Q8_0, "w3": Q.Q4_1, "wcls": Q.Q8_0}
    w, tokens = write_gguf(src, bpe=bpe, qtypes=qt, pre="gpt2", untied=True, seed=1)
    run_export(src, out)
    h, tok, ow = read_model(out)
    assert h["head_dim"] == 16 and h["shared_classifier"] == 0 and h["pretok"] == 2
    compare_weights(ow, gguf_expect(src), 2)
    # and close to the float weights it was quantized from
    np.testing.assert_allclose(ow["w1"][1], w[("w1", 1)], atol=0.02)
    np.testing.assert_allclose(ow["wcls"], w["wcls"], atol=0.05)


def test_gguf_kquants_bf16(tmp_path, bpe):
    src, out = tmp_path / "m.gguf", tmp_path / "model.bin"
    qt = {"tok_emb": Q.BF16, "wq": Q.Q4_K, "wk": Q.Q2_K, "wv": Q.Q3_K, "wo": Q.Q5_K,
          "w1": Q.Q6_K, "w2": Q.Q4_K, "w3": Q.BF16}
    w, tokens = write_gguf(src, bpe=bpe, qtypes=qt, dim=256, hidden=256, hd=64, seed=5)
    p = run_export(src, out)
    assert "warning" not in p.stderr
    h, tok, ow = read_model(out)
    assert (h["dim"], h["hidden_dim"], h["head_dim"]) == (256, 256, 64)
    compare_weights(ow, gguf_expect(src), 2)
    assert np.abs(ow["wq"]).max() > 0 and np.abs(ow["w1"]).max() > 0
    np.testing.assert_allclose(ow["tok_emb"], w["tok_emb"], rtol=1e-2)


def test_gguf_sentencepiece_f16(tmp_path):
    src, out = tmp_path / "m.gguf", tmp_path / "model.bin"
    qt = {k: Q.F16 for k in GGUF_NAMES}
    w, tokens = write_gguf(src, tokenizer="llama", qtypes=qt, untied=True, seed=2)
    run_export(src, out)
    h, tok, ow = read_model(out)
    assert h["kind"] == 1 and h["pretok"] == 0 and h["add_bos"] == 1
    assert (h["bos"], h["eos"]) == (1, 2)
    assert (h["chat_start"], h["chat_end"]) == (len(tokens) - 2, len(tokens) - 1)
    assert tok["tokens"][259] == b" the" and tok["tokens"][3 + 0x0A] == b"<0x0A>"
    assert tok["scores"][260] == -2.0
    assert tok["flags"][:3] == [0, 1, 1] and tok["flags"][-2:] == [1, 1]
    assert tok["flags"][3] == 0
    assert tok["merges"] == [] and tok["ranges"] == []
    compare_weights(ow, gguf_expect(src), 2)
    np.testing.assert_array_equal(ow["wq"][0], w[("wq", 0)].astype(np.float16)
                                  .astype(np.float32))


# ----------------------------------------------------------------------------------------
# (b) Hugging Face folder

def write_safetensors(path, tensors):
    """Minimal safetensors writer; tensors: name -> (dtype str, shape, raw bytes)."""
    hdr, blobs, off = {}, [], 0
    for name, (dt, shape, raw) in tensors.items():
        hdr[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    hj = json.dumps(hdr).encode()
    hj += b" " * (-len(hj) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)) + hj + b"".join(blobs))


def to_bf16(a):
    """float32 -> (bf16 raw bytes, the float32 value those bf16 hold)."""
    u = a.astype(np.float32).view(np.uint32)
    b = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return b.tobytes(), (b.astype(np.uint32) << 16).view(np.float32)


HF_NAMES = {"tok_emb": "model.embed_tokens.weight",
            "rms_att": "model.layers.{}.input_layernorm.weight",
            "wq": "model.layers.{}.self_attn.q_proj.weight",
            "wk": "model.layers.{}.self_attn.k_proj.weight",
            "wv": "model.layers.{}.self_attn.v_proj.weight",
            "wo": "model.layers.{}.self_attn.o_proj.weight",
            "rms_ffn": "model.layers.{}.post_attention_layernorm.weight",
            "w1": "model.layers.{}.mlp.gate_proj.weight",
            "w2": "model.layers.{}.mlp.down_proj.weight",
            "w3": "model.layers.{}.mlp.up_proj.weight",
            "rms_final": "model.norm.weight", "wcls": "lm_head.weight"}


def write_hf(folder, bpe, *, sharded=False, untied=False, pretok="smollm", extra_vocab=0,
             model_type="llama", seed=3, L=2, dim=64, hidden=96, nh=4, nkv=2):
    """Returns {hf tensor name: float32 values the file holds}."""
    from tokenizers import pre_tokenizers
    folder.mkdir(exist_ok=True)
    hd = dim // nh
    V = len(bpe["tokens"]) + extra_vocab
    rng = np.random.default_rng(seed)
    w = random_weights(rng, dim, hidden, L, nh, nkv, hd, V, untied)
    cfg = {"architectures": ["LlamaForCausalLM"] if model_type == "llama" else ["GPT2LMHeadModel"],
           "model_type": model_type, "hidden_size": dim, "intermediate_size": hidden,
           "num_hidden_layers": L, "num_attention_heads": nh, "num_key_value_heads": nkv,
           "vocab_size": V, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
           "rope_theta": 20000.0, "tie_word_embeddings": not untied, "bos_token_id": 0,
           "eos_token_id": [2], "hidden_act": "silu", "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors, values = {}, {}
    for key, arr in w.items():
        name, layer = key if isinstance(key, tuple) else (key, None)
        n = HF_NAMES[name].format(layer) if layer is not None else HF_NAMES[name]
        if sharded and name in ("wq", "w2", "tok_emb"):
            raw, val = to_bf16(arr)
            tensors[n] = ("BF16", arr.shape, raw)
        elif sharded and name in ("wk", "rms_att"):
            val = arr.astype(np.float16).astype(np.float32)
            tensors[n] = ("F16", arr.shape, arr.astype("<f2").tobytes())
        else:
            val = arr
            tensors[n] = ("F32", arr.shape, arr.astype("<f4").tobytes())
        values[n] = val
    if sharded:
        names = sorted(tensors)
        write_safetensors(folder / "model-00001-of-00002.safetensors",
                          {k: tensors[k] for k in names[:len(names) // 2]})
        write_safetensors(folder / "model-00002-of-00002.safetensors",
                          {k: tensors[k] for k in names[len(names) // 2:]})
    else:
        from safetensors.numpy import save_file
        save_file({k: v for k, v in values.items()}, str(folder / "model.safetensors"))
    tj = json.loads(bpe["tokenizer"].to_str())
    if pretok == "gpt2":
        tj["pre_tokenizer"] = json.loads(pre_tokenizers.ByteLevel(
            add_prefix_space=False, use_regex=True).__getstate__())
        tj["model"]["merges"] = [list(m) for m in bpe["merges"]]   # the [a, b] form
    elif pretok == "llama3":
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t)"}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    return values, cfg


def rope_interleaved(x, pos, theta):
    """x: (n_heads, hd); rotate pairs (2i, 2i+1) by pos * theta^(-2i/hd)."""
    hd = x.shape[-1]
    f = pos * theta ** (-np.arange(0, hd, 2) / hd)
    c, s = np.cos(f), np.sin(f)
    y = x.copy()
    y[:, 0::2] = x[:, 0::2] * c - x[:, 1::2] * s
    y[:, 1::2] = x[:, 0::2] * s + x[:, 1::2] * c
    return y


def rope_rotate_half(x, pos, theta):
    """HF Llama: q*cos + rotate_half(q)*sin, cos/sin = cat(freqs, freqs)."""
    hd = x.shape[-1]
    f = pos * theta ** (-np.arange(0, hd, 2) / hd)
    c, s = np.concatenate([np.cos(f)] * 2), np.concatenate([np.sin(f)] * 2)
    rot = np.concatenate([-x[:, hd // 2:], x[:, :hd // 2]], axis=-1)
    return x * c + rot * s


def attention_scores(wq, wk, nh, nkv, xq, xk, pq, pk, theta, rope):
    hd = wq.shape[0] // nh
    q = rope((wq.astype(np.float64) @ xq).reshape(nh, hd), pq, theta)
    k = rope((wk.astype(np.float64) @ xk).reshape(nkv, hd), pk, theta)
    return np.array([q[h] @ k[h // (nh // nkv)] for h in range(nh)])


def test_hf_folder(tmp_path, bpe):
    src, out = tmp_path / "hf", tmp_path / "model.bin"
    values, cfg = write_hf(src, bpe)
    run_export(src, out)
    h, tok, ow = read_model(out)
    assert (h["dim"], h["hidden_dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"],
            h["head_dim"], h["vocab_size"], h["seq_len"]) == (64, 96, 2, 4, 2, 16,
                                                              len(bpe["tokens"]), 1024)
    assert h["shared_classifier"] == 1 and h["kind"] == 2 and h["pretok"] == 1
    assert h["rope_theta"] == 20000.0 and h["norm_eps"] == np.float32(1e-5)
    assert (h["bos"], h["eos"]) == (0, 2)
    assert h["chat_start"] == bpe["tokens"].index("<|im_start|>")
    check_gpt2_tokenizer(tok, bpe)

    nh, nkv, hd = 4, 2, 16

    def perm(w, n):   # HF rotate-half rows -> interleaved rows, written out by hand
        out = np.empty_like(w)
        for hh in range(n):
            for i in range(hd // 2):
                out[hh * hd + 2 * i] = w[hh * hd + i]
                out[hh * hd + 2 * i + 1] = w[hh * hd + hd // 2 + i]
        return out

    def expect(name, layer):
        n = HF_NAMES[name].format(layer) if layer is not None else HF_NAMES[name]
        v = values[n]
        if name == "wq":
            return perm(v, nh)
        if name == "wk":
            return perm(v, nkv)
        return v
    compare_weights(ow, expect, 2)

    # RoPE equivalence: HF rotate-half on the source rows and interleaved RoPE on the
    # exported rows give the same attention scores q.k, for every head and position pair
    rng = np.random.default_rng(7)
    for layer in range(2):
        wq_hf, wk_hf = values[HF_NAMES["wq"].format(layer)], values[HF_NAMES["wk"].format(layer)]
        for pq, pk in [(0, 0), (5, 3), (17, 17), (100, 1)]:
            xq, xk = rng.standard_normal(64), rng.standard_normal(64)
            ref = attention_scores(wq_hf, wk_hf, nh, nkv, xq, xk, pq, pk, 20000.0,
                                   rope_rotate_half)
            got = attention_scores(ow["wq"][layer], ow["wk"][layer], nh, nkv, xq, xk, pq, pk,
                                   20000.0, rope_interleaved)
            np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)
            # and the test has teeth: the unpermuted rows disagree
            bad = attention_scores(wq_hf, wk_hf, nh, nkv, xq, xk, pq, pk, 20000.0,
                                   rope_interleaved)
            if pq != pk:
                assert not np.allclose(bad, ref, rtol=1e-6, atol=1e-6)


def test_hf_sharded_bf16_untied(tmp_path, bpe):
    src, out = tmp_path / "hf", tmp_path / "model.bin"
    values, cfg = write_hf(src, bpe, sharded=True, untied=True, pretok="gpt2", extra_vocab=5)
    run_export(src, out)
    h, tok, ow = read_model(out)
    V = len(bpe["tokens"]) + 5
    assert h["vocab_size"] == V and h["shared_classifier"] == 0 and h["pretok"] == 2
    assert len(tok["tokens"]) == V and all(t for t in tok["tokens"])
    check_gpt2_tokenizer(tok, bpe, pretok_ranges=False)
    np.testing.assert_array_equal(ow["tok_emb"], values["model.embed_tokens.weight"])
    np.testing.assert_array_equal(ow["wcls"], values["lm_head.weight"])
    np.testing.assert_array_equal(ow["w2"][1], values["model.layers.1.mlp.down_proj.weight"])
    np.testing.assert_array_equal(ow["rms_att"][0],
                                  values["model.layers.0.input_layernorm.weight"])
    wq = values["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(
        ow["wq"][1], wq.reshape(4, 2, 8, 64).swapaxes(1, 2).reshape(64, 64))
    wk = values["model.layers.0.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(
        ow["wk"][0], wk.reshape(2, 2, 8, 64).swapaxes(1, 2).reshape(32, 64))


# ----------------------------------------------------------------------------------------
# (c) llama2.c

def write_llama2c(folder, *, shared=True, version=0, freqs=True, seed=4, hidden=96):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    dim, L, nh, nkv, seq = 64, 2, 4, 2, 32
    toks = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    toks += [b" the", b" a", b"he", b" t", b" fox", b"\xc3\xa9t\xc3\xa9"]
    V = len(toks)
    hd = dim // nh
    w = random_weights(rng, dim, hidden, L, nh, nkv, hd, V, not shared)

    def layers(n):
        return b"".join(w[(n, l)].tobytes() for l in range(L))
    if version == 0:
        data = struct.pack("<7i", dim, hidden, L, nh, nkv, V if shared else -V, seq)
        data += w["tok_emb"].tobytes()
        for n in ["rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3"]:
            data += layers(n)
        data += w["rms_final"].tobytes()
        if freqs:
            data += rng.standard_normal(seq * hd).astype(np.float32).tobytes()
    else:
        data = struct.pack("<Ii7iB", 0x616B3432, 1, dim, hidden, L, nh, nkv, V, seq, int(shared))
        data += bytes(256 - len(data))
        data += layers("rms_att") + layers("rms_ffn") + w["rms_final"].tobytes()
        data += w["tok_emb"].tobytes()
        for n in ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]:
            data += layers(n)
    if not shared:
        data += w["wcls"].tobytes()
    (folder / "stories.bin").write_bytes(data)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-1.5, -2.5, -3.5, -4.5, -5.5, -6.5]
    tb = struct.pack("<i", max(len(t) for t in toks))
    for t, s in zip(toks, scores):
        tb += struct.pack("<fi", s, len(t)) + t
    (folder / "tokenizer.bin").write_bytes(tb)
    return w, toks, scores


@pytest.mark.parametrize("shared,version,freqs", [(True, 0, True), (False, 0, True),
                                                  (True, 0, False), (False, 1, False)])
def test_llama2c(tmp_path, shared, version, freqs):
    src, out = tmp_path / "l2c", tmp_path / "model.bin"
    w, toks, scores = write_llama2c(src, shared=shared, version=version, freqs=freqs)
    run_export(src / "stories.bin", out)
    h, tok, ow = read_model(out)
    assert (h["dim"], h["hidden_dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"],
            h["head_dim"], h["vocab_size"], h["seq_len"]) == (64, 96, 2, 4, 2, 16, len(toks), 32)
    assert h["shared_classifier"] == int(shared)
    assert (h["kind"], h["pretok"], h["add_bos"], h["bos"], h["eos"]) == (1, 0, 1, 1, 2)
    assert (h["chat_start"], h["chat_end"]) == (-1, -1)
    assert h["rope_theta"] == 10000.0 and h["norm_eps"] == np.float32(1e-5)
    assert tok["tokens"] == toks
    assert tok["scores"] == scores
    assert tok["flags"][:4] == [0, 1, 1, 0] and sum(tok["flags"]) == 2
    assert tok["merges"] == [] and tok["ranges"] == []
    compare_weights(ow, lambda n, l: w[(n, l)] if l is not None else w[n], 2)


def test_llama2c_tokenizer_option(tmp_path):
    src, out = tmp_path / "l2c", tmp_path / "model.bin"
    write_llama2c(src)
    other = tmp_path / "tok"
    other.mkdir()
    os.replace(src / "tokenizer.bin", other / "tok512.bin")
    p = run_export(src / "stories.bin", out, check=False)
    assert p.returncode == 1 and "tokenizer" in p.stderr and not out.exists()
    run_export(src / "stories.bin", out, "--tokenizer", other / "tok512.bin")
    h, tok, _ = read_model(out)
    assert tok["tokens"][-1] == "été".encode()


# ----------------------------------------------------------------------------------------
# errors: exit 1, one line naming the problem, nothing left behind

def assert_fails(tmp_path, src, out, *words, extra=()):
    out.write_bytes(b"previous model")          # a failed export must not clobber it
    before = set(os.listdir(out.parent))
    p = run_export(src, out, *extra, check=False)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export.py: error: "), p.stderr
    for wd in words:
        assert wd in lines[0], lines[0]
    assert "Traceback" not in p.stderr
    assert out.read_bytes() == b"previous model"
    assert set(os.listdir(out.parent)) == before, "temporary file left behind"
    return lines[0]


def test_error_unsupported_tensor_type(tmp_path, bpe):
    src = tmp_path / "m.gguf"
    write_gguf(src, bpe=bpe)
    # rewrite one tensor's type id in the file to an unsupported one (I8 = 24)
    r = gguf.GGUFReader(str(src))
    t = [t for t in r.tensors if t.name == "blk.0.attn_q.weight"][0]
    f = t.field   # parts: name len, name, n_dims, dims..., type, offset
    type_part = f.parts[-2]
    off = int(type_part.ctypes.data - r.data.ctypes.data)
    del r, t, f, type_part
    data = bytearray(src.read_bytes())
    assert struct.unpack_from("<I", data, off)[0] == 0
    struct.pack_into("<I", data, off, 24)
    src.write_bytes(bytes(data))
    assert_fails(tmp_path, src, tmp_path / "model.bin", "unsupported tensor type", "I8",
                 "blk.0.attn_q.weight")


def test_error_garbage_and_truncated(tmp_path, bpe):
    out = tmp_path / "model.bin"
    g = tmp_path / "garbage.bin"
    g.write_bytes(np.random.default_rng(0).bytes(100000))
    assert_fails(tmp_path, g, out, "garbage.bin")
    src = tmp_path / "m.gguf"
    write_gguf(src, bpe=bpe)
    tr = tmp_path / "trunc.gguf"
    tr.write_bytes(src.read_bytes()[:20000])
    assert_fails(tmp_path, tr, out, "trunc.gguf")
    tr.write_bytes(src.read_bytes()[:-1000])          # metadata intact, tensor data cut
    assert_fails(tmp_path, tr, out, "trunc.gguf")
    l2c = tmp_path / "l2c"
    write_llama2c(l2c)
    (l2c / "cut.bin").write_bytes((l2c / "stories.bin").read_bytes()[:-12])
    assert_fails(tmp_path, l2c / "cut.bin", out, "size")
    assert_fails(tmp_path, tmp_path / "nonexistent.gguf", out, "nonexistent.gguf")


def test_error_hf_configs(tmp_path, bpe):
    out = tmp_path / "model.bin"
    src = tmp_path / "hf"
    write_hf(src, bpe, model_type="gpt2")
    assert_fails(tmp_path, src, out, "gpt2", "model_type")
    write_hf(src, bpe)
    (src / "config.json").write_text("{not json")
    assert_fails(tmp_path, src, out, "config.json")
    write_hf(src, bpe, pretok="llama3")
    assert_fails(tmp_path, src, out, "pre-tokenizer", "Split")


# ----------------------------------------------------------------------------------------
# the real demo model

def test_real_smollm2(tmp_path):
    src = next((p for p in SMOL_GGUF_PATHS if p.exists()), None)
    if src is None:
        pytest.skip("SmolLM2 GGUF not available")
    out = tmp_path / "model.bin"
    t0 = time.time()
    run_export(src, out)
    dt = time.time() - t0
    assert dt < 60, f"export took {dt:.1f} s"
    h, tok, ow = read_model(out)
    assert (h["dim"], h["hidden_dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"],
            h["head_dim"], h["vocab_size"], h["seq_len"]) == (576, 1536, 30, 9, 3, 64, 49152,
                                                              8192)
    assert h["rope_theta"] == 100000.0 and h["norm_eps"] == np.float32(1e-5)
    assert h["shared_classifier"] == 1 and "wcls" not in ow
    assert (h["kind"], h["pretok"], h["add_bos"]) == (2, 1, 0)
    assert (h["bos"], h["eos"], h["chat_start"], h["chat_end"]) == (1, 2, 1, 2)
    T = tok["tokens"]
    assert T[0] == b"<|endoftext|>" and T[1] == b"<|im_start|>" and T[2] == b"<|im_end|>"
    assert tok["flags"][:17] == [1] * 17 and sum(tok["flags"]) == 17
    assert len(tok["merges"]) == 48900
    ids = {t: i for i, t in enumerate(T)}
    assert tok["merges"][0] == (ids[b" "], ids[b"t"])      # "Ġ t"
    assert b" the" in ids and b"\n" in ids
    r = gguf.GGUFReader(str(src))
    ts = {t.name: t for t in r.tensors}
    for name, arr in [("blk.0.attn_q.weight", ow["wq"][0]), ("blk.29.ffn_down.weight",
                                                              ow["w2"][29]),
                      ("output_norm.weight", ow["rms_final"])]:
        t = ts[name]
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(arr.shape)
        np.testing.assert_array_equal(arr, ref)
    t = ts["token_embd.weight"]
    np.testing.assert_array_equal(ow["tok_emb"][1000:1010], gguf.quants.dequantize(
        t.data[1000:1010], t.tensor_type))

    # the file works: a float64 numpy forward pass over model.bin (interleaved RoPE, as
    # the format says) answers the ChatML question with " Paris"
    words = [b"<|im_start|>", b"user", b"\n", b"What", b" is", b" the", b" capital", b" of",
             b" France", b"?", b"<|im_end|>", b"\n", b"<|im_start|>", b"ass", b"istant", b"\n",
             b"The", b" capital", b" of", b" France", b" is"]
    logits = forward_last(h, ow, [ids[x] for x in words])
    assert T[int(np.argmax(logits))] == b" Paris"


def forward_last(h, w, tokens):
    """Logits after the last of tokens: a plain float64 Llama forward pass over model.bin."""
    L, nh, nkv, hd = h["n_layers"], h["n_heads"], h["n_kv_heads"], h["head_dim"]
    n, eps, theta = len(tokens), h["norm_eps"], h["rope_theta"]
    pos = np.arange(n)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)   # (n, hd/2)
    cos, sin = np.cos(pos)[:, None], np.sin(pos)[:, None]

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(x):      # x (n, heads, hd), pairs (2i, 2i+1)
        y = np.empty_like(x)
        y[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        y[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
        return y
    mask = np.triu(np.full((n, n), -np.inf), 1)
    x = w["tok_emb"][tokens].astype(np.float64)
    for l in range(L):
        xb = rms(x, w["rms_att"][l])
        q = rope((xb @ w["wq"][l].T).reshape(n, nh, hd))
        k = rope((xb @ w["wk"][l].T).reshape(n, nkv, hd))
        v = (xb @ w["wv"][l].T).reshape(n, nkv, hd)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        a = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", a, v).reshape(n, nh * hd) @ w["wo"][l].T
        xb = rms(x, w["rms_ffn"][l])
        g, u = xb @ w["w1"][l].T, xb @ w["w3"][l].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w["w2"][l].T
    wcls = w["tok_emb"] if h["shared_classifier"] else w["wcls"]
    return wcls @ rms(x[-1], w["rms_final"])


# ----------------------------------------------------------------------------------------
# --weights q8: every matrix in int8, one fp32 scale per 64 numbers of a row

def q8_quantize(a):
    """The test's own statement of README's int8 groups: per run of 64 numbers along a row,
    s = max|w| / 127 rounded to float32 (here: divided in float64, then rounded, which gives
    the same float32 since 53 >= 2 * 24 + 2 bits), q = w / s rounded to the nearest integer,
    ties to even, from the exact quotient; an all-zero group has s = 0 and q = 0."""
    a = np.asarray(a, dtype=np.float32)
    rows, cols = a.shape
    g = a.reshape(rows, cols // 64, 64).astype(np.float64)
    s = (np.abs(g).max(axis=2) / 127.0).astype(np.float32)
    q = np.zeros(g.shape)
    nz = s > 0
    q[nz] = np.round(g[nz] / s[nz].astype(np.float64)[:, None])
    return q.astype(np.int8).reshape(rows, cols), s


MATRICES = ("tok_emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "wcls")


def check_q8_export(src, tmp_path, extra=()):
    """Exports src as fp32 and as q8; the q8 file's header equals the fp32 one's but for the
    weight type, group size and weights_bytes; its RMSNorm weights are the same fp32 bits;
    its codes and scales are q8_quantize of the fp32 file's matrices (which the tests above
    check against the sources). Returns (header, weights) of the q8 file."""
    f32, q8 = tmp_path / "f32.bin", tmp_path / "q8.bin"
    run_export(src, f32, *extra)
    p = run_export(src, q8, *extra, "--weights", "q8")
    assert "int8 g64 weights" in p.stdout, p.stdout
    hf, tokf, wf = read_model(f32)
    hq, tokq, wq = read_model(q8)
    assert (hf["weight_type"], hf["group"]) == (0, 0)
    assert (hq["weight_type"], hq["group"]) == (1, 64)
    hb_f, hb_q = f32.read_bytes()[:256], q8.read_bytes()[:256]
    assert hb_q[:96] + hb_q[104:112] == hb_f[:96] + hb_f[104:112]   # all but weights_bytes
    assert hb_q[112:120] == struct.pack("<ii", 1, 64) and hb_f[112:120] == bytes(8)
    for k in hf:
        if k not in ("w_bytes", "weight_type", "group"):
            assert hq[k] == hf[k], k
    assert tokq == tokf
    data_f = f32.read_bytes()
    assert q8.read_bytes()[hq["tok_off"]:hq["w_off"]] == data_f[hf["tok_off"]:hf["w_off"]]
    n_mat = sum(wf[m].size for m in MATRICES if m in wf)
    n_norm = sum(wf[m].size for m in ("rms_att", "rms_ffn", "rms_final"))
    assert hq["w_bytes"] == n_mat + 4 * (n_mat // 64) + 4 * n_norm
    assert hf["w_bytes"] == 4 * (n_mat + n_norm)
    for m in ("rms_att", "rms_ffn", "rms_final"):
        np.testing.assert_array_equal(wq[m], wf[m], err_msg=m)
    for m in MATRICES:
        if m not in wf:
            assert m not in wq
            continue
        mats = wf[m] if wf[m].ndim == 3 else wf[m][None]
        codes = wq[m] if wq[m].ndim == 3 else wq[m][None]
        scales = wq[m + ".scale"] if wq[m].ndim == 3 else wq[m + ".scale"][None]
        for l, a in enumerate(mats):
            q, sc = q8_quantize(a)
            np.testing.assert_array_equal(scales[l], sc, err_msg=f"{m}[{l}] scales")
            np.testing.assert_array_equal(codes[l], q, err_msg=f"{m}[{l}] codes")
            # and what they stand for is within half a step of the fp32 weights
            deq = codes[l].astype(np.float64).reshape(sc.shape + (64,)) * sc[..., None]
            err = np.abs(deq.reshape(a.shape) - a)
            assert (err <= np.repeat(sc, 64, axis=-1) * (0.5 + 1e-6)).all(), f"{m}[{l}]"
            assert np.abs(codes[l]).max() == 127
    # the file is about a quarter of the fp32 one
    assert hq["w_bytes"] < 0.3 * hf["w_bytes"]
    return hq, wq


def test_q8_gguf_quantized_untied(tmp_path, bpe):
    src = tmp_path / "m.gguf"
    qt = {"tok_emb": Q.Q8_0, "wq": Q.Q4_1, "wk": Q.F16, "wv": Q.Q8_0, "wo": Q.Q4_0,
          "w1": Q.Q5_0, "w3": Q.BF16, "wcls": Q.Q8_0}
    write_gguf(src, bpe=bpe, qtypes=qt, untied=True, hidden=256, seed=6)
    h, w = check_q8_export(src, tmp_path)
    assert h["shared_classifier"] == 0 and w["w1"].shape == (2, 256, 64)


def test_q8_gguf_f32_tied(tmp_path, bpe):
    src = tmp_path / "m.gguf"
    w, _ = write_gguf(src, bpe=bpe, hidden=128, seed=7)
    h, wq = check_q8_export(src, tmp_path)
    assert h["shared_classifier"] == 1 and "wcls" not in wq
    # straight from the source too: the F32 tensors are the float32 weights themselves
    q, sc = q8_quantize(w[("w2", 1)])
    np.testing.assert_array_equal(wq["w2"][1], q)
    np.testing.assert_array_equal(wq["w2.scale"][1], sc)


def test_q8_hf_sharded_bf16_untied(tmp_path, bpe):
    src = tmp_path / "hf"
    values, _ = write_hf(src, bpe, sharded=True, untied=True, pretok="gpt2", hidden=192)
    h, w = check_q8_export(src, tmp_path)
    # q/k rows are permuted before quantizing: the groups run along rows, so each row's
    # codes are those of the source row it came from
    wk = values["model.layers.0.self_attn.k_proj.weight"]
    q, _ = q8_quantize(wk)
    np.testing.assert_array_equal(w["wk"][0], q.reshape(2, 2, 8, 64).swapaxes(1, 2).reshape(32, 64))


@pytest.mark.parametrize("shared,version", [(True, 0), (False, 1)])
def test_q8_llama2c(tmp_path, shared, version):
    src = tmp_path / "l2c"
    write_llama2c(src, shared=shared, version=version, freqs=False, hidden=128)
    check_q8_export(src / "stories.bin", tmp_path)


def test_q8_rows_not_a_multiple_of_64(tmp_path, bpe):
    """hidden_dim 96 (the default test models) cannot be cut into groups of 64."""
    src = tmp_path / "m.gguf"
    write_gguf(src, bpe=bpe)
    assert_fails(tmp_path, src, tmp_path / "model.bin", "--weights q8", "groups of 64",
                 "hidden_dim 96", "--weights fp32", extra=("--weights", "q8"))
    l2c = tmp_path / "l2c"
    write_llama2c(l2c)
    assert_fails(tmp_path, l2c / "stories.bin", tmp_path / "model.bin", "hidden_dim 96",
                 extra=("--weights", "q8"))


def test_q8_non_finite_weight(tmp_path, bpe):
    """int8 cannot hold a NaN: --weights q8 refuses it (fp32 copies it with a warning)."""
    src = tmp_path / "m.gguf"
    write_gguf(src, bpe=bpe, hidden=128)
    r = gguf.GGUFReader(str(src))
    t = [t for t in r.tensors if t.name == "blk.1.ffn_up.weight"][0]
    off = int(t.data.ctypes.data - r.data.ctypes.data) + 4 * 70
    del r, t
    data = bytearray(src.read_bytes())
    struct.pack_into("<f", data, off, float("nan"))
    src.write_bytes(bytes(data))
    out = tmp_path / "model.bin"
    out.write_bytes(b"previous model")
    before = set(os.listdir(tmp_path))
    p = run_export(src, out, "--weights", "q8", check=False)
    last = p.stderr.strip().splitlines()[-1]   # after the progress lines of the tensors before
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert last.startswith("export.py: error: ") and "w3[1]" in last and "non-finite" in last \
        and "--weights fp32" in last, last
    assert out.read_bytes() == b"previous model" and set(os.listdir(tmp_path)) == before
    p = run_export(src, tmp_path / "f32.bin")
    assert "warning: non-finite values in w3[1]" in p.stderr


def test_q8_real_smollm2(tmp_path):
    src = next((p for p in SMOL_GGUF_PATHS if p.exists()), None)
    if src is None:
        pytest.skip("SmolLM2 GGUF not available")
    out = tmp_path / "model_q8.bin"
    run_export(src, out, "--weights", "q8")
    h, tok, w = read_model(out)
    assert (h["weight_type"], h["group"], h["dim"], h["n_layers"]) == (1, 64, 576, 30)
    n_mat = 49152 * 576 + 30 * (576 * 576 * 2 + 192 * 576 * 2 + 3 * 1536 * 576)
    assert h["w_bytes"] == n_mat + 4 * n_mat // 64 + 4 * (2 * 30 * 576 + 576)
    r = gguf.GGUFReader(str(src))
    ts = {t.name: t for t in r.tensors}
    for name, key, layer in [("blk.0.attn_q.weight", "wq", 0), ("blk.29.ffn_down.weight", "w2", 29)]:
        t = ts[name]
        a = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w[key][layer].shape)
        q, sc = q8_quantize(a)
        np.testing.assert_array_equal(w[key][layer], q)
        np.testing.assert_array_equal(w[key + ".scale"][layer], sc)
