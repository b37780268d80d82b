#!/usr/bin/env bash
# The whole suite as two pytest processes side by side: the operator tests mostly wait (on the
# emulator, on timers, on the Jobs the harness runs) while the rest keeps both cores busy, so
# together they take about as long as the rest alone. They share no ports: only the rest starts
# SeaweedFS. Arguments go to both (e.g. -x). Fails if either fails; the operator tests' output is
# printed after the rest's.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
log=$(mktemp)
# One PyTorch thread per process of the operator tests (the Jobs they run are tiny): with two
# OpenMP pools sized to the machine, one per suite, the two suites spin against each other on the
# two cores (measured: 28 CPU-minutes together, 20.5 apart; 17:35 -> 14:16 wall).
OMP_NUM_THREADS=1 "$bin/pytest" tests/operator --durations=10 "$@" > "$log" 2>&1 &
operator=$!
"$bin/pytest" --ignore=tests/operator --durations=15 "$@"
rest=$?
wait "$operator"
ops=$?
echo "=================== tests/operator (ran beside the tests above) ==================="
cat "$log"
rm -f "$log"
exit $(( rest != 0 || ops != 0 ))
