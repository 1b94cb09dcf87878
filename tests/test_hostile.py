"""Hostile inputs: a bad model file, option, prompt or export source gets one line
on stderr that names the problem, an exit status > 0 (a negative one is a signal: a crash),
and nothing on stdout. Model-file cases run against ./run and ./run_san (ASan + UBSan).

Models are small files made by tests/fuzz_seeds.py: a valid header patched one field at a
time, and a tiny random-weight model with SmolLM2's real tokenizer (copied from model.bin)
for the prompt and context cases. The end of the file: regressions of what fuzzing found,
a short generation under valgrind, and export.py's errors and atomic output."""
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from conftest import ROOT, RUN, RUN_SAN, RUN_VG  # noqa: E402
import fuzz_seeds as fs  # noqa: E402

BINARIES = [pytest.param(RUN, id="run"), pytest.param(RUN_SAN, id="run_san")]


@pytest.fixture(scope="module", params=BINARIES)
def binary(request):
    if not request.param.exists():
        pytest.skip(f"{request.param.name} is not built (make run run_san)")
    return request.param


@pytest.fixture(scope="module")
def plain():
    if not RUN.exists():
        pytest.skip("./run is not built")
    return RUN


# An error exit leaves buffers that are still in use unfreed: LeakSanitizer would report
# them. Leaks on the normal path are checked by the valgrind test instead.
SAN_ENV = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")


def run_cmd(args, binary=RUN, check=True, timeout=60):
    """Like conftest.run_cmd, but bytes arguments go through as bytes (invalid UTF-8),
    stdin is empty, and LeakSanitizer is off."""
    p = subprocess.run([str(binary)] + [a if isinstance(a, bytes) else str(a) for a in args],
                       capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                       env=SAN_ENV)
    if check:
        assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    return p


def refused(p, *phrases):
    """One error line naming the problem, exit status 1 (not a signal), empty stdout."""
    err = p.stderr.decode("utf-8", errors="replace")
    assert p.returncode == 1, f"exit status {p.returncode} (negative: a signal)\n{err[-2000:]}"
    assert "ERROR: AddressSanitizer" not in err and "runtime error" not in err, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run: error: "), err[-2000:]
    for ph in phrases:
        assert ph in lines[0], f"{ph!r} not in {lines[0]!r}"
    assert p.stdout == b"", p.stdout[:200]
    return lines[0]


# ----------------------------------------------------------------------------------------
# model files

SEED = fs.seeds()["gpt2.bin"]     # dim 8, 1 layer, 1 head of 8, vocab 262, seq_len 64


def patched(**kw):
    h = fs.read_header(SEED)
    h.update(kw)
    return fs.pack_header(h) + SEED[256:]


SEED_Q8 = fs.seeds()["gpt2_q8.bin"]   # dim 64, 1 layer, 2 heads of 32, int8 weights (weight type 1)


def patched_q8(**kw):
    h = fs.read_header(SEED_Q8)
    h.update(kw)
    return fs.pack_header(h) + SEED_Q8[256:]


def q8_rows_of_8():
    """An int8 file whose rows (dim 8) are not whole groups of 64, sizes consistent."""
    return fs.build_q8(fs.config(vocab_size=262, dim=8, hidden_dim=64, n_layers=1, n_heads=1,
                                 n_kv_heads=1, head_dim=8), fs.tiny_gpt2_section())


def corrupt_section():
    b = bytearray(SEED)
    struct.pack_into("<i", b, 256, 999)           # n_vocab in the section != vocab_size
    return bytes(b)


MODEL_CASES = {                     # name: (file bytes, phrases the message must contain)
    "empty": (b"", ["0 bytes", "too short"]),
    "header_cut": (SEED[:100], ["100 bytes", "too short"]),
    "header_only": (SEED[:256], ["out of bounds"]),
    "truncated": (SEED[:-100], ["truncated"]),
    "extra_bytes": (SEED + b"\0" * 64, ["64 bytes past the end of the weights"]),
    "magic": (b"GGUF" + SEED[4:], ["not a model.bin", "magic"]),
    "version": (patched(version=2), ["format version 2"]),
    "dim_zero": (patched(dim=0), ["dim = 0", "out of range"]),
    "dim_negative": (patched(dim=-8), ["dim = -8", "out of range"]),
    "dim_huge": (patched(dim=1 << 30), ["dim = 1073741824", "out of range"]),
    "hidden_zero": (patched(hidden_dim=0), ["hidden_dim = 0"]),
    "layers_negative": (patched(n_layers=-1), ["n_layers = -1"]),
    "heads_zero": (patched(n_heads=0), ["n_heads = 0"]),
    "kv_heads_zero": (patched(n_kv_heads=0), ["n_kv_heads = 0"]),
    "head_dim_zero": (patched(head_dim=0), ["head_dim = 0"]),
    "vocab_zero": (patched(vocab_size=0), ["vocab_size = 0"]),
    "seq_len_negative": (patched(seq_len=-5), ["seq_len = -5"]),
    "heads_not_dividing_dim": (patched(n_heads=3), ["n_heads = 3 does not divide dim = 8"]),
    "head_dim_odd": (patched(head_dim=7), ["head_dim = 7 is odd"]),
    "kv_heads_not_dividing": (patched(n_heads=4, n_kv_heads=3),
                              ["n_kv_heads = 3 does not divide n_heads = 4"]),
    "q_dim_huge": (patched(n_heads=8, head_dim=1 << 22), ["n_heads x head_dim"]),
    "size_overflow": (patched(dim=1 << 24, hidden_dim=1 << 24, n_layers=1 << 24),
                      ["overflow"]),
    "weights_bytes": (patched(w_bytes=4), ["header says 4 weight bytes"]),
    "shared_flag": (patched(shared_classifier=2), ["shared_classifier"]),
    "tokenizer_kind": (patched(kind=3), ["unknown tokenizer kind 3"]),
    "pretok": (patched(pretok=9), ["unknown pre-tokenizer 9"]),
    "bos_outside": (patched(bos=262), ["bos_id = 262", "outside the vocabulary"]),
    "eos_negative": (patched(eos=-2), ["eos_id = -2"]),
    "add_bos_no_bos": (patched(add_bos=1), ["add_bos", "no bos token"]),
    "rope_theta_nan": (patched(rope_theta=float("nan")), ["rope_theta = nan"]),
    "rope_theta_zero": (patched(rope_theta=0.0), ["rope_theta = 0"]),
    "norm_eps_zero": (patched(norm_eps=0.0), ["norm_eps = 0"]),
    "norm_eps_inf": (patched(norm_eps=float("inf")), ["norm_eps = inf"]),
    "tokenizer_offset": (patched(tok_off=512), ["tokenizer offset 512"]),
    "tokenizer_past_end": (patched(tok_bytes=1 << 40), ["tokenizer section", "out of bounds"]),
    "tokenizer_over_weights": (patched(tok_bytes=len(SEED) - 300), ["out of bounds"]),
    "weights_offset_odd": (patched(w_off=3841), ["out of bounds"]),
    "weights_offset_past_end": (patched(w_off=1 << 40), ["out of bounds"]),
    "tokenizer_section_corrupt": (corrupt_section(), ["bad tokenizer section", "999 tokens"]),
    # int8 weights (weight type 1): sizes from the codes and scales, the type and group checked
    "q8_truncated": (SEED_Q8[:-100], ["truncated"]),
    "q8_last_scale_cut": (SEED_Q8[:-4], ["truncated"]),
    "q8_extra_bytes": (SEED_Q8 + b"\0" * 64, ["64 bytes past the end of the weights"]),
    "q8_group_32": (patched_q8(group=32), ["int8 weights in groups of 32", "groups of 64"]),
    "q8_unknown_type": (patched_q8(weight_type=2), ["unknown weight type 2"]),
    "q8_type_negative": (patched_q8(weight_type=-1), ["unknown weight type -1"]),
    "q8_read_as_fp32": (patched_q8(weight_type=0, group=0), ["weight bytes, the config needs"]),
    "q8_fp32_sized": (patched_q8(w_bytes=4 * fs.weights_floats(fs.read_header(SEED_Q8))),
                      ["weight bytes, the config needs"]),
    "q8_rows_not_groups": (q8_rows_of_8(), ["dim = 8 is not a multiple of the group size 64"]),
    "fp32_read_as_q8": (patched(weight_type=1, group=64), ["dim = 8 is not a multiple"]),
    "fp32_with_group": (patched(group=64), ["fp32 weights with a group size of 64"]),
}


@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_bad_model_file(binary, tmp_path, name):
    data, phrases = MODEL_CASES[name]
    path = tmp_path / "bad.bin"
    path.write_bytes(data)
    p = run_cmd([path, "-n", "2", "-i", "the"], binary=binary, check=False, timeout=60)
    refused(p, str(path), *phrases)


def test_run_cuda_refuses_int8_weights(tmp_path):
    """The GPU build reads fp32 weights only and says so, before it looks for a GPU."""
    run_cuda = ROOT / "run_cuda"
    if not run_cuda.exists():
        pytest.skip("./run_cuda is not built (make run_cuda)")
    path = tmp_path / "q8.bin"
    path.write_bytes(SEED_Q8)
    p = run_cmd([path, "-n", "2", "-i", "the"], binary=run_cuda, check=False)
    err = p.stderr.decode(errors="replace").strip()
    assert p.returncode == 1 and err == ("run_cuda: error: int8 weights are not supported by the GPU build "
                                         "yet; export with --weights fp32"), err


def test_model_path_missing_or_not_a_file(binary, tmp_path):
    refused(run_cmd([tmp_path / "nope.bin", "-i", "x"], binary=binary, check=False),
            "cannot open model", "nope.bin", "No such file")
    refused(run_cmd([tmp_path, "-i", "x"], binary=binary, check=False), "not a regular file")
    refused(run_cmd(["/dev/zero", "-i", "x"], binary=binary, check=False), "not a regular file")


def test_seed_models_are_valid(binary, tmp_path):
    """The files the cases above patch are themselves accepted (so each case tests one field)."""
    for name, data in fs.seeds().items():
        path = tmp_path / name
        path.write_bytes(data)
        p = run_cmd([path, "-n", "3", "-i", "the", "-s", "1"], binary=binary, timeout=60)
        assert p.stdout.startswith(b"the"), (name, p.stdout)


# ----------------------------------------------------------------------------------------
# a tiny model with SmolLM2's tokenizer (dim 16, 2 layers, seq_len 64)

@pytest.fixture(scope="module")
def tiny(smollm2, tmp_path_factory):
    h, section = fs.smollm2_tokenizer(smollm2)
    ids = {k: h[k] for k in ("vocab_size", "bos", "eos", "chat_start", "chat_end", "pretok",
                             "add_bos", "kind")}
    path = tmp_path_factory.mktemp("tiny") / "tiny.bin"
    path.write_bytes(fs.build(fs.config(**ids), section))
    return path


OPTION_CASES = {        # name: (arguments after the model, phrases)
    "k_unknown": (["-k", "tq9"], ['unknown KV format "tq9"']),
    "k_empty_v": (["-k", "tq3:"], ['bad -k "tq3:"']),
    "k_empty_k": (["-k", ":tq3"], ['bad -k ":tq3"']),
    "k_three": (["-k", "tq3:tq3:tq3"], ["bad -k"]),
    "k_long": (["-k", "x" * 100], ["bad -k"]),
    "q4_head_dim_8": (["-k", "q4"], ["format q4 cannot hold head_dim 8"]),
    "q4_values": (["-k", "fp16:q4"], ["format q4 cannot hold head_dim 8"]),
    "n_negative": (["-n", "-1"], ["-n -1 is out of range"]),
    "n_text": (["-n", "ten"], ['-n wants a number, got "ten"']),
    "n_fraction": (["-n", "1.5"], ["-n wants an integer"]),
    "n_empty": (["-n", ""], ["-n wants a number"]),
    "n_huge": (["-n", "1e12"], ["out of range"]),
    "t_nan": (["-t", "nan"], ['-t wants a number, got "nan"']),
    "t_inf": (["-t", "inf"], ["-t wants a number"]),
    "t_negative": (["-t", "-0.5"], ["-t -0.5 is out of range"]),
    "t_tiny": (["-t", "1e-30"], ["-t 1e-30 is too small"]),
    "p_above_1": (["-p", "1.5"], ["-p 1.5 is out of range [0, 1]"]),
    "p_nan": (["-p", "NaN"], ["-p wants a number"]),
    "p_negative": (["-p", "-0.1"], ["out of range"]),
    "s_negative": (["-s", "-3"], ["-s -3 is out of range"]),
    "s_text": (["-s", "0x"], ["-s wants a number"]),
    "c_zero": (["-c", "0"], ["-c 0 is out of range"]),
    "c_above_model": (["-c", "65"], ["-c 65 exceeds the model's context of 64"]),
    "c_text": (["-c", "12k"], ["-c wants a number"]),
    "chunks_zero": (["--chunks", "0"], ["--chunks 0 is out of range"]),
    "scale_unknown": (["--scale", "max"], ['unknown --scale "max"']),
    "scale_unknown_values": (["--scale", "eden:max"], ['unknown --scale "max"']),
    "scale_empty_values": (["--scale", "eden:"], ['bad --scale "eden:"']),
    "scale_three": (["--scale", "nc:nc:nc"], ["bad --scale"]),
    "kproj_three": (["--kproj", "3"], ["--kproj 3 is out of range [0, 2]"]),
    "kblock_not_16": (["--kblock", "100"], ["--kblock 100", "multiple of 16"]),
    "offsets_retired": (["--offsets", "0"], ["unknown option --offsets"]),
    "kweights_retired": (["--kweights", "0"], ["unknown option --kweights"]),
    "batch_zero": (["--batch", "0"], ["--batch 0 is out of range"]),
    "batch_huge": (["--batch", "100000"], ["--batch 100000 is out of range"]),
    "qinput_two": (["--qinput", "2"], ["--qinput 2 is out of range [0, 1]"]),
    "mode_unknown": (["-m", "train"], ['unknown mode "train"']),
    "option_unknown": (["-q", "1"], ["unknown option -q"]),
    "not_an_option": (["hello"], ['expected an option, got "hello"']),
    "missing_value": (["-n"], ["option -n needs a value"]),
    "prompt_twice": (["-i", "a", "-f", "/dev/null"], ["-i or -f, not both"]),
    "f_missing": (["-f", "/nonexistent/prompt.txt"], ["cannot read /nonexistent/prompt.txt",
                                                      "No such file"]),
    "f_directory": (["-f", "/"], ["cannot read /", "Is a directory"]),
    "z_missing": (["-z", "/nonexistent.bin"], ["cannot open model /nonexistent.bin"]),
    "eval_c_1": (["-m", "eval", "-c", "1", "-f", "/dev/null"], ["-c 1 is too short"]),
    "no_prompt": ([], ["no prompt"]),
    "logits_no_output": (["-m", "logits", "-i", "1 2"], ["-o"]),
    "logits_bad_id": (["-m", "logits", "-i", "1 x", "-o", "/dev/null"], ["bad token id"]),
    "logits_id_range": (["-m", "logits", "-i", "49152", "-o", "/dev/null"], ["bad token id"]),
    "logits_unwritable": (["-m", "logits", "-i", "1 2", "-o", "/nonexistent/x.f32"],
                          ["cannot write /nonexistent/x.f32"]),
}


@pytest.mark.parametrize("name", sorted(OPTION_CASES))
def test_bad_option(plain, tiny, name):
    args, phrases = OPTION_CASES[name]
    if "-i" not in args and "-f" not in args and name not in ("no_prompt", "missing_value"):
        args = args + ["-i", "Hi"]
    refused(run_cmd([tiny] + args, binary=plain, check=False, timeout=60), *phrases)


def test_options_under_sanitizers(tiny):
    """A few of the option cases through ./run_san as well."""
    if not RUN_SAN.exists():
        pytest.skip("./run_san is not built")
    for name in ("k_unknown", "q4_head_dim_8", "t_nan", "c_above_model", "f_directory"):
        args, phrases = OPTION_CASES[name]
        refused(run_cmd([tiny, *args, "-i", "Hi"] if "-i" not in args and "-f" not in args
                        else [tiny, *args], binary=RUN_SAN, check=False, timeout=60), *phrases)


# a value for every option -h names, each valid with `-m logits -i "1 2" -o FILE`
HELP_VALUES = {"-t": "0", "-p": "0.5", "-s": "7", "-n": "1", "-i": "1 2", "-f": None, "-m": "logits",
               "-y": "be brief", "-k": "tq3:q8", "-c": "8", "--chunks": "1", "-o": None, "--paper": (),
               "--scale": "nc:eden", "--kproj": "1", "--kblock": "16", "--sink": "2", "--window": "3", "--batch": "1",
               "--qinput": "0", "--stats": None, "-z": None}


def help_flags(text):
    """(the options lines' flags, the research line's flags) of run's -h text"""
    main = re.findall(r"^  (-{1,2}[a-z]+) ", text, re.M)
    research = [line for line in text.splitlines() if line.startswith("Research options")]
    assert len(research) == 1, text
    return main, re.findall(r"(?<!\S)(-{1,2}[a-z]+)", research[0])


def test_help_is_short_and_true(plain, tiny, tmp_path):
    """-h lists at most 14 options and one line of research options, which bench/README.md
    documents; every option it names is accepted (none is probed, a removed one fails here),
    and every option run.c parses is named."""
    text = run_cmd(["-h"], binary=plain).stdout.decode()
    main, research = help_flags(text)
    assert len(main) <= 14, main
    assert "--paper" in main and "--kproj" in research
    src = (ROOT / "run.c").read_text()   # options compared one by one, and main's table of options with a value
    parsed = set(re.findall(r'!strcmp\(a, "(-[^"]+)"\)', src) + re.findall(r'\{"(-[^"]+)", \'[sifu]\', &', src)) - {"-h", "--help"}
    assert parsed == set(main) | set(research), parsed ^ (set(main) | set(research))
    lab = (ROOT / "bench" / "README.md").read_text()
    section = lab[lab.index("## Research options"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    for f in research:
        assert f"`{f}" in section, f"{f} is not documented in bench/README.md's Research options"
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2")
    for f in main + research:
        value = HELP_VALUES[f]
        args = [tiny, "-m", "logits", "-o", tmp_path / "out.f32"]
        args += [] if f == "-f" else ["-i", "1 2"]
        extra = {"-f": [f, ids], "-o": [f, tmp_path / "o2.f32"], "--stats": [f, tmp_path / "s.f32"],
                 "-z": [f, tiny], "--paper": [f]}.get(f, [f, value])
        p = run_cmd(args + extra, binary=plain, check=False, timeout=60)
        assert p.returncode == 0, (f, p.stderr.decode())


def test_file_with_nul_byte(plain, tiny, tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"Hello\0world")
    refused(run_cmd([tiny, "-f", f], binary=plain, check=False), "NUL byte at offset 5")
    # -m tokenize reads the NUL bytes (test_tokenizer.py checks their ids)
    assert run_cmd([tiny, "-m", "tokenize", "-f", f], binary=plain).stdout.strip()


def test_head_dim_too_large_for_tq(binary, tmp_path):
    """A head_dim of 2048: tq formats (a head_dim^2 rotation or QJL matrix) refuse it,
    fp16 takes it (the run then stops at the tokenizer, whose section is empty)."""
    path = tmp_path / "wide.bin"
    path.write_bytes(fs.build(fs.config(dim=8, hidden_dim=8, n_layers=1, n_heads=1,
                                        n_kv_heads=1, head_dim=2048, vocab_size=4), b"",
                              weights=False))
    refused(run_cmd([path, "-k", "tq3", "-i", "x"], binary=binary, check=False),
            "format tq3 handles head_dim up to 1024")
    refused(run_cmd([path, "-k", "fp16:tq4p", "-i", "x"], binary=binary, check=False),
            "format tq4p handles head_dim up to 1024")
    refused(run_cmd([path, "-k", "fp16", "-i", "x"], binary=binary, check=False),
            "bad tokenizer section")


def test_head_dim_not_multiple_of_8(binary, tmp_path):
    path = tmp_path / "hd12.bin"
    path.write_bytes(fs.build(fs.config(dim=12, hidden_dim=8, n_layers=1, n_heads=1,
                                        n_kv_heads=1, head_dim=12, vocab_size=4), b""))
    for fmt in ("fp32", "tq3"):
        refused(run_cmd([path, "-k", fmt, "-i", "x"], binary=binary, check=False),
                f"format {fmt} cannot hold head_dim 12")


# ----------------------------------------------------------------------------------------
# prompts and the context

def test_prompt_longer_than_context(binary, tiny):
    prompt = " ".join(["word"] * 100)
    refused(run_cmd([tiny, "-i", prompt], binary=binary, check=False),
            "the prompt is 100 tokens; the context is 64")
    refused(run_cmd([tiny, "-i", "one two three four five", "-c", "4"], binary=binary,
                    check=False), "the prompt is 5 tokens; the context is 4")


def test_generation_stops_at_end_of_context(binary, tiny):
    """Not an error: the tokens so far are the output, stderr says why it stopped."""
    p = run_cmd([tiny, "-i", "Hello there", "-c", "8", "-n", "100", "-t", "0"], binary=binary,
                check=False)
    err = p.stderr.decode()
    assert p.returncode >= 0 and "end of the context" in err and "8 tokens" in err, err
    assert "ERROR: AddressSanitizer" not in err and "runtime error" not in err
    assert p.stdout.startswith(b"Hello there")


@pytest.mark.parametrize("data", [b"\xff", b"ab\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"x\x80y"])
def test_invalid_utf8_prompt(binary, tiny, tmp_path, data):
    refused(run_cmd([tiny, "-i", data], binary=binary, check=False), "not valid UTF-8")
    f = tmp_path / "p.txt"
    f.write_bytes(data)
    refused(run_cmd([tiny, "-f", f], binary=binary, check=False), "not valid UTF-8")
    refused(run_cmd([tiny, "-m", "chat", "-i", data], binary=binary, check=False),
            "not valid UTF-8")


def test_empty_prompt(binary, tiny, tmp_path):
    refused(run_cmd([tiny, "-i", ""], binary=binary, check=False), "empty prompt")
    f = tmp_path / "empty.txt"
    f.write_bytes(b"")
    refused(run_cmd([tiny, "-f", f], binary=binary, check=False), "empty prompt")


def test_context_too_large_for_memory(binary, tmp_path):
    """seq_len 2^24 with 64 layers of head_dim 1024: terabytes of cache. The default context
    and -c both get a message with the bytes needed; a small -c passes that check."""
    h = fs.config(dim=8, hidden_dim=8, n_layers=64, n_heads=1, n_kv_heads=1, head_dim=1024,
                  vocab_size=4, seq_len=1 << 24)
    path = tmp_path / "long.bin"
    path.write_bytes(fs.build(h, b"", weights=False))
    e = refused(run_cmd([path, "-i", "x"], binary=binary, check=False),
                "the model's context of 16777216 tokens need", "bytes", "give a smaller -c")
    need = int(e.split(" need ")[1].split(" bytes")[0])
    per_token = 64 * (386 + 386)     # tq3 at head_dim 1024: 3 bits x 1024 + fp16 norm
    assert need >= per_token * (1 << 24), e
    refused(run_cmd([path, "-i", "x", "-c", "16777216", "-k", "fp32"], binary=binary,
                    check=False), "-c 16777216 tokens need", "GiB of memory here")
    refused(run_cmd([path, "-i", "x", "-c", "1000"], binary=binary, check=False),
            "bad tokenizer section")


# ----------------------------------------------------------------------------------------
# what fuzzing found (tests/fuzz_load.c, tests/fuzz_tok.c), and the sampler

def test_special_token_inside_a_character(binary, tmp_path):
    """fuzz_load: a GPT-2 kind special token "\\xe2\\x82" matched the first two bytes of
    "\u20ac", leaving the pre-tokenizer a lone continuation byte: an endless loop. A special
    token that is not whole UTF-8 characters is now refused when the tokenizer is built."""
    toks = [bytes([b]) for b in range(256)] + [b"\xe2\x82"]
    section = fs.pack_tokenizer(toks, flags=[0] * 256 + [1], ranges=[(32, 32, 3)])
    path = tmp_path / "split.bin"
    path.write_bytes(fs.build(fs.config(vocab_size=257, pretok=2, dim=8, hidden_dim=8,
                                        n_layers=1, n_heads=1, head_dim=8), section))
    refused(run_cmd([path, "-m", "tokenize", "-i", "a\u20ac"], binary=binary, check=False,
                    timeout=30), "special token 256 is not valid UTF-8")


def test_top_p_with_nothing_above_the_cutoff(binary, tmp_path):
    """top-p below 1/vocab with a flat distribution (a huge temperature), or NaN logits
    (NaN weights): no token passes the cutoff; the sampler read probindex[-1]."""
    path = tmp_path / "m.bin"
    path.write_bytes(SEED)
    p = run_cmd([path, "-i", "the", "-n", "3", "-t", "1000000", "-p", "0.001"], binary=binary)
    assert p.stdout.startswith(b"the")
    h = fs.read_header(SEED)
    nan = bytearray(SEED)
    nan[h["w_off"]:] = np.full(h["w_bytes"] // 4, np.nan, "<f4").tobytes()
    path.write_bytes(bytes(nan))
    p = run_cmd([path, "-i", "the", "-n", "3", "-p", "0.5"], binary=binary)
    assert p.stdout.startswith(b"the")


# ----------------------------------------------------------------------------------------
# valgrind

def test_valgrind_short_generation(tiny, tmp_path):
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    assert RUN_VG.exists(), "./run_vg is not built (make run_vg)"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for fmt in ("tq3", "tq3p:q8"):
        p = subprocess.run(["valgrind", "--error-exitcode=99", "--leak-check=full", str(RUN_VG),
                            str(tiny), "-n", "3", "-i", "Hi", "-k", fmt],
                           capture_output=True, timeout=120, env=env)
        err = p.stderr.decode(errors="replace")
        assert p.returncode == 0, err[-3000:]       # 99: a memory error or a leak
        assert "ERROR SUMMARY: 0 errors" in err, err[-3000:]
        assert p.stdout.startswith(b"Hi")


def test_valgrind_int8_weights(tmp_path):
    """The int8 products under valgrind: the 19-token prompt fills one 16-token tile and leaves
    3 tokens for the one-token kernel, then 3 tokens are decoded."""
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    assert RUN_VG.exists(), "./run_vg is not built (make run_vg)"
    path = tmp_path / "q8.bin"
    path.write_bytes(SEED_Q8)
    p = subprocess.run(["valgrind", "--error-exitcode=99", "--leak-check=full", str(RUN_VG), str(path),
                        "-n", "3", "-i", "the quick brown fox j", "-k", "tq3", "-s", "1"],
                       capture_output=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 0 and "ERROR SUMMARY: 0 errors" in err, err[-3000:]
    assert "weights: int8 g64" in err and p.stdout.startswith(b"the quick brown fox j")


# ----------------------------------------------------------------------------------------
# export.py: broken sources get one clear line; the output is replaced atomically

try:
    import gguf
    import test_export as te
    from test_export import bpe  # noqa: F401  (the fixture: a small BPE trained with tokenizers)
except ImportError:             # export.py's test dependencies are missing: skip its cases
    gguf = None

    @pytest.fixture(scope="module")
    def bpe():
        pytest.skip("gguf / tokenizers are not installed")


def export_fails(tmp_path, src, *phrases):
    te.assert_fails(tmp_path, src, tmp_path / "model.bin", *phrases)


def st_header(folder, edit):
    """Rewrites model.safetensors' JSON header with edit(header) (the data is kept)."""
    p = folder / "model.safetensors"
    b = p.read_bytes()
    (n,) = struct.unpack_from("<Q", b)
    hj = json.dumps(edit(json.loads(b[8:8 + n]))).encode()
    p.write_bytes(struct.pack("<Q", len(hj)) + hj + b[8 + n:])


def edit_entry(name, **kw):
    def edit(h):
        h[name] = {k: v for k, v in {**h[name], **kw}.items() if v is not None}
        return h
    return edit


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory, bpe):  # noqa: F811
    folder = tmp_path_factory.mktemp("hf") / "hf"
    _, cfg = te.write_hf(folder, bpe)
    return folder, cfg


HF_CASES = {  # name: (how to break a copy of the folder, phrases)
    "config_not_json": (lambda d, c: (d / "config.json").write_text("{oops"), ["config.json"]),
    "config_not_object": (lambda d, c: (d / "config.json").write_text("[1]"),
                          ["not a JSON object"]),
    "config_missing_key": (lambda d, c: (d / "config.json").write_text(
        json.dumps({k: v for k, v in c.items() if k != "hidden_size"})), ["hidden_size"]),
    "config_wrong_type": (lambda d, c: (d / "config.json").write_text(
        json.dumps({**c, "num_hidden_layers": "two"})), ["bad config.json", "two"]),
    "config_heads_zero": (lambda d, c: (d / "config.json").write_text(
        json.dumps({**c, "num_attention_heads": 0})), ["n_heads = 0"]),
    "config_heads_not_dividing": (lambda d, c: (d / "config.json").write_text(
        json.dumps({**c, "num_attention_heads": 6, "num_key_value_heads": 6})),
        ["n_heads 6 does not divide dim 64"]),
    "arch_unsupported": (lambda d, c: (d / "config.json").write_text(
        json.dumps({**c, "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]})),
        ["unsupported model", "gpt_neox"]),
    "rope_scaling_string": (lambda d, c: (d / "config.json").write_text(
        json.dumps({**c, "rope_scaling": "yarn"})), ["rope_scaling", "not an object"]),
    "activation": (lambda d, c: (d / "config.json").write_text(
        json.dumps({**c, "hidden_act": "gelu"})), ["hidden_act 'gelu'"]),
    "no_safetensors": (lambda d, c: (d / "model.safetensors").unlink(), ["no *.safetensors"]),
    "st_empty": (lambda d, c: (d / "model.safetensors").write_bytes(b""),
                 ["cannot read safetensors"]),
    "st_header_length": (lambda d, c: (d / "model.safetensors").write_bytes(
        struct.pack("<Q", 10 ** 7) + b"{}"), ["header length 10000000 is larger than the file"]),
    "st_header_not_json": (lambda d, c: (d / "model.safetensors").write_bytes(
        struct.pack("<Q", 5) + b"{abc}"), ["cannot read safetensors"]),
    "st_header_not_object": (lambda d, c: st_header(d, lambda h: [1, 2]),
                             ["not a JSON object"]),
    "st_no_offsets": (lambda d, c: st_header(d, edit_entry("model.norm.weight",
                                                           data_offsets=None)),
                      ["bad header entry", "model.norm.weight"]),
    "st_size_mismatch": (lambda d, c: st_header(d, edit_entry("model.norm.weight",
                                                              shape=[32])),
                         ["model.norm.weight has 256 bytes", "need 128"]),
    "st_truncated": (lambda d, c: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:-100]), ["truncated"]),
    "st_dtype": (lambda d, c: st_header(d, edit_entry("model.norm.weight", dtype="I32")),
                 ["unsupported tensor type I32", "model.norm.weight"]),
    "st_shape": (lambda d, c: st_header(d, edit_entry("model.norm.weight", shape=[8, 8])),
                 ["model.norm.weight has shape (8, 8), expected (64,)"]),
    "tensor_missing": (lambda d, c: st_header(d, lambda h: {k: v for k, v in h.items()
                                                           if k != "model.norm.weight"}),
                       ["model.norm.weight missing"]),
    "tokenizer_missing": (lambda d, c: (d / "tokenizer.json").unlink(), ["tokenizer.json"]),
    "tokenizer_not_object": (lambda d, c: (d / "tokenizer.json").write_text("[]"),
                             ["bad tokenizer.json"]),
    "tokenizer_negative_id": (lambda d, c: (d / "tokenizer.json").write_text(json.dumps(
        (lambda t: {**t, "model": {**t["model"], "vocab": {**t["model"]["vocab"], "zz": -1}}})(
            json.loads((d / "tokenizer.json").read_text())))), ["ids >= 0", "'zz': -1"]),
}


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_export_bad_hf_folder(tmp_path, hf_src, name):
    folder, cfg = hf_src
    d = tmp_path / "src"
    shutil.copytree(folder, d)
    breaker, phrases = HF_CASES[name]
    breaker(d, cfg)
    export_fails(tmp_path, d, *phrases)


@pytest.fixture(scope="module")
def gguf_src(tmp_path_factory, bpe):  # noqa: F811
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    te.write_gguf(path, bpe=bpe)
    return path


def test_export_broken_gguf(tmp_path, gguf_src):
    data = gguf_src.read_bytes()
    for name, blob, phrases in [("garbage.gguf", b"GGUF" + bytes(range(256)) * 40, ["GGUF"]),
                                ("cut.gguf", data[:5000], ["cannot parse GGUF"]),
                                ("data_cut.gguf", data[:-1000], ["data_cut.gguf"])]:
        src = tmp_path / name
        src.write_bytes(blob)
        export_fails(tmp_path, src, name, *phrases)


@pytest.mark.parametrize("name,kw,phrases", [
    ("arch", dict(arch="gpt2"), ["unsupported architecture 'gpt2'"]),
    ("string_metadata", dict(extra_kv={"x": lambda w: w.add_string(
        "llama.rope.freq_base", "fast")}), ["llama.rope.freq_base = 'fast' is not a number"]),
    ("array_metadata", dict(extra_kv={"x": lambda w: w.add_array(
        "llama.attention.head_count_kv", [2, 2])}), ["head_count_kv", "is not an integer"]),
    ("tokenizer_model", dict(extra_kv={"x": lambda w: w.add_tokenizer_model("bert")}),
     ["tokenizer.ggml.model = 'bert'"]),
    ("pre_tokenizer", dict(pre="llama-bpe"), ["llama-bpe"]),
    ("missing_tensor", dict(skip=("blk.1.ffn_up.weight",)), ["blk.1.ffn_up.weight", "missing"]),
])
def test_export_bad_gguf(tmp_path, bpe, name, kw, phrases):  # noqa: F811
    src = tmp_path / f"{name}.gguf"
    if kw.get("arch"):
        wr = gguf.GGUFWriter(str(src), kw["arch"])
        wr.add_block_count(1)
        wr.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_tensors_to_file()
        wr.close()
    else:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            te.write_gguf(src, bpe=bpe, **kw)
    export_fails(tmp_path, src, *phrases)


def test_export_output_folder_missing(tmp_path, hf_src):
    p = te.run_export(hf_src[0], tmp_path / "no" / "model.bin", check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"export.py: error: output folder {tmp_path / 'no'} does not exist"], p.stderr


def test_export_atomic_on_failure_midway(tmp_path, hf_src, monkeypatch):
    """A failure after half of the weights are written leaves the previous model.bin as it
    was and no temporary file; so does an interrupt (Ctrl-C)."""
    sys.path.insert(0, str(ROOT))
    import export
    out = tmp_path / "model.bin"
    for exc in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        out.write_bytes(b"previous model")
        calls = []
        real_get = export.HFSource.get

        def failing_get(self, group, layer, exc=exc):
            calls.append(group)
            if len(calls) == 12:
                raise exc
            return real_get(self, group, layer)
        monkeypatch.setattr(export.HFSource, "get", failing_get)
        assert export.main([str(hf_src[0]), str(out)]) == 1
        assert len(calls) == 12 and out.read_bytes() == b"previous model"
        assert sorted(os.listdir(tmp_path)) == ["model.bin"], os.listdir(tmp_path)
    monkeypatch.undo()


def test_export_atomic_replace(tmp_path, hf_src):
    """A successful export replaces the file in one rename: a reader that opened the old
    file keeps reading the old bytes, and the new file is complete."""
    out = tmp_path / "model.bin"
    out.write_bytes(b"previous model")
    with open(out, "rb") as old:
        te.run_export(hf_src[0], out)
        assert old.read() == b"previous model"
    h, _, _ = te.read_model(out)       # checks the sizes of every section
    assert h["dim"] == 64 and sorted(os.listdir(tmp_path)) == ["model.bin"]
