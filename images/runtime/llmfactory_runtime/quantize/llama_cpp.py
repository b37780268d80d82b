"""llama.cpp for what gguf-py cannot do in Python: K-quants (llama-quantize) and importance
matrices (llama-imatrix), which the runtime image builds at a pinned tag (elsewhere point
LLMFACTORY_LLAMA_CPP_BIN at a folder holding them), and loading a GGUF back with llama.cpp
itself through llama-cpp-python."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

from ..task import InvalidTask

K_QUANTS = {"q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q5_k_s": "Q5_K_S", "q4_k_m": "Q4_K_M", "q4_k_s": "Q4_K_S",
            "q3_k_m": "Q3_K_M", "q2_k": "Q2_K"}
BIN_ENV = "LLMFACTORY_LLAMA_CPP_BIN"


def tool(name: str) -> str:
    folder = os.environ.get(BIN_ENV)
    found = shutil.which(name, path=folder) if folder else shutil.which(name)
    if not found:
        where = f"{BIN_ENV}={folder}" if folder else "PATH"
        raise InvalidTask(f"spec.types: K-quants need llama.cpp's {name}, which is not on {where}: use the runtime "
                          f"image, or build llama.cpp and set {BIN_ENV} to its bin folder; gguf-py types "
                          f"(f16, bf16, q8_0, q5_0, q5_1, q4_0, q4_1) need no tool")
    return found


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{tail}")


def importance_matrix(model: Path, calibration_text: Path, out: Path, threads: int) -> None:
    _run([tool("llama-imatrix"), "-m", str(model), "-f", str(calibration_text), "-o", str(out),
          "-t", str(threads), "--no-ppl"], "llama-imatrix")


def k_quantize(source: Path, out: Path, type_name: str, threads: int, imatrix: Path | None = None) -> None:
    command = [tool("llama-quantize")]
    if imatrix is not None:
        command += ["--imatrix", str(imatrix)]
    _run(command + [str(source), str(out), K_QUANTS[type_name], str(threads)], "llama-quantize")


TOKENIZER_SAMPLE = ("Почему небо голубое? Why is the sky blue? 为什么天空是蓝色的？ 1234567 + 89 = ?\n"
                    "\tIn 2024 there were 366 days; double  spaces, ünïcödé, emoji 🙂")


def can_load_back() -> bool:
    """Whether llama-cpp-python is installed (the runtime image has it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def load_back(path: Path, tokenizer, prompt: str, threads: int) -> dict:
    """The GGUF as llama.cpp loads it: does its tokenizer cut a multilingual sample as the
    model's own does, and does it answer a chat prompt? A converter's most common failure is a
    tokenizer llama.cpp reads differently."""
    from llama_cpp import Llama  # noqa: PLC0415 - optional: see can_load_back

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, seed=0, verbose=False)
    ours = llm.tokenize(TOKENIZER_SAMPLE.encode(), add_bos=False, special=False)
    theirs = tokenizer(TOKENIZER_SAMPLE, add_special_tokens=False)["input_ids"]
    start = time.perf_counter()
    out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=24,
                                     temperature=0.0)
    seconds = time.perf_counter() - start
    llm.close()
    return {"tokenizerMatches": list(ours) == list(theirs), "answer": out["choices"][0]["message"]["content"][:200],
            "tokensPerSecond": round(out["usage"]["completion_tokens"] / seconds, 1)}
