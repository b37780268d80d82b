"""Quantization: GGUF files or compressed-tensors folders, each loaded back through transformers,
measured for perplexity and top-token agreement against the unquantized model and asked a chat
question; GGUF files also through llama.cpp itself when llama-cpp-python is installed."""

from __future__ import annotations

import gc
import itertools
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import cpus
from ..batching import as_trained, perplexity, top_tokens
from ..chat import REASONING_KEY
from ..data import iter_split, messages_of, no_rows, read_split, text_of, tools_of, undesirable
from ..digests import sha256_files
from ..generate import generate
from ..models import load_model, load_tokenizer, locate
from ..progress import Progress
from ..store import Store
from ..task import InvalidTask
from ..tool_calls import expected_calls
from . import compressed, llama_cpp
from .gguf_export import export


IMPORTANCE_MATRIX = "validation/imatrix.dat"  # in the run, once computed


def measure_quality(source: dict, rows: list[dict], prompt: str, cache: bool = True) -> tuple[float, list[int], str]:
    """(perplexity on assistant tokens, the top token at each of them, the start of a greedy answer)."""
    tokenizer = load_tokenizer(source, cache=cache)
    model = load_model(source, cache=cache, tokenizer=tokenizer)
    value, tops = perplexity(model, tokenizer, rows)["assistant"], top_tokens(model, tokenizer, rows)
    answer = generate(model, tokenizer, [[{"role": "user", "content": prompt}]], max_new_tokens=32)[0].text
    del model
    gc.collect()
    return value, tops, answer


def _chat_prompt(rows: list[dict]) -> str:
    """A held-out user message when there is one."""
    for row in rows:
        if text_of(row) is not None:  # raw text has no user message
            continue
        for message in messages_of(row):
            if message["role"] == "user":
                return message["content"]
    return "Why is the sky blue? Answer in one sentence."


def _calibration(spec: dict, dataset: dict) -> list[dict]:
    """The first calibrationSamples rows of the train split: conversations (of unpaired rows, the
    desirable ones) and raw text."""
    return list(itertools.islice((r for r in iter_split(dataset["uri"], "train") if not undesirable(r)),
                                 spec["calibrationSamples"]))


def _plain_text(row: dict) -> str:
    """A raw-text row's text; a conversation's words one after another: the tools it offers and the
    calls its assistant makes as JSON (what the model reads and writes of them), and each message's
    content, after its reasoning where it has any (the model writes that too)."""
    text = text_of(row)
    if text is not None:
        return text
    parts = [json.dumps(tool, ensure_ascii=False) for tool in tools_of(row) or []]
    for m in messages_of(row):
        parts += [m.get(REASONING_KEY), m["content"],
                  *(json.dumps(c, ensure_ascii=False) for c in expected_calls(m.get("tool_calls") or []))]
    return "\n".join(part for part in parts if part)


def _files(out: Path) -> list[Path]:
    return [out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file())


class GgufWriter:
    """GGUF files: Python types straight from the safetensors; K-quants from one f16 GGUF (and one
    importance matrix, kept in the run: a restarted pod does not compute it again) shared by every
    K type of the run."""

    def __init__(self, task: dict, tmp: Path, run: Store, progress: Progress):
        self.spec, self.dataset, self.name = task["spec"], task["inputs"].get("dataset"), task["resource"]["name"]
        self.folder = Path(locate(task["inputs"]["model"])[0])
        self.tmp, self.run, self.progress = tmp, run, progress
        self.base, self.base_params, self.imatrix = tmp / "base-f16.gguf", None, None

    def write(self, type_name: str, out: Path) -> tuple[int, dict]:
        """(parameters, what the artifact records besides the common fields)"""
        if type_name not in llama_cpp.K_QUANTS:
            return export(self.folder, out, type_name, self.name), {}
        if self.base_params is None:
            self.base_params = export(self.folder, self.base, "f16", self.name)
            if self.spec.get("importanceMatrix"):
                self.imatrix = self._importance_matrix()
        llama_cpp.k_quantize(self.base, out, type_name, cpus.available(), self.imatrix)
        return self.base_params, {}

    def _importance_matrix(self) -> Path:
        """llama-imatrix over the calibration rows as plain text; or the run's, computed before a restart."""
        path = self.tmp / "imatrix.dat"
        if self.run.exists(IMPORTANCE_MATRIX):
            self.run.download_file(IMPORTANCE_MATRIX, path)
            return path
        self.progress.stage("computing the importance matrix")
        calibration = self.tmp / "calibration.txt"
        calibration.write_text("\n\n".join(_plain_text(row) for row in _calibration(self.spec, self.dataset)))
        llama_cpp.importance_matrix(self.base, calibration, path, cpus.available())
        self.run.upload_file(path, IMPORTANCE_MATRIX)
        return path


class CompressedWriter:
    """compressed-tensors folders, each quantized from a fresh copy of the model."""

    def __init__(self, task: dict, tokenizer):
        self.spec, self.dataset, self.source = task["spec"], task["inputs"].get("dataset"), task["inputs"]["model"]
        self.tokenizer, self._calibration = tokenizer, None

    def calibration(self):
        """The tokenized calibration rows, built once for gptq and awq alike."""
        if self._calibration is None and self.dataset:
            texts = [as_trained(self.tokenizer, row) for row in _calibration(self.spec, self.dataset)]
            self._calibration = compressed.calibration_set(self.tokenizer, texts)
        return self._calibration

    def write(self, type_name: str, out: Path) -> tuple[int, dict]:
        # On the CPU (llmcompressor moves layers to the GPU itself), in the source's own dtype:
        # what stays unquantized (embeddings, norms, head) is saved as the source had it.
        model = load_model(self.source, dtype="auto", to=torch.device("cpu"), tokenizer=self.tokenizer)
        params = sum(p.numel() for p in model.parameters())
        calibration = self.calibration() if type_name in compressed.CALIBRATED else None
        extra = compressed.compress(model, self.tokenizer, type_name, out, calibration)
        del model
        gc.collect()
        return params, extra


@dataclass(frozen=True)
class Check:
    """What each artifact is held to: the unquantized model's perplexity and top tokens on held-out
    rows (none: nothing to measure), the validation bounds, and llama.cpp's reading of its tokenizer."""
    rows: list[dict]
    prompt: str
    validation: dict
    reference: dict | None  # {perplexity, tops}
    tokenizer: Any

    def failures(self, art: dict, out: Path) -> list[str]:
        """Measure the artifact at `out` into `art`; the bounds it missed, each a sentence with its value."""
        failures = []
        if self.rows:
            # Loaded back the way users of transformers will load it: proof the artifact is usable (a
            # GGUF file; a compressed-tensors folder).
            loaded = {"uri": f"file://{out.parent}", "ggufFile": out.name} if out.is_file() else {"uri": f"file://{out}"}
            value, tops, art["answer"] = measure_quality(loaded, self.rows, self.prompt, cache=False)
            reference, reference_tops = self.reference["perplexity"], self.reference["tops"]
            art["perplexity"] = round(value, 4)
            art["perplexityIncreasePercent"] = round(100 * (value - reference) / reference, 3)
            art["topTokenAgreementPercent"] = round(
                100 * sum(a == b for a, b in zip(tops, reference_tops)) / max(len(reference_tops), 1), 2)
            failures += _outside_bounds(art, self.validation)
        if out.is_file() and llama_cpp.can_load_back():
            art["llamaCpp"] = llama_cpp.load_back(out, self.tokenizer, self.prompt, cpus.available())
            if not art["llamaCpp"]["tokenizerMatches"]:
                failures.append("llama.cpp cuts text into other tokens than the model's tokenizer")
        return failures


def _outside_bounds(art: dict, validation: dict) -> list[str]:
    """The validation bounds an artifact missed, each as a sentence with the value it got."""
    bound = validation.get("maxPerplexityIncreasePercent")
    floor = validation.get("minTopTokenAgreementPercent")
    failures = []
    if bound is not None and art["perplexityIncreasePercent"] > bound:
        failures.append(f"perplexity {art['perplexityIncreasePercent']:+.2f}% over the unquantized model's "
                        f"(maxPerplexityIncreasePercent {bound:g})")
    if floor is not None and art["topTokenAgreementPercent"] < floor:
        failures.append(f"top-token agreement {art['topTokenAgreementPercent']:.2f}% "
                        f"(minTopTokenAgreementPercent {floor:g})")
    return failures


def _convert(type_name: str, writer, out: Path, key: str, run: Store, check: Check, progress: Progress,
             place: tuple[int, int]) -> dict:
    """One type written to `out`, measured, and uploaded to the run at `key`: its artifact record."""
    params, extra = writer.write(type_name, out)
    size = sum(p.stat().st_size for p in _files(out))
    art = {"type": type_name, "uri": f"{run.uri}/{key}", "sizeBytes": size,
           "sha256": sha256_files(_files(out)), "bitsPerWeight": round(size * 8 / params, 3), **extra}
    if check.rows:
        progress.stage(f"validating {type_name}", total=place[1], unit="types")
        progress.update(place[0])
    failures = check.failures(art, out)
    if failures:
        art["failures"] = failures
    if out.is_file():
        run.upload_file(out, key)
        out.unlink()
    else:
        run.upload_dir(out, key)  # committed folder by folder
        shutil.rmtree(out)
    return art


def run(task: dict[str, Any], run: Store, progress: Progress) -> dict[str, Any]:
    spec, inputs = task["spec"], task["inputs"]
    types, validation = spec["types"], spec["validation"]
    is_gguf = spec["format"] == "gguf"
    if locate(inputs["model"])[1]:
        raise InvalidTask("spec.model: the model is already a GGUF file; quantize the safetensors model it came from")
    # Fail before any work when the tools are missing.
    if not is_gguf:
        compressed.check_can_run(types)
    if any(t in llama_cpp.K_QUANTS for t in types):
        llama_cpp.tool("llama-quantize")
        if spec.get("importanceMatrix"):
            llama_cpp.tool("llama-imatrix")
    dataset = inputs.get("dataset")  # a GRPO FineTune's prompts (format graded) have no answers to measure on
    split = validation["split"]
    rows = (read_split(dataset["uri"], split, validation["maxSamples"])
            if dataset and dataset["format"] != "graded" else [])
    bounded = [f for f in ("maxPerplexityIncreasePercent", "minTopTokenAgreementPercent")
               if validation.get(f) is not None]
    if bounded and not rows:  # the planner saw a dataset; its split decides, else nothing would be checked
        other = "validation" if split == "test" else "test"
        raise InvalidTask(f"spec.validation.{bounded[0]}: {no_rows(dataset['uri'], split)}, to measure on "
                          f"(spec.validation.split {other} measures on its {other} split)")
    prompt = _chat_prompt(rows)
    progress.stage("measuring the unquantized model" if rows else "converting", total=len(types), unit="types")
    # Each step is saved in the run as it finishes, so a restarted pod (a preempted node) measures the
    # unquantized model and converts each type once.
    reference = run.once("validation/reference.json", lambda: dict(zip(
        ("perplexity", "tops"), measure_quality(inputs["model"], rows, prompt)[:2]))) if rows else None
    check = Check(rows, prompt, validation, reference, load_tokenizer(inputs["model"]))
    artifacts, name, prefix = [], task["resource"]["name"], "gguf" if is_gguf else "compressed"
    with tempfile.TemporaryDirectory() as tmp:
        writer = GgufWriter(task, Path(tmp), run, progress) if is_gguf else CompressedWriter(task, check.tokenizer)
        for i, type_name in enumerate(types):
            progress.stage(f"converting to {type_name}", total=len(types), unit="types")
            progress.update(i)
            out = Path(tmp) / (f"{name}-{type_name}.gguf" if is_gguf else f"{name}-{type_name}")
            art = run.once(f"artifacts/{type_name}.json", lambda: _convert(
                type_name, writer, out, f"{prefix}/{out.name}", run, check, progress, (i, len(types))))
            artifacts.append(art)
            progress.update(i + 1, figure=f"{type_name} {art['sizeBytes'] / 1e6:.1f} MB")
    run.commit(prefix)
    return {
        "artifacts": artifacts,
        "referencePerplexity": round(reference["perplexity"], 4) if reference else None,
        "measuredRows": len(rows) or None,
        "passed": not any(art.get("failures") for art in artifacts),
        "datasetUri": dataset["uri"] if dataset else None,
        "datasetFormat": dataset["format"] if dataset else None,
        "datasetDigest": dataset["digest"] if dataset else None,
        # Absent rather than null (a merge patch of status drops nulls): only a GRPO model's prompts have them.
        **({"datasetReferenceFields": dataset["referenceFields"]}
           if dataset and "referenceFields" in dataset else {}),
    }
