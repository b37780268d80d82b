"""compressed-tensors checkpoints for vLLM, written by llmcompressor: fp8 (FP8 weights, dynamic
per-token FP8 activations; no calibration), gptq and awq (4-bit symmetric integer weights in
groups, 16-bit activations; calibrated on the training data)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..task import InvalidTask

# llmcompressor presets. Symmetric 4-bit for awq too: transformers 5 cannot load the packed
# zero points of the asymmetric preset back, and every artifact is validated by loading it.
PRESETS = {"fp8": "FP8_DYNAMIC", "gptq": "W4A16", "awq": "W4A16"}
CALIBRATED = ("gptq", "awq")
MAX_CALIBRATION_TOKENS = 2048  # llmcompressor's examples calibrate on sequences this long
INSTALL_HINT = "pip install --no-deps llmcompressor==0.14.0.1 (the runtime image has it)"


def pinned_memory_available() -> bool:
    """llmcompressor's AWQ pins its cached activations in page-locked memory, which needs CUDA."""
    return torch.cuda.is_available()


def check_can_run(types: list[str]) -> None:
    """Fail before any work, naming what is missing."""
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")  # its INFO lines flood the pod log
    try:
        import llmcompressor  # noqa: F401, PLC0415 - optional: only this format needs it
    except ImportError as e:
        raise InvalidTask(f"spec.format compressed-tensors needs llmcompressor, which is not installed "
                          f"({INSTALL_HINT})") from e
    if "awq" in types and not pinned_memory_available():
        raise InvalidTask("spec.types: awq needs a CUDA GPU (llmcompressor's AWQ keeps calibration activations "
                          "in page-locked memory); give the Quantization resources.gpusPerNode >= 1, or use gptq "
                          "or fp8, which also run on CPU")


def group_size(model) -> int:
    """128 (what vLLM's 4-bit kernels expect) unless a quantized layer's input width is not a
    multiple of it, as in SmolLM2 (576): then the largest power of two that divides every width."""
    widths = {m.in_features for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}
    for size in (128, 64, 32):
        if all(w % size == 0 for w in widths):
            return size
    raise InvalidTask(f"spec.types: 4-bit groups need layer input widths divisible by 32; this model's are "
                      f"{sorted(widths)}")


def _recipe(type_name: str, group: int):
    from compressed_tensors.quantization import preset_name_to_scheme  # noqa: PLC0415
    from llmcompressor.modifiers.awq import AWQModifier  # noqa: PLC0415
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier  # noqa: PLC0415

    scheme = preset_name_to_scheme(PRESETS[type_name], ["Linear"])
    if type_name in CALIBRATED:
        scheme.weights.group_size = group
    modifier = {"fp8": QuantizationModifier, "gptq": GPTQModifier, "awq": AWQModifier}[type_name]
    # The output head stays 16-bit: it is small next to the decoder and the most sensitive layer.
    return modifier(config_groups={"group_0": scheme}, ignore=["lm_head"])


def calibration_set(tokenizer, texts: list[str]):
    """The calibration rows as the model saw them in training (batching.as_trained), tokenized."""
    from datasets import Dataset  # noqa: PLC0415

    enc = tokenizer(texts, truncation=True, max_length=MAX_CALIBRATION_TOKENS, add_special_tokens=False)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def compress(model, tokenizer, type_name: str, out: Path, calibration=None) -> dict[str, Any]:
    """Quantize `model` in place and save it to `out`: config (with its quantization_config),
    compressed safetensors, tokenizer and chat template. Returns what the artifact records."""
    from llmcompressor import oneshot  # noqa: PLC0415

    group = group_size(model) if type_name in CALIBRATED else None
    kwargs: dict[str, Any] = {}
    if type_name in CALIBRATED:
        if calibration is None or len(calibration) == 0:
            raise InvalidTask(f"spec.types: {type_name} needs calibration rows (the FineTune's train split)")
        kwargs = {"dataset": calibration, "num_calibration_samples": len(calibration),
                  "max_seq_length": MAX_CALIBRATION_TOKENS, "shuffle_calibration_samples": False}
    oneshot(model=model, tokenizer=tokenizer, recipe=_recipe(type_name, group), **kwargs)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    return {"groupSize": group} if group else {}
