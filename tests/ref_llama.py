"""Independent numpy reference forward pass of a Llama-architecture model (float64).

Written from the Llama equations, not from run.c or export.py, and it never reads model.bin:
the weights come straight from the source checkpoint.

    load_gguf(path)    a GGUF file (arch "llama"), tensors dequantized with gguf.quants.dequantize;
                       q/k rows are in llama.cpp's order, so RoPE rotates interleaved pairs
                       (2i, 2i+1) of each head.
    load_hf(folder)    a Hugging Face folder (config.json + *.safetensors, read by a small parser
                       of our own so that bf16 works too); q/k rows stay in HF's order and RoPE
                       uses HF's rotate_half convention, pairs (i, i + head_dim/2). This is
                       deliberately the *other* convention: export.py permutes HF q/k rows into
                       the interleaved order, and comparing run against this reference checks
                       that permutation.
    forward(m, tokens, kv_fn=None, k_fn=None, v_fn=None) -> logits (n_tokens, vocab) float64
    quantize_q8(m)     the model with int8 weights (README, "model.bin format": groups of 64
                       along a row, s = max|w| / 127, q = round(w / s)), held as q * s

Per layer:  h  = x + wo . attn(RoPE(wq . n1), RoPE(wk . n1), wv . n1),   n1 = RMSNorm(x)
            x' = h + w2 . (silu(w1 . n2) * (w3 . n2)),                    n2 = RMSNorm(h)
attention is causal, grouped-query (query head h reads kv head h // (n_heads // n_kv_heads)),
scores scaled by 1/sqrt(head_dim). RoPE angle for pair i at position p: p * theta^(-2i/head_dim).
Logits = wcls . RMSNorm(x) with wcls = token embedding when tied.

int8-weight hook: matmul_in(x, site, layer), if given, replaces the input x (T, n) of every matrix
product, e.g. with x quantized the way run quantizes the input of an int8 product; site is
"qkv" (the input of wq, wk and wv), "wo", "w13" (of w1 and w3), "w2" or "cls" (the classifier's,
layer = n_layers).

kv cache hook: every cached key (after RoPE) and value vector, one head at a time, goes through
k_fn / v_fn (default kv_fn, default identity) before attention reads it; e.g.
kv_fn=fp16_roundtrip simulates an fp16 cache. Keys are handed over in the interleaved order that
model.bin (and so run's cache) uses, also for HF weights: a rotating codec is not
permutation-equivariant, so the order matters for tq formats.

CLI:  python3 tests/ref_llama.py SRC ids.txt out.f32   writes float32 logits (n_tokens, vocab).
"""
from __future__ import annotations

import json
import pathlib
import struct
import sys
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RefModel:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    rope_style: str                 # "interleaved" (GGUF / llama.cpp) or "half" (HF rotate_half)
    tok_emb: np.ndarray             # (vocab, dim)
    final_norm: np.ndarray          # (dim,)
    wcls: np.ndarray                # (vocab, dim); is tok_emb when tied
    tied: bool
    layers: list = field(default_factory=list)  # dicts: attn_norm wq wk wv wo ffn_norm w1 w2 w3


# ----------------------------------------------------------------------------- loading: GGUF

def _f64(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float64))


def _gguf_field(reader, key, default=None):
    f = reader.get_field(key)
    if f is None:
        return default
    return f.contents()


def _gguf_tensor(t) -> np.ndarray:
    """A GGUF tensor as a float64 numpy array of shape (rows, cols) (= reversed ne)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    shape = tuple(int(n) for n in reversed(list(t.shape)))
    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F64,
                         GGMLQuantizationType.F16):
        a = np.asarray(t.data).astype(np.float64)
    else:
        a = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64)
    return np.ascontiguousarray(a.reshape(shape))


def load_gguf(path) -> RefModel:
    import gguf
    r = gguf.GGUFReader(str(path))
    arch = _gguf_field(r, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"reference handles arch 'llama' only, got {arch!r}")
    tensors = {t.name: t for t in r.tensors}
    if "rope_freqs.weight" in tensors:
        raise NotImplementedError("rope_freqs (llama3 rope scaling) not supported by the reference")
    stype = _gguf_field(r, "llama.rope.scaling.type")
    if stype not in (None, "none"):
        raise NotImplementedError(f"rope scaling {stype!r} not supported by the reference")

    dim = int(_gguf_field(r, "llama.embedding_length"))
    n_layers = int(_gguf_field(r, "llama.block_count"))
    n_heads = int(_gguf_field(r, "llama.attention.head_count"))
    n_kv_heads = int(_gguf_field(r, "llama.attention.head_count_kv", n_heads))
    head_dim = int(_gguf_field(r, "llama.attention.key_length", dim // n_heads))
    n_rot = int(_gguf_field(r, "llama.rope.dimension_count", head_dim))
    if n_rot != head_dim:
        raise NotImplementedError(f"partial rotary (n_rot {n_rot} != head_dim {head_dim})")
    hidden = int(_gguf_field(r, "llama.feed_forward_length"))
    theta = float(_gguf_field(r, "llama.rope.freq_base", 10000.0))
    eps = float(_gguf_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5))

    def get(name):
        return _gguf_tensor(tensors[name])

    tok = get("token_embd.weight")
    layers = []
    for l in range(n_layers):
        p = f"blk.{l}."
        for b in ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"):
            if p + b in tensors:
                raise NotImplementedError(f"bias tensor {p + b} not supported")
        layers.append(dict(
            attn_norm=get(p + "attn_norm.weight"),
            wq=get(p + "attn_q.weight"), wk=get(p + "attn_k.weight"),
            wv=get(p + "attn_v.weight"), wo=get(p + "attn_output.weight"),
            ffn_norm=get(p + "ffn_norm.weight"),
            w1=get(p + "ffn_gate.weight"), w2=get(p + "ffn_down.weight"),
            w3=get(p + "ffn_up.weight")))
    tied = "output.weight" not in tensors
    wcls = tok if tied else get("output.weight")
    m = RefModel(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads,
                 n_kv_heads=n_kv_heads, head_dim=head_dim, vocab_size=tok.shape[0],
                 rope_theta=theta, norm_eps=eps, rope_style="interleaved", tok_emb=tok,
                 final_norm=get("output_norm.weight"), wcls=wcls, tied=tied, layers=layers)
    _check_shapes(m)
    return m


# ----------------------------------------------------------------------------- loading: HF

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bf16"}


def read_safetensors(path) -> dict:
    """Minimal safetensors reader: {name: float64 array}; handles F32/F16/BF16/F64."""
    out = {}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise NotImplementedError(f"safetensors dtype {info['dtype']} ({name})")
        lo, hi = info["data_offsets"]
        raw = np.asarray(buf[base + lo: base + hi])
        if dt == "bf16":
            a = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            a = raw.view(np.dtype(dt).newbyteorder("<"))
        out[name] = a.astype(np.float64).reshape(info["shape"])
    return out


def load_hf(folder) -> RefModel:
    folder = pathlib.Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("rope_scaling"):
        raise NotImplementedError(f"rope_scaling {cfg['rope_scaling']} not supported")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise NotImplementedError("attention/mlp bias not supported")
    w = {}
    for f in sorted(folder.glob("*.safetensors")):
        w.update(read_safetensors(f))
    dim = int(cfg["hidden_size"])
    n_heads = int(cfg["num_attention_heads"])
    n_kv_heads = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or dim // n_heads)
    n_layers = int(cfg["num_hidden_layers"])
    tok = w["model.embed_tokens.weight"]
    layers = []
    for l in range(n_layers):
        p = f"model.layers.{l}."
        layers.append(dict(
            attn_norm=w[p + "input_layernorm.weight"],
            wq=w[p + "self_attn.q_proj.weight"], wk=w[p + "self_attn.k_proj.weight"],
            wv=w[p + "self_attn.v_proj.weight"], wo=w[p + "self_attn.o_proj.weight"],
            ffn_norm=w[p + "post_attention_layernorm.weight"],
            w1=w[p + "mlp.gate_proj.weight"], w2=w[p + "mlp.down_proj.weight"],
            w3=w[p + "mlp.up_proj.weight"]))
    tied = bool(cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in w
    wcls = tok if tied else w["lm_head.weight"]
    m = RefModel(dim=dim, hidden_dim=int(cfg["intermediate_size"]), n_layers=n_layers,
                 n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                 vocab_size=tok.shape[0], rope_theta=float(cfg.get("rope_theta", 10000.0)),
                 norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_style="half",
                 tok_emb=tok, final_norm=w["model.norm.weight"], wcls=wcls, tied=tied,
                 layers=layers)
    _check_shapes(m)
    return m


def quantize_q8(m: RefModel) -> RefModel:
    """A copy of m whose matrices (token embedding, wq wk wv wo w1 w2 w3, classifier) are their
    int8 group quantization, dequantized: each run of 64 numbers along a row w (float32
    values) shares s = max|w| / 127 rounded to float32, and w becomes q * s with q = w / s
    rounded to the nearest integer, ties to even (an all-zero group stays zero). Rows are
    quantized in the order of the source: permuting rows (HF q/k rows into RoPE's
    interleaved order) does not change what a row holds. The RMSNorm weights are kept."""
    import copy

    def q8(a):
        rows, cols = a.shape
        if cols % 64:
            raise ValueError(f"rows of {cols} numbers are not groups of 64")
        g = np.asarray(a, dtype=np.float32).astype(np.float64).reshape(rows, cols // 64, 64)
        s = (np.abs(g).max(axis=2, keepdims=True) / 127.0).astype(np.float32).astype(np.float64)
        q = np.rint(np.divide(g, s, out=np.zeros_like(g), where=s > 0))
        return np.ascontiguousarray((q * s).reshape(rows, cols))

    out = copy.copy(m)
    out.tok_emb = q8(m.tok_emb)
    out.wcls = out.tok_emb if m.tied else q8(m.wcls)
    out.layers = [dict(L, **{k: q8(L[k]) for k in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")})
                  for L in m.layers]
    return out


def load(src) -> RefModel:
    src = pathlib.Path(src)
    if src.is_dir():
        return load_hf(src)
    if src.suffix == ".gguf" or src.read_bytes()[:4] == b"GGUF":
        return load_gguf(src)
    raise ValueError(f"unknown source {src}")


def _check_shapes(m: RefModel):
    D, H, KV, hd, F, V = m.dim, m.n_heads, m.n_kv_heads, m.head_dim, m.hidden_dim, m.vocab_size
    assert H % KV == 0, (H, KV)
    assert hd % 2 == 0
    assert m.tok_emb.shape == (V, D) and m.wcls.shape == (V, D) and m.final_norm.shape == (D,)
    for L in m.layers:
        assert L["attn_norm"].shape == (D,) and L["ffn_norm"].shape == (D,)
        assert L["wq"].shape == (H * hd, D), L["wq"].shape
        assert L["wk"].shape == (KV * hd, D) and L["wv"].shape == (KV * hd, D)
        assert L["wo"].shape == (D, H * hd)
        assert L["w1"].shape == (F, D) and L["w3"].shape == (F, D) and L["w2"].shape == (D, F)


# ----------------------------------------------------------------------------- forward

def _openblas_threads_api():
    """(get, set) of the OpenBLAS that numpy bundles, or None. The reference's matrices are
    small; with several threads on a busy machine OpenBLAS runs them 30x slower than one."""
    import ctypes
    import glob
    import os
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs",
                                  "*openblas*"))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in ("64_", "_64_", ""):
            for prefix in ("scipy_openblas_", "openblas_"):
                g = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
                s = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
                if g is not None and s is not None:
                    g.restype = ctypes.c_int
                    s.argtypes = [ctypes.c_int]
                    return g, s
    return None


_BLAS = None


class _one_blas_thread:
    def __enter__(self):
        global _BLAS
        if _BLAS is None:
            try:
                _BLAS = _openblas_threads_api() or False
            except Exception:
                _BLAS = False
        self.saved = _BLAS[0]() if _BLAS else None
        if _BLAS:
            _BLAS[1](1)

    def __exit__(self, *exc):
        if _BLAS and self.saved:
            _BLAS[1](self.saved)


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, theta, style):
    """x: (T, n_heads, hd) at positions 0..T-1; returns the rotated copy."""
    T, _, hd = x.shape
    half = hd // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / hd)     # (half,)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]       # (T, half)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = np.empty_like(x)
    if style == "interleaved":          # pairs (2i, 2i+1)
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
    elif style == "half":               # HF rotate_half: pairs (i, i + hd/2)
        a, b = x[..., :half], x[..., half:]
        out[..., :half] = a * c - b * s
        out[..., half:] = b * c + a * s
    else:
        raise ValueError(style)
    return out


def silu(x):
    return x / (1.0 + np.exp(-x))


def _apply_per_vector(fn, x, kind, layer):
    """fn on every x[t, g] (head vector); fn(v, where=(kind, layer, t, g)) when fn.wants_where."""
    if fn is None:
        return x
    out = np.empty_like(x)
    where = getattr(fn, "wants_where", False)
    for idx in np.ndindex(x.shape[:-1]):
        v = x[idx].copy()
        y = fn(v, where=(kind, layer) + tuple(idx)) if where else fn(v)
        y = np.asarray(y, dtype=np.float64)
        assert y.shape == x[idx].shape
        out[idx] = y
    return out


def forward(m: RefModel, tokens, kv_fn=None, k_fn=None, v_fn=None, rope_style=None,
            kv_order="interleaved", layer_fn=None, return_kv=False, last=None, matmul_in=None):
    """Full-sequence causal forward; row t of the result = logits after tokens[0..t]
    (only the last `last` rows when given: the classifier of every row of a long prompt
    would be a (T, vocab) float64 array).

    k_fn / v_fn (default kv_fn) map one cached key / value vector (head_dim,) to what the cache
    returns. Keys reach k_fn in kv_order: "interleaved" (default; model.bin's and llama.cpp's
    RoPE pairs (2i, 2i+1), what run's cache stores, whatever the source) or "native" (the
    source's own order: rotate_half pairs (i, i+hd/2) for HF weights).
    A function with attribute wants_where = True is called as fn(vec, where=(kind, layer, t,
    kv_head)), kind "k" or "v", e.g. to pick among codes that float32 noise could select.
    layer_fn(layer, q (T, n_heads, hd), k (T, n_kv_heads, hd), v) -> (q, k, v), if given, sees
    every layer's queries and keys after RoPE (in kv_order) and values before k_fn / v_fn, and
    what it returns is what attention uses (e.g. to model a cache that stores transformed
    vectors: the key projection, exact fp16 positions).
    rope_style overrides the model's RoPE pairing (for sensitivity tests only).
    matmul_in(x, site, layer) -> x' replaces the input of every matrix product (module doc)."""
    with _one_blas_thread():
        return _forward(m, tokens, kv_fn, k_fn, v_fn, rope_style, kv_order, layer_fn, return_kv, last,
                        matmul_in)


def _forward(m, tokens, kv_fn, k_fn, v_fn, rope_style, kv_order, layer_fn, return_kv, last, matmul_in):
    tokens = np.asarray(tokens, dtype=np.int64)
    T = len(tokens)
    H, KV, hd = m.n_heads, m.n_kv_heads, m.head_dim
    group = H // KV
    style = rope_style or m.rope_style
    k_fn = k_fn if k_fn is not None else kv_fn
    v_fn = v_fn if v_fn is not None else kv_fn
    mask = np.triu(np.ones((T, T), dtype=bool), k=1)    # True above the diagonal: future

    def mm_in(a, site, layer):                          # the input a product sees
        return a if matmul_in is None else matmul_in(a, site, layer)
    x = m.tok_emb[tokens].copy()                        # (T, D)
    kv = []
    for li, L in enumerate(m.layers):
        xn = mm_in(rmsnorm(x, L["attn_norm"], m.norm_eps), "qkv", li)
        q = (xn @ L["wq"].T).reshape(T, H, hd)
        k = (xn @ L["wk"].T).reshape(T, KV, hd)
        v = (xn @ L["wv"].T).reshape(T, KV, hd)
        q = rope(q, m.rope_theta, style)
        k = rope(k, m.rope_theta, style)
        # the cache sees q, k in model.bin's interleaved order (pairs (2i, 2i+1)); a codec with
        # a rotation is not permutation-equivariant, so reorder around it for HF weights
        reorder = style == "half" and kv_order == "interleaved"
        perm = np.arange(hd).reshape(2, hd // 2).T.reshape(-1)   # 0, hd/2, 1, hd/2+1, ...
        if layer_fn is not None:
            if reorder:
                q, k = q[..., perm], k[..., perm]
            q, k, v = layer_fn(li, q, k, v)
            if reorder:
                q[..., perm], k[..., perm] = q.copy(), k.copy()
        if reorder and k_fn is not None:
            k[..., perm] = _apply_per_vector(k_fn, k[..., perm], "k", li)
        else:
            k = _apply_per_vector(k_fn, k, "k", li)     # what the cache would hand back
        v = _apply_per_vector(v_fn, v, "v", li)
        kv.append((k, v))
        att_out = np.empty((T, H, hd))
        for h in range(H):
            g = h // group
            sc = (q[:, h, :] @ k[:, g, :].T) / np.sqrt(hd)      # (T, T)
            sc = np.where(mask, -np.inf, sc)
            sc = sc - sc.max(axis=1, keepdims=True)
            p = np.exp(sc)
            p /= p.sum(axis=1, keepdims=True)
            att_out[:, h, :] = p @ v[:, g, :]
        x = x + mm_in(att_out.reshape(T, H * hd), "wo", li) @ L["wo"].T
        xn = mm_in(rmsnorm(x, L["ffn_norm"], m.norm_eps), "w13", li)
        x = x + mm_in(silu(xn @ L["w1"].T) * (xn @ L["w3"].T), "w2", li) @ L["w2"].T
    x = x[-last:] if last else x
    logits = mm_in(rmsnorm(x, m.final_norm, m.norm_eps), "cls", len(m.layers)) @ m.wcls.T
    return (logits, kv) if return_kv else logits


def fp16_roundtrip(v):
    """kv_fn for an fp16 cache: round to nearest-even binary16 and back."""
    return np.asarray(v, dtype=np.float64).astype(np.float32).astype(np.float16).astype(np.float64)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: ref_llama.py SRC(gguf file | hf folder) ids.txt out.f32")
    model = load(sys.argv[1])
    ids = [int(t) for t in pathlib.Path(sys.argv[2]).read_text().split()]
    forward(model, ids).astype(np.float32).tofile(sys.argv[3])
