#!/usr/bin/env bash
# On the GPU machine (the device tool), the FineTune measurements that benchmarks/RESULTS.md asks
# for, in parts that each fit one 10-minute call: `bash benchmarks/gpu/measure.sh 1|2|3|4`.
# A session is lent 15 minutes of device time in all (the machine's start, ~35 s, included), so
# part 1 holds what matters most, most important first: QLoRA (4-bit, the default) next to LoRA
# through the runtime, then both compiled through the runtime (compile time included). Part 2:
# steady-state profiles (where the time goes), uncompiled and compiled, and QLoRA dequantized once.
# Part 4: a Benchmark's answering with transformers on the GPU (the first batch of 8 twice: does the
# first run pay per new shape, as training did before batching.row_width?). Part 5: a full fine-tune
# (Llama-3.2-3B shape) with AdamW and with 8-bit AdamW (hyperparameters.optimizer): peak memory and
# tokens/s of each.
# Each step runs under a time limit and leaves its log and JSON rows in $OUT; a step that runs out
# of time leaves what it printed. SHAPE, SEQ and CONVERSATIONS override the sizes (a dry run on
# CPU: SHAPE=small SEQ=256 CONVERSATIONS=40 OUT=/tmp/out bash benchmarks/gpu/measure.sh 1).
set -uo pipefail
cd "$(dirname "$0")/../.."
part=${1:?which part: 1, 2, 3, 4 or 5}
OUT=${OUT:?set OUT to a folder for the logs}
SHAPE=${SHAPE:-llama3-8b} SEQ=${SEQ:-2048} CONVERSATIONS=${CONVERSATIONS:-300}
if compgen -G ".wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .wheels/*.whl || exit
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS ARGS...: one benchmark run, its log and JSON rows in $OUT
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" python3 benchmarks/finetune_throughput.py --shape "$SHAPE" --workdir /tmp/llmfactory-bench \
        --seq "$SEQ" --batch 2 --lora-dropout 0 "$@" --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
    echo "rc=$?"
    tail -n 25 "$OUT/$name.log"
}

case $part in
1)  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.csv"
    python3 -c 'import torch, transformers, peft, bitsandbytes as b; print(torch.__version__, transformers.__version__, peft.__version__, b.__version__)' \
        | tee "$OUT/versions.txt"
    # QLoRA first: the first run on a fresh machine, as a cluster's pod is, pays what nothing has
    # cached yet (cuDNN's plans per batch width: batching.row_width).
    step runtime 240 --conversations "$CONVERSATIONS" --methods qlora,lora
    # torch.compile per layer through the runtime: LoRA first (its compiled steady state is known:
    # 12.6k tokens/s), then 4-bit QLoRA, whose compiled profile once did not finish in 125 s.
    step compile 300 --conversations "$CONVERSATIONS" --methods lora,qlora --compile ;;
2)  # Steady state after warm-up (where compiling happens), and the device time by kind of work.
    step profile 150 --conversations 150 --methods lora,qlora --profile 5
    step profile-compile 150 --conversations 150 --methods lora --profile 5 --compile
    step qlora-auto 200 --conversations "$CONVERSATIONS" --methods qlora --qlora-dequantize auto ;;
3)  step dora 200 --conversations 200 --methods lora --dora --checkpointing
    # DPO: a row holds a pair, up to twice --seq: half the sequence, the same tokens per row.
    SEQ=$((SEQ / 2)) step dpo 180 --conversations "$CONVERSATIONS" --methods qlora,lora --dpo ;;
4)  echo "== generation (limit 540s)"
    # Random weights never end a turn: every answer is 256 tokens, the same work in each run.
    timeout 540 python3 benchmarks/generation_engines.py --shape "$SHAPE" --engines transformers \
        --max-new-tokens "${NEW_TOKENS:-256}" --batch 8,8,36 --workdir /tmp/llmfactory-bench > "$OUT/generation.log" 2>&1
    echo "rc=$?"
    tail -n 8 "$OUT/generation.log" ;;
5)  SHAPE=${SHAPE_FULL:-llama3.2-3b} step full-optimizers 500 --conversations 150 --methods full --optimizer both \
        --checkpointing ;;
*)  echo "part must be 1, 2, 3, 4 or 5" >&2; exit 2 ;;
esac
