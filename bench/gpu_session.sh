#!/bin/bash
# bench/gpu_session.sh - what one session on a GPU machine runs, step by step:
#   bench/gpu_session.sh TOKFILE OUTDIR STEP...
# TOKFILE: model.bin cut after its tokenizer section (head -c WEIGHTS_OFFSET model.bin), so that
# random-weight models can be made there (model.bin itself is too large to carry). Steps:
#   tests     tests/test_cuda.py on a random SmolLM2-shaped model (TQ_CUDA_MODEL)
#   sanitize  compute-sanitizer memcheck on short generations (tq3, tq4p:q4, fp16)
#   speed     bench/speed --run ./run_cuda at ~1000 and ~7400 prompt tokens, random SmolLM2 shape
#   long      bench/gpubench at 8K, 32K and 128K, random llama-3.1-8b shape cut to $LAYERS layers
# Logs go to OUTDIR; each step goes on when another fails.
set -u
tok=$1 out=$2
shift 2
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=python3
rnd=/tmp/rnd135.bin
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
make run >/dev/null 2>&1 || echo "gpu_session: make run failed"
[ -f $rnd ] || $py export.py "$tok" $rnd --random smollm2-135m
for step in "$@"; do
    t0=$(date +%s)
    case $step in
    tests)
        TQ_CUDA_MODEL=$rnd $py -m pytest -q -rA tests/test_cuda.py 2>&1 | tee "$out/tests.log" \
            | grep -E "passed|failed|error|KL|largest|Error|assert" | tail -60 ;;
    sanitize)
        [ -x run_cuda ] || make run_cuda >/dev/null
        for k in tq3 tq4p:q4 fp16; do
            compute-sanitizer --tool memcheck --leak-check no ./run_cuda $rnd -k $k -c 96 -n 6 -t 0 \
                -i "The capital of France is Paris. The capital of Germany is" > "$out/san_$k.log" 2>&1
            echo "sanitize $k: exit $?, $(grep -c 'Invalid\|ERROR SUMMARY: [1-9]' "$out/san_$k.log") error lines; $(grep 'ERROR SUMMARY' "$out/san_$k.log")"
        done ;;
    speed)
        [ -x run_cuda ] || make run_cuda >/dev/null
        for n in 1000 7400; do
            $py bench/speed --run ./run_cuda --model $rnd --formats fp16,q8,q4,tq4,tq3,tq2 --rounds 3 \
                --prompt-tokens $n -n 128 2>&1 | tee "$out/speed_$n.log" | tail -9
        done ;;
    long)
        [ -x bench/gpubench ] || nvcc -O3 -arch=sm_90 -Xcompiler "-Wall -Wextra -fopenmp" -o bench/gpubench \
            bench/gpubench.cu -lcublas -lm
        big=/tmp/rnd8b.bin
        [ -f $big ] || $py export.py "$tok" $big --random llama-3.1-8b --layers "${LAYERS:-4}"
        ./bench/gpubench $big --formats fp16,q8,q4,tq4,tq3,tq2 --ctx 8192,32768,131072 --rounds "${ROUNDS:-3}" \
            2>&1 | tee "$out/long.log" | tail -24 ;;
    *) echo "gpu_session: unknown step $step" ;;
    esac
    echo "gpu_session: step $step took $(( $(date +%s) - t0 )) s"
done
