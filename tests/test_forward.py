"""End-to-end logits of ./run against the independent numpy reference (tests/ref_llama.py).

Small random Llama models are written in tmp dirs as a GGUF (gguf.GGUFWriter, llama.cpp's
interleaved q/k row order) and as a Hugging Face folder (safetensors, rotate_half order), exported
with `python3 export.py SRC out.bin`, run with `./run out.bin -m logits -k FMT -f ids.txt -o F`
(float32 logits, (n_tokens, vocab), no bos) and compared with ref_llama.forward on the *source*
weights. The reference never reads model.bin, so export.py's conversion (q/k permutation for HF,
dequantization for GGUF, tied/untied classifier, hyper-parameters) is checked along with run.c.

    test_reference_*                 the reference itself: GGUF (interleaved) == HF (rotate_half)
                                     for the same weights; sensitivity to RoPE, theta, GQA
    test_logits_fp32                 every model, -k fp32: max |diff| < 1e-4
    test_logits_fp16                 fp16 and mixed fp32/fp16 caches: < 1e-2 (fp16 rounding flips)
    test_logits_cache_libtq          q8 q4 tq*: reference over tq_encode+tq_decode of libtq.so
                                     (checks run's attention straight from the codes), < 1e-4
    test_logits_cache_tq_ref         tq*: reference over the numpy oracle tests/tq_ref.py, < 1e-4
    test_logits_cache_transforms     run's key projection (--kproj 0/1/2) and fp16 sink positions,
                                     modelled in the reference
    test_logits_int8_weights         export.py --weights q8: the reference on the same int8
                                     weights, every product's input quantized as run does it
                                     (--qinput 1; near-ties matched, InputQuant) or not
                                     (--qinput 0), < 1e-4
    test_eval_int8_weights           -m eval on an int8 file = its definition from -m logits
Codec tests run with --scale given and the fixes off (--kproj 0 --sink 0 --window 0), so that the
cache is exactly encode/decode per vector; float32-vs-float64 near-ties are matched (NearTies).
"""
import ctypes
import functools
import importlib
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from conftest import bytes_to_unicode, ROOT, RUN, run_cmd  # noqa: E402
import ref_llama  # noqa: E402

EXPORT = ROOT / "export.py"
N_TOK = 64

# dim 128, 2 layers, 4 query heads sharing 2 kv heads, head_dim 32, FFN 192, vocab 256
CFG = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden=192, vocab=256,
           eps=1e-5, ctx=256)


# ----------------------------------------------------------------------------- model builders



def make_weights(seed, tied):
    """Random weights under HF names, q/k rows in HF (rotate_half) order, float32.

    Scales give sharp, position-dependent attention (score std ~3) and logits of order 1.
    """
    rng = np.random.default_rng(seed)
    D, L, H, KV, hd, F, V = (CFG[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads",
                                               "head_dim", "hidden", "vocab"))

    def nrm(*shape, s):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    W = {"model.embed_tokens.weight": nrm(V, D, s=0.5 if not tied else 0.15)}
    for l in range(L):
        p = f"model.layers.{l}."
        W[p + "input_layernorm.weight"] = (1.0 + nrm(D, s=0.2))
        W[p + "self_attn.q_proj.weight"] = nrm(H * hd, D, s=0.16)
        W[p + "self_attn.k_proj.weight"] = nrm(KV * hd, D, s=0.16)
        W[p + "self_attn.v_proj.weight"] = nrm(KV * hd, D, s=0.1)
        W[p + "self_attn.o_proj.weight"] = nrm(D, H * hd, s=0.1)
        W[p + "post_attention_layernorm.weight"] = (1.0 + nrm(D, s=0.2))
        W[p + "mlp.gate_proj.weight"] = nrm(F, D, s=0.1)
        W[p + "mlp.up_proj.weight"] = nrm(F, D, s=0.1)
        W[p + "mlp.down_proj.weight"] = nrm(D, F, s=0.1)
    W["model.norm.weight"] = (1.0 + nrm(D, s=0.2))
    if not tied:
        W["lm_head.weight"] = nrm(V, D, s=0.1)
    return W


def permute_qk(w, n_head):
    """HF rotate_half row order -> llama.cpp interleaved order (convert_hf_to_gguf's permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_hf(folder, W, theta, tied):
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in W.items()},
              str(folder / "model.safetensors"))
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": CFG["dim"], "intermediate_size": CFG["hidden"],
        "num_hidden_layers": CFG["n_layers"], "num_attention_heads": CFG["n_heads"],
        "num_key_value_heads": CFG["n_kv_heads"], "head_dim": CFG["head_dim"],
        "vocab_size": CFG["vocab"], "max_position_embeddings": CFG["ctx"],
        "rms_norm_eps": CFG["eps"], "rope_theta": theta, "rope_scaling": None,
        "tie_word_embeddings": tied, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32", "bos_token_id": None, "eos_token_id": None,
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": None,
         "model_max_length": CFG["ctx"]}))
    return folder


def write_gguf(path, W, theta, tied, qtypes=None):
    """The same model as a llama.cpp GGUF: q/k rows permuted to interleaved order.

    qtypes: optional {gguf tensor name suffix: GGMLQuantizationType} to store some tensors
    quantized (as a real llama.cpp file would)."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    qtypes = qtypes or {}
    H, KV = CFG["n_heads"], CFG["n_kv_heads"]
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_context_length(CFG["ctx"])
    w.add_embedding_length(CFG["dim"])
    w.add_block_count(CFG["n_layers"])
    w.add_feed_forward_length(CFG["hidden"])
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_key_length(CFG["head_dim"])
    w.add_value_length(CFG["head_dim"])
    w.add_rope_dimension_count(CFG["head_dim"])
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(CFG["eps"])
    w.add_vocab_size(CFG["vocab"])
    w.add_file_type(0)
    b2u = bytes_to_unicode()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([b2u[b] for b in range(256)])
    w.add_token_types([1] * 256)

    def add(name, a):
        a = np.ascontiguousarray(a, dtype=np.float32)
        qt = next((q for suf, q in qtypes.items() if name.endswith(suf)), None)
        if qt is None or qt == Q.F32 or a.ndim == 1:
            w.add_tensor(name, a)
        elif qt == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)

    add("token_embd.weight", W["model.embed_tokens.weight"])
    for l in range(CFG["n_layers"]):
        p, b = f"model.layers.{l}.", f"blk.{l}."
        add(b + "attn_norm.weight", W[p + "input_layernorm.weight"])
        add(b + "attn_q.weight", permute_qk(W[p + "self_attn.q_proj.weight"], H))
        add(b + "attn_k.weight", permute_qk(W[p + "self_attn.k_proj.weight"], KV))
        add(b + "attn_v.weight", W[p + "self_attn.v_proj.weight"])
        add(b + "attn_output.weight", W[p + "self_attn.o_proj.weight"])
        add(b + "ffn_norm.weight", W[p + "post_attention_layernorm.weight"])
        add(b + "ffn_gate.weight", W[p + "mlp.gate_proj.weight"])
        add(b + "ffn_up.weight", W[p + "mlp.up_proj.weight"])
        add(b + "ffn_down.weight", W[p + "mlp.down_proj.weight"])
    add("output_norm.weight", W["model.norm.weight"])
    if not tied:
        add("output.weight", W["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return pathlib.Path(path)


# name -> (seed, rope theta, tied, source kind, gguf tensor types)
MODELS = {
    "gguf": (1, 50000.0, False, "gguf", None),
    "gguf_tied": (2, 10000.0, True, "gguf", None),
    "gguf_quant": (3, 50000.0, False, "gguf", "mixed"),
    "hf": (4, 50000.0, False, "hf", None),
    "hf_tied": (5, 10000.0, True, "hf", None),
}


def _qtypes(kind):
    if kind != "mixed":
        return None
    from gguf import GGMLQuantizationType as Q
    # like a real llama.cpp quant: Q4_1 matrices, Q8_0 embedding, F16 classifier
    return {"token_embd.weight": Q.Q8_0, "output.weight": Q.F16, "attn_q.weight": Q.Q4_1,
            "attn_k.weight": Q.Q4_1, "attn_v.weight": Q.Q8_0, "attn_output.weight": Q.Q4_1,
            "ffn_gate.weight": Q.Q4_1, "ffn_up.weight": Q.Q4_1, "ffn_down.weight": Q.Q8_0}


def build_source(name, d):
    seed, theta, tied, kind, q = MODELS[name]
    W = make_weights(seed, tied)
    d = pathlib.Path(d)
    if kind == "gguf":
        return write_gguf(d / f"{name}.gguf", W, theta, tied, _qtypes(q))
    return write_hf(d / name, W, theta, tied)


def token_ids(seed=0):
    return np.random.default_rng(1000 + seed).integers(0, CFG["vocab"], N_TOK)


# ----------------------------------------------------------------------------- the reference itself

@pytest.mark.parametrize("tied", [False, True])
def test_reference_gguf_equals_hf(tmp_path, tied):
    """The same weights written as GGUF (interleaved RoPE rows) and as HF (rotate_half rows)
    give the same reference logits; RoPE with the wrong pairing does not (sensitivity)."""
    W = make_weights(7, tied)
    mg = ref_llama.load_gguf(write_gguf(tmp_path / "m.gguf", W, 50000.0, tied))
    mh = ref_llama.load_hf(write_hf(tmp_path / "hf", W, 50000.0, tied))
    assert mg.tied == tied and mh.tied == tied
    assert (mg.rope_theta, mg.norm_eps) == (50000.0, pytest.approx(1e-5))
    assert (mh.rope_theta, mh.norm_eps) == (50000.0, 1e-5)
    ids = token_ids()
    lg, lh = ref_llama.forward(mg, ids), ref_llama.forward(mh, ids)
    assert lg.shape == (N_TOK, CFG["vocab"])
    d = np.abs(lg - lh).max()
    assert d < 1e-9, f"GGUF vs HF reference max |diff| {d:.3g}"
    # a cache codec that is not permutation-equivariant (rotate, round to a grid) sees keys in
    # model.bin's interleaved order from both sources, so the two still agree
    rot = np.linalg.qr(np.random.default_rng(3).standard_normal((mg.head_dim,) * 2))[0]

    def coarse(v):
        return rot.T @ (np.round(rot @ v / 0.05) * 0.05)
    cg, ch = ref_llama.forward(mg, ids, kv_fn=coarse), ref_llama.forward(mh, ids, kv_fn=coarse)
    d = np.abs(cg - ch).max()
    assert d < 1e-9 and np.abs(cg - lg).max() > 1e-3, \
        f"GGUF vs HF reference with a rotating kv_fn: max |diff| {d:.3g}"
    # the test models are sensitive to RoPE pairing, theta and GQA head mapping
    scale = np.abs(lg).std()
    assert 0.3 < scale < 5, scale
    bad = ref_llama.forward(mg, ids, rope_style="half")
    assert np.abs(bad - lg).max() > 0.05 * scale, "model insensitive to RoPE pairing"
    mg.rope_theta = 10000.0
    assert np.abs(ref_llama.forward(mg, ids) - lg).max() > 0.05 * scale, "insensitive to theta"
    mg.rope_theta = 50000.0
    for L in mg.layers:   # swap the two kv heads: query head h would read the other kv head
        for k in ("wk", "wv"):
            hd = mg.head_dim
            L[k] = np.concatenate([L[k][hd:2 * hd], L[k][:hd]])
    assert np.abs(ref_llama.forward(mg, ids) - lg).max() > 0.05 * scale, "insensitive to GQA"


def test_reference_fp16_hook(tmp_path):
    """kv_fn is applied to every cached key/value vector; fp16 rounding moves logits a little."""
    W = make_weights(8, False)
    m = ref_llama.load_hf(write_hf(tmp_path / "hf", W, 10000.0, False))
    ids = token_ids(1)
    calls = []

    def spy(v):
        calls.append(v.shape)
        return v
    base = ref_llama.forward(m, ids, kv_fn=spy)
    assert len(calls) == 2 * CFG["n_layers"] * N_TOK * CFG["n_kv_heads"]
    assert all(s == (CFG["head_dim"],) for s in calls)
    h = ref_llama.forward(m, ids, kv_fn=ref_llama.fp16_roundtrip)
    d = np.abs(h - base).max()
    assert 1e-7 < d < 1e-2, d


# ----------------------------------------------------------------------------- ./run against it

def _need_run():
    if not RUN.exists():
        pytest.skip(f"{RUN} missing: build it with `make run`")
    if not EXPORT.exists():
        pytest.skip(f"{EXPORT} missing")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fwd")


@functools.lru_cache(maxsize=None)
def _exported(name, d):
    """(source path, model.bin path, reference model) for MODELS[name], built once per module."""
    d = pathlib.Path(d)
    src = build_source(name, d)
    out = d / f"{name}.bin"
    p = subprocess.run([sys.executable, str(EXPORT), str(src), str(out)], capture_output=True,
                       timeout=120, cwd=ROOT)
    assert p.returncode == 0 and out.exists(), \
        f"export.py {src.name} failed ({p.returncode}):\n{p.stderr.decode(errors='replace')[-3000:]}"
    return src, out, ref_llama.load(src)


@functools.lru_cache(maxsize=None)
def _ref_logits(name, d, kfmt="fp32", vfmt="fp32"):
    _, _, m = _exported(name, d)
    fns = {"fp32": None, "fp16": ref_llama.fp16_roundtrip}
    return ref_llama.forward(m, token_ids(), k_fn=fns[kfmt], v_fn=fns[vfmt])


def run_logits(model_bin, d, kspec, extra=(), stats=False):
    """run -m logits on token_ids(): the (N_TOK, vocab) logits, and with stats=True also the
    path of the --stats file it wrote."""
    d = pathlib.Path(d)
    ids = d / "ids.txt"
    if not ids.exists():
        ids.write_text(" ".join(str(int(t)) for t in token_ids()) + "\n")
    out = d / f"logits_{model_bin.stem}_{kspec.replace(':', '_')}_{'_'.join(extra)}.f32"
    more = ("--stats", out.with_suffix(".stats")) if stats else ()
    run_cmd([model_bin, "-m", "logits", "-k", kspec, "-f", ids, "-o", out, *extra, *more], binary=RUN,
            timeout=60)
    a = np.fromfile(out, dtype=np.float32)
    assert a.size == N_TOK * CFG["vocab"], f"logits file has {a.size} floats, want {N_TOK}x256"
    a = a.reshape(N_TOK, CFG["vocab"]).astype(np.float64)
    return (a, out.with_suffix(".stats")) if stats else a


def _where(diff):
    t, v = np.unravel_index(np.argmax(diff), diff.shape)
    first_bad = int(np.argmax(diff.max(axis=1) > 1e-3)) if (diff > 1e-3).any() else None
    return f"worst at token {t}, vocab {v}; first position with |diff|>1e-3: {first_bad}"


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_fp32(workdir, name):
    _need_run()
    _, out, _ = _exported(name, str(workdir))
    ref = _ref_logits(name, str(workdir))
    got = run_logits(out, workdir, "fp32")
    diff = np.abs(got - ref)
    assert diff.max() < 1e-4, \
        f"{name} -k fp32: max |run - ref| = {diff.max():.3g} ({_where(diff)})"
    print(f"{name} fp32 max|diff| {diff.max():.3g}")


def test_score_mode_gives_the_reference_log_probabilities(workdir):
    """-m score prints, for every position j >= 1, token j's log-probability after tokens
    0..j-1 and the most likely token there: against the float64 reference's log-softmax."""
    _need_run()
    _, out, _ = _exported("gguf", str(workdir))
    ref = _ref_logits("gguf", str(workdir))
    ids = token_ids()
    path = pathlib.Path(workdir) / "score_ids.txt"
    path.write_text(" ".join(str(int(t)) for t in ids))
    p = run_cmd([out, "-m", "score", "-k", "fp32", "-f", path, "--batch", "7"], binary=RUN)
    rows = np.array([[float(x) for x in ln.split()] for ln in p.stdout.decode().splitlines()])
    assert rows.shape == (N_TOK - 1, 4)
    assert (rows[:, 0] == np.arange(1, N_TOK)).all() and (rows[:, 1] == ids[1:]).all()
    lse = ref.max(axis=1) + np.log(np.exp(ref - ref.max(axis=1, keepdims=True)).sum(axis=1))
    want = ref[np.arange(N_TOK - 1), ids[1:]] - lse[:-1]
    assert np.abs(rows[:, 2] - want).max() < 1e-4
    top2 = np.sort(ref[:-1], axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3          # positions without a near-tie for first place
    assert clear.sum() > N_TOK // 2
    assert (rows[clear, 3] == ref[:-1].argmax(axis=1)[clear]).all()
    bad = run_cmd([out, "-m", "score", "-k", "fp32", "-i", "5"], binary=RUN, check=False)
    assert bad.returncode == 1 and b"at least 2 token ids" in bad.stderr


FP16_TOL = 1e-2
FP16_TOL = 1e-2


@pytest.mark.parametrize("name,kspec", [("gguf", "fp16"), ("hf_tied", "fp16"),
                                        ("gguf", "fp32:fp16"), ("hf", "fp16:fp32")])
def test_logits_fp16(workdir, name, kspec):
    """fp16 cache (or fp16 for one of keys / values): the reference rounds the cached vectors
    to binary16 through kv_fn. run computes k, v in float32, so a few elements that lie
    within float32 noise of an fp16 rounding boundary round the other way (measured: this alone
    moves the logits by up to ~1.5e-3 on these models); hence max 1e-2, and on average run must
    sit much closer to the fp16 reference than to the fp32 one."""
    _need_run()
    _, out, _ = _exported(name, str(workdir))
    kf, vf = (kspec.split(":") + [kspec])[:2]
    ref = _ref_logits(name, str(workdir), kf, vf)
    got = run_logits(out, workdir, kspec)
    diff = np.abs(got - ref)
    moved = np.abs(got - _ref_logits(name, str(workdir)))   # the fp16 cache's own effect
    assert diff.max() < FP16_TOL, \
        f"{name} -k {kspec}: max |run - ref| = {diff.max():.3g} ({_where(diff)})"
    assert diff.mean() < 0.25 * moved.mean(), \
        (f"{name} -k {kspec}: run is not much closer to the fp16-cache reference (mean |diff| "
         f"{diff.mean():.3g}) than to the fp32 one ({moved.mean():.3g}): is the cache really "
         f"{kspec}?")
    print(f"{name} {kspec} max|diff| {diff.max():.3g} mean {diff.mean():.3g} "
          f"(fp16 effect max {moved.max():.3g} mean {moved.mean():.3g})")


# ----------------------------------------------------------------------------- compressed caches

LIBTQ = ROOT / "tests" / "libtq.so"
TQ_DEFAULT_SEED = 0x5475726230517541   # tq.h; run.c draws every codec from it


class _Codec(ctypes.Structure):
    """tq_codec of tq.h (enums are ints)."""
    _fields_ = [("fmt", ctypes.c_int), ("d", ctypes.c_int), ("bits", ctypes.c_int),
                ("scale", ctypes.c_int), ("bytes", ctypes.c_size_t),
                ("centroids", ctypes.POINTER(ctypes.c_float)),
                ("bounds", ctypes.POINTER(ctypes.c_float)), ("rounds", ctypes.c_int),
                ("signs", ctypes.POINTER(ctypes.c_float)), ("dense", ctypes.POINTER(ctypes.c_float)),
                ("qjl", ctypes.POINTER(ctypes.c_float))]


@functools.lru_cache(maxsize=None)
def _libtq():
    if not LIBTQ.exists():
        pytest.skip(f"{LIBTQ} missing: build it with `make tests/libtq.so`")
    lib = ctypes.CDLL(str(LIBTQ))
    lib.tq_parse_fmt.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
    lib.tq_parse_scale.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
    lib.tq_init.argtypes = [ctypes.POINTER(_Codec), ctypes.c_int, ctypes.c_int, ctypes.c_int,
                            ctypes.c_uint64]
    for name in ("tq_encode", "tq_decode"):
        getattr(lib, name).argtypes = [ctypes.POINTER(_Codec), ctypes.c_void_p, ctypes.c_void_p]
        getattr(lib, name).restype = None
    return lib


@functools.lru_cache(maxsize=None)
def _c_codec(fmt, d, scale):
    """The codec object run builds for (fmt, head_dim, --scale): seed TQ_DEFAULT_SEED.
    Never freed (lives as long as the test process)."""
    lib = _libtq()
    f, s = ctypes.c_int(), ctypes.c_int()
    assert lib.tq_parse_fmt(fmt.encode(), ctypes.byref(f)) == 0, fmt
    assert lib.tq_parse_scale(scale.encode(), ctypes.byref(s)) == 0, scale
    codec = _Codec()
    assert lib.tq_init(ctypes.byref(codec), f.value, d, s.value, TQ_DEFAULT_SEED) == 0, (fmt, d)
    return codec


def libtq_roundtrip(fmt, d, scale):
    """kv_fn: encode + decode one vector with the C codec itself. Checks run.c's attention
    straight from the codes (prepared query, tq_dot, tq_axpy in the rotated domain, tq_finish,
    cache layout, GQA mapping) against attention over the decoded vectors."""
    lib, codec = _libtq(), _c_codec(fmt, d, scale)
    code = np.zeros(codec.bytes, dtype=np.uint8)

    def fn(v):
        x = np.ascontiguousarray(v, dtype=np.float32)
        y = np.empty(d, dtype=np.float32)
        lib.tq_encode(ctypes.byref(codec), x.ctypes.data, code.ctypes.data)
        lib.tq_decode(ctypes.byref(codec), code.ctypes.data, y.ctypes.data)
        return y.astype(np.float64)
    return fn


def tq_ref_roundtrip(fmt, d, scale):
    """kv_fn from the numpy oracle tests/tq_ref.py (TurboQuant(fmt, d, scale, Pi, S) with the
    rotation signs / dense matrix and QJL matrix of the C codec run uses); tq formats only."""
    tq_ref = importlib.import_module("tq_ref")
    assert fmt in tq_ref.MSE_BITS, f"tests/tq_ref.py does not model format {fmt}"
    c = _c_codec(fmt, d, scale)
    if c.rounds:
        Pi = tq_ref.hadamard_rotation(
            np.ctypeslib.as_array(c.signs, (c.rounds, d)).astype(np.float64))
    else:
        Pi = np.ctypeslib.as_array(c.dense, (d, d)).astype(np.float64)
    S = np.ctypeslib.as_array(c.qjl, (d, d)).astype(np.float64) if c.qjl else None
    oracle = tq_ref.TurboQuant(fmt, d, scale, Pi, S)

    def batch(X):
        codes, _ = oracle.encode(np.asarray(X, dtype=np.float64).reshape(-1, d))
        return np.asarray(oracle.decode(codes), dtype=np.float64)

    def fn(v):
        return batch(v)[0]
    fn.batch = batch
    return fn


# the fixes on top of the codec off, so that the cache is exactly encode/decode per vector
PLAIN_CACHE_OPTS = ("--kproj", "0", "--sink", "0", "--window", "0")


class NearTies:
    """Wraps a quantize-dequantize kv_fn so that the reference can follow run's float32 choices.

    run computes k, v in float32, the reference in float64, so now and then an element lies
    within float32 noise of a quantization boundary (a q8/q4 rounding tie, a Lloyd-Max
    threshold, a QJL sign, an fp16 scale) and the two pick neighbouring codes. One such flip
    moves the logits by 1e-3 .. 0.5 on these models (measured by perturbing the reference's
    k, v by 1e-6 relative noise), far above the ~1e-5 agreement otherwise. So every vector is
    also coded with J fixed perturbations of relative size `rel`; the distinct decodes are the
    codes float32 arithmetic could have picked (alts[where]), the unperturbed one first, and
    choice[where] selects one. match_near_ties() picks, greedily, the choices that bring the
    reference closest to run; only genuine near-ties can be switched, so a real bug still shows.
    """
    wants_where = True

    def __init__(self, fn, d, rel=3e-6, J=4):
        self.fn, self.rel = fn, rel
        self.noise = np.random.default_rng(12345).standard_normal((J, d))
        self.memo, self.alts, self.choice = {}, {}, {}

    def __call__(self, v, where):
        key = v.tobytes()
        outs = self.memo.get(key)
        if outs is None:
            X = np.concatenate([v[None, :], v[None, :] * (1 + self.rel * self.noise)])
            batch = getattr(self.fn, "batch", None)
            Y = batch(X) if batch else np.array([self.fn(x) for x in X])
            outs, same = [], 1e-9 * (np.abs(Y[0]).max() + 1e-30)   # decodes in float64 / float32
            for y in Y:
                if not any(np.abs(y - o).max() <= same for o in outs):
                    outs.append(y)
            self.memo[key] = outs
        if len(outs) > 1:
            self.alts[where] = len(outs)
        return outs[min(self.choice.get(where, 0), len(outs) - 1)]


def match_near_ties(m, ids, k_fn, v_fn, got, tol):
    """Reference logits with the near-tie choices that best match run's logits `got`.
    Returns (logits, number of near-tie vectors, number of them switched)."""
    wrappers = [w for w in dict.fromkeys((k_fn, v_fn)) if isinstance(w, NearTies)]
    return _match_with(lambda: ref_llama.forward(m, ids, k_fn=k_fn, v_fn=v_fn), wrappers, got,
                       tol)


def _match_with(forward, wrappers, got, tol):
    def ref():
        for w in wrappers:
            w.alts.clear()
        return forward()
    best = ref()
    err = ((got - best) ** 2).sum()
    n_ties = sum(len(w.alts) for w in wrappers)
    for _ in range(3):
        if np.abs(got - best).max() < tol:
            break
        improved = False
        # earliest positions first: a flip at position t moves the logits of rows >= t only
        pending = sorted((where[2], where[1], i, where, n) for i, w in enumerate(wrappers)
                      for where, n in w.alts.items())
        for _, _, i, where, n in pending:
            w = wrappers[i]
            cur = w.choice.get(where, 0)
            for alt in range(n):
                if alt == cur:
                    continue
                w.choice[where] = alt
                r = ref()
                e = ((got - r) ** 2).sum()
                if e < 0.9 * err:
                    best, err, cur, improved = r, e, alt, True
                else:
                    w.choice[where] = cur
        if not improved:
            break
    switched = sum(1 for w in wrappers for c in w.choice.values() if c)
    return best, n_ties, switched


# Tolerance of the compressed caches once near-ties are matched: without flips run and the
# reference agree to ~1e-5 on these models. A wrong scale rule moves the logits by 0.25 .. 5.
CACHE_TOL = 1e-4

CODEC_CASES = [("q8", "nc"), ("q4", "nc"), ("tq2", "nc"), ("tq3", "nc"), ("tq4", "nc"),
               ("tq2p", "nc"), ("tq3p", "nc"), ("tq4p", "nc"), ("tq3", "norm"), ("tq3", "eden"),
               ("tq4p", "eden"), ("tq3:q8", "nc"), ("fp16:tq2", "norm"), ("tq4:tq2p", "eden")]


def _kv_fns(kspec, d, scale, make_fn):
    kf, vf = (kspec.split(":") + [kspec])[:2]
    fns = {}
    for f in (kf, vf):
        if f not in fns:
            fns[f] = ref_llama.fp16_roundtrip if f == "fp16" else \
                None if f == "fp32" else NearTies(make_fn(f, d, scale), d)
    return fns[kf], fns[vf]


def _check_cache(workdir, name, kspec, scale, make_fn, label):
    _need_run()
    _, out, m = _exported(name, str(workdir))
    kfn, vfn = _kv_fns(kspec, m.head_dim, scale, make_fn)
    got = run_logits(out, workdir, kspec, ("--scale", scale) + PLAIN_CACHE_OPTS)
    # fp16 rounding flips are element-wise and not matched, hence test_logits_fp16's tolerance
    tol = FP16_TOL if "fp16" in kspec.split(":") else CACHE_TOL
    ref, n_ties, switched = match_near_ties(m, token_ids(), kfn, vfn, got, tol)
    diff = np.abs(got - ref)
    moved = np.abs(got - _ref_logits(name, str(workdir)))   # the compression's own effect
    what = f"{name} -k {kspec} --scale {scale} vs {label}"
    assert diff.max() < tol, \
        (f"{what}: max |run - ref| = {diff.max():.3g} (tol {tol}; {_where(diff)}; "
         f"compression effect {moved.max():.3g}; near-tie vectors {n_ties}, "
         f"{switched} switched to match)")
    assert diff.mean() < 1e-4 and diff.mean() < 0.01 * moved.mean(), \
        (f"{what}: run not much closer to the reference (mean |diff| {diff.mean():.3g}) than "
         f"to the fp32 one (mean {moved.mean():.3g})")
    print(f"{what}: max|diff| {diff.max():.3g} mean {diff.mean():.3g} (cache effect max "
          f"{moved.max():.3g} mean {moved.mean():.3g}; near-tie vectors {n_ties}, "
          f"{switched} switched)")


@pytest.mark.parametrize("kspec,scale", CODEC_CASES)
def test_logits_cache_libtq(workdir, kspec, scale):
    """run's attention from the codes = reference attention over libtq-decoded vectors."""
    _check_cache(workdir, "gguf", kspec, scale, libtq_roundtrip, "libtq decode")


@pytest.mark.parametrize("kspec,scale", [c for c in CODEC_CASES
                                         if not {"q8", "q4"} & set(c[0].split(":"))])
def test_logits_cache_tq_ref(workdir, kspec, scale):
    """run's TurboQuant cache = reference attention over vectors from the numpy oracle
    tq_ref.py (independent of tq.c except for the rotation / QJL matrices it is handed)."""
    _check_cache(workdir, "hf", kspec, scale, tq_ref_roundtrip, "tq_ref")


# ----------------------------------------------------------------------------- run's cache transforms

# run's default cache (run.c, "Key projection" and "Exact positions"): for q8/q4/tq formats each
# key keeps beta_j = fp16(u_j.k) along R directions measured on the sequence's first forward batch
# (position 0 left out) and the codes hold k - sum_j beta_j u_j; with --sink S the first S positions'
# keys and values are also kept in fp16 and attention uses those. (--window, the recent positions,
# depends on the query position, which this per-position model cannot express: it is off here and
# tested below.) These tests model exactly that, with the statistics from the first --batch tokens;
# FIRST_BATCH is the batch most cases use (fewer than N_TOK, so the later batches are encoded with
# statistics they did not contribute to).
FIRST_BATCH = 48


def _f16(x):
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float64)


KBLOCK_MIN = 16   # run.c: a block's own tokens its first batch needs to measure its directions


def reference_stats(q, k, group, batch, kproj, kblock=None):
    """The key directions of run.c ("Key projection") per block of kblock positions (None:
    one block), computed again in float64 from one layer's q (T, H, hd) and k (T, KV, hd) of
    the reference, run in batches of `batch` tokens from position 0: U (KV, blocks, R, hd), or
    None for kproj 0. A block's directions come from its tokens in the batch that holds its
    first position (block_dirs), or are the previous block's when those are fewer than
    KBLOCK_MIN (but for the first block)."""
    T = k.shape[0]
    if not kproj:
        return None
    kblock = kblock or T
    blocks = []
    for p in range(0, T, kblock):
        m = min(min((p // batch + 1) * batch, T) - p, kblock)
        blocks.append(blocks[-1] if p > 0 and m < KBLOCK_MIN else
                      block_dirs(q[p:p + m], k[p:p + m], group, kproj, skip_first=p == 0))
    return np.stack(blocks, axis=1)


def reference_steps(k, U, batch, kblock):
    """The int8 betas' steps of run.c (--kblock: tq.h, "Key projection") from one layer's k (T,
    KV, hd) and the directions U (KV, blocks, R, hd): per block and direction 2 max |u_j.k| / 127
    over the tokens the block's directions were measured on (the previous block's step where
    it took the previous block's directions), fp16-rounded: (KV, blocks, R)."""
    T = k.shape[0]
    steps = []
    for i, p in enumerate(range(0, T, kblock)):
        m = min(min((p // batch + 1) * batch, T) - p, kblock)
        if p > 0 and m < KBLOCK_MIN:
            steps.append(steps[-1])
            continue
        first = 1 if p == 0 and m > 1 else 0
        mx = np.abs(np.einsum("tgd,grd->tgr", k[p + first:p + m], U[:, i])).max(axis=0)   # (KV, R)
        steps.append(np.where(mx > 0, _f16(2 * mx / 127), 1.0))
    return np.stack(steps, axis=1)


def block_dirs(q, k, group, kproj, skip_first):
    """One block's directions U (KV, R, hd) from its tokens' q (n, H, hd) and k (n, KV, hd):
    u_1 = the fp16-rounded, renormalized mean of the group's queries; u_2 = the top eigenvector
    of sum r r^T over the keys less their part along u_1 (by power iteration from the longest
    r, as run finds it), fp16-rounded and made orthonormal to u_1. Position 0 (the sink) is
    left out when skip_first and n > 1."""
    n, KV, hd = k.shape
    first = 1 if skip_first and n > 1 else 0
    u = q[first:n].sum(axis=0).reshape(KV, group, hd).sum(axis=1)   # (KV, hd)
    u = _f16(u / np.linalg.norm(u, axis=1, keepdims=True))
    U = (u / np.linalg.norm(u, axis=1, keepdims=True))[:, None, :]    # (KV, R, hd)
    if kproj > 1:
        dirs = []
        for g in range(KV):
            u1 = U[g, 0]
            r = k[first:n, g]
            r = r - np.outer(r @ u1, u1)
            e = r[np.argmax((r ** 2).sum(axis=1))]
            for _ in range(200):
                e = (r.T @ (r @ e))
                e = e / np.linalg.norm(e)
            u2 = _f16(e)
            u2 = u2 - (u2 @ u1) * u1
            dirs.append(u2 / np.linalg.norm(u2))
        U = np.concatenate([U, np.array(dirs)[:, None, :]], axis=1)
    return U


def read_run_stats(path, m, n_tok, kproj, kblock=None):
    """run's --stats file (run.c's dump_logits, from tq_cache_stats): per layer (U or None, beta) with U (KV, blocks,
    R, hd) the key directions of each block of kblock positions (None: one block) and beta
    (KV, n_tok, R) the fp16 projections every key stored."""
    KV, hd, R, nb = m.n_kv_heads, m.head_dim, kproj, -(-n_tok // (kblock or n_tok))
    a = np.fromfile(path, dtype=np.float32).astype(np.float64)
    per_layer = R * KV * nb * hd + KV * n_tok * R
    assert a.size == m.n_layers * per_layer, f"--stats file has {a.size} floats, want {m.n_layers}x{per_layer}"
    out = []
    for x in a.reshape(m.n_layers, per_layer):
        U = x[:R * KV * nb * hd].reshape(KV, nb, R, hd) if R else None
        beta = x[R * KV * nb * hd:].reshape(KV, n_tok, R)
        out.append((U, beta))
    return out


def cache_transform_layer_fn(kfn, vfn, ktrans, group, sink=0, n_first=FIRST_BATCH, kproj=0,
                             stats=None, seen=None, kblock=None):
    """layer_fn for ref_llama.forward: keys / values through kfn / vfn (None: kept in fp32),
    the first `sink` positions kept exact, and run's key projection (run.c, "Key projection")
    on kproj directions where ktrans (a quantized key format): a key k keeps
    beta_j = fp16(u_j.k) and the codes hold k - sum_j beta_j u_j, so what a query sees is
    sum_j beta_j u_j + (I - U^T U) decode(k - sum_j beta_j u_j), with U the directions of
    k's block of kblock positions (None: one block; n_first: the batch size) and beta_j in
    int8 steps of the block (reference_steps) where kblock is given.

    stats: run's own statistics (read_run_stats), used instead of computing them again: a
    statistic rounded to fp16 can sit on a rounding boundary, and float32 arithmetic with
    or without FMA / AVX-512 then lands on either side of it, which moves every code of a
    head (a different computation, not a wrong one). reference_stats() recomputes them and
    test_run_stats_match_the_reference checks run's against it. seen: a list that receives,
    per layer, (the recomputed directions, the recomputed betas, |k| (KV, T), the int8 steps
    or None)."""
    def code(fn, x, where):
        if where[2] < sink:
            return _f16(x)
        if fn is None:
            return x
        return fn(x, where=where) if getattr(fn, "wants_where", False) else fn(x)

    def f(li, q, k, v):
        T, KV, hd = k.shape
        k_in, k, v = k, k.copy(), v.copy()
        mine = reference_stats(q, k, group, n_first, kproj if ktrans else 0, kblock)
        U = stats[li][0] if stats is not None else mine
        betas = np.zeros((KV, T, U.shape[2] if U is not None else 0))
        steps = reference_steps(k, U, n_first, kblock) if U is not None and kblock else None
        for t in range(T):
            for g in range(KV):
                kt = k[t, g].copy()
                if U is not None:
                    Ut = U[g, t // (kblock or T)]                            # (R, hd): t's block's
                    if steps is None:
                        betas[g, t] = _f16(Ut @ kt)                          # (R,)
                    else:
                        st = steps[g, t // kblock]
                        betas[g, t] = np.clip(np.round(Ut @ kt / st), -127, 127) * st
                if U is None or t < sink:
                    k[t, g] = code(kfn, kt, ("k", li, t, g))
                else:
                    beta = stats[li][1][g, t] if stats is not None else betas[g, t]
                    kd = code(kfn, kt - beta @ Ut, ("k", li, t, g))
                    k[t, g] = beta @ Ut + kd - (Ut @ kd) @ Ut
                v[t, g] = code(vfn, v[t, g], ("v", li, t, g))
        if seen is not None:
            seen.append((mine, betas, np.linalg.norm(k_in, axis=2).T, steps))
        return q, k, v
    return f


@pytest.mark.parametrize("name,kspec,scale,sink,batch", [
    ("gguf", "tq3", "nc", 0, FIRST_BATCH), ("hf", "tq4p", "nc", 0, FIRST_BATCH),
    ("gguf", "q8", "nc", 0, FIRST_BATCH), ("hf", "tq2:q4", "eden", 0, 20),
    ("gguf_tied", "fp16:tq3", "nc", 0, FIRST_BATCH), ("gguf", "tq3", "nc", 4, 50), ("gguf", "tq3", "nc", 0, 256),
    ("hf", "fp16:tq2p", "norm", 3, 7)])
@pytest.mark.parametrize("kproj", [0, 1, 2])
def test_logits_cache_transforms(workdir, name, kspec, scale, sink, batch, kproj):
    """run with the key projection on 0, 1 or 2 directions and --sink as given (--window 0)
    against the reference with those transforms modelled around the C codec (libtq), the
    statistics taken from the first `--batch` tokens (256: all of the N_TOK here)."""
    _need_run()
    _, out, m = _exported(name, str(workdir))
    kf, vf = (kspec.split(":") + [kspec])[:2]
    hd, group = m.head_dim, m.n_heads // m.n_kv_heads
    fns = {f: None if f == "fp32" else ref_llama.fp16_roundtrip if f == "fp16" else
           NearTies(libtq_roundtrip(f, hd, scale), hd) for f in {kf, vf}}
    quantized = {f: f not in ("fp32", "fp16") for f in {kf, vf}}
    got, stats = run_logits(out, workdir, kspec, ("--scale", scale, "--sink", str(sink), "--window", "0",
                                                  "--kproj", str(kproj), "--batch", str(batch)), stats=True)
    layer_fn = cache_transform_layer_fn(fns[kf], fns[vf], quantized[kf], group, sink, n_first=batch, kproj=kproj,
                                        stats=read_run_stats(stats, m, N_TOK, kproj if quantized[kf] else 0))
    wrappers = [w for w in fns.values() if isinstance(w, NearTies)]
    ref, n_ties, switched = _match_with(
        lambda: ref_llama.forward(m, token_ids(), layer_fn=layer_fn), wrappers, got, 1e-4)
    diff = np.abs(got - ref)
    moved = np.abs(got - _ref_logits(name, str(workdir)))
    tol = FP16_TOL if "fp16" in (kf, vf) else 1e-3
    what = f"{name} -k {kspec} --scale {scale} --sink {sink} --kproj {kproj} --batch {batch}"
    assert diff.max() < tol, \
        (f"{what}: max |run - ref| = {diff.max():.3g} (tol {tol}; {_where(diff)}; cache "
         f"effect {moved.max():.3g}; near-tie vectors {n_ties}, {switched} switched)")
    print(f"{what}: max|diff| {diff.max():.3g} mean {diff.mean():.3g} (cache effect max "
          f"{moved.max():.3g}; near-tie vectors {n_ties}, {switched} switched)")


def _f16_ulp(x):
    """The spacing of fp16 numbers at |x| (subnormal spacing near zero)."""
    e = np.floor(np.log2(np.maximum(np.abs(x), 2.0 ** -14)))
    return 2.0 ** (e - 10)


@pytest.mark.parametrize("name,kspec,batch,kproj,kblock", [
    ("gguf", "tq3", FIRST_BATCH, 2, None), ("hf", "tq2:q4", 20, 2, None), ("gguf_tied", "q8", FIRST_BATCH, 1, None),
    ("gguf", "tq3", FIRST_BATCH, 2, 16), ("hf", "tq2:q4", 24, 2, 16), ("gguf_tied", "tq4", 40, 1, 32)])
def test_run_stats_match_the_reference(workdir, name, kspec, batch, kproj, kblock):
    """The statistics run measures and stores (--stats: key directions, every key's
    projections beta) against the reference's float64 computation of them from its own q, k
    (reference_stats): betas within one fp16 step of the reference's value, the most that
    float32 rounding can move a number that is stored in fp16 (with --kblock: one int8 step),
    plus the float32 noise of the key it is taken from (1e-6 |k|: near zero, fp16 steps are
    finer than that), directions within two. With --kblock, per block of positions: measured on the block's own tokens of
    the batch that starts it, or the previous block's (batch 24, kblock 16: block 16
    takes block 0's; batch 40, kblock 32: block 32 takes block 0's). The
    reference is advanced with run's statistics, so both see the same activations at every
    layer."""
    _need_run()
    _, out, m = _exported(name, str(workdir))
    kf, vf = (kspec.split(":") + [kspec])[:2]
    hd, group = m.head_dim, m.n_heads // m.n_kv_heads
    fns = {f: NearTies(libtq_roundtrip(f, hd, "eden"), hd) for f in {kf, vf}}
    got, path = run_logits(out, workdir, kspec, ("--kproj", str(kproj), "--sink", "1", "--window", "0",
                                                 "--batch", str(batch), "--kblock", str(kblock or 0)), stats=True)
    stats = read_run_stats(path, m, N_TOK, kproj, kblock)
    seen = []
    layer_fn = cache_transform_layer_fn(fns[kf], fns[vf], True, group, sink=1, n_first=batch,
                                        kproj=kproj, stats=stats, seen=seen, kblock=kblock)
    _match_with(lambda: (seen.clear(), ref_llama.forward(m, token_ids(), layer_fn=layer_fn))[1],
                list(fns.values()), got, 1e-4)
    assert len(seen) == m.n_layers
    for li, (U, betas, knorm, steps) in enumerate(seen):
        r_U, r_beta = stats[li]
        unit = _f16_ulp(betas) if steps is None else np.repeat(steps, kblock, axis=1)[:, :N_TOK]   # fp16 or int8 steps
        off = np.abs(r_beta - betas) / (unit + 1e-6 * knorm[:, :, None])
        assert off.max() <= 1.0 + 1e-6, f"layer {li}: beta differs by {off.max():.3g} fp16 steps"
        assert np.abs(r_beta).max() > 1e-3, "projections not measured"
        # directions: fp16-rounded, then renormalized (and u_2 made orthogonal to u_1) in float
        assert r_U.shape == U.shape, f"layer {li}: run stored {r_U.shape} directions, the reference has {U.shape}"
        for j in range(kproj):
            d = np.abs(r_U[:, :, j] - U[:, :, j]).max() / _f16_ulp(np.abs(U[:, :, j]).max())
            assert d <= 2.0, f"layer {li}: key direction {j + 1} differs by {d:.3g} fp16 steps"
        assert np.abs(np.einsum("gbrd,gbsd->gbrs", r_U, r_U) - np.eye(kproj)).max() < 1e-5


@pytest.mark.parametrize("name,kspec,kproj,kblock", [
    ("gguf", "tq3", 2, None), ("hf", "tq4", 2, None), ("gguf", "tq2:tq3", 1, None), ("gguf_tied", "q4", 2, None),
    ("gguf", "tq3", 2, 16), ("hf", "tq2:tq3", 1, 32)])
def test_logits_cache_run_defaults(workdir, name, kspec, kproj, kblock):
    """run's default cache (--scale eden, --kproj 2, 1 fp16 sink; the window off, see above), a
    variant with a single key direction and key directions per block of 16 or 32 positions
    (--kblock), against the reference modelling exactly those transforms around the C codec."""
    _need_run()
    _, out, m = _exported(name, str(workdir))
    kf, vf = (kspec.split(":") + [kspec])[:2]
    hd, group = m.head_dim, m.n_heads // m.n_kv_heads
    fns = {f: NearTies(libtq_roundtrip(f, hd, "eden"), hd) for f in {kf, vf}}
    extra = (("--window", "0", "--batch", str(FIRST_BATCH)) + (("--kproj", str(kproj)) if kproj != 2 else ())
             + (("--kblock", str(kblock)) if kblock else ()))
    got, stats = run_logits(out, workdir, kspec, extra, stats=True)
    layer_fn = cache_transform_layer_fn(fns[kf], fns[vf], True, group, sink=1, kproj=kproj,
                                        stats=read_run_stats(stats, m, N_TOK, kproj, kblock), kblock=kblock)
    ref, n_ties, switched = _match_with(
        lambda: ref_llama.forward(m, token_ids(), layer_fn=layer_fn), list(fns.values()), got, 1e-4)
    diff = np.abs(got - ref)
    assert diff.max() < 1e-3, (f"{name} -k {kspec} --kproj {kproj} --kblock {kblock}: max |run - ref| = "
                               f"{diff.max():.3g} ({_where(diff)}; near-tie vectors {n_ties}, {switched} switched)")


@pytest.mark.parametrize("kspec", ["tq2", "tq3:q4"])
def test_window_covering_everything_is_fp16(workdir, kspec):
    """With --window as long as the sequence every position is read from the fp16 exact store,
    so a tq cache must give the logits of an fp16 cache (up to fp16 rounding), and clearly not
    those of the same cache without the window."""
    _need_run()
    _, out, m = _exported("gguf", str(workdir))
    n = len(token_ids())
    fp16 = run_logits(out, workdir, "fp16", ())
    full = run_logits(out, workdir, kspec, ("--window", str(n), "--sink", "0"))
    none = run_logits(out, workdir, kspec, ("--window", "0", "--sink", "0"))
    assert np.abs(full - fp16).max() < FP16_TOL, np.abs(full - fp16).max()
    assert np.abs(none - fp16).max() > 10 * np.abs(full - fp16).max()


@pytest.mark.parametrize("kspec", ["tq3", "q4:tq2p"])
def test_paper_is_plain_turboquant(workdir, kspec):
    """--paper is the paper's TurboQuant as written: the same logits, bit for bit, as the
    flags it stands for (--scale norm --kproj 0 --sink 0 --window 0), and other logits than
    run's default fixed cache; a later flag overrides it."""
    _need_run()
    _, out, m = _exported("gguf", str(workdir))
    paper = run_logits(out, workdir, kspec, ("--paper",))
    spelled = run_logits(out, workdir, kspec, ("--scale", "norm", "--kproj", "0", "--sink", "0", "--window", "0"))
    default = run_logits(out, workdir, kspec, ())
    assert np.array_equal(paper, spelled)
    assert np.abs(paper - default).max() > 1e-3
    eden = run_logits(out, workdir, kspec, ("--paper", "--scale", "eden"))
    assert np.array_equal(eden, run_logits(out, workdir, kspec, ("--kproj", "0", "--sink", "0", "--window", "0")))


# ----------------------------------------------------------------------------- int8 weights

class InputQuant:
    """matmul_in hook for ref_llama.forward: the input x of every matrix product quantized
    the way run quantizes it for int8 weights (run.c, "int8 weights"): per token and group
    of 64 numbers, s = max|x| / 127 and x -> rint(x / s) * s.

    run computes x in float32 and the reference in float64, so an element whose x / s lies
    within float32 noise of a half-integer can round the other way in run; one such flip
    moves the products of its row by s * |w|, 1e-4 .. 1e-3 of the logits here, far above
    the ~1e-5 agreement otherwise. As in NearTies, each such near-tie is listed in alts,
    where = ("x", layer, token, site, element) with 2 choices, and choice[where] = 1 takes
    the other neighbour; _match_with() picks the choices that bring the reference closest
    to run. Only an element within `rel` (relative to |x / s| + 1) of a tie can switch."""

    def __init__(self, rel=3e-6):
        self.rel, self.alts, self.choice = rel, {}, {}

    def __call__(self, x, site, layer):
        T, n = x.shape
        g = x.reshape(T, n // 64, 64)
        s = np.abs(g).max(axis=2, keepdims=True) / 127.0
        u = np.divide(g, s, out=np.zeros_like(g), where=s > 0)
        q, lo = np.rint(u), np.floor(u)
        near = np.abs(u - lo - 0.5) < self.rel * (np.abs(u) + 1)
        for t, j, k in zip(*np.nonzero(near)):
            where = ("x", layer, int(t), site, int(j * 64 + k))
            self.alts[where] = 2
            if self.choice.get(where, 0):
                q[t, j, k] = lo[t, j, k] + 1 if q[t, j, k] == lo[t, j, k] else lo[t, j, k]
        return (q * s).reshape(T, n)


@functools.lru_cache(maxsize=None)
def _exported_q8(name, d):
    """(model.bin with --weights q8, the reference model on the same int8 weights)."""
    src, _, m = _exported(name, d)
    out = pathlib.Path(d) / f"{name}_q8.bin"
    p = subprocess.run([sys.executable, str(EXPORT), str(src), str(out), "--weights", "q8"],
                       capture_output=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    return out, ref_llama.quantize_q8(m)


@pytest.mark.parametrize("name,kspec,qinput", [(n, "fp32", 1) for n in MODELS] + [("gguf", "q8", 1), ("hf", "tq3", 1)]
                         + [(n, "fp32", 0) for n in ("gguf", "hf_tied")] + [("gguf_tied", "tq3", 0)])
def test_logits_int8_weights(workdir, name, kspec, qinput):
    """run on a --weights q8 file against the reference fed the same int8 weights
    (ref_llama.quantize_q8), with a compressed cache too (the codec modelled as in
    test_logits_cache_libtq), within the fp32 test's 1e-4. --qinput 1 (W8A8): the reference
    quantizes every product's input as run does (InputQuant, its near-ties matched);
    --qinput 0 (W8A32): the inputs stay as they are. The comparison has teeth: the
    reference on the fp32 weights, and the other treatment of the inputs, are far off."""
    _need_run()
    out, mq = _exported_q8(name, str(workdir))
    kfn, vfn = _kv_fns(kspec, mq.head_dim, "nc", libtq_roundtrip)
    opts = ("--scale", "nc") + PLAIN_CACHE_OPTS if kspec != "fp32" else ()
    got = run_logits(out, workdir, kspec, opts + ("--qinput", str(qinput)))
    ids = token_ids()
    act = InputQuant()
    wrappers = ([act] if qinput else []) + [w for w in dict.fromkeys((kfn, vfn)) if isinstance(w, NearTies)]
    ref, n_ties, switched = _match_with(
        lambda: ref_llama.forward(mq, ids, k_fn=kfn, v_fn=vfn, matmul_in=act if qinput else None), wrappers, got,
        1e-4)
    diff = np.abs(got - ref)
    what = f"{name} --weights q8 --qinput {qinput} -k {kspec}"
    assert diff.max() < 1e-4, (f"{what}: max |run - ref| = {diff.max():.3g} ({_where(diff)}; near-ties "
                               f"{n_ties}, {switched} switched)")
    other = np.abs(got - ref_llama.forward(mq, ids, k_fn=kfn, v_fn=vfn, matmul_in=None if qinput else act)).max()
    fp32_w = np.abs(got - ref_llama.forward(_exported(name, str(workdir))[2], ids, k_fn=kfn, v_fn=vfn)).max()
    assert other > 30 * max(diff.max(), 1e-6) and fp32_w > 30 * max(diff.max(), 1e-6), (other, fp32_w)
    print(f"{what}: max|diff| {diff.max():.3g} mean {diff.mean():.3g}; near-ties {n_ties}, {switched} "
          f"switched; with the inputs {'kept' if qinput else 'quantized'} {other:.3g}, on the fp32 weights {fp32_w:.3g}")


@pytest.mark.parametrize("kspec", ["fp32", "tq3"])
def test_eval_int8_weights(workdir, tmp_path, kspec):
    """-m eval on an int8 file: the weights line names the type, and the perplexities are the
    ones computed here from -m logits of each chunk (the logits test_logits_int8_weights
    checks), for the cache given and for the fp32 cache eval runs alongside (on the same int8
    weights)."""
    _need_run()
    out, _ = _exported_q8("gguf", str(workdir))
    ctx, chunks = 32, 3
    text = tmp_path / "text.txt"
    text.write_bytes((ROOT / "README.md").read_bytes()[:ctx * chunks])   # byte-level vocabulary
    p = run_cmd([out, "-m", "eval", "-f", text, "-k", kspec, "-c", ctx, "--chunks", chunks], binary=RUN,
                timeout=60)
    assert re.search(r"^weights: int8 g64, [\d.]+ MiB \(fp32 [\d.]+ MiB\)", p.stderr.decode(), re.M), p.stderr
    got = dict(kv.split("=", 1) for kv in p.stdout.decode().split()[1:])
    ids = list((ROOT / "README.md").read_bytes()[:ctx * chunks])
    nll = {kspec: 0.0, "fp32": 0.0}
    for c in range(chunks):
        chunk = tmp_path / "chunk.txt"
        chunk.write_text(" ".join(map(str, ids[c * ctx:(c + 1) * ctx])))
        for fmt in nll:
            lg = tmp_path / "lg.f32"
            run_cmd([out, "-m", "logits", "-k", fmt, "-f", chunk, "-o", lg, "-c", ctx], binary=RUN, timeout=60)
            x = np.fromfile(lg, dtype=np.float32).reshape(ctx, -1).astype(np.float64)
            lp = x - x.max(axis=1, keepdims=True)
            lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
            nll[fmt] -= sum(lp[j, ids[c * ctx + j + 1]] for j in range(ctx // 2 - 1, ctx - 1))
    n = chunks * ctx // 2
    assert int(got["tokens"]) == n
    for key, fmt in (("ppl", kspec), ("ppl_fp32", "fp32")):
        assert abs(float(got[key]) / np.exp(nll[fmt] / n) - 1) < 2e-4, (key, got[key], np.exp(nll[fmt] / n))
