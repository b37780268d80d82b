"""Quantization: GGUF files, each loaded back through transformers and measured for perplexity
and top-token agreement, and through llama.cpp itself when llama-cpp-python is installed."""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path
from typing import Any

from ..batching import perplexity, top_tokens
from ..data import messages_of, read_split
from ..digests import sha256_files
from ..models import load_model, load_tokenizer, locate
from ..progress import Progress
from ..store import Store
from ..task import InvalidTask
from . import llama_cpp
from .gguf_export import export


def measure_quality(source: dict, rows: list[dict], cache: bool = True) -> tuple[float, list[int]]:
    """(perplexity on assistant tokens, the top token at each of them)."""
    model, tokenizer = load_model(source, cache=cache), load_tokenizer(source, cache=cache)
    value, tops = perplexity(model, tokenizer, rows)["assistant"], top_tokens(model, tokenizer, rows)
    del model
    gc.collect()
    return value, tops


def _chat_prompt(rows: list[dict]) -> str:
    """A held-out user message when there is one."""
    for row in rows:
        for message in messages_of(row):
            if message["role"] == "user":
                return message["content"]
    return "Why is the sky blue? Answer in one sentence."


def _importance_matrix(base: Path, tmp: Path, dataset: dict, progress: Progress) -> Path:
    """llama-imatrix over the train split's conversations, as plain text."""
    progress.stage("computing the importance matrix")
    calibration, imatrix = tmp / "calibration.txt", tmp / "imatrix.dat"
    rows = read_split(dataset["uri"], "train")[:200]
    calibration.write_text("\n\n".join("\n".join(m["content"] for m in messages_of(r)) for r in rows))
    llama_cpp.importance_matrix(base, calibration, imatrix, os.cpu_count() or 2)
    return imatrix


def run(task: dict[str, Any], run: Store, progress: Progress) -> dict[str, Any]:
    spec, inputs = task["spec"], task["inputs"]
    types, validation = spec["types"], spec["validation"]
    folder, gguf_file, _ = locate(inputs["model"])
    if gguf_file:
        raise InvalidTask("spec.model: the model is already a GGUF file; quantize the safetensors model it came from")
    k_types = [t for t in types if t in llama_cpp.K_QUANTS]
    if k_types:  # fail before any work when the tools are missing
        llama_cpp.tool("llama-quantize")
        if spec.get("importanceMatrix"):
            llama_cpp.tool("llama-imatrix")
    dataset = inputs.get("dataset")
    rows = read_split(dataset["uri"], "test")[: validation["maxSamples"]] if dataset else []
    progress.stage("measuring the unquantized model" if rows else "converting",
                   total=len(types), unit="types")
    reference, reference_tops = measure_quality(inputs["model"], rows) if rows else (None, [])

    artifacts, passed, tokenizer = [], True, None
    name = task["resource"]["name"]
    with tempfile.TemporaryDirectory() as tmp:
        # K-quants start from one f16 GGUF (and one importance matrix) shared by every K type.
        base, base_params, imatrix = Path(tmp) / "base-f16.gguf", None, None
        for i, type_name in enumerate(types):
            progress.stage(f"converting to {type_name}", total=len(types), unit="types")
            progress.update(i)
            out = Path(tmp) / f"{name}-{type_name}.gguf"
            if type_name in llama_cpp.K_QUANTS:
                if base_params is None:
                    base_params = export(Path(folder), base, "f16", name)
                    if spec.get("importanceMatrix"):
                        imatrix = _importance_matrix(base, Path(tmp), dataset, progress)
                llama_cpp.k_quantize(base, out, type_name, os.cpu_count() or 2, imatrix)
                params = base_params
            else:
                params = export(Path(folder), out, type_name, name)
            art: dict[str, Any] = {
                "type": type_name,
                "uri": f"{run.uri}/gguf/{out.name}",
                "sizeBytes": out.stat().st_size,
                "sha256": sha256_files([out]),
                "bitsPerWeight": round(out.stat().st_size * 8 / params, 3),
            }
            if rows:
                progress.stage(f"validating {type_name}", total=len(types), unit="types")
                progress.update(i)
                # Loaded back the way users of transformers will load it: proof the file is usable.
                value, tops = measure_quality({"uri": f"file://{tmp}", "ggufFile": out.name}, rows, cache=False)
                art["perplexity"] = round(value, 4)
                art["perplexityIncreasePercent"] = round(100 * (value - reference) / reference, 3)
                art["topTokenAgreementPercent"] = round(
                    100 * sum(a == b for a, b in zip(tops, reference_tops)) / max(len(reference_tops), 1), 2)
                bound = validation.get("maxPerplexityIncreasePercent")
                floor = validation.get("minTopTokenAgreementPercent")
                if (bound is not None and art["perplexityIncreasePercent"] > bound) or \
                        (floor is not None and art["topTokenAgreementPercent"] < floor):
                    passed = False
            if llama_cpp.can_load_back():
                tokenizer = tokenizer or load_tokenizer(inputs["model"])
                art["llamaCpp"] = llama_cpp.load_back(out, tokenizer, _chat_prompt(rows), os.cpu_count() or 2)
                passed &= art["llamaCpp"]["tokenizerMatches"]
            run.upload_file(out, f"gguf/{out.name}")
            artifacts.append(art)
            out.unlink()
            progress.update(i + 1, figure=f"{type_name} {art['sizeBytes'] / 1e6:.1f} MB")
    run.commit("gguf")
    return {
        "artifacts": artifacts,
        "referencePerplexity": round(reference, 4) if reference else None,
        "passed": passed,
        "datasetUri": dataset["uri"] if dataset else None,
        "datasetFormat": dataset["format"] if dataset else None,
        "datasetDigest": dataset["digest"] if dataset else None,
    }
