"""run_cuda (the GPU build) against run (the CPU build).

The build is checked wherever nvcc exists; the rest is skipped where there is no NVIDIA GPU (CI
has none): run it on a GPU machine with `python3 -m pytest -q tests/test_cuda.py`.

The model: model.bin (the real SmolLM2), or the model.bin named by the environment variable
TQ_CUDA_MODEL, e.g. a random-weight model of SmolLM2's shape cut to 4 layers, made on the GPU
machine with `python3 export.py tok.bin rnd.bin --random smollm2-135m --layers 4` (tok.bin:
model.bin cut after its tokenizer section), since model.bin is too large to carry there. Why 4
layers: a deep random model is chaotic. Measured with run on 300 tokens (tq3 cache, batches of
64): with all 30 layers KL(fp32 cache || tq3 cache) is 2.2 and the CPU build against itself
without FMA already 0.61, so the yardstick below is as large as the effect of quantizing at all;
with 4 layers they are 0.54 and 0.026 (the real model: about 0.02 and 8e-4), so a GPU error of a
tenth of the quantization noise shows, as it does on the real model.

Like with like. run_cuda keeps the weights in fp16 (converted at load); run multiplies with the
file's fp32 weights. So both builds run on a file whose weights are fp16-representable: the
model itself when it already is (export.py --random writes such weights), else a copy of it with
every weight rounded to fp16 (made here). Then both multiply by the very same numbers and the
remaining differences are rounding (fused multiply-adds, sums in another order) and, through
it, now and then another code for a key or value of a quantized cache (the QJL signs of
tq3p/tq4p most of all). So the two builds are not compared bit for bit; the yardstick is the
CPU build itself compiled a second time with -ffp-contract=off: the same arithmetic, rounded
differently; and a third time for the baseline x86-64 instruction set (SSE2: no FMA, other
vector widths, so run.c's dot products add up in another order, as the GPU's do; TQ_SIMD=portable
for the same reason where the codec dispatches at run time). The GPU must stay as close to the
CPU as the farther of those two builds does: within 3x its KL divergence (plus 1e-9 for the
formats where all are rounding noise) for batches; within 10x one token at a time, where the GPU
rounds differently in more places than either CPU build (every GEMV sums in its own order, where
run.c's batched products and the GPU's cuBLAS products are comparably far apart; CUDA's expf;
projections beta summed in double), so that more keys land on another code. Measured on an H200
(4-layer random model, 2026-12-01, tq2/tq3 through the tensor-core attention): batches 0.03x to
1.3x the yardstick, every format; one token at a time 9.8x for tq3 over 120 tokens (the closest
to its bound), 3.8x over 700 and for q4:tq2p, while the lossless fp16 cache stays at 0.9x. A real error
(an exact position read wrongly, stale statistics) moves KL by orders of magnitude more: with the
sink and window positions not kept exact, tq3's KL from the fp32 cache triples on the real model.
And two runs of the GPU build must give the same bits (no atomics, no races)."""
import functools
import os
import pathlib
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest

from conftest import MODEL, ROOT, RUN, WIKI, run_cmd

GPU = ROOT / "run_cuda"
FORMATS = ["fp32", "fp16", "q8", "q4", "tq2", "tq3", "tq4", "tq3p", "tq4p", "tq4:tq3"]
ENV_MODEL = os.environ.get("TQ_CUDA_MODEL")


def have_gpu():
    if not shutil.which("nvidia-smi") or not shutil.which("nvcc"):
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


needs_gpu = pytest.mark.skipif(not have_gpu(), reason="no NVIDIA GPU and nvcc here (CI has none)")


@functools.lru_cache(maxsize=None)
def build():
    """A fresh build (once per session), which must be free of warnings (nvcc compiles without a GPU)."""
    p = subprocess.run(["make", "-B", "run_cuda"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "warning" not in (p.stdout + p.stderr).lower(), p.stdout + p.stderr
    return GPU


@pytest.mark.skipif(not shutil.which("nvcc"), reason="no nvcc here")
def test_builds_without_warnings():
    build()


@pytest.fixture(scope="module")
def run_cuda():
    return build()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The model both builds run: fp16-representable weights (see the module's docstring)."""
    src = pathlib.Path(ENV_MODEL) if ENV_MODEL else MODEL
    if not src.exists():
        pytest.skip(f"{src} missing: run `make model` or set TQ_CUDA_MODEL")
    with open(src, "rb") as f:
        w_off = struct.unpack_from("<Q", f.read(256), 88)[0]
    w = np.memmap(src, dtype="<f4", mode="r", offset=w_off)
    rounded = w.astype(np.float16).astype(np.float32)
    if np.array_equal(rounded, w):
        return src
    out = tmp_path_factory.mktemp("f16") / "model_f16.bin"
    with open(src, "rb") as f, open(out, "wb") as g:
        g.write(f.read(w_off))
        g.write(rounded.astype("<f4").tobytes())
    return out


def token_file(model, path, n):
    """the first n tokens of wiki.test.raw (README.md, repeated, where it is missing)"""
    text = WIKI.read_text()[:20 * n] if WIKI.exists() else ((ROOT / "README.md").read_text() * 8)[:20 * n]
    ids = run_cmd([model, "-m", "tokenize", "-i", text]).stdout.decode().split()[:n]
    assert len(ids) == n
    path.write_text(" ".join(ids))
    return path


@pytest.fixture(scope="module")
def ids_file(model, tmp_path_factory):
    return token_file(model, tmp_path_factory.mktemp("cuda") / "ids.txt", 300)


@pytest.fixture(scope="module")
def short_ids_file(model, tmp_path_factory):
    return token_file(model, tmp_path_factory.mktemp("cuda") / "short_ids.txt", 120)


@pytest.fixture(scope="module")
def long_ids_file(model, tmp_path_factory):
    return token_file(model, tmp_path_factory.mktemp("cuda") / "long_ids.txt", 700)


# Both builds at their default, key directions per block of 256 positions (--kblock 256), and at
# --kblock 0 (one set per sequence, fp16 betas) and --kblock 48 (several blocks to a batch of 64,
# chunks that are not a multiple of 128, and a block at 288 with 12 tokens of the last batch,
# which inherits the previous block's directions)
ONE_SET = ("--kblock", 0)
SMALL_BLOCKS = ("--kblock", 48)


def logits(binary, model, ids_file, out, fmt, *extra):
    n = len(ids_file.read_text().split())
    run_cmd([model, "-m", "logits", "-k", fmt, "-c", max(512, n), "-f", ids_file, "-o", out, *extra],
            binary=binary)
    return np.fromfile(out, dtype=np.float32).reshape(n, -1).astype(np.float64)


def kl(p_logits, q_logits):
    """mean over positions of KL(softmax p || softmax q)"""
    lp = p_logits - p_logits.max(1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    lq = q_logits - q_logits.max(1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(1, keepdims=True))
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), 1)))


@pytest.fixture(scope="module")
def run_other_rounding(tmp_path_factory):
    """run.c built again, rounding differently: without fused multiply-adds (-ffp-contract=off),
    and for the baseline x86-64 instruction set. The CPU's own rounding sensitivity."""
    out = tmp_path_factory.mktemp("other")
    builds = {"nofma": ["-march=native", "-ffp-contract=off"], "baseline": ["-march=x86-64", "-mtune=generic"]}
    for name, flags in builds.items():
        subprocess.run(["gcc", "-O3", *flags, "-fopenmp", "-o", str(out / name), str(ROOT / "run.c"),
                        str(ROOT / "tq.c"), "-lm"], check=True)
    return [out / name for name in builds]


def logits_env(binary, model, ids_file, out, fmt, env, *extra):
    n = len(ids_file.read_text().split())
    args = [str(binary), str(model), "-m", "logits", "-k", fmt, "-c", str(max(512, n)), "-f", str(ids_file), "-o", str(out)]
    subprocess.run(args + [str(a) for a in extra], check=True, capture_output=True, env={**os.environ, **env})
    return np.fromfile(out, dtype=np.float32).reshape(n, -1).astype(np.float64)


def yardstick(cpu, others, model, ids_file, tmp_path, fmt, *extra):
    """the larger KL(cpu || other build) of the two other CPU builds"""
    kls = [kl(cpu, logits_env(b, model, ids_file, tmp_path / f"{b.name}.f32", fmt, {"TQ_SIMD": "portable"}, *extra))
           for b in others]
    return max(kls), kls


def compare(model, run_cuda, run_other_rounding, ids_file, tmp_path, fmt, *extra, factor=3):
    cpu = logits(RUN, model, ids_file, tmp_path / "cpu.f32", fmt, *extra)
    gpu = logits(run_cuda, model, ids_file, tmp_path / "gpu.f32", fmt, *extra)
    assert np.all(np.isfinite(gpu))
    if fmt == "fp32":                  # nothing quantized: rounding alone, no code flips
        diff = np.abs(cpu - gpu).max()
        print(f"fp32 {' '.join(map(str, extra))}: largest logit difference {diff:.3g}")
        assert diff < 1e-3 and np.all(cpu.argmax(1) == gpu.argmax(1))
        return
    ys, kls = yardstick(cpu, run_other_rounding, model, ids_file, tmp_path, fmt, *extra)
    apart = kl(cpu, gpu)
    print(f"{fmt} {' '.join(map(str, extra))}: KL(cpu || gpu) {apart:.3g}, KL(cpu || cpu without FMA) "
          f"{kls[0]:.3g}, KL(cpu || baseline cpu) {kls[1]:.3g}, top-1 agreement {np.mean(cpu.argmax(1) == gpu.argmax(1)):.4f}")
    assert apart <= factor * ys + 1e-9, (apart, kls)


@needs_gpu
@pytest.mark.parametrize("fmt,blocks", [(f, ()) for f in FORMATS] + [("tq3", ONE_SET), ("tq4p:q8", ONE_SET),
                                                                      ("tq3", SMALL_BLOCKS), ("q4:tq3p", SMALL_BLOCKS)])
def test_logits_match_cpu(model, run_cuda, run_other_rounding, ids_file, tmp_path, fmt, blocks):
    """Batches: 300 tokens in batches of 64 (the key directions of block 0 from the first batch,
    of block 1 from the batch at 256; later batches reading earlier ones from the cache and the
    exact ring; cuBLAS products, chunks of 256 keys). KL(CPU || GPU) of the next-token
    distributions against KL(CPU || CPU rounded differently). Measured with the previous
    fp32-weights GPU build on an H200, 2026-11-28 (real SmolLM2): the two within a factor 1.4 of
    each other for every format."""
    compare(model, run_cuda, run_other_rounding, ids_file, tmp_path, fmt, "--batch", 64, *blocks)


@needs_gpu
@pytest.mark.parametrize("fmt,blocks", [("fp32", ()), ("fp16", ()), ("tq3", ()), ("tq4p:q8", ()), ("tq3", ONE_SET)])
def test_decode_logits_match_cpu(model, run_cuda, run_other_rounding, short_ids_file, tmp_path, fmt, blocks):
    """120 tokens one at a time (--batch 1): the decode path (GEMV kernels, the replayed CUDA
    graph, the exact ring written by the encode kernel, attention chunks that follow the
    position), statistics from the first token. tq4p:q8 scores keys of 2 head_dim floats
    (prepared query and QJL signs) and accumulates values of head_dim."""
    compare(model, run_cuda, run_other_rounding, short_ids_file, tmp_path, fmt, "--batch", 1, *blocks, factor=10)


@needs_gpu
@pytest.mark.parametrize("fmt,blocks", [("tq3", ()), ("q4:tq2p", ()), ("tq3", ONE_SET)])
def test_long_decode_matches_cpu(model, run_cuda, run_other_rounding, long_ids_file, tmp_path, fmt, blocks):
    """700 tokens one at a time: decode attention merges up to 6 chunks of 128 keys and the
    window ring wraps many times; the blocks of directions at 256 and 512 start with one decoded
    token and inherit the previous block's inside the replayed graph (rope_encode_kernel). q4:tq2p:
    1-bit centroids plus signs for the values."""
    compare(model, run_cuda, run_other_rounding, long_ids_file, tmp_path, fmt, "--batch", 1, *blocks, factor=10)


@needs_gpu
@pytest.mark.parametrize("fmt,blocks", [("tq3", ()), ("q8:tq4p", ()), ("tq4p", SMALL_BLOCKS), ("tq3", ONE_SET)])
def test_gpu_statistics_match_host(model, run_cuda, run_other_rounding, ids_file, tmp_path, fmt, blocks):
    """The statistics of a sequence (the two key directions of the default --kproj 2, per block,
    with the int8 betas' steps) measured on the GPU (stats_kernel, inherit_kernel) against tq.c's
    tq_cache_key_dirs on the host (TQ_CUDA_HOST_STATS=1), both in the GPU build: the same logits up to
    the CPU builds' rounding yardstick."""
    extra = ["--batch", 64, *blocks]
    host = logits_env(run_cuda, model, ids_file, tmp_path / "host.f32", fmt, {"TQ_CUDA_HOST_STATS": "1"}, *extra)
    gpu = logits_env(run_cuda, model, ids_file, tmp_path / "gpu.f32", fmt, {}, *extra)
    cpu = logits(RUN, model, ids_file, tmp_path / "cpu.f32", fmt, *extra)
    ys, kls = yardstick(cpu, run_other_rounding, model, ids_file, tmp_path, fmt, *extra)
    apart = kl(host, gpu)
    print(f"{fmt}: KL(gpu, host statistics || gpu, GPU statistics) {apart:.3g}, yardstick {kls}, "
          f"KL(cpu || gpu) {kl(cpu, gpu):.3g}")
    assert apart <= 3 * ys + 1e-9, (apart, kls)
    assert kl(cpu, gpu) <= 3 * ys + 1e-9, (kl(cpu, gpu), kls)


@needs_gpu
@pytest.mark.parametrize("fmt", ["tq3", "tq2:tq3"])
def test_tensor_core_attention_matches_cuda_cores(model, run_cuda, run_other_rounding, ids_file, tmp_path, fmt):
    """tq2/tq3 keys and values take the tensor-core attention (attention_mma_kernel: fp16 operands
    split in high and low parts); TQ_CUDA_NO_MMA=1 takes the CUDA-core attention_kernel. The switch
    takes effect (the logits are not the same bits) and both are as close to the CPU as the CPU's
    other roundings are (3x, as for batches above). tq2:tq3: mixed key and value bits."""
    extra = ["--batch", 64]
    mma = logits_env(run_cuda, model, ids_file, tmp_path / "mma.f32", fmt, {}, *extra)
    simt = logits_env(run_cuda, model, ids_file, tmp_path / "simt.f32", fmt, {"TQ_CUDA_NO_MMA": "1"}, *extra)
    cpu = logits(RUN, model, ids_file, tmp_path / "cpu.f32", fmt, *extra)
    ys, kls = yardstick(cpu, run_other_rounding, model, ids_file, tmp_path, fmt, *extra)
    print(f"{fmt}: KL(cpu || tensor cores) {kl(cpu, mma):.3g}, KL(cpu || CUDA cores) {kl(cpu, simt):.3g}, "
          f"KL(CUDA cores || tensor cores) {kl(simt, mma):.3g}, yardstick {kls}")
    assert not np.array_equal(mma, simt)
    assert kl(cpu, mma) <= 3 * ys + 1e-9 and kl(cpu, simt) <= 3 * ys + 1e-9, (kl(cpu, mma), kl(cpu, simt), kls)


@needs_gpu
@pytest.mark.parametrize("fmt,batch", [("tq3", 1), ("tq4p:q4", 64)])
def test_gpu_is_deterministic(model, run_cuda, short_ids_file, tmp_path, fmt, batch):
    """Two runs, the same bits: no kernel depends on timing (a missing barrier would show here)."""
    a = logits(run_cuda, model, short_ids_file, tmp_path / "a.f32", fmt, "--batch", batch)
    b = logits(run_cuda, model, short_ids_file, tmp_path / "b.f32", fmt, "--batch", batch)
    assert np.array_equal(a, b)


def eval_line(binary, model, text, fmt):
    p = run_cmd([model, "-m", "eval", "-f", text, "-k", fmt, "-c", 256, "--chunks", 4], binary=binary)
    line = p.stdout.decode().strip().splitlines()[-1]
    return {k: float(v) if k != "fmt" else v for k, v in (kv.split("=", 1) for kv in line.split()[1:])}


@needs_gpu
@pytest.mark.skipif(not WIKI.exists(), reason="wiki.test.raw missing")
def test_eval_matches_cpu(model, run_cuda, run_other_rounding):
    """-m eval, 4 chunks of 256 tokens of wiki.test.raw, tq3: the same fp32 perplexity (the
    fp32 cache is exact, so only rounding differs), the same bits, and dPPL and KLD as close to
    the CPU's as the CPU's own other rounding is (or within 0.5 points and 20 %)."""
    cpu, gpu = eval_line(RUN, model, WIKI, "tq3"), eval_line(run_cuda, model, WIKI, "tq3")
    others = [eval_line(b, model, WIKI, "tq3") for b in run_other_rounding]
    print("cpu", cpu, "\ngpu", gpu, "\nother cpu builds", others)
    assert cpu["kv_bits"] == gpu["kv_bits"] and cpu["tokens"] == gpu["tokens"]
    assert abs(cpu["ppl_fp32"] / gpu["ppl_fp32"] - 1) < 1e-4
    for key, floor in (("dppl_pct", 0.5), ("kld", 0.2 * cpu["kld"])):
        assert abs(cpu[key] - gpu[key]) < max(floor, 3 * max(abs(cpu[key] - o[key]) for o in others)), key


@needs_gpu
def test_generate_and_memory_line(model, run_cuda):
    """Greedy generation with the default cache: the memory line (bytes of the same layout) is
    the CPU's, and the text is the CPU's for the first 8 tokens (and names Berlin, on the real
    model)."""
    args = [model, "-t", 0, "-n", 8, "-i", "The capital of France is Paris. The capital of Germany is"]
    cpu, gpu = run_cmd(args), run_cmd(args, binary=run_cuda)
    mem = lambda p: [l for l in p.stderr.decode().splitlines() if l.startswith("kv:")]
    assert mem(cpu) == mem(gpu) and len(mem(cpu)) == 2
    assert cpu.stdout == gpu.stdout, (cpu.stdout, gpu.stdout)
    if not ENV_MODEL:
        assert b"Berlin" in gpu.stdout


@needs_gpu
def test_help_and_errors_are_runs(model, run_cuda):
    """One CLI: the same -h (but the name; --kblock 256 the default of both) and the same error
    messages."""
    a, b = run_cmd(["-h"]).stdout.decode(), run_cmd(["-h"], binary=run_cuda).stdout.decode()
    assert "--kblock 256 " in a
    assert a.replace("run ", "RUN ") == b.replace("run_cuda ", "RUN ")
    for bad in (["-k", "tq9"], ["-c", "100000"], ["--kproj", "3"], ["--kblock", "17"]):
        pa = run_cmd([model, *bad, "-i", "x"], check=False)
        pb = run_cmd([model, *bad, "-i", "x"], binary=run_cuda, check=False)
        assert pa.returncode == pb.returncode == 1
        assert re.sub(r"^run: ", "", pa.stderr.decode()) == re.sub(r"^run_cuda: ", "", pb.stderr.decode())


@pytest.mark.skipif(have_gpu() or not shutil.which("nvcc"), reason="needs nvcc and no GPU")
def test_no_gpu_is_a_clear_error(smollm2):
    """On a machine without a GPU (CI's), run_cuda says so and points to run; no crash."""
    p = run_cmd([smollm2, "-i", "x", "-n", 2], binary=build(), check=False)
    assert p.returncode == 1
    assert p.stderr.decode() == "run_cuda: error: no usable CUDA GPU (use run, the CPU build)\n"
