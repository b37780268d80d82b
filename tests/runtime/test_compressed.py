"""Quantization to compressed-tensors (fp8, gptq, awq) through llmcompressor: checkpoints vLLM
serves, loaded back by transformers and measured against the unquantized model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmfactory.planner import parse, plan
from llmfactory_runtime.data import dumps_jsonl
from llmfactory_runtime.progress import Progress
from llmfactory_runtime.quantize import compressed
from llmfactory_runtime.quantize import run as quantize
from llmfactory_runtime.store import open_store
from llmfactory_runtime.task import InvalidTask
from tests.promises import assert_task_kept_promise
from tests.runtime.finetune_helpers import conversations, write_dataset


def quantization_task(model, tmp_path, types, **spec):
    """A Quantization of a FineTune's model, its dataset's train split for calibration and test split
    for validation."""
    data = tmp_path / "data"
    write_dataset(data, train=24)
    (data / "test.jsonl").write_bytes(dumps_jsonl(conversations(6)))
    fine_tune = {"modelUri": f"file://{model}", "baseModel": {"uri": f"file://{model}"}, "digest": "sha256:f",
                 "datasetUri": f"file://{data}", "datasetFormat": "chatml", "datasetDigest": "sha256:d"}
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Quantization", "metadata": {"name": "tiny"},
           "spec": {"model": {"fineTuneRef": {"name": "ft"}}, "format": "compressed-tensors", "types": types,
                    "calibrationSamples": 16, **spec}}
    return plan(parse(doc), lambda kind, ns, name: fine_tune, f"file://{tmp_path}/store")


def run_task(task):
    store = open_store(task["artifactUri"])
    result = quantize.run(task, store, Progress(store))
    assert_task_kept_promise(task, result)
    return store, result


def test_fp8_and_gptq_checkpoints_load_back_and_are_measured(tiny_model, tmp_path):
    task = quantization_task(tiny_model, tmp_path, ["fp8", "gptq"], validation={"maxPerplexityIncreasePercent": 5})
    store, result = run_task(task)
    fp8, gptq = result["artifacts"]
    assert [fp8["type"], gptq["type"]] == ["fp8", "gptq"]
    assert fp8["uri"] == f"{task['artifactUri']}/compressed/tiny-fp8"
    # Each folder is committed: config with its quantization_config, weights, tokenizer, chat template.
    for art in (fp8, gptq):
        folder = store.child(f"compressed/tiny-{art['type']}")
        assert folder.is_committed()
        assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(folder.list())
    assert store.is_committed("compressed")
    config = lambda t: json.loads(store.read_bytes(f"compressed/tiny-{t}/config.json"))["quantization_config"]  # noqa: E731
    fp8_weights = config("fp8")["config_groups"]["group_0"]
    assert fp8_weights["weights"]["type"] == "float" and fp8_weights["weights"]["num_bits"] == 8
    assert fp8_weights["input_activations"]["dynamic"] is True
    gptq_weights = config("gptq")["config_groups"]["group_0"]["weights"]
    # The tiny model is 64 wide: groups of 128 cannot tile it, 64 can (recorded).
    assert (gptq_weights["num_bits"], gptq_weights["group_size"], gptq["groupSize"]) == (4, 64, 64)
    assert config("gptq")["ignore"] == ["lm_head"]
    # Smaller than the fp32 original (32 bits per weight); 4-bit smaller than 8-bit.
    assert gptq["bitsPerWeight"] < fp8["bitsPerWeight"] < 32
    # Measured against the unquantized model on the test split; fp8 barely moves it.
    assert result["referencePerplexity"] > 1
    assert abs(fp8["perplexityIncreasePercent"]) < 1 and fp8["topTokenAgreementPercent"] > 90
    assert gptq["perplexityIncreasePercent"] < 5 and result["passed"] is True
    assert isinstance(fp8["answer"], str)
    # What a user downloads loads with transformers and computes nearly the original logits.
    local = store.download_dir("compressed/tiny-fp8", tmp_path / "download")
    ids = torch.tensor([[5, 17, 42, 7]])
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(local)(ids).logits
    assert torch.allclose(original, loaded, atol=0.05 * original.abs().max().item())


def test_awq_without_a_gpu_fails_before_any_work_naming_what_to_change(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(compressed, "pinned_memory_available", lambda: False)
    task = quantization_task(tiny_model, tmp_path, ["fp8", "awq"])
    store = open_store(task["artifactUri"])
    with pytest.raises(InvalidTask, match="awq needs a CUDA GPU.*gpusPerNode >= 1.*gptq or fp8"):
        quantize.run(task, store, Progress(store))
    assert store.list("compressed") == []


def test_awq_calibrates_loads_back_and_is_held_to_the_bounds(tiny_model, tmp_path, monkeypatch):
    # llmcompressor's AWQ pins its cached activations, which needs CUDA; with pinning made a no-op
    # the rest of the path (smoothing, 4-bit groups, save, load back) runs here on CPU.
    monkeypatch.setattr(compressed, "pinned_memory_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self)
    task = quantization_task(tiny_model, tmp_path, ["awq"], validation={"minTopTokenAgreementPercent": 100})
    _, result = run_task(task)
    [awq] = result["artifacts"]
    assert awq["groupSize"] == 64 and awq["bitsPerWeight"] < 32
    assert awq["perplexityIncreasePercent"] < 5
    # 4-bit weights move some top tokens: a bound of 100% agreement fails the run.
    assert awq["topTokenAgreementPercent"] < 100 and result["passed"] is False


def test_calibrated_types_need_calibration_rows(tiny_model, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with pytest.raises(InvalidTask, match="gptq needs calibration rows"):
        compressed.compress(model, None, "gptq", tmp_path / "out", calibration=None)
