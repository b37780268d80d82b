#!/usr/bin/env bash
# On the GPU machine (the device tool), the FineTune measurements that benchmarks/RESULTS.md asks
# for, in three parts that each fit one 10-minute call: `bash benchmarks/gpu/measure.sh 1|2|3`.
# Each step runs under a time limit and leaves its log and JSON rows in $OUT; a step that runs out
# of time leaves what it printed. SHAPE, SEQ and CONVERSATIONS override the sizes (a dry run on
# CPU: SHAPE=small SEQ=256 CONVERSATIONS=20 OUT=/tmp/out bash benchmarks/gpu/measure.sh 1).
set -uo pipefail
cd "$(dirname "$0")/../.."
part=${1:?which part: 1, 2 or 3}
OUT=${OUT:?set OUT to a folder for the logs}
SHAPE=${SHAPE:-llama3-8b} SEQ=${SEQ:-2048} CONVERSATIONS=${CONVERSATIONS:-400}
if compgen -G ".wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-deps --target /tmp/site .wheels/*.whl
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
    # QLoRA dequantized once (bf16 head) next to LoRA, then QLoRA kept 4-bit (bf16 head).
    step qlora-auto 330 --conversations "$CONVERSATIONS" --methods qlora,lora --qlora-dequantize auto
    step qlora-never 200 --conversations "$CONVERSATIONS" --methods qlora --qlora-dequantize never ;;
2)  # torch.compile per layer (its tokens/s include compiling), then steady-state profiles.
    step compile 300 --conversations "$CONVERSATIONS" --methods qlora,lora --compile
    step profile 270 --conversations 150 --methods qlora,lora --profile 5 ;;
3)  step profile-compile 200 --conversations 150 --methods qlora --profile 5 --compile
    step dora 200 --conversations 200 --methods lora --dora --checkpointing
    # DPO: a row holds a pair, up to twice --seq: half the sequence, the same tokens per row.
    SEQ=$((SEQ / 2)) step dpo 180 --conversations "$CONVERSATIONS" --methods qlora,lora --dpo ;;
*)  echo "part must be 1, 2 or 3" >&2; exit 2 ;;
esac
