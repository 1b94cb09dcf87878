#!/usr/bin/env python3
"""
export.py: convert a Llama-architecture checkpoint into the one-file model.bin that `run` mmaps.

    python3 export.py SOURCE model.bin [--tokenizer tokenizer.bin] [--weights fp32|q8]

SOURCE is one of
  1. a GGUF file of architecture "llama" (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_x and K-quants;
     every tensor is dequantized to fp32 with gguf's numpy dequantizer),
  2. a Hugging Face model folder (config.json + *.safetensors + tokenizer.json),
  3. a llama2.c checkpoint (legacy v0 .bin, or the fp32 "ak42" version 1 .bin) with its
     tokenizer.bin next to it (or given with --tokenizer).

The output format (version 1) is specified in README.md, "model.bin format":
  256-byte header | tokenizer section | zero padding to 64 | weights.
The weights are fp32 (--weights fp32, the default) or, with --weights q8, every matrix in
int8 with one fp32 scale per group of 64 numbers along a row (llama2.c's runq.c scheme; the
RMSNorm weights stay fp32).
The file is written to a temporary file in the output's directory and renamed over the
output only once complete, so a failed export never leaves a half-written model.bin.

Notes on choices made here:
  * RoPE layout: model.bin wants q/k rows in the *interleaved* order (pairs 2i, 2i+1).
    GGUF (llama.cpp's converter already permuted them) and llama2.c files are copied as is;
    Hugging Face q_proj/k_proj rows (rotate-half order, pairs i, i+hd/2) are permuted with
    llama.cpp's permutation.
  * Unicode classes for the GPT-2 pre-tokenizer: cls 1 = category L*, cls 2 = category N*,
    cls 3 = whitespace.  Whitespace is the Unicode White_Space property, i.e. Python's
    str.isspace() minus U+001C..U+001F (the information separators, which isspace() and
    Python's re \\s accept but which are not White_Space).  That is what both reference
    tokenizers use for \\s: Hugging Face tokenizers (Oniguruma) and llama.cpp (unicode.cpp).
  * Special tokens (flags bit 0): GGUF token_type 3 (control) or 4 (user defined); Hugging
    Face added_tokens with "special": true; llama2.c: the bos and eos tokens (ids 1 and 2).
    Their bytes are their raw text (GGUF and HF store added tokens un-mapped).
"""
import argparse
import json
import os
import struct
import sys
import tempfile
import time
import unicodedata

import numpy as np

MAGIC = b"TQLM"
VERSION = 1
HEADER_SIZE = 256
ALIGN = 64

KIND_SPM, KIND_GPT2 = 1, 2
PRETOK_NONE, PRETOK_SMOLLM, PRETOK_GPT2 = 0, 1, 2
FLAG_SPECIAL = 1

# weight types (header offset 112) and the group size of the int8 type (offset 116)
WEIGHT_TYPES = {"fp32": 0, "q8": 1}
QGROUP = 64

# weight groups, in file order; "per_layer" groups hold n_layers tensors each
WEIGHT_ORDER = [
    ("tok_emb", False), ("rms_att", True), ("wq", True), ("wk", True), ("wv", True),
    ("wo", True), ("rms_ffn", True), ("w1", True), ("w2", True), ("w3", True),
    ("rms_final", False), ("wcls", False),
]


class ExportError(Exception):
    """An error the user can act on; printed as one line, exit status 1."""


def log(msg):
    print(f"export.py: {msg}", file=sys.stderr, flush=True)


def expected_shape(cfg, name):
    d, h, hd, v = cfg["dim"], cfg["hidden_dim"], cfg["head_dim"], cfg["vocab_size"]
    nq, nkv = cfg["n_heads"] * hd, cfg["n_kv_heads"] * hd
    return {
        "tok_emb": (v, d), "rms_att": (d,), "wq": (nq, d), "wk": (nkv, d), "wv": (nkv, d),
        "wo": (d, nq), "rms_ffn": (d,), "w1": (h, d), "w2": (d, h), "w3": (h, d),
        "rms_final": (d,), "wcls": (v, d),
    }[name]


def tensor_list(cfg):
    """[(group, layer or None)] in file order."""
    out = []
    for name, per_layer in WEIGHT_ORDER:
        if name == "wcls" and cfg["shared_classifier"]:
            continue
        if per_layer:
            out += [(name, l) for l in range(cfg["n_layers"])]
        else:
            out.append((name, None))
    return out


def quantize_q8(a):
    """A float32 matrix (rows, cols) -> int8 codes (rows, cols) and float32 scales
    (rows, cols // QGROUP). Each run of QGROUP numbers along a row shares one scale
    s = max|w| / 127 (a float32 division) and holds q = w / s rounded to the nearest integer,
    ties to even. The quotient is taken in float64, where it is exact enough that q is the
    rounding of the exact w / s; an all-zero group has s = 0 and q = 0."""
    rows, cols = a.shape
    g = a.reshape(rows, cols // QGROUP, QGROUP)
    s = (np.abs(g).max(axis=2) / np.float32(127)).astype(np.float32)
    safe = np.where(s > 0, s, np.float32(1)).astype(np.float64)
    q = np.rint(g.astype(np.float64) / safe[..., None])
    assert np.abs(q).max(initial=0) <= 127
    return q.astype(np.int8).reshape(rows, cols), s


def tensor_bytes(cfg, group, weights):
    """Bytes of one tensor of `group` in the file: fp32, or for q8 matrices the int8 codes
    plus one fp32 scale per QGROUP numbers."""
    n = int(np.prod(expected_shape(cfg, group)))
    if weights == "q8" and len(expected_shape(cfg, group)) == 2:
        return n + 4 * (n // QGROUP)
    return 4 * n


def check_q8_rows(cfg):
    """--weights q8 needs every matrix row (dim, n_heads*head_dim for wo, hidden_dim for w2)
    to be whole groups of QGROUP numbers."""
    rows = {"dim": cfg["dim"], "n_heads*head_dim": cfg["n_heads"] * cfg["head_dim"],
            "hidden_dim": cfg["hidden_dim"]}
    bad = [f"{k} {v}" for k, v in rows.items() if v % QGROUP]
    if bad:
        raise ExportError(f"--weights q8 quantizes matrix rows in groups of {QGROUP} numbers, "
                          f"and this model's rows are not multiples of {QGROUP} "
                          f"({', '.join(bad)}); export it with --weights fp32")


def check_config(cfg):
    for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
              "vocab_size", "seq_len"):
        v = cfg.get(k)
        if not isinstance(v, int) or v <= 0 or v > 2 ** 24:    # run.c's range
            raise ExportError(f"bad config value {k} = {v!r} (must be in [1, 2^24])")
    if cfg["dim"] % cfg["n_heads"]:
        raise ExportError(f"n_heads {cfg['n_heads']} does not divide dim {cfg['dim']}")
    if cfg["n_heads"] * cfg["head_dim"] > 2 ** 24:
        raise ExportError(f"n_heads x head_dim = {cfg['n_heads'] * cfg['head_dim']} is too large")
    if cfg["n_heads"] % cfg["n_kv_heads"]:
        raise ExportError(f"n_heads {cfg['n_heads']} is not a multiple of "
                          f"n_kv_heads {cfg['n_kv_heads']}")
    if cfg["head_dim"] % 2:
        raise ExportError(f"head_dim {cfg['head_dim']} is odd (RoPE needs pairs)")
    if not (cfg["rope_theta"] > 0 and np.isfinite(cfg["rope_theta"])):
        raise ExportError(f"bad rope_theta {cfg['rope_theta']!r}")
    if not (cfg["norm_eps"] > 0 and np.isfinite(cfg["norm_eps"])):
        raise ExportError(f"bad norm_eps {cfg['norm_eps']!r}")


# ----------------------------------------------------------------------------------------
# tokenizer helpers

def gpt2_byte_decoder():
    """Inverse of GPT-2's bytes_to_unicode: printable char -> byte value."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = gpt2_byte_decoder()


def gpt2_token_bytes(s, stats):
    """GPT-2 byte-level token text -> real bytes. Chars outside the mapping (should not
    occur in a byte-level vocab) are kept as their UTF-8 and counted."""
    out = bytearray()
    for ch in s:
        b = _BYTE_DECODER.get(ch)
        if b is None:
            out += ch.encode("utf-8")
            stats["unmapped"] = stats.get("unmapped", 0) + 1
        else:
            out.append(b)
    return bytes(out)


def unicode_ranges():
    """Maximal sorted inclusive code point ranges: cls 1 letter, 2 number, 3 whitespace."""
    ranges = []
    cur_cls, lo = 0, 0
    cat = unicodedata.category
    for cp in range(0x110000):
        ch = chr(cp)
        c = cat(ch)[0]
        if c == "L":
            k = 1
        elif c == "N":
            k = 2
        elif ch.isspace() and not (0x1C <= cp <= 0x1F):   # Unicode White_Space
            k = 3
        else:
            k = 0
        if k != cur_cls:
            if cur_cls:
                ranges.append((lo, cp - 1, cur_cls))
            cur_cls, lo = k, cp
    if cur_cls:
        ranges.append((lo, 0x10FFFF, cur_cls))
    return ranges


def resolve_merges(merge_pairs, token_ids, tokens_bytes, what):
    """[(left_str, right_str)] -> [(left_id, right_id)], keeping order (rank). Merges whose
    parts or result are not in the vocabulary cannot fire; they are dropped with a warning."""
    out, dropped = [], 0
    bytes_ids = {}
    for i, b in enumerate(tokens_bytes):
        bytes_ids.setdefault(b, i)
    for a, b in merge_pairs:
        ia, ib = token_ids.get(a), token_ids.get(b)
        if ia is None or ib is None or (tokens_bytes[ia] + tokens_bytes[ib]) not in bytes_ids:
            dropped += 1
            continue
        out.append((ia, ib))
    if dropped:
        log(f"warning: {dropped} of {len(merge_pairs)} {what} merges reference tokens not in "
            f"the vocabulary; dropped")
    return out


def split_merge_string(m):
    # like llama.cpp: split at the first space after position 0
    pos = m.find(" ", 1)
    if pos < 0:
        raise ExportError(f"bad merge entry {m!r} (no space)")
    return m[:pos], m[pos + 1:]


def find_id(token_ids, text):
    i = token_ids.get(text)
    return -1 if i is None else i


def pack_tokenizer(tok):
    """The tokenizer section as bytes (README: 'Tokenizer: at tokenizer_offset')."""
    toks, scores, flags = tok["tokens"], tok["scores"], tok["flags"]
    n = len(toks)
    parts = [struct.pack("<ii", n, max((len(t) for t in toks), default=0))]
    for t, s, f in zip(toks, scores, flags):
        parts.append(struct.pack("<fii", s, f, len(t)))
        parts.append(t)
    merges = tok["merges"]
    parts.append(struct.pack("<i", len(merges)))
    if merges:
        parts.append(np.asarray(merges, dtype="<i4").tobytes())
    ranges = tok["ranges"]
    parts.append(struct.pack("<i", len(ranges)))
    for lo, hi, c in ranges:
        parts.append(struct.pack("<IIi", lo, hi, c))
    return b"".join(parts)


# ----------------------------------------------------------------------------------------
# source 1: GGUF

class GGUFSource:
    TENSOR_NAMES = {
        "tok_emb": "token_embd.weight", "rms_att": "blk.{}.attn_norm.weight",
        "wq": "blk.{}.attn_q.weight", "wk": "blk.{}.attn_k.weight",
        "wv": "blk.{}.attn_v.weight", "wo": "blk.{}.attn_output.weight",
        "rms_ffn": "blk.{}.ffn_norm.weight", "w1": "blk.{}.ffn_gate.weight",
        "w2": "blk.{}.ffn_down.weight", "w3": "blk.{}.ffn_up.weight",
        "rms_final": "output_norm.weight", "wcls": "output.weight",
    }

    def __init__(self, path):
        import gguf
        self.gguf = gguf
        try:
            self.r = gguf.GGUFReader(path, "r")
        except Exception as e:
            raise ExportError(f"cannot parse GGUF file {path} (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}")
        self.path = path
        self.tensors = {t.name: t for t in self.r.tensors}
        arch = self.kv("general.architecture")
        if arch != "llama":
            raise ExportError(f"unsupported architecture {arch!r} in {path} (only 'llama')")
        self.desc = f"GGUF {os.path.basename(path)}"
        self._config()
        self._tokenizer()

    def kv(self, key, default=None):
        f = self.r.fields.get(key)
        if f is None:
            return default
        v = f.contents()
        return v

    def req(self, key):
        v = self.kv(key)
        if v is None:
            raise ExportError(f"GGUF metadata key {key} missing")
        return v

    def num(self, key, default=None, typ=int):
        """A numeric metadata value (required when default is None), checked for its type."""
        v = self.req(key) if default is None else self.kv(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or (typ is int and v != int(v)):
            kind = "an integer" if typ is int else "a number"
            raise ExportError(f"GGUF metadata {key} = {str(v)[:40]!r} is not {kind}")
        return typ(v)

    def _config(self):
        dim = self.num("llama.embedding_length")
        n_heads = self.num("llama.attention.head_count")
        n_kv = self.num("llama.attention.head_count_kv", n_heads)
        head_dim = self.num("llama.attention.key_length", dim // n_heads if n_heads else 0)
        vlen = self.num("llama.attention.value_length", head_dim)
        if vlen != head_dim:
            raise ExportError(f"attention value_length {vlen} != key_length {head_dim} "
                              "is not supported")
        rot = self.num("llama.rope.dimension_count", head_dim)
        if rot != head_dim:
            raise ExportError(f"partial RoPE (rope.dimension_count {rot} != head_dim "
                              f"{head_dim}) is not supported")
        scaling = self.kv("llama.rope.scaling.type")
        if scaling not in (None, "none"):
            raise ExportError(f"RoPE scaling {scaling!r} is not supported")
        if "rope_freqs.weight" in self.tensors:
            raise ExportError("rope_freqs.weight (Llama 3.1-style RoPE scaling) is not "
                              "supported")
        experts = self.kv("llama.expert_count")
        if experts:
            raise ExportError(f"mixture of experts (llama.expert_count {experts}) is not "
                              "supported")
        tokens = self.req("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ExportError("GGUF metadata tokenizer.ggml.tokens is not a list of strings")
        self.cfg = dict(
            dim=dim, hidden_dim=self.num("llama.feed_forward_length"),
            n_layers=self.num("llama.block_count"), n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=head_dim, vocab_size=len(tokens),
            seq_len=self.num("llama.context_length"),
            rope_theta=self.num("llama.rope.freq_base", 10000.0, typ=float),
            norm_eps=self.num("llama.attention.layer_norm_rms_epsilon", typ=float),
            shared_classifier=0 if "output.weight" in self.tensors else 1,
        )
        self._tokens = tokens
        # tensors nobody asked for mean a feature run.c does not have: refuse
        known = set()
        for name, t in self.TENSOR_NAMES.items():
            if "{}" in t:
                known.update(t.format(l) for l in range(self.cfg["n_layers"]))
            else:
                known.add(t)
        extra = sorted(n for n in self.tensors if n not in known
                       and not n.endswith("attn_rot_embd"))
        if extra:
            raise ExportError(f"unsupported tensors in GGUF: {', '.join(extra[:5])}"
                              + (" ..." if len(extra) > 5 else ""))

    def _tokenizer(self):
        model = self.req("tokenizer.ggml.model")
        tokens = self._tokens
        n = len(tokens)
        types = self.kv("tokenizer.ggml.token_type") or [1] * n
        if len(types) != n:
            raise ExportError(f"tokenizer.ggml.token_type has {len(types)} entries, "
                              f"tokens has {n}")
        flags = [FLAG_SPECIAL if t in (3, 4) else 0 for t in types]
        token_ids = {}
        for i, t in enumerate(tokens):
            token_ids.setdefault(t, i)
        if model == "gpt2":
            pre = self.kv("tokenizer.ggml.pre", "default")
            if pre == "smollm":
                pretok = PRETOK_SMOLLM
            elif pre in ("gpt2", "default"):
                pretok = PRETOK_GPT2
            else:
                raise ExportError(f"unsupported pre-tokenizer tokenizer.ggml.pre = {pre!r} "
                                  "(run supports 'smollm' and 'gpt2'/'default')")
            stats = {}
            tb = [t.encode("utf-8") if f else gpt2_token_bytes(t, stats)
                  for t, f in zip(tokens, flags)]
            if stats.get("unmapped"):
                log(f"warning: {stats['unmapped']} characters outside GPT-2's byte map kept "
                    "as UTF-8")
            merges_raw = self.kv("tokenizer.ggml.merges") or []
            merges = resolve_merges([split_merge_string(m) for m in merges_raw], token_ids,
                                    tb, "GGUF")
            tok = dict(kind=KIND_GPT2, pretok=pretok, tokens=tb, scores=[0.0] * n,
                       flags=flags, merges=merges, ranges=unicode_ranges(),
                       bos=self.num("tokenizer.ggml.bos_token_id", -1),
                       eos=self.num("tokenizer.ggml.eos_token_id", -1),
                       add_bos=int(bool(self.kv("tokenizer.ggml.add_bos_token", False))))
        elif model == "llama":
            scores = self.kv("tokenizer.ggml.scores")
            if scores is None or len(scores) != n:
                raise ExportError("SentencePiece GGUF without a matching tokenizer.ggml.scores")
            tb = [t.replace("\u2581", " ").encode("utf-8") for t in tokens]
            tok = dict(kind=KIND_SPM, pretok=PRETOK_NONE, tokens=tb,
                       scores=[float(s) for s in scores], flags=flags, merges=[], ranges=[],
                       bos=self.num("tokenizer.ggml.bos_token_id", 1),
                       eos=self.num("tokenizer.ggml.eos_token_id", 2),
                       add_bos=int(bool(self.kv("tokenizer.ggml.add_bos_token", True))))
        else:
            raise ExportError(f"unsupported tokenizer model tokenizer.ggml.model = {model!r} "
                              "(supported: 'gpt2', 'llama')")
        tok["chat_start"] = find_id(token_ids, "<|im_start|>")
        tok["chat_end"] = find_id(token_ids, "<|im_end|>")
        self.tok = tok

    def _name(self, group, layer):
        t = self.TENSOR_NAMES[group]
        return t.format(layer) if layer is not None else t

    def check(self, group, layer, shape):
        name = self._name(group, layer)
        t = self.tensors.get(name)
        if t is None:
            raise ExportError(f"tensor {name} missing from GGUF")
        qt = t.tensor_type
        Q = self.gguf.GGMLQuantizationType
        ok = qt in (Q.F32, Q.F16) or qt in getattr(self.gguf.quants, "_type_traits", {})
        if not ok:
            raise ExportError(f"unsupported tensor type {qt.name} for tensor {name}")
        got = tuple(int(x) for x in reversed(t.shape))
        if got != shape:
            raise ExportError(f"tensor {name} has shape {got}, expected {shape}")

    def get(self, group, layer):
        t = self.tensors[self._name(group, layer)]
        a = self.gguf.quants.dequantize(t.data, t.tensor_type)
        return a.reshape(tuple(int(x) for x in reversed(t.shape)))


# ----------------------------------------------------------------------------------------
# source 2: Hugging Face folder

class HFSource:
    TENSOR_NAMES = {
        "tok_emb": "model.embed_tokens.weight",
        "rms_att": "model.layers.{}.input_layernorm.weight",
        "wq": "model.layers.{}.self_attn.q_proj.weight",
        "wk": "model.layers.{}.self_attn.k_proj.weight",
        "wv": "model.layers.{}.self_attn.v_proj.weight",
        "wo": "model.layers.{}.self_attn.o_proj.weight",
        "rms_ffn": "model.layers.{}.post_attention_layernorm.weight",
        "w1": "model.layers.{}.mlp.gate_proj.weight",
        "w2": "model.layers.{}.mlp.down_proj.weight",
        "w3": "model.layers.{}.mlp.up_proj.weight",
        "rms_final": "model.norm.weight", "wcls": "lm_head.weight",
    }
    DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}

    def __init__(self, folder):
        self.folder = folder
        self.desc = f"HF folder {folder}"
        cpath = os.path.join(folder, "config.json")
        if not os.path.isfile(cpath):
            raise ExportError(f"{folder} is a folder without config.json")
        try:
            with open(cpath, encoding="utf-8") as f:
                c = json.load(f)
            if not isinstance(c, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise ExportError(f"bad config.json: {e}")
        self._index_safetensors()
        self._config(c)
        self._tokenizer(c)

    def _index_safetensors(self):
        files = sorted(f for f in os.listdir(self.folder) if f.endswith(".safetensors"))
        if not files:
            raise ExportError(f"no *.safetensors files in {self.folder}")
        self.index = {}
        for fn in files:
            p = os.path.join(self.folder, fn)
            try:
                size = os.path.getsize(p)
                with open(p, "rb") as f:
                    (hlen,) = struct.unpack("<Q", f.read(8))
                    if hlen > min(100_000_000, size - 8):
                        raise ValueError(f"header length {hlen} is larger than the file")
                    hdr = json.loads(f.read(hlen))
                if not isinstance(hdr, dict):
                    raise ValueError("the header is not a JSON object")
            except (ValueError, struct.error, OSError) as e:
                raise ExportError(f"cannot read safetensors file {p}: {e}")
            for name, info in hdr.items():
                if name == "__metadata__":
                    continue
                self._check_entry(p, name, info)
                b, e = info["data_offsets"]
                if 8 + hlen + e > size:
                    raise ExportError(f"safetensors file {p} is truncated (tensor {name})")
                self.index[name] = (p, 8 + hlen, info)

    ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1}

    def _check_entry(self, path, name, info):
        """A header entry must be {dtype, shape, data_offsets} with a size that matches."""
        def ints(v, n=None):
            return (isinstance(v, list) and (n is None or len(v) == n)
                    and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v))
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str)
              and ints(info.get("shape")) and ints(info.get("data_offsets"), 2)
              and info["data_offsets"][0] <= info["data_offsets"][1])
        if not ok:
            raise ExportError(f"safetensors file {path}: bad header entry for tensor {name}: "
                              f"{json.dumps(info)[:100]}")
        size = self.ITEMSIZE.get(info["dtype"])
        b, e = info["data_offsets"]
        if size is not None and e - b != size * int(np.prod(info["shape"], dtype=np.int64)):
            raise ExportError(f"safetensors file {path}: tensor {name} has {e - b} bytes, its "
                              f"shape {info['shape']} and dtype {info['dtype']} need "
                              f"{size * int(np.prod(info['shape'], dtype=np.int64))}")

    def _config(self, c):
        mt = c.get("model_type")
        archs = c.get("architectures") or []
        if mt == "llama" or "LlamaForCausalLM" in archs:
            pass
        elif mt == "mistral" or "MistralForCausalLM" in archs:
            sw = c.get("sliding_window")
            if sw is not None and sw < c.get("max_position_embeddings", 0):
                raise ExportError(f"Mistral config with sliding_window {sw} is not supported")
        else:
            raise ExportError(f"unsupported model in config.json: model_type {mt!r}, "
                              f"architectures {archs} (only Llama)")
        try:
            dim = int(c["hidden_size"])
            n_heads = int(c["num_attention_heads"])
            cfg = dict(
                dim=dim, hidden_dim=int(c["intermediate_size"]),
                n_layers=int(c["num_hidden_layers"]), n_heads=n_heads,
                n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
                head_dim=int(c.get("head_dim") or (dim // n_heads if n_heads > 0 else 0)),
                vocab_size=int(c["vocab_size"]),
                seq_len=int(c.get("max_position_embeddings", 2048)),
                rope_theta=float(c.get("rope_theta", 10000.0)),
                norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            )
        except KeyError as e:
            raise ExportError(f"bad config.json: missing key {e}")
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise ExportError(f"bad config.json: {e}")
        rs = c.get("rope_scaling")
        if rs is not None and not isinstance(rs, dict):
            raise ExportError(f"bad config.json: rope_scaling = {str(rs)[:40]!r} is not an object")
        if rs and (rs.get("rope_type") or rs.get("type")) not in (None, "default"):
            raise ExportError(f"RoPE scaling {rs} is not supported")
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise ExportError("attention_bias / mlp_bias are not supported")
        act = c.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ExportError(f"hidden_act {act!r} is not supported (only silu)")
        tie = c.get("tie_word_embeddings", False)
        has_head = "lm_head.weight" in self.index
        if not tie and not has_head:
            log("warning: lm_head.weight missing: using tied embeddings")
        cfg["shared_classifier"] = 1 if (tie or not has_head) else 0
        self.cfg = cfg

    def _tokenizer(self, c):
        tpath = os.path.join(self.folder, "tokenizer.json")
        try:
            with open(tpath, encoding="utf-8") as f:
                tj = json.load(f)
        except OSError as e:
            raise ExportError(f"cannot read tokenizer.json: {e}")
        except ValueError as e:
            raise ExportError(f"bad tokenizer.json: {e}")
        tc = {}
        tcpath = os.path.join(self.folder, "tokenizer_config.json")
        if os.path.isfile(tcpath):
            try:
                with open(tcpath, encoding="utf-8") as f:
                    tc = json.load(f)
            except ValueError:
                tc = {}
            if not isinstance(tc, dict):
                tc = {}
        if not isinstance(tj, dict) or not isinstance(tj.get("model"), dict):
            raise ExportError("bad tokenizer.json: not an object with a \"model\" object")
        model = tj["model"]
        if model.get("type") != "BPE":
            raise ExportError(f"unsupported tokenizer.json model type {model.get('type')!r} "
                              "(only byte-level BPE)")
        if tj.get("normalizer") is not None:
            nt = tj["normalizer"]
            raise ExportError(f"unsupported tokenizer.json normalizer "
                              f"{nt.get('type') if isinstance(nt, dict) else nt!r}")
        if tj.get("pre_tokenizer") is not None and not isinstance(tj["pre_tokenizer"], dict):
            raise ExportError("bad tokenizer.json: pre_tokenizer is not an object")
        pretok = self._pretok(tj.get("pre_tokenizer"))

        vocab = model.get("vocab") or {}
        added = tj.get("added_tokens") or []

        def good_id(i):
            return isinstance(i, int) and not isinstance(i, bool) and i >= 0
        if not isinstance(vocab, dict) or not all(good_id(i) for i in vocab.values()):
            bad = next((f"{k!r}: {v!r}" for k, v in vocab.items() if not good_id(v)), "") \
                if isinstance(vocab, dict) else "not an object"
            raise ExportError(f"bad tokenizer.json: model.vocab needs ids >= 0 ({bad[:60]})")
        if not isinstance(added, list) or not all(
                isinstance(a, dict) and good_id(a.get("id")) and isinstance(a.get("content"), str)
                for a in added):
            raise ExportError("bad tokenizer.json: added_tokens needs {id >= 0, content} "
                              "entries")
        n = max([i for i in vocab.values()] + [a["id"] for a in added], default=-1) + 1
        V = self.cfg["vocab_size"]
        if n > V:
            raise ExportError(f"tokenizer.json has {n} tokens, more than config vocab_size {V}")
        text = [None] * V
        flags = [0] * V
        tb = [None] * V
        stats = {}
        for s, i in vocab.items():
            text[i] = s
            tb[i] = gpt2_token_bytes(s, stats)
        for a in added:
            i = a["id"]
            text[i] = a["content"]
            tb[i] = a["content"].encode("utf-8")
            flags[i] = FLAG_SPECIAL if a.get("special") else 0
        if stats.get("unmapped"):
            log(f"warning: {stats['unmapped']} characters outside GPT-2's byte map kept as "
                "UTF-8")
        npad = 0
        for i in range(V):
            if tb[i] is None:      # ids the embedding has but the tokenizer does not use
                tb[i] = f"<|pad_{i}|>".encode()
                npad += 1
        if npad:
            log(f"note: {npad} unused token ids (vocab_size {V}) filled with <|pad_N|>")
        token_ids = {}
        for i, s in enumerate(text):
            if s is not None:
                token_ids.setdefault(s, i)
        pairs = []
        for m in model.get("merges") or []:
            if isinstance(m, str):
                pairs.append(split_merge_string(m))
            elif isinstance(m, (list, tuple)) and len(m) == 2:
                pairs.append((m[0], m[1]))
            else:
                raise ExportError(f"bad merge entry {m!r} in tokenizer.json")
        merges = resolve_merges(pairs, token_ids, tb, "tokenizer.json")

        def tok_id(key_cfg, key_tc):
            v = c.get(key_cfg)
            if isinstance(v, list):
                v = v[0] if v else None
            if v is not None:
                return int(v)
            t = tc.get(key_tc)
            if isinstance(t, dict):
                t = t.get("content")
            return find_id(token_ids, t) if isinstance(t, str) else -1

        bos = tok_id("bos_token_id", "bos_token")
        eos = tok_id("eos_token_id", "eos_token")
        if "add_bos_token" in tc:
            add_bos = int(bool(tc["add_bos_token"]))
        else:
            add_bos = 0
            pp = tj.get("post_processor") or {}
            procs = pp.get("processors", [pp]) if pp.get("type") == "Sequence" else [pp]
            for p in procs:
                if p.get("type") == "TemplateProcessing" and bos >= 0:
                    for piece in p.get("single", []):
                        st = piece.get("SpecialToken")
                        if st and find_id(token_ids, st.get("id")) == bos:
                            add_bos = 1
        self.tok = dict(kind=KIND_GPT2, pretok=pretok, tokens=tb, scores=[0.0] * V,
                        flags=flags, merges=merges, ranges=unicode_ranges(), bos=bos, eos=eos,
                        add_bos=add_bos, chat_start=find_id(token_ids, "<|im_start|>"),
                        chat_end=find_id(token_ids, "<|im_end|>"))

    @staticmethod
    def _pretok(pt):
        def bytelevel_ok(p):
            return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False)
                    and p.get("use_regex", True))

        desc = json.dumps(pt, separators=(",", ":"))[:200] if pt is not None else "null"
        if pt is None:
            raise ExportError("unsupported pre-tokenizer: none (need ByteLevel)")
        if bytelevel_ok(pt):
            return PRETOK_GPT2
        if pt.get("type") == "Sequence":
            ps = pt.get("pretokenizers") or []
            if (len(ps) == 2 and ps[0].get("type") == "Digits"
                    and ps[0].get("individual_digits") and bytelevel_ok(ps[1])):
                return PRETOK_SMOLLM
            if len(ps) == 1 and bytelevel_ok(ps[0]):
                return PRETOK_GPT2
        raise ExportError(f"unsupported pre-tokenizer in tokenizer.json: {desc}")

    def _name(self, group, layer):
        t = self.TENSOR_NAMES[group]
        return t.format(layer) if layer is not None else t

    def check(self, group, layer, shape):
        name = self._name(group, layer)
        if name not in self.index:
            raise ExportError(f"tensor {name} missing from safetensors")
        info = self.index[name][2]
        if info["dtype"] not in self.DTYPES:
            raise ExportError(f"unsupported tensor type {info['dtype']} for tensor {name}")
        got = tuple(info["shape"])
        if got != shape:
            raise ExportError(f"tensor {name} has shape {got}, expected {shape}")

    def _read(self, name):
        path, base, info = self.index[name]
        dt = info["dtype"]
        shape = tuple(info["shape"])
        if dt == "BF16":   # numpy has no bfloat16: read raw bytes, widen to fp32
            b, e = info["data_offsets"]
            raw = np.memmap(path, dtype="<u2", mode="r", offset=base + b,
                            shape=((e - b) // 2,))
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        from safetensors import safe_open
        with safe_open(path, framework="numpy") as f:
            return f.get_tensor(name).astype(np.float32, copy=False)

    def get(self, group, layer):
        a = self._read(self._name(group, layer))
        if group in ("wq", "wk"):
            n = self.cfg["n_heads"] if group == "wq" else self.cfg["n_kv_heads"]
            a = hf_to_interleaved(a, n)
        return a


def hf_to_interleaved(w, n_head):
    """HF rotate-half rows (pairs i, i+hd/2) -> interleaved rows (pairs 2i, 2i+1), per head
    (llama.cpp convert_hf_to_gguf's permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# ----------------------------------------------------------------------------------------
# source 3: llama2.c checkpoint

class Llama2cSource:
    V1_MAGIC = 0x616B3432   # "ak42"

    def __init__(self, path, tokenizer_path):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
        if len(head) < 28:
            raise ExportError(f"{path}: file too short ({size} bytes) to be a model")
        if struct.unpack("<I", head[:4])[0] == self.V1_MAGIC:
            if len(head) < 37:
                raise ExportError(f"{path}: truncated llama2.c v1 header")
            version = struct.unpack("<i", head[4:8])[0]
            if version != 1:
                raise ExportError(f"llama2.c checkpoint version {version} is not supported "
                                  "(only v0 and fp32 v1)")
            dim, hidden, nl, nh, nkv, vocab, seq = struct.unpack("<7i", head[8:36])
            shared = head[36]
            self.version, base = 1, HEADER_SIZE
        else:
            dim, hidden, nl, nh, nkv, vocab, seq = struct.unpack("<7i", head[:28])
            shared = 1 if vocab > 0 else 0
            vocab = abs(vocab)
            self.version, base = 0, 28
        sane = (0 < dim < 1 << 20 and 0 < hidden < 1 << 22 and 0 < nl < 4096
                and 0 < nh <= dim and 0 < nkv <= nh and 0 < vocab < 1 << 24
                and 0 < seq < 1 << 24 and dim % nh == 0)
        if not sane:
            raise ExportError(f"{path}: not a GGUF file, a Hugging Face folder or a llama2.c "
                              f"checkpoint (header ints {dim}, {hidden}, {nl}, {nh}, {nkv}, "
                              f"{vocab}, {seq} make no sense)")
        hd = dim // nh
        cfg = dict(dim=dim, hidden_dim=hidden, n_layers=nl, n_heads=nh, n_kv_heads=nkv,
                   head_dim=hd, vocab_size=vocab, seq_len=seq, rope_theta=10000.0,
                   norm_eps=1e-5, shared_classifier=int(bool(shared)))
        # element offsets of every tensor, in the file's own order
        shapes = {g: expected_shape(cfg, g) for g, _ in WEIGHT_ORDER}
        numel = {g: int(np.prod(s)) for g, s in shapes.items()}
        if self.version == 0:
            order = ["tok_emb", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3",
                     "rms_final"]
        else:
            order = ["rms_att", "rms_ffn", "rms_final", "tok_emb", "wq", "wk", "wv", "wo",
                     "w1", "w2", "w3"]
        off = {}
        pos = 0
        for g in order:
            off[g] = pos
            pos += numel[g] * (nl if dict(WEIGHT_ORDER)[g] else 1)
        freqs = seq * hd  # freq_cis_real + freq_cis_imag, (seq_len, hd/2) each
        cls = 0 if shared else numel["wcls"]
        n_floats = (size - base) // 4
        if self.version == 0 and n_floats == pos + freqs + cls and (size - base) % 4 == 0:
            off["wcls"] = pos + freqs
        elif n_floats == pos + cls and (size - base) % 4 == 0:
            off["wcls"] = pos            # no freq_cis tables (v1, or a v0 written without)
        else:
            raise ExportError(
                f"{path}: size {size} does not match a llama2.c v{self.version} checkpoint "
                f"with dim {dim}, hidden {hidden}, {nl} layers, {nh} heads, {nkv} kv heads, "
                f"vocab {vocab}, seq_len {seq} (expected {base + 4 * (pos + cls)} or "
                f"{base + 4 * (pos + freqs + cls)} bytes)")
        self.off, self.numel, self.shapes, self.base = off, numel, shapes, base
        self.data = np.memmap(path, dtype="<f4", mode="r", offset=base, shape=(n_floats,))
        self.cfg = cfg
        self.desc = f"llama2.c v{self.version} {os.path.basename(path)}"
        if tokenizer_path is None:
            tokenizer_path = os.path.join(os.path.dirname(os.path.abspath(path)),
                                          "tokenizer.bin")
            if not os.path.isfile(tokenizer_path):
                raise ExportError(f"llama2.c checkpoint needs tokenizer.bin: none next to "
                                  f"{path}; pass --tokenizer PATH")
        self.tok = self._tokenizer(tokenizer_path, vocab)

    @staticmethod
    def _tokenizer(path, vocab):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ExportError(f"cannot read tokenizer {path}: {e}")
        try:
            pos = 4
            toks, scores = [], []
            for _ in range(vocab):
                score, n = struct.unpack_from("<fi", data, pos)
                pos += 8
                if n < 0 or pos + n > len(data):
                    raise struct.error("bad token length")
                toks.append(data[pos:pos + n])
                scores.append(score)
                pos += n
        except struct.error:
            raise ExportError(f"{path}: not a llama2.c tokenizer.bin for vocab {vocab} "
                              f"(truncated at token {len(toks)})")
        if pos != len(data):
            log(f"warning: {len(data) - pos} extra bytes after {vocab} tokens in {path}")
        flags = [0] * vocab
        for i in (1, 2):
            if i < vocab:
                flags[i] = FLAG_SPECIAL
        return dict(kind=KIND_SPM, pretok=PRETOK_NONE, tokens=toks, scores=scores, flags=flags,
                    merges=[], ranges=[], bos=1, eos=2, add_bos=1, chat_start=-1, chat_end=-1)

    def check(self, group, layer, shape):
        pass   # shapes are implied by the header and the file size was checked

    def get(self, group, layer):
        n = self.numel[group]
        o = self.off[group] + (n * layer if layer is not None else 0)
        return self.data[o:o + n].reshape(self.shapes[group])


# ----------------------------------------------------------------------------------------
# writer

def open_source(src, tokenizer_path):
    if os.path.isdir(src):
        return HFSource(src)
    if not os.path.isfile(src):
        raise ExportError(f"{src}: no such file or folder")
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFSource(src)
    return Llama2cSource(src, tokenizer_path)


def export(src, out, tokenizer_path=None, weights="fp32"):
    t0 = time.time()
    if weights not in WEIGHT_TYPES:
        raise ExportError(f"unknown weight type {weights!r} (fp32 or q8)")
    if os.path.exists(out) and os.path.exists(src) and os.path.samefile(src, out):
        raise ExportError("output path is the same file as the input")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise ExportError(f"output folder {os.path.dirname(os.path.abspath(out))} does not exist")
    if os.path.isdir(out):
        raise ExportError(f"output {out} is a folder")
    s = open_source(src, tokenizer_path)
    cfg, tok = s.cfg, s.tok
    check_config(cfg)
    if weights == "q8":
        check_q8_rows(cfg)
    if len(tok["tokens"]) != cfg["vocab_size"]:
        raise ExportError(f"tokenizer has {len(tok['tokens'])} tokens, model vocab_size "
                          f"{cfg['vocab_size']}")
    for k in ("bos", "eos", "chat_start", "chat_end"):
        if not -1 <= tok[k] < cfg["vocab_size"]:
            raise ExportError(f"{k} id {tok[k]} out of range")
    tensors = tensor_list(cfg)
    for g, l in tensors:
        s.check(g, l, expected_shape(cfg, g))
    tok_blob = pack_tokenizer(tok)
    w_off = -(-(HEADER_SIZE + len(tok_blob)) // ALIGN) * ALIGN
    w_bytes = sum(tensor_bytes(cfg, g, weights) for g, _ in tensors)

    out_dir = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(out) + ".", suffix=".tmp",
                               dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * HEADER_SIZE)
            f.write(tok_blob)
            f.write(b"\0" * (w_off - HEADER_SIZE - len(tok_blob)))
            written, nonfinite = 0, []
            scales = []     # q8: a group's scales, written after the codes of all its layers
            for g, l in tensors:
                a = s.get(g, l)
                shape = expected_shape(cfg, g)
                if a.shape != shape:
                    raise ExportError(f"tensor {g}[{l}] has shape {a.shape}, expected {shape}")
                a = np.ascontiguousarray(a, dtype="<f4")
                name = f"{g}" + (f"[{l}]" if l is not None else "")
                if not np.isfinite(a).all():
                    if weights == "q8":
                        raise ExportError(f"tensor {name} has non-finite values, which int8 "
                                          f"cannot hold; export it with --weights fp32")
                    nonfinite.append(name)
                if weights == "q8" and a.ndim == 2:
                    a, sc = quantize_q8(a)
                    scales.append(sc)
                f.write(memoryview(a).cast("B"))
                written += a.nbytes
                if l is None or l == cfg["n_layers"] - 1:
                    for sc in scales:
                        f.write(memoryview(np.ascontiguousarray(sc, dtype="<f4")).cast("B"))
                        written += sc.nbytes
                    scales = []
                    n = cfg["n_layers"] if l is not None else 1
                    kind = f"int8 g{QGROUP}" if weights == "q8" and len(shape) == 2 else "fp32"
                    log(f"[{100 * written / w_bytes:5.1f}%] {g:9s} {n} x {shape} {kind}")
            if written != w_bytes:
                raise ExportError(f"internal: wrote {written} weight bytes, expected {w_bytes}")
            if nonfinite:
                log(f"warning: non-finite values in {', '.join(nonfinite[:8])}")
            header = struct.pack(
                "<4s15i2f4Q2i", MAGIC, VERSION, cfg["dim"], cfg["hidden_dim"], cfg["n_layers"],
                cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"], cfg["vocab_size"],
                cfg["seq_len"], cfg["shared_classifier"], tok["kind"], tok["bos"], tok["eos"],
                tok["chat_start"], tok["chat_end"], cfg["rope_theta"], cfg["norm_eps"],
                HEADER_SIZE, len(tok_blob), w_off, w_bytes, tok["add_bos"], tok["pretok"])
            if weights != "fp32":   # fp32 files keep zeros here, as before the field existed
                header += struct.pack("<2i", WEIGHT_TYPES[weights], QGROUP)
            header += b"\0" * (HEADER_SIZE - len(header))
            f.seek(0)
            f.write(header)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    size = w_off + w_bytes
    kind = {KIND_SPM: "sentencepiece", KIND_GPT2: "gpt2-bpe"}[tok["kind"]]
    wdesc = f"int8 g{QGROUP}" if weights == "q8" else "fp32"
    print(f"export.py: wrote {out} ({size / 2 ** 20:.1f} MiB, {wdesc} weights) from {s.desc} in "
          f"{time.time() - t0:.1f} s: dim {cfg['dim']}, hidden {cfg['hidden_dim']}, "
          f"{cfg['n_layers']} layers, {cfg['n_heads']} heads, {cfg['n_kv_heads']} kv heads, "
          f"head_dim {cfg['head_dim']}, vocab {cfg['vocab_size']}, seq_len {cfg['seq_len']}, "
          f"theta {cfg['rope_theta']:g}, eps {cfg['norm_eps']:g}, "
          f"{'shared' if cfg['shared_classifier'] else 'separate'} classifier, "
          f"tokenizer {kind} (pretok {tok['pretok']}, {len(tok['merges'])} merges), "
          f"bos {tok['bos']}, eos {tok['eos']}, chat {tok['chat_start']}/{tok['chat_end']}, "
          f"add_bos {tok['add_bos']}")


# ----------------------------------------------------------------------------------------
# random-weight models of a named shape (speed measurements and GPU-vs-CPU tests only)

RANDOM_SHAPES = {   # the shapes of two real models; the weights are random
    "smollm2-135m": dict(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                         vocab_size=49152, seq_len=8192, rope_theta=100000.0, norm_eps=1e-5,
                         shared_classifier=1),
    "llama-3.1-8b": dict(dim=4096, hidden_dim=14336, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                         vocab_size=128256, seq_len=131072, rope_theta=500000.0, norm_eps=1e-5,
                         shared_classifier=0),
}


# Standard deviations of the random matrices. With 0.02 everywhere a SmolLM2-shaped model's
# attention is uniform in all but name (entropy 5.22 nats at positions 128..255, uniform 5.24)
# and its next-token distribution nearly so; with wq, wk at 0.08 and the embedding at 0.1 the
# scores spread (std ~3.5) and attention is peaked, so a wrong weight in the softmax shows.
RANDOM_STD = {"tok_emb": 0.1, "wcls": 0.1, "wq": 0.08, "wk": 0.08}


def export_random(src, out, shape, layers=None, seed=1234):
    """A model.bin of RANDOM_SHAPES[shape] (n_layers = layers if given) with the tokenizer of the
    model.bin src (only its header and tokenizer section are read, so a file cut after the
    tokenizer will do). Matrices are N(0, std^2) (RANDOM_STD, else 0.02) rounded to
    fp16-representable numbers, so the fp16 weights of run_cuda are exactly the fp32 weights of
    run; the RMSNorm weights are 1. A vocabulary larger than src's is filled with special tokens
    <|pad_N|> that no text produces."""
    if shape not in RANDOM_SHAPES:
        raise ExportError(f"unknown shape {shape!r} (known: {', '.join(RANDOM_SHAPES)})")
    cfg = dict(RANDOM_SHAPES[shape])
    if layers is not None:
        if not 1 <= layers <= cfg["n_layers"]:
            raise ExportError(f"--layers {layers}: the shape has 1 to {cfg['n_layers']} layers")
        cfg["n_layers"] = layers
    with open(src, "rb") as f:
        head = f.read(HEADER_SIZE)
        fmt = "<4s15i2f4Q2i"
        if len(head) < HEADER_SIZE or head[:4] != MAGIC:
            raise ExportError(f"{src} is not a model.bin (its tokenizer is what --random takes)")
        h = struct.unpack(fmt, head[:struct.calcsize(fmt)])
        kind, bos, eos, chat_start, chat_end = h[11:16]
        t_off, t_len, add_bos, pretok = h[18], h[19], h[22], h[23]
        f.seek(t_off)
        blob = f.read(t_len)
    if len(blob) != t_len:
        raise ExportError(f"{src}: tokenizer section truncated")
    n, max_len = struct.unpack_from("<ii", blob, 0)
    p = 8
    for _ in range(n):                           # skip the vocabulary to find the merges
        p += 12 + struct.unpack_from("<i", blob, p + 8)[0]
    vocab = cfg["vocab_size"]
    if vocab < n:
        raise ExportError(f"shape {shape} has a vocabulary of {vocab}, fewer than {src}'s {n} tokens")
    pads = [f"<|pad_{i}|>".encode() for i in range(n, vocab)]
    extra = b"".join(struct.pack("<fii", 0.0, FLAG_SPECIAL, len(t)) + t for t in pads)
    max_len = max([max_len] + [len(t) for t in pads])
    tok_blob = struct.pack("<ii", vocab, max_len) + blob[8:p] + extra + blob[p:]
    check_config(cfg)
    cfg_t = dict(kind=kind, bos=bos, eos=eos, chat_start=chat_start, chat_end=chat_end, add_bos=add_bos, pretok=pretok)
    tensors = tensor_list(cfg)
    w_off = -(-(HEADER_SIZE + len(tok_blob)) // ALIGN) * ALIGN
    w_bytes = sum(4 * int(np.prod(expected_shape(cfg, g))) for g, _ in tensors)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    with open(out, "wb") as f:
        header = struct.pack(
            fmt, MAGIC, VERSION, cfg["dim"], cfg["hidden_dim"], cfg["n_layers"], cfg["n_heads"],
            cfg["n_kv_heads"], cfg["head_dim"], vocab, cfg["seq_len"], cfg["shared_classifier"],
            cfg_t["kind"], cfg_t["bos"], cfg_t["eos"], cfg_t["chat_start"], cfg_t["chat_end"],
            cfg["rope_theta"], cfg["norm_eps"], HEADER_SIZE, len(tok_blob), w_off, w_bytes,
            cfg_t["add_bos"], cfg_t["pretok"])
        f.write(header + b"\0" * (HEADER_SIZE - len(header)) + tok_blob)
        f.write(b"\0" * (w_off - HEADER_SIZE - len(tok_blob)))
        for g, _ in tensors:
            size = int(np.prod(expected_shape(cfg, g)))
            if g.startswith("rms"):
                f.write(np.ones(size, dtype="<f4").tobytes())
                continue
            std = np.float32(RANDOM_STD.get(g, 0.02))
            for i in range(0, size, 1 << 24):    # 64 MiB at a time
                a = rng.standard_normal(min(1 << 24, size - i), dtype=np.float32) * std
                f.write(a.astype(np.float16).astype("<f4").tobytes())
    print(f"export.py: wrote {out} ({(w_off + w_bytes) / 2 ** 20:.1f} MiB) in {time.time() - t0:.1f} s: random "
          f"normal weights (fp16-representable) of shape {shape}, {cfg['n_layers']} layers, "
          f"tokenizer of {src} ({n} tokens, {vocab - n} pads)")


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="export.py",
        description="Convert a GGUF file, a Hugging Face folder or a llama2.c checkpoint "
                    "into model.bin (format v1, see README.md).")
    ap.add_argument("source", help="GGUF file, HF model folder, or llama2.c .bin")
    ap.add_argument("output", help="model.bin to write")
    ap.add_argument("--tokenizer", help="llama2.c tokenizer.bin (default: next to source)")
    ap.add_argument("--weights", choices=sorted(WEIGHT_TYPES), default="fp32",
                    help="fp32 (default), or q8: matrices in int8 with an fp32 scale per 64 "
                         "numbers of a row (RMSNorm weights stay fp32)")
    ap.add_argument("--random", metavar="SHAPE", help="random weights of shape SHAPE ("
                    + ", ".join(RANDOM_SHAPES) + ") with the tokenizer of SOURCE, a model.bin: "
                    "for speed measurements; --layers N keeps the first N layers")
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        if args.random:
            export_random(args.source, args.output, args.random, args.layers)
            return 0
        export(args.source, args.output, args.tokenizer, args.weights)
    except ExportError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("export.py: error: interrupted", file=sys.stderr)
        return 1
    except (OSError, MemoryError) as e:
        print(f"export.py: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except Exception as e:   # a file we could not make sense of: still one line, no traceback
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"export.py: error: unexpected {type(e).__name__} while exporting "
              f"{args.source}: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
