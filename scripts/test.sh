#!/usr/bin/env bash
# The whole suite as two pytest processes side by side: the operator tests mostly wait (on the
# emulator, on timers, on the Jobs the harness runs), so beside them run the runtime tests that
# need no S3 server and spend their time in one process (BESIDE), while the rest keeps both cores
# busy. They share no ports: only the rest starts SeaweedFS. Arguments go to both (e.g. -x, or
# --extended for the tests the default run leaves out: make test-all). Fails if either fails; the
# second process's output is printed after the rest's.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
log=$(mktemp)
# One PyTorch thread per process beside the rest (the Jobs the operator tests run are tiny, the
# runtime tests' models too): with two OpenMP pools sized to the machine, one per pytest process,
# they spin against each other on the two cores (measured on 2 cores: operator tests alone beside
# the rest 17:35 -> 14:16 with one thread; these runtime tests moved beside them 14:40 -> 9:49,
# 22.7 -> 17.3 CPU-minutes).
# The unit tests are single-threaded Python (schemas, CEL, Helm's binary) and go beside them too, but
# for the store's, which needs SeaweedFS (measured 2026-12-05: the rest 13:45, these 10:06 before).
# Chat templates, raw text and tool calls too (measured 2026-12-06: the rest 13:49, these 10:35 before).
BESIDE=(tests/operator tests/runtime/test_benchmark.py tests/runtime/test_dataset_build.py
        tests/runtime/test_preference.py tests/runtime/test_reward_model.py tests/runtime/test_compressed.py
        tests/runtime/test_grpo.py tests/runtime/test_chat.py tests/runtime/test_text_rows.py
        tests/runtime/test_tool_calls.py tests/runtime/test_token_files.py tests/runtime/test_multiprocess_finetune.py
        $(ls tests/unit/test_*.py | grep -v test_store.py))
OMP_NUM_THREADS=1 "$bin/pytest" "${BESIDE[@]}" --durations=10 "$@" > "$log" 2>&1 &
beside=$!
"$bin/pytest" "${BESIDE[@]/#/--ignore=}" --durations=15 "$@"
rest=$?
wait "$beside"
beside_rc=$?
echo "=================== ${BESIDE[*]} (ran beside the tests above) ==================="
cat "$log"
rm -f "$log"
exit $(( rest != 0 || beside_rc != 0 ))
