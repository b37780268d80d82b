"""HF -> GGUF with gguf-py, loaded back by transformers: same model, within the type's error."""

import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmfactory_runtime.quantize.gguf_export import export
from llmfactory_runtime.task import InvalidTask
from tests.promises import assert_task_kept_promise

TEXT = "Почему небо голубое? The sea is wide. 为什么天空是蓝色的？"


@pytest.mark.parametrize("qtype,tolerance", [("f32", 1e-4), ("f16", 2e-2), ("q8_0", 5e-2)])
def test_gguf_loads_back_as_the_same_model(tiny_model, tmp_path, qtype, tolerance):
    out = tmp_path / f"m-{qtype}.gguf"
    params = export(tiny_model, out, qtype, "tiny")
    original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert params == sum(p.numel() for p in original.parameters())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    for name, tensor in original.state_dict().items():
        other = loaded.state_dict()[name]
        assert torch.allclose(tensor, other, atol=tolerance, rtol=0), f"{name} differs beyond {tolerance}"
    ids = AutoTokenizer.from_pretrained(tiny_model)(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = original(ids).logits, loaded(ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_gguf_metadata_and_tokenizer_round_trip(tiny_model, tmp_path):
    out = tmp_path / "m.gguf"
    export(tiny_model, out, "q8_0", "tiny")
    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    config = json.loads((tiny_model / "config.json").read_text())
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == config["num_hidden_layers"]
    assert fields["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    original = AutoTokenizer.from_pretrained(tiny_model)
    # Where a turn ends, so llama.cpp stops there (not only on end-of-sequence).
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == original.convert_tokens_to_ids("<|im_end|>")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert loaded(TEXT)["input_ids"] == original(TEXT)["input_ids"]
    chat = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(chat, tokenize=False) == original.apply_chat_template(chat, tokenize=False)


MULTILINGUAL = TEXT + " 1234567 + 89 = ?\n\tTabs,  double  spaces; emoji 🙂 and Ünïcödé."


@pytest.mark.parametrize("family", ["llama3", "qwen2", "sentencepiece"])
def test_other_families_and_tokenizers_convert_and_load_back(tmp_path, family):
    """Llama 3's split, Qwen2 (architecture and split) and SentencePiece-style BPE with byte
    fallback (Llama 2, Mistral): the weights and the tokenizer come back as they were."""
    from tests.tiny_model import make_tiny_llama, make_tiny_qwen2

    folder = tmp_path / family
    if family == "qwen2":
        make_tiny_qwen2(folder)
    else:
        make_tiny_llama(folder, tokenizer=family)
    out = tmp_path / f"{family}.gguf"
    export(folder, out, "f32", family)
    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items() if k in (
        "general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token")}
    assert fields == {"llama3": {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2",
                                 "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.add_bos_token": False},
                      "qwen2": {"general.architecture": "qwen2", "tokenizer.ggml.model": "gpt2",
                                "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.add_bos_token": False},
                      "sentencepiece": {"general.architecture": "llama", "tokenizer.ggml.model": "llama",
                                        "tokenizer.ggml.pre": "default", "tokenizer.ggml.add_bos_token": True},
                      }[family]
    original_tok = AutoTokenizer.from_pretrained(folder)
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert loaded_tok(MULTILINGUAL)["input_ids"] == original_tok(MULTILINGUAL)["input_ids"]
    assert loaded_tok.decode(original_tok(MULTILINGUAL)["input_ids"], skip_special_tokens=True) == MULTILINGUAL

    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    ids = original_tok(MULTILINGUAL, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(original(ids).logits, loaded(ids).logits, atol=1e-4)


def test_unknown_pre_tokenizer_is_named(tmp_path):
    from tests.tiny_model import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "m", tokenizer="llama3")
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+"
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(InvalidTask, match=r"unsupported tokenizer pre-tokenizer .*Split.*knows byte-level BPE with "
                                          r"the GPT-2 \(SmolLM\), Llama 3 or Qwen2 split"):
        export(folder, tmp_path / "x.gguf", "f32", "x")


def test_q8_0_blocks_dequantize_within_their_error():
    data = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    back = gguf.dequantize(gguf.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
    assert np.abs(back - data).max() <= np.abs(data).max() / 127


def test_unsupported_architecture_is_named(tiny_model, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_model.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(InvalidTask, match="unsupported architecture 'gpt_neox'.*llama"):
        export(folder, tmp_path / "x.gguf", "q8_0", "x")


def quantization_task(model, tmp_path, types):
    from llmfactory.planner import parse, plan

    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Quantization", "metadata": {"name": "tiny"},
           "spec": {"model": {"source": {"uri": f"file://{model}"}}, "types": types}}
    return plan(parse(doc), lambda *k: None, f"file://{tmp_path}/store")


def test_a_grpo_fine_tunes_quantization_passes_its_prompts_on_without_measuring_on_them(tiny_model, tmp_path):
    """Its dataset holds prompts, no answers: nothing is measured on it, and the result passes it on for a
    Benchmark's reward."""
    from llmfactory.planner import parse, plan
    from llmfactory_runtime.data import dumps_jsonl
    from llmfactory_runtime.progress import Progress
    from llmfactory_runtime.quantize import run as quantize
    from llmfactory_runtime.store import open_store

    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "test.jsonl").write_bytes(dumps_jsonl([{"prompt": "2+2?", "reference": "4"}]))
    fine_tune = {"modelUri": f"file://{tiny_model}", "digest": "sha256:m", "baseModel": {"uri": f"file://{tiny_model}"},
                 "datasetUri": f"file://{tmp_path / 'prompts'}", "datasetFormat": "graded", "datasetDigest": "sha256:d",
                 "datasetReferenceFields": ["reference"]}
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Quantization", "metadata": {"name": "tiny"},
           "spec": {"model": {"fineTuneRef": {"name": "grpo"}}, "types": ["q8_0"]}}
    task = plan(parse(doc), lambda *k: fine_tune, f"file://{tmp_path}/store")
    store = open_store(task["artifactUri"])
    result = quantize.run(task, store, Progress(store))
    assert_task_kept_promise(task, result)  # the file a Benchmark's vLLM check was told of
    assert "perplexity" not in result["artifacts"][0] and result["referencePerplexity"] is None and result["passed"]
    assert result["measuredRows"] is None
    assert (result["datasetUri"], result["datasetFormat"]) == (fine_tune["datasetUri"], "graded")
    assert result["datasetReferenceFields"] == ["reference"]  # passed on, for a Benchmark's reward grader


def test_a_validation_bound_without_test_rows_is_refused_before_any_conversion_and_measures_on_validation_if_told(
        tiny_model, tmp_path):
    """A FineTune whose dataset has no test split: maxPerplexityIncreasePercent has nothing to measure
    on, so the run fails naming the field, the splits there are and spec.validation.split, rather than
    passing unchecked; with split validation it measures each type on the validation rows."""
    from llmfactory.planner import parse, plan
    from llmfactory_runtime.data import dumps_jsonl
    from llmfactory_runtime.progress import Progress
    from llmfactory_runtime.quantize import run as quantize
    from llmfactory_runtime.store import open_store

    (tmp_path / "rows").mkdir()
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (("Hi", "Hello."), ("What is two and two?", "Four."), ("Name a colour.", "Blue."))]
    (tmp_path / "rows" / "train.jsonl").write_bytes(dumps_jsonl(rows[:1]))
    (tmp_path / "rows" / "validation.jsonl").write_bytes(dumps_jsonl(rows[1:]))
    fine_tune = {"modelUri": f"file://{tiny_model}", "digest": "sha256:m", "baseModel": {"uri": f"file://{tiny_model}"},
                 "datasetUri": f"file://{tmp_path / 'rows'}", "datasetFormat": "chatml", "datasetDigest": "sha256:d"}
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Quantization", "metadata": {"name": "tiny"},
           "spec": {"model": {"fineTuneRef": {"name": "sft"}}, "types": ["q8_0"],
                    "validation": {"maxPerplexityIncreasePercent": 5}}}
    task = plan(parse(doc), lambda *k: fine_tune, f"file://{tmp_path}/store")
    store = open_store(task["artifactUri"])
    with pytest.raises(InvalidTask, match=r"^spec.validation.maxPerplexityIncreasePercent: file://.*/rows has no test "
                                          r"rows \(no test.jsonl there, only train.jsonl, validation.jsonl\), to "
                                          r"measure on \(spec.validation.split validation measures on its validation "
                                          r"split\)$"):
        quantize.run(task, store, Progress(store))
    assert store.list("gguf") == []

    doc["spec"]["validation"]["split"] = "validation"
    task = plan(parse(doc), lambda *k: fine_tune, f"file://{tmp_path}/store")
    store = open_store(task["artifactUri"])
    result = quantize.run(task, store, Progress(store))
    assert result["passed"] and result["measuredRows"] == 2 and result["referencePerplexity"] > 1
    assert abs(result["artifacts"][0]["perplexityIncreasePercent"]) < 5


def test_an_artifact_outside_the_validation_bounds_fails_the_quantization_saying_by_how_much(tiny_model, tmp_path):
    """maxPerplexityIncreasePercent 0 and minTopTokenAgreementPercent 100: f32 keeps the model exactly
    and passes, q4_0 does not; the run is Failed (reason ValidationFailed) quoting what q4_0 got, its
    artifacts kept, and the headline gives each type's perplexity change."""
    from llmfactory.api.headline import gates_failed, headline
    from llmfactory.controller.status import succeeded
    from llmfactory_runtime.progress import Progress
    from llmfactory_runtime.quantize import run as quantize
    from llmfactory_runtime.store import open_store

    task = _sft_quantization(tiny_model, tmp_path, ["f32", "q4_0"],
                             validation={"maxPerplexityIncreasePercent": 0, "minTopTokenAgreementPercent": 100})
    store = open_store(task["artifactUri"])
    result = quantize.run(task, store, Progress(store))
    f32, q4 = result["artifacts"]
    assert "failures" not in f32 and f32["perplexityIncreasePercent"] == 0 and result["passed"] is False
    expected = []
    if q4["perplexityIncreasePercent"] > 0:
        expected.append(f"perplexity {q4['perplexityIncreasePercent']:+.2f}% over the unquantized model's "
                        "(maxPerplexityIncreasePercent 0)")
    if q4["topTokenAgreementPercent"] < 100:
        expected.append(f"top-token agreement {q4['topTokenAgreementPercent']:.2f}% (minTopTokenAgreementPercent 100)")
    assert expected and q4["failures"] == expected
    assert sorted(store.list("gguf")) == ["COMMITTED", "tiny-f32.gguf", "tiny-q4_0.gguf"]  # kept, to look at
    why = "quantization finished but validation failed: " + "; ".join(f"q4_0: {f}" for f in expected)
    assert gates_failed("Quantization", result) == why
    line = headline("Quantization", result)
    assert line.startswith("f32 ") and " MB (ppl +0.00%), q4_0 " in line
    status = succeeded("Quantization", result, {}, 1)
    assert status["phase"] == "Failed" and status["conditions"][0]["reason"] == "ValidationFailed"
    assert status["conditions"][0]["message"] == why


def test_a_quantization_killed_between_types_resumes_without_measuring_or_converting_twice(tiny_model, tmp_path,
                                                                                          monkeypatch):
    """A pod preempted after f16 was converted, measured and uploaded: the restarted run converts
    only q8_0 and measures only it (the unquantized model's figures are kept in the run too), and
    ends with what an uninterrupted run gives."""
    from llmfactory_runtime.progress import Progress
    from llmfactory_runtime.quantize import run as quantize
    from llmfactory_runtime.store import open_store

    def run_in(store_name: str):
        task = _sft_quantization(tiny_model, tmp_path, ["f16", "q8_0"], store_name)
        store = open_store(task["artifactUri"])
        return store, quantize.run(task, store, Progress(store))

    _, whole = run_in("whole")
    export, measure, calls = quantize.export, quantize.measure_quality, []

    def preempted(folder, out, type_name, name):
        if type_name == "q8_0":
            raise KeyboardInterrupt("SIGTERM")  # what a kill leaves: nothing of q8_0 recorded
        return export(folder, out, type_name, name)

    monkeypatch.setattr(quantize, "export", preempted)
    with pytest.raises(KeyboardInterrupt):
        run_in("resumed")
    monkeypatch.setattr(quantize, "export", lambda *a: calls.append(("export", a[2])) or export(*a))
    monkeypatch.setattr(quantize, "measure_quality", lambda source, *a, **k: calls.append(("measure", source))
                        or measure(source, *a, **k))
    store, resumed = run_in("resumed")
    assert calls == [("export", "q8_0"), ("measure", {"uri": calls[1][1]["uri"], "ggufFile": "tiny-q8_0.gguf"})]
    unrun = lambda result: [{k: v for k, v in a.items() if k != "uri"} for a in result["artifacts"]]  # noqa: E731
    assert unrun(resumed) == unrun(whole) and resumed["referencePerplexity"] == whole["referencePerplexity"]
    assert sorted(store.list("gguf")) == ["COMMITTED", "tiny-f16.gguf", "tiny-q8_0.gguf"]


def test_a_restarted_k_quant_run_reuses_the_importance_matrix_it_computed(tiny_model, tmp_path, monkeypatch):
    """llama-imatrix over the calibration rows takes minutes on an 8B model: kept in the run, so a pod
    preempted while quantizing reads it back rather than computing it again. (llama.cpp's tools are
    stood in for here; they run for real in test_k_quant_and_importance_matrix_through_llama_cpp.)"""
    from llmfactory_runtime.data import dumps_jsonl
    from llmfactory_runtime.progress import Progress
    from llmfactory_runtime.quantize import llama_cpp, run as quantize
    from llmfactory_runtime.store import open_store

    computed, used = [], []

    def importance_matrix(model, calibration_text, out, threads):
        computed.append(calibration_text.read_text())
        out.write_bytes(b"imatrix of " + calibration_text.read_bytes()[:32])

    def k_quantize(source, out, type_name, threads, imatrix=None):
        used.append(imatrix.read_bytes())
        if len(used) == 1:
            raise KeyboardInterrupt("SIGTERM")  # preempted while quantizing
        shutil.copyfile(source, out)  # an f16 file under the K type's name: what the rest of the run reads

    monkeypatch.setattr(llama_cpp, "tool", lambda name: name)
    monkeypatch.setattr(llama_cpp, "importance_matrix", importance_matrix)
    monkeypatch.setattr(llama_cpp, "k_quantize", k_quantize)
    task = _sft_quantization(tiny_model, tmp_path, ["q4_k_m"])
    task["spec"]["importanceMatrix"] = True
    (tmp_path / "rows" / "train.jsonl").write_bytes(dumps_jsonl([{"text": TEXT}] * 3))
    store = open_store(task["artifactUri"])
    with pytest.raises(KeyboardInterrupt):
        quantize.run(task, store, Progress(store))
    result = quantize.run(task, store, Progress(store))
    assert len(computed) == 1 and TEXT in computed[0]
    assert used == [b"imatrix of " + TEXT.encode()[:32]] * 2
    assert [a["type"] for a in result["artifacts"]] == ["q4_k_m"]


def _sft_quantization(model, tmp_path, types, store_name="store", validation=None):
    """A Quantization of an SFT FineTune of `model` whose dataset has four held-out conversations."""
    from llmfactory.planner import parse, plan
    from llmfactory_runtime.data import dumps_jsonl

    (tmp_path / "rows").mkdir(exist_ok=True)
    (tmp_path / "rows" / "test.jsonl").write_bytes(dumps_jsonl([{"messages": [
        {"role": "user", "content": f"Name a colour ({i})."}, {"role": "assistant", "content": TEXT}]} for i in range(4)]))
    fine_tune = {"modelUri": f"file://{model}", "digest": "sha256:m", "baseModel": {"uri": f"file://{model}"},
                 "datasetUri": f"file://{tmp_path / 'rows'}", "datasetFormat": "chatml", "datasetDigest": "sha256:d"}
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Quantization", "metadata": {"name": "tiny"},
           "spec": {"model": {"fineTuneRef": {"name": "sft"}}, "types": types, "validation": validation or {}}}
    return plan(parse(doc), lambda *k: fine_tune, f"file://{tmp_path}/{store_name}")


def test_k_quants_without_llama_cpp_fail_before_any_work_naming_the_tool(tiny_model, tmp_path, monkeypatch):
    from llmfactory_runtime.progress import Progress
    from llmfactory_runtime.quantize import run as quantize
    from llmfactory_runtime.store import open_store

    (tmp_path / "empty-bin").mkdir()
    monkeypatch.setenv("LLMFACTORY_LLAMA_CPP_BIN", str(tmp_path / "empty-bin"))
    task = quantization_task(tiny_model, tmp_path, ["q8_0", "q4_k_m"])
    store = open_store(task["artifactUri"])
    with pytest.raises(InvalidTask, match="llama-quantize.*LLMFACTORY_LLAMA_CPP_BIN"):
        quantize.run(task, store, Progress(store))
    assert store.list("gguf") == []  # nothing converted before the error


LLAMA_CPP = os.environ.get("LLMFACTORY_LLAMA_CPP_BIN")


@pytest.mark.skipif(not LLAMA_CPP, reason="set LLMFACTORY_LLAMA_CPP_BIN to a llama.cpp build (the runtime image has "
                                          "one) to run K-quants")
def test_k_quant_and_importance_matrix_through_llama_cpp(tiny_model, tmp_path):
    from llmfactory_runtime.quantize import llama_cpp

    base = tmp_path / "base.gguf"
    export(tiny_model, base, "f16", "tiny")
    text = tmp_path / "calibration.txt"
    text.write_text((TEXT + "\n") * 200)
    llama_cpp.importance_matrix(base, text, tmp_path / "imatrix.dat", 2)
    out = tmp_path / "tiny-q4_k_m.gguf"
    llama_cpp.k_quantize(base, out, "q4_k_m", 2, tmp_path / "imatrix.dat")
    reader = gguf.GGUFReader(out)
    file_type = int(reader.fields["general.file_type"].parts[-1][0])
    assert file_type == gguf.LlamaFileType.MOSTLY_Q4_K_M
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(tiny_model)(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(loaded(ids).logits).all()


@pytest.mark.skipif(not LLAMA_CPP, reason="set LLMFACTORY_LLAMA_CPP_BIN to a llama.cpp build to run K-quants")
def test_quantization_phase_writes_k_quants_beside_python_types(tiny_model, tmp_path):
    from llmfactory_runtime.progress import Progress
    from llmfactory_runtime.quantize import run as quantize
    from llmfactory_runtime.store import open_store

    task = quantization_task(tiny_model, tmp_path, ["q8_0", "q4_k_m", "q6_k"])
    store = open_store(task["artifactUri"])
    result = quantize.run(task, store, Progress(store))
    assert [a["type"] for a in result["artifacts"]] == ["q8_0", "q4_k_m", "q6_k"]
    assert sorted(store.list("gguf")) == ["COMMITTED", "tiny-q4_k_m.gguf", "tiny-q6_k.gguf", "tiny-q8_0.gguf"]


try:
    import llama_cpp as _llama_cpp  # noqa: F401
    HAS_LLAMA_CPP_PYTHON = True
except ImportError:
    HAS_LLAMA_CPP_PYTHON = False


@pytest.mark.skipif(not HAS_LLAMA_CPP_PYTHON, reason="llama-cpp-python is not installed (the runtime image has it)")
@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen2", "sentencepiece"])
def test_llama_cpp_itself_reads_each_tokenizer_as_transformers_does(tmp_path, family):
    from llmfactory_runtime.quantize import llama_cpp
    from tests.tiny_model import make_tiny_llama, make_tiny_qwen2

    folder = make_tiny_qwen2(tmp_path / family) if family == "qwen2" else make_tiny_llama(tmp_path / family,
                                                                                          tokenizer=family)
    out = tmp_path / f"{family}.gguf"
    export(folder, out, "f16", family)
    checked = llama_cpp.load_back(out, AutoTokenizer.from_pretrained(folder), "Why is the sky blue?", 2)
    assert checked["tokenizerMatches"], family
    assert checked["tokensPerSecond"] > 0 and isinstance(checked["answer"], str)


@pytest.mark.skipif(not HAS_LLAMA_CPP_PYTHON, reason="llama-cpp-python is not installed (the runtime image has it)")
def test_quantization_phase_records_llama_cpp_load_back(tiny_model, tmp_path):
    from llmfactory_runtime.progress import Progress
    from llmfactory_runtime.quantize import run as quantize
    from llmfactory_runtime.store import open_store

    task = quantization_task(tiny_model, tmp_path, ["q8_0"])
    store = open_store(task["artifactUri"])
    result = quantize.run(task, store, Progress(store))
    assert_task_kept_promise(task, result)  # of a source model: its file, and no dataset
    checked = result["artifacts"][0]["llamaCpp"]
    assert checked["tokenizerMatches"] and checked["tokensPerSecond"] > 0 and result["passed"]
