"""llama.cpp's tools for what gguf-py cannot do in Python: K-quants (llama-quantize) and
importance matrices (llama-imatrix). The runtime image builds them at a pinned tag; elsewhere
point LLMFACTORY_LLAMA_CPP_BIN at a folder holding them."""

from __future__ import annotations

import os
import shutil
import subprocess
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
