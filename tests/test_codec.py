"""tq.c (through ctypes, tests/libtq.so) against the independent numpy oracle tests/tq_ref.py.

    python3 -m pytest -q tests/test_codec.py

- fp16 conversions agree with numpy on every half and on random floats;
- the Lloyd-Max codebooks agree with the oracle's (other quadrature, other start);
- for the same rotation and QJL matrix (read from tq.c's codec struct), the oracle
  produces byte-identical codes for every tq format, d and scale rule, and the two
  reconstructions agree within 1e-5;
- MSE, inner-product bias and variance of every tq format and scale rule match what the
  oracle predicts with its own, independent Haar rotation and Gaussian S;
- tests/tqstat prints the documented lines;
- run's attention through the codec's kernels gives the same logits on every SIMD path the CPU
  runs (TQ_SIMD forced), in prefill tiles and in decode splits, for every format; TQ_SIMD's errors;
  the AVX2 kernels under valgrind (which hides AVX-512, so the dispatch must not pick it).
"""
import ctypes
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import fuzz_seeds
import tq_ref
from conftest import ROOT, RUN, RUN_VG

DIMS = [32, 64, 80, 96, 128, 256]
TQ_FMTS = ["tq2", "tq3", "tq4", "tq2p", "tq3p", "tq4p"]
SCALES = ["norm", "nc", "eden"]
SEED = 0x5475726230517541                                  # TQ_DEFAULT_SEED
REF_MSE = {64: {1: 0.3584, 2: 0.1145, 3: 0.0334, 4: 0.00913},   # tests/test_tq.c's REF_MSE
           128: {1: 0.3609, 2: 0.1160, 3: 0.0340, 4: 0.00932}}
REF_MSE_ULP = {1: 1e-4, 2: 1e-4, 3: 1e-4, 4: 1e-5}


# ---- the C library ---------------------------------------------------------------------

class TqCodec(ctypes.Structure):
    """tq_codec from tq.h (enums are ints)."""
    _fields_ = [("fmt", ctypes.c_int), ("d", ctypes.c_int), ("bits", ctypes.c_int), ("scale", ctypes.c_int),
                ("bytes", ctypes.c_size_t), ("centroids", ctypes.POINTER(ctypes.c_float)),
                ("bounds", ctypes.POINTER(ctypes.c_float)), ("rounds", ctypes.c_int),
                ("signs", ctypes.POINTER(ctypes.c_float)), ("dense", ctypes.POINTER(ctypes.c_float)),
                ("qjl", ctypes.POINTER(ctypes.c_float))]


def _load():
    subprocess.run(["make", "-s", "tests/libtq.so"], cwd=ROOT, check=True)
    lib = ctypes.CDLL(str(ROOT / "tests" / "libtq.so"))
    P = ctypes.c_void_p
    lib.tq_parse_fmt.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
    lib.tq_parse_scale.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
    lib.tq_init.argtypes = [ctypes.POINTER(TqCodec), ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint64]
    lib.tq_free.argtypes = [ctypes.POINTER(TqCodec)]
    for name in ("tq_encode", "tq_decode", "tq_rotate", "tq_unrotate"):
        getattr(lib, name).argtypes = [ctypes.POINTER(TqCodec), P, P]
        getattr(lib, name).restype = None
    lib.tq_f32_to_f16.argtypes, lib.tq_f32_to_f16.restype = [ctypes.c_float], ctypes.c_uint16
    lib.tq_f16_to_f32.argtypes, lib.tq_f16_to_f32.restype = [ctypes.c_uint16], ctypes.c_float
    return lib


LIB = _load()


def _enum(parse, name):
    out = ctypes.c_int()
    assert parse(name.encode(), ctypes.byref(out)) == 0, name
    return out.value


class CCodec:
    """One tq.c codec; numpy in, numpy out."""

    def __init__(self, fmt, d, scale="norm", seed=SEED):
        self.c = TqCodec()
        rc = LIB.tq_init(ctypes.byref(self.c), _enum(LIB.tq_parse_fmt, fmt), d, _enum(LIB.tq_parse_scale, scale), seed)
        assert rc == 0, (fmt, d)
        self.d, self.nbytes = d, self.c.bytes

    def __del__(self):
        LIB.tq_free(ctypes.byref(self.c))

    def encode(self, X):
        X = np.ascontiguousarray(X, dtype=np.float32)
        codes = np.zeros((len(X), self.nbytes), dtype=np.uint8)
        ref, xp, cp = ctypes.byref(self.c), X.ctypes.data, codes.ctypes.data
        for i in range(len(X)):
            LIB.tq_encode(ref, xp + 4 * self.d * i, cp + self.nbytes * i)
        return codes

    def decode(self, codes):
        codes = np.ascontiguousarray(codes)
        X = np.zeros((len(codes), self.d), dtype=np.float32)
        ref, xp, cp = ctypes.byref(self.c), X.ctypes.data, codes.ctypes.data
        for i in range(len(codes)):
            LIB.tq_decode(ref, cp + self.nbytes * i, xp + 4 * self.d * i)
        return X

    def centroids(self):
        return np.ctypeslib.as_array(self.c.centroids, (1 << self.c.bits,)).astype(np.float64)

    def bounds(self):
        return np.ctypeslib.as_array(self.c.bounds, ((1 << self.c.bits) - 1,)).astype(np.float64)

    def rotation(self):
        """Pi as a matrix, built by the oracle from the codec's signs (or its dense matrix)."""
        if self.c.rounds:
            return tq_ref.hadamard_rotation(np.ctypeslib.as_array(self.c.signs, (self.c.rounds, self.d)).astype(np.float64))
        return np.ctypeslib.as_array(self.c.dense, (self.d, self.d)).astype(np.float64)

    def qjl(self):
        return np.ctypeslib.as_array(self.c.qjl, (self.d, self.d)).astype(np.float64) if self.c.qjl else None


def oracle_for(cc, fmt, scale):
    return tq_ref.TurboQuant(fmt, cc.d, scale, cc.rotation(), cc.qjl())


def random_unit(rng, n, d):
    X = rng.standard_normal((n, d))
    return X / np.linalg.norm(X, axis=1, keepdims=True)


# ---- fp16 ---------------------------------------------------------------------------------

def test_f16_to_f32_every_half():
    h = np.arange(65536, dtype=np.uint16)
    want = h.view(np.float16).astype(np.float32)
    got = np.array([LIB.tq_f16_to_f32(int(v)) for v in h], dtype=np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_f32_to_f16_matches_numpy():
    rng = np.random.default_rng(1)
    x = np.concatenate([
        (rng.standard_normal(60000) * np.exp(rng.uniform(-25, 13, 60000))).astype(np.float32),
        # exact ties between two halves (round to even), and the overflow edge
        ((np.arange(1, 4000) + 0.5) * 2.0 ** -24).astype(np.float32),
        (1 + (2 * np.arange(1, 2000) + 1) * 2.0 ** -11).astype(np.float32),
        np.array([65504, 65519.99, 65520, -65520, 1e30, -0.0, 0.0, np.inf, -np.inf], dtype=np.float32)])
    got = np.array([LIB.tq_f32_to_f16(float(v)) for v in x], dtype=np.uint16)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(got, want)
    assert np.isnan(np.uint16(LIB.tq_f32_to_f16(float("nan"))).view(np.float16))


# ---- the codebook ---------------------------------------------------------------------------

@pytest.mark.parametrize("d", DIMS)
def test_codebook_matches_oracle(d):
    for fmt in ("tq2p", "tq2", "tq3", "tq4"):                 # 1, 2, 3, 4 bits
        cc = CCodec(fmt, d)
        c = tq_ref.lloyd_max(d, tq_ref.MSE_BITS[fmt])
        assert np.max(np.abs(cc.centroids() - c)) * math.sqrt(d) < 2e-6, fmt
        assert np.max(np.abs(cc.bounds() - (c[1:] + c[:-1]) / 2)) * math.sqrt(d) < 2e-6, fmt


@pytest.mark.parametrize("d", [64, 128])
def test_oracle_codebook_mse_is_reference_table(d):
    for bits in (1, 2, 3, 4):
        mse = tq_ref.codebook_mse(tq_ref.lloyd_max(d, bits), d)
        assert abs(mse - REF_MSE[d][bits]) < 0.6 * REF_MSE_ULP[bits], (bits, mse)


# ---- identical codes --------------------------------------------------------------------------

def test_vectors(rng, d):
    """Random vectors of many lengths, plus structured ones."""
    X = rng.standard_normal((150, d)) * np.exp(2 * rng.standard_normal((150, 1)))
    basis = np.eye(d)[:: max(1, d // 8)]
    spike = rng.standard_normal((4, d))
    spike[np.arange(4), rng.integers(0, d, 4)] = 1000
    offset = 20 + rng.standard_normal((4, d))
    return np.concatenate([X, basis, np.ones((1, d)), spike, offset, np.zeros((1, d))])


test_vectors.__test__ = False


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("fmt", TQ_FMTS)
def test_identical_codes(fmt, d, scale):
    rng = np.random.default_rng(d * 7 + len(fmt) + len(scale))
    X = test_vectors(rng, d).astype(np.float32)
    cc = CCodec(fmt, d, scale)
    ref = oracle_for(cc, fmt, scale)
    c_codes = cc.encode(X)
    r_codes, ambiguous = ref.encode(X.astype(np.float64))
    differ = (c_codes != r_codes).any(axis=1)
    assert not (differ & ~ambiguous).any(), f"codes differ for vectors {np.flatnonzero(differ & ~ambiguous)}"
    # structured vectors may sit exactly on a bound (0 is one); random ones almost never do
    assert differ[:150].sum() <= 3, f"{differ[:150].sum()} of 150 random vectors differ (all near a decision)"
    # reconstructions: the oracle's decode of tq.c's bytes, and tq.c's own decode
    xc = cc.decode(c_codes).astype(np.float64)
    xr = ref.decode(c_codes)
    err = np.linalg.norm(xc - xr, axis=1) / np.maximum(np.linalg.norm(xr, axis=1), 1e-30)
    assert err.max() < 1e-5
    assert np.array_equal(xc[-1], np.zeros(d))                     # the zero vector


# ---- distortion: tq.c against the oracle's predictions -------------------------------------------

def ip_stats(X, Xt, Q):
    e = np.einsum("ij,ij->i", Q, Xt) - np.einsum("ij,ij->i", Q, X)
    return e.mean(), e.var(), e.std() / math.sqrt(len(e))


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("fmt", TQ_FMTS)
def test_distortion_matches_oracle(fmt, d):
    """10,000 random unit vectors x and unit q at 60 degrees from x (as tests/tqstat):
    tq.c (its Hadamard rotation) against the oracle with the SAME rotation and S (the
    same codes, so the same numbers) and against the oracle with an INDEPENDENT Haar
    rotation and Gaussian S (statistics agree within sampling error)."""
    n = 10000
    rng = np.random.default_rng(100 + d + len(fmt))
    X = random_unit(rng, n, d)
    W = random_unit(rng, n, d)
    W -= np.einsum("ij,ij->i", W, X)[:, None] * X
    Q = 0.5 * X + math.sqrt(0.75) * W / np.linalg.norm(W, axis=1, keepdims=True)
    X32 = X.astype(np.float32)
    Xd = X32.astype(np.float64)
    haar = tq_ref.TurboQuant(fmt, d, "norm", tq_ref.haar_rotation(d, rng), tq_ref.gaussian_qjl(d, rng))
    Pi, S = CCodec(fmt, d).rotation(), CCodec(fmt, d).qjl()   # the same for every scale rule
    for scale in SCALES:
        cc = CCodec(fmt, d, scale)
        xc = cc.decode(cc.encode(X32)).astype(np.float64)
        mse_c = np.mean(np.sum((xc - Xd) ** 2, axis=1))
        bias_c, var_c, se_c = ip_stats(Xd, xc, Q)

        same = tq_ref.TurboQuant(fmt, d, scale, Pi, S)        # same codes: same numbers
        m = 2000
        xs = same.decode(same.encode(Xd[:m])[0])
        mse_s = np.mean(np.sum((xs - Xd[:m]) ** 2, axis=1))
        mse_cm = np.mean(np.sum((xc[:m] - Xd[:m]) ** 2, axis=1))
        assert abs(mse_cm / mse_s - 1) < 1e-3, (scale, mse_cm, mse_s)

        haar.scale = scale                                    # independent rotation and S
        xh = haar.decode(haar.encode(Xd)[0])
        mse_h = np.mean(np.sum((xh - Xd) ** 2, axis=1))
        bias_h, var_h, se_h = ip_stats(Xd, xh, Q)
        assert abs(mse_c / mse_h - 1) < 0.03, (scale, "mse", mse_c, mse_h)
        assert abs(bias_c - bias_h) < 4 * math.hypot(se_c, se_h), (scale, "ip bias", bias_c, bias_h)
        assert abs(var_c / var_h - 1) < 0.1, (scale, "ip variance", var_c, var_h)
        if fmt.endswith("p"):                                 # Algorithm 2: unbiased
            assert abs(bias_c) < 3 * se_c, (scale, "prod bias", bias_c, se_c)


# ---- tests/tqstat ---------------------------------------------------------------------------------

def test_tqstat_lines():
    subprocess.run(["make", "-s", "tests/tqstat"], cwd=ROOT, check=True)
    out = subprocess.run([str(ROOT / "tests" / "tqstat")], capture_output=True, text=True, check=True).stdout
    lines = out.strip().split("\n")
    num = r"(-?[0-9.]+(?:e[-+][0-9]+)?)"
    pat = re.compile(rf"tqstat fmt=(\w+) d=(\d+) bits={num} ratio_fp16={num} mse={num} ip_bias={num} "
                     rf"ip_var_d={num} mse_nc={num} mse_eden={num}")
    fmts = ["fp32", "fp16", "q8", "q4"] + TQ_FMTS
    assert len(lines) == 2 * len(fmts)
    for line, (d, fmt) in zip(lines, [(d, f) for d in (64, 128) for f in fmts]):
        m = pat.fullmatch(line)
        assert m, line
        assert m.group(1) == fmt and int(m.group(2)) == d
        mse = float(m.group(5))
        nbytes = {"fp32": 4 * d, "fp16": 2 * d, "q8": d + 2, "q4": d // 32 * 18}.get(fmt)
        if nbytes is None:                                     # tq.h's layout
            b = tq_ref.MSE_BITS[fmt]
            nbytes = d * b // 8 + 2 + (d // 8 + 2 if fmt.endswith("p") else 0)
        assert f"{8 * nbytes / d:.2f}" == m.group(3) and f"{2 * d / nbytes:.2f}" == m.group(4), line
        if fmt in ("tq2", "tq3", "tq4"):
            assert abs(mse / REF_MSE[d][tq_ref.MSE_BITS[fmt]] - 1) < 0.03, line
    assert "tqstat fmt=tq3 d=64 bits=3.25 ratio_fp16=4.92 mse=0.0334 " in out


# ---- run's attention: SIMD paths, prefill tiles and decode splits -----------------------------------

SIMD_PATHS = ["portable", "avx2", "avx512"]
N_IDS = 300          # decode splits its coded positions in pieces of 256: more than one piece here


def supported_paths():
    """The TQ_SIMD values this CPU runs: run refuses the others (test_simd_errors)."""
    got = []
    for path in SIMD_PATHS:
        p = subprocess.run([str(RUN), "/nonexistent.bin"], capture_output=True, text=True, env=dict(os.environ, TQ_SIMD=path))
        if "lacks" not in p.stderr:        # the model error comes after the path's check
            got.append(path)
    return got


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    """A random model with SmolLM2's head shape (head_dim 64, 3 query heads per KV head) and ONE
    layer: its keys and values come from the same matmuls whatever the attention path or batch
    size does, so two runs differ only by the attention's own float rounding (with more layers a
    rounding difference in one layer's output can flip a code of the next layer's keys)."""
    h = fuzz_seeds.config(dim=192, hidden_dim=192, n_layers=1, n_heads=6, n_kv_heads=2, head_dim=64, seq_len=1024,
                          vocab_size=262, pretok=1, chat_start=259, chat_end=260)
    data = bytearray(fuzz_seeds.build(h, fuzz_seeds.tiny_gpt2_section(), weights=False))
    hh = fuzz_seeds.read_header(data)
    data[hh["w_off"]:] = (0.3 * np.random.default_rng(1).standard_normal(hh["w_bytes"] // 4)).astype("<f4").tobytes()
    d = tmp_path_factory.mktemp("one_layer")
    (d / "m.bin").write_bytes(bytes(data))
    (d / "ids.txt").write_text(" ".join(map(str, np.random.default_rng(0).integers(0, 262, N_IDS))))
    return d


def one_layer_logits(d, kspec, path, batch):
    out = d / f"lg_{kspec.replace(':', '_')}_{path}_{batch}.f32"
    p = subprocess.run([str(RUN), str(d / "m.bin"), "-m", "logits", "-k", kspec, "-f", str(d / "ids.txt"), "-o", str(out),
                        "--batch", str(batch), "--kproj", "0"],
                       capture_output=True, text=True, env=dict(os.environ, TQ_SIMD=path))
    assert p.returncode == 0, p.stderr
    return np.fromfile(out, dtype=np.float32).reshape(N_IDS, -1)


@pytest.mark.parametrize("kspec", ["fp32", "fp16", "q8", "q4", "tq2", "tq3", "tq4", "tq2p", "tq3p", "tq4p", "tq3:q8"])
def test_simd_paths_agree(one_layer, kspec):
    """Every SIMD path against the portable one, the whole prompt in one batch (prefill tiles of
    16 tokens): the same logits up to float rounding. Measured 3e-6..5e-6 (logits up to 7); the
    kernels themselves agree within 1e-5 relative (tests/test_tq.c). For fp32 and tq3 also one
    token per forward pass (decode: coded positions split in pieces, states merged), every path."""
    paths = supported_paths()
    for batch in ((256, 1) if kspec in ("fp32", "tq3") else (256,)):
        base = one_layer_logits(one_layer, kspec, "portable", batch)
        for path in paths[1:]:
            diff = np.abs(one_layer_logits(one_layer, kspec, path, batch) - base).max()
            assert diff < 1e-4, (kspec, path, batch, diff)


def test_decode_splits_match_prefill_tiles(one_layer):
    """fp32 cache (nothing quantized, no exact positions): a forward pass per token, whose 300
    positions are split in pieces and merged, against the whole prompt in tiles of 16 tokens.
    Measured 6e-6. (Other formats are left out here: run's matmuls round differently for other
    batch sizes, which flips fp16 roundings and codes: 1e-4..2e-4.)"""
    for path in supported_paths():
        a = one_layer_logits(one_layer, "fp32", path, 256)
        b = one_layer_logits(one_layer, "fp32", path, 1)
        assert np.abs(a - b).max() < 1e-4, path


def test_simd_errors(smollm2):
    p = subprocess.run([str(RUN), str(smollm2), "-i", "hi", "-n", "1"], capture_output=True, text=True,
                       env=dict(os.environ, TQ_SIMD="sse"))
    assert p.returncode != 0 and p.stderr.strip() == "run: error: TQ_SIMD must be portable, avx2 or avx512", p.stderr
    p = subprocess.run([str(RUN), str(smollm2), "-i", "hi", "-n", "1", "-k", "tq3"], capture_output=True, text=True,
                       env=dict(os.environ, TQ_SIMD="portable"))
    assert p.returncode == 0 and "attention portable" in p.stderr, p.stderr


def test_valgrind_runs_the_avx2_kernels(one_layer):
    """valgrind emulates a CPU without AVX-512: TQ_SIMD=avx512 is refused there, and the default
    picks AVX2 (where the host has it), whose kernels must run clean: a prompt long enough for
    full tiles of coded rows (past the sink and the 8 recent positions), keys tq3, values q4."""
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    assert RUN_VG.exists(), "./run_vg is not built (make run_vg)"
    vg = ["valgrind", "--error-exitcode=99", str(RUN_VG), str(one_layer / "m.bin"), "-n", "4", "-i", "the " * 40, "-k", "tq3:q4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(vg, capture_output=True, timeout=300, env=dict(env, TQ_SIMD="avx512"))
    err = p.stderr.decode(errors="replace")
    assert p.returncode != 0 and "run: error: TQ_SIMD=avx512: this CPU (or build) lacks AVX-512F" in err, err[-2000:]
    p = subprocess.run(vg, capture_output=True, timeout=300, env=env)     # stdout: a random model's bytes
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 0 and "ERROR SUMMARY: 0 errors" in err, err[-3000:]
    if "avx2" in supported_paths():
        assert "attention avx2" in err, err[-2000:]
