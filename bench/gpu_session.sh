#!/bin/bash
# bench/gpu_session.sh - what one session on a GPU machine runs, step by step:
#   bench/gpu_session.sh TOKFILE OUTDIR STEP...
# TOKFILE: model.bin cut after its tokenizer section (head -c WEIGHTS_OFFSET model.bin), so that
# random-weight models can be made there (model.bin itself is too large to carry). Steps:
#   tests     tests/test_cuda.py on a random SmolLM2-shaped model (TQ_CUDA_MODEL; $TESTS_K: pytest -k)
#   sanitize  compute-sanitizer memcheck on short generations (tq3, tq4p:q4, fp16), racecheck (tq3, tq4p:q4)
#   profile   ncu: GPU time of every kernel of a 1000-token prefill and 3 decode steps ($PROFILE_FORMATS,
#             default tq3 and fp16)
#   speed     bench/speed --run ./run_cuda at ~1000 and ~7400 prompt tokens, random SmolLM2 shape
#             (through a wrapper that drops the generated text: a random model's bytes are not
#             UTF-8, which bench/speed cannot read), formats $FORMATS (default all six)
#   gpubench  bench/gpubench on the same model at 1024 and 7400 (warm prefill of 1000 tokens),
#             with the tensor-core attention and without it (TQ_CUDA_NO_MMA=1: fp16, tq3)
#   long      bench/gpubench at 8K, 32K and 128K, random llama-3.1-8b shape cut to $LAYERS layers
#             ($FORMATS, default all six), then fp16 and tq3 again with TQ_CUDA_NO_MMA=1 (NOMMA=0: not)
# Logs go to OUTDIR (at the end as one archive, OUTDIR/logs.tgz, but for a session.log the caller
# tees there); each step goes on when another fails.
set -u
tok=$1 out=$2
shift 2
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=python3
rnd=/tmp/rnd135.bin rnd4=/tmp/rnd135_4.bin
gb=0
[ -x bench/gpubench ] || { nvcc -O3 -arch=sm_90 -Xcompiler "-Wall -Wextra -fopenmp" -o bench/gpubench \
    bench/gpubench.cu -lcublas -lm > "$out/gpubench_build.log" 2>&1 & gb=$!; }
wait_gpubench() { [ $gb = 0 ] || wait $gb; gb=0; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
make run >/dev/null 2>&1 || echo "gpu_session: make run failed"
big=/tmp/rnd8b.bin bx=0     # the 8B model is written in the background while the first steps run
case " $* " in *" long "*) [ -f $big ] || { $py export.py "$tok" $big --random llama-3.1-8b --layers "${LAYERS:-4}" \
    > "$out/export8b.log" 2>&1 & bx=$!; } ;; esac
[ -f $rnd ] || $py export.py "$tok" $rnd --random smollm2-135m
[ -f $rnd4 ] || $py export.py "$tok" $rnd4 --random smollm2-135m --layers 4
for step in "$@"; do
    t0=$(date +%s)
    case $step in
    tests)
        TQ_CUDA_MODEL=$rnd4 $py -m pytest -q -rA tests/test_cuda.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$out/tests.log" \
            | grep -E "passed|failed|error|KL|largest|Error" | grep -v "^    " | tail -60 ;;
    sanitize)
        [ -x run_cuda ] || make run_cuda >/dev/null
        for k in tq3 tq4p:q4 fp16; do
            compute-sanitizer --tool memcheck --leak-check no ./run_cuda $rnd4 -k $k -c 96 -n 6 -t 0 \
                -i "The capital of France is Paris. The capital of Germany is" > "$out/san_${k/:/_}.log" 2>&1
            echo "sanitize $k: exit $?, $(grep 'ERROR SUMMARY' "$out/san_${k/:/_}.log")"
        done
        for k in tq3 tq4p:q4; do
            compute-sanitizer --tool racecheck ./run_cuda $rnd4 -k $k -c 48 -n 3 -t 0 \
                -i "The capital of France is Paris. The capital of Germany is" > "$out/race_${k/:/_}.log" 2>&1
            echo "racecheck $k: exit $?, $(grep 'RACECHECK SUMMARY\|ERROR SUMMARY' "$out/race_${k/:/_}.log")"
        done ;;
    profile)
        [ -x run_cuda ] || make run_cuda >/dev/null
        for k in ${PROFILE_FORMATS:-tq3 fp16}; do
            ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv ./run_cuda $rnd -k $k -n 3 -t 0 \
                -c 1100 -i "$(head -c 3800 tests/data/wiki.test.raw)" > "$out/ncu_$k.csv" 2>/dev/null
            echo "== profile $k"; $py bench/ncu_summary.py "$out/ncu_$k.csv" --tokens 3 | head -40 | sed "s/^ */  /"
        done ;;
    speed)
        [ -x run_cuda ] || make run_cuda >/dev/null
        mkdir -p /tmp/w && printf '#!/bin/bash\ncase " $* " in *" tokenize "*) exec %s "$@";; esac\nexec %s "$@" >/dev/null\n' \
            "$PWD/run_cuda" "$PWD/run_cuda" > /tmp/w/run_cuda && chmod +x /tmp/w/run_cuda
        for n in 1000 7400; do
            $py bench/speed --run /tmp/w/run_cuda --model $rnd --formats "${FORMATS:-fp16,q8,q4,tq4,tq3,tq2}" --rounds 3 \
                --prompt-tokens $n -n 128 2>&1 | tee "$out/speed_$n.log" | tail -9
        done ;;
    gpubench)
        wait_gpubench
        for mma in on off; do
            echo "== gpubench, tensor-core attention $mma"
            env $([ $mma = off ] && echo TQ_CUDA_NO_MMA=1) ./bench/gpubench $rnd --formats $([ $mma = on ] && echo ${FORMATS:-fp16,q8,q4,tq4,tq3,tq2} || echo fp16,tq3) \
                --ctx 1024,7400 --rounds 3 --prefill 1000 2>&1 | tee "$out/gpubench_smollm_mma_$mma.log" | grep -v "^$" | tail -24
        done ;;
    long)
        [ $bx = 0 ] || wait $bx
        cat "$out/export8b.log" 2>/dev/null
        wait_gpubench
        ./bench/gpubench $big --formats ${FORMATS:-fp16,q8,q4,tq4,tq3,tq2} --ctx 8192,32768,131072 --rounds "${ROUNDS:-3}" \
            2>&1 | tee "$out/long.log" | grep -v "^$" | tail -24
        [ "${NOMMA:-1}" = 1 ] && echo "== the same, tensor-core attention off (TQ_CUDA_NO_MMA=1)" && TQ_CUDA_NO_MMA=1 ./bench/gpubench $big --formats fp16,tq3 --ctx 8192,32768,131072 --rounds "${ROUNDS:-3}" \
            2>&1 | tee "$out/long_nomma.log" | grep -v "^$" | tail -8 ;;
    *) echo "gpu_session: unknown step $step" ;;
    esac
    echo "gpu_session: step $step took $(( $(date +%s) - t0 )) s"
done
# at most 8 files come back from the device machine: the logs travel as one archive
(cd "$out" && ls | grep -v '^logs.tgz$\|^session.log$' > /tmp/gpu_session_logs && tar czf logs.tgz -T /tmp/gpu_session_logs && xargs rm -f < /tmp/gpu_session_logs)
