#!/usr/bin/env bash
# The GPU checks and benchmarks of one session on a lent GPU machine, in order of value, each step with its own time
# limit so that one slow step cannot starve the rest. Run from the repository root:
#
#     OUT=bench_out/gpu bash benchmarks/gpu_run.sh [steps...]  # steps: tests decode graphs encoders compiled
#
# Writes under $OUT: run.log (every step's output), generation_e2b.{json,md} (decode and prefill, gemma3n bf16 / int8 /
# int4 against transformers bf16), graphs_e2b.{json,md} (decode with CUDA graphs, the default, and eager steps),
# encoders.{json,md} (towers against transformers, bf16 and fp32) and
# compiled_e2b.{json,md} (compiled decode steps: their compile time and speed).
set -u
OUT=${OUT:-bench_out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
STEPS=${*:-tests graphs encoders compiled}
LOG=$OUT/run.log

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name: limit ${limit} s, $(date -u +%T)" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start)) s" | tee -a "$LOG"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda)"
    nproc
} >>"$LOG" 2>&1

for s in $STEPS; do
    case $s in
    tests)
        step tests 150 python -m pytest -q -p no:cacheprovider -rA tests/test_cuda.py ;;
    decode)
        step decode 200 python benchmarks/bench_generation.py --preset e2b --device cuda --dtype bfloat16 \
            --quantize int8 int4 --batch-sizes 1 8 --prompt-tokens 128 --new-tokens 32 --prefill-lengths 128 1024 \
            --repeat 3 --out "$OUT/generation_e2b.json" ;;
    graphs)  # decode only (prefill is the decode step's figures), CUDA graphs (the default) against eager steps
        step graphs 170 python benchmarks/bench_generation.py --preset e2b --device cuda --dtype bfloat16 \
            --quantize int8 int4 --batch-sizes 1 8 --prompt-tokens 128 --new-tokens 32 --prefill-lengths \
            --repeat 3 --out "$OUT/graphs_e2b.json" ;;
    encoders)
        step encoders 180 python benchmarks/bench_encoders.py --device cuda --no-compiled --rounds 5 \
            --out "$OUT/encoders" ;;
    compiled)
        step compiled 240 python benchmarks/bench_generation.py --preset e2b --device cuda --dtype bfloat16 \
            --quantize int8 int4 --compile --batch-sizes 1 --prompt-tokens 128 --new-tokens 32 --prefill-lengths \
            --repeat 3 --out "$OUT/compiled_e2b.json" ;;
    *)
        echo "unknown step $s" | tee -a "$LOG" ;;
    esac
done
grep -E "passed|failed|error" "$LOG" | tail -n 5
