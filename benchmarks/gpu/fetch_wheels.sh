#!/usr/bin/env bash
# On the CPU machine: the wheels that the GPU machine's image lacks or has too old, for its Python
# (3.12; the device tool's page says what the image holds), into .wheels/ (ignored by git), which
# the device tool carries (64 MiB in all with the tree: ~60 MiB here). The GPU machine reaches no
# package registry. Then, with the device tool: carry [".wheels"], command
# `bash benchmarks/gpu/measure.sh 1` (and 2, 3: each fits the 10-minute limit of one call).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-3.12}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do platforms+=(--platform "$p"); done
# transformers, peft and bitsandbytes at the versions the suite pins; pydantic and cel-python for
# the planner that makes the tasks (the runtime itself needs neither).
names=(bitsandbytes==0.50.2 transformers==5.23.0 peft==0.21.2
       pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions
       cel-python==0.5.0 google-re2 lark pendulum jmespath tzdata)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    "${platforms[@]}" -d .wheels "${names[@]}"
du -sh .wheels
