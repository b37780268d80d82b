"""Quantization: GGUF files or compressed-tensors folders, each loaded back through transformers,
measured for perplexity and top-token agreement against the unquantized model and asked a chat
question; GGUF files also through llama.cpp itself when llama-cpp-python is installed."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..batching import perplexity, top_tokens
from ..data import messages_of, read_split
from ..digests import sha256_files
from ..generate import generate
from ..models import load_model, load_tokenizer, locate
from ..progress import Progress
from ..store import Store
from ..task import InvalidTask
from . import compressed, llama_cpp
from .gguf_export import export


def measure_quality(source: dict, rows: list[dict], prompt: str, cache: bool = True) -> tuple[float, list[int], str]:
    """(perplexity on assistant tokens, the top token at each of them, the start of a greedy answer)."""
    model, tokenizer = load_model(source, cache=cache), load_tokenizer(source, cache=cache)
    value, tops = perplexity(model, tokenizer, rows)["assistant"], top_tokens(model, tokenizer, rows)
    answer = generate(model, tokenizer, [[{"role": "user", "content": prompt}]], max_new_tokens=32)[0].text
    del model
    gc.collect()
    return value, tops, answer


def _chat_prompt(rows: list[dict]) -> str:
    """A held-out user message when there is one."""
    for row in rows:
        for message in messages_of(row):
            if message["role"] == "user":
                return message["content"]
    return "Why is the sky blue? Answer in one sentence."


def _calibration(spec: dict, dataset: dict) -> list[list[dict[str, str]]]:
    """The first calibrationSamples conversations of the train split."""
    return [messages_of(r) for r in read_split(dataset["uri"], "train")[: spec["calibrationSamples"]]]


def _importance_matrix(base: Path, tmp: Path, conversations: list, progress: Progress) -> Path:
    """llama-imatrix over the calibration conversations, as plain text."""
    progress.stage("computing the importance matrix")
    calibration, imatrix = tmp / "calibration.txt", tmp / "imatrix.dat"
    calibration.write_text("\n\n".join("\n".join(m["content"] for m in c) for c in conversations))
    llama_cpp.importance_matrix(base, calibration, imatrix, os.cpu_count() or 2)
    return imatrix


def _files(out: Path) -> list[Path]:
    return [out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file())


def run(task: dict[str, Any], run: Store, progress: Progress) -> dict[str, Any]:
    spec, inputs = task["spec"], task["inputs"]
    types, validation = spec["types"], spec["validation"]
    is_gguf = spec["format"] == "gguf"
    folder, gguf_file, _ = locate(inputs["model"])
    if gguf_file:
        raise InvalidTask("spec.model: the model is already a GGUF file; quantize the safetensors model it came from")
    # Fail before any work when the tools are missing.
    if not is_gguf:
        compressed.check_can_run(types)
    if any(t in llama_cpp.K_QUANTS for t in types):
        llama_cpp.tool("llama-quantize")
        if spec.get("importanceMatrix"):
            llama_cpp.tool("llama-imatrix")
    dataset = inputs.get("dataset")
    rows = read_split(dataset["uri"], "test")[: validation["maxSamples"]] if dataset else []
    prompt = _chat_prompt(rows)
    progress.stage("measuring the unquantized model" if rows else "converting",
                   total=len(types), unit="types")
    reference, reference_tops, _ = measure_quality(inputs["model"], rows, prompt) if rows else (None, [], None)

    artifacts, passed, tokenizer = [], True, load_tokenizer(inputs["model"])
    name, prefix = task["resource"]["name"], "gguf" if is_gguf else "compressed"
    with tempfile.TemporaryDirectory() as tmp:
        # K-quants start from one f16 GGUF (and one importance matrix) shared by every K type.
        base, base_params, imatrix = Path(tmp) / "base-f16.gguf", None, None
        for i, type_name in enumerate(types):
            progress.stage(f"converting to {type_name}", total=len(types), unit="types")
            progress.update(i)
            out, art = Path(tmp) / f"{name}-{type_name}{'.gguf' if is_gguf else ''}", {}
            if not is_gguf:
                # On the CPU (llmcompressor moves layers to the GPU itself), in the source's own dtype:
                # what stays unquantized (embeddings, norms, head) is saved as the source had it.
                model = load_model(inputs["model"], dtype="auto", to=torch.device("cpu"))
                params = sum(p.numel() for p in model.parameters())
                calibration = (compressed.calibration_set(tokenizer, _calibration(spec, dataset))
                               if type_name in compressed.CALIBRATED and dataset else None)
                art = compressed.compress(model, tokenizer, type_name, out, calibration)
                del model
                gc.collect()
            elif type_name in llama_cpp.K_QUANTS:
                if base_params is None:
                    base_params = export(Path(folder), base, "f16", name)
                    if spec.get("importanceMatrix"):
                        imatrix = _importance_matrix(base, Path(tmp), _calibration(spec, dataset), progress)
                llama_cpp.k_quantize(base, out, type_name, os.cpu_count() or 2, imatrix)
                params = base_params
            else:
                params = export(Path(folder), out, type_name, name)
            size = sum(p.stat().st_size for p in _files(out))
            art = {"type": type_name, "uri": f"{run.uri}/{prefix}/{out.name}", "sizeBytes": size,
                   "sha256": sha256_files(_files(out)), "bitsPerWeight": round(size * 8 / params, 3), **art}
            if rows:
                progress.stage(f"validating {type_name}", total=len(types), unit="types")
                progress.update(i)
                # Loaded back the way users of transformers will load it: proof the artifact is usable.
                loaded = {"uri": f"file://{tmp}", "ggufFile": out.name} if is_gguf else {"uri": f"file://{out}"}
                value, tops, art["answer"] = measure_quality(loaded, rows, prompt, cache=False)
                art["perplexity"] = round(value, 4)
                art["perplexityIncreasePercent"] = round(100 * (value - reference) / reference, 3)
                art["topTokenAgreementPercent"] = round(
                    100 * sum(a == b for a, b in zip(tops, reference_tops)) / max(len(reference_tops), 1), 2)
                bound = validation.get("maxPerplexityIncreasePercent")
                floor = validation.get("minTopTokenAgreementPercent")
                if (bound is not None and art["perplexityIncreasePercent"] > bound) or \
                        (floor is not None and art["topTokenAgreementPercent"] < floor):
                    passed = False
            if is_gguf and llama_cpp.can_load_back():
                art["llamaCpp"] = llama_cpp.load_back(out, tokenizer, prompt, os.cpu_count() or 2)
                passed &= art["llamaCpp"]["tokenizerMatches"]
            if is_gguf:
                run.upload_file(out, f"gguf/{out.name}")
                out.unlink()
            else:
                run.upload_dir(out, f"compressed/{out.name}")  # committed folder by folder
                shutil.rmtree(out)
            artifacts.append(art)
            progress.update(i + 1, figure=f"{type_name} {size / 1e6:.1f} MB")
    run.commit(prefix)
    return {
        "artifacts": artifacts,
        "referencePerplexity": round(reference, 4) if reference else None,
        "passed": passed,
        "datasetUri": dataset["uri"] if dataset else None,
        "datasetFormat": dataset["format"] if dataset else None,
        "datasetDigest": dataset["digest"] if dataset else None,
    }
