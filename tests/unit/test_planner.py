"""The planner: tasks, digests, references, and errors that name the resource and field."""

import copy
import subprocess
import sys

import pytest
import yaml

from llmfactory.api.headline import headline
from llmfactory.planner import (PlanError, Waiting, benchmark_metric_names, config_maps_among, dependency_order, parse,
                               plan, promises_among)
from llmfactory.planner.graph import references, topological

STORE = "s3://bucket/llmfactory"
MODEL = {"uri": "file:///models/base"}


def m(kind, name, spec, namespace=None):
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "llmfactory.dev/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}


DATA = m("DatasetBuild", "data", {"sources": [{"inline": [{"text": "hi", "language": "en"}]}], "teacher": {"model": MODEL}})
FT = m("FineTune", "ft", {"baseModel": MODEL, "dataset": {"datasetBuildRef": {"name": "data"}}})
BENCH = m("Benchmark", "bench", {"model": {"fineTuneRef": {"name": "ft"}}, "perplexity": {},
                                 "judge": {"model": MODEL, "languages": ["en", "ru"]}})
QUANT = m("Quantization", "q", {"model": {"fineTuneRef": {"name": "ft"}}, "types": ["q8_0", "f16"]})

DATA_RESULT = {"uri": "s3://bucket/data", "format": "chatml", "digest": "sha256:aaa", "rows": {"train": 1},
               "rowsPerLanguage": {}, "dropped": {}, "teacherTokens": 1}
FT_RESULT = {"modelUri": "s3://bucket/ft/model", "baseModel": MODEL, "datasetUri": "s3://bucket/data",
             "datasetFormat": "chatml", "datasetDigest": "sha256:aaa", "digest": "sha256:fff"}


def lookup(results):
    return lambda kind, ns, name: results.get((kind, name))


def test_resources_run_after_what_they_reference():
    order = dependency_order(parse(x) for x in [BENCH, QUANT, FT, DATA])
    names = [r.name for r in order]
    assert names.index("data") < names.index("ft") < names.index("bench")
    assert names.index("ft") < names.index("q")


def test_task_document_is_resolved_and_deterministic():
    task = plan(parse(FT), lookup({("DatasetBuild", "data"): DATA_RESULT}), STORE)
    assert task["phase"] == "finetune"
    assert task["inputs"]["dataset"] == {"uri": "s3://bucket/data", "format": "chatml", "digest": "sha256:aaa"}
    assert task["spec"]["lora"]["r"] == 16  # defaults are spelled out for the runtime
    assert task["artifactUri"] == f"{STORE}/default/finetune/ft/{task['digest'][:16]}"
    again = plan(parse(copy.deepcopy(FT)), lookup({("DatasetBuild", "data"): DATA_RESULT}), STORE)
    assert again["digest"] == task["digest"]


def test_a_field_added_later_with_a_default_does_not_rerun_finished_resources():
    """An upgrade that adds a defaulted field (the CRD then fills it into every stored object)
    must not give finished resources new digests, which would run them all again."""
    import dataclasses

    from pydantic import Field

    from llmfactory.api.fine_tune import FineTuneSpec

    class NextVersionSpec(FineTuneSpec):
        future_option: int = Field(3, description="added in a later version")

    results = lookup({("DatasetBuild", "data"): DATA_RESULT})
    now = parse(FT)
    later = dataclasses.replace(now, spec=NextVersionSpec.model_validate({**FT["spec"], "futureOption": 3}))
    assert later.spec.wire()["futureOption"] == 3
    assert plan(later, results, STORE)["digest"] == plan(now, results, STORE)["digest"]
    # Writing a default out is the same spec; setting the new field to something else is a new run.
    explicit = copy.deepcopy(FT)
    explicit["spec"]["lora"] = {"r": 16}
    assert plan(parse(explicit), results, STORE)["digest"] == plan(now, results, STORE)["digest"]
    other = dataclasses.replace(now, spec=NextVersionSpec.model_validate({**FT["spec"], "futureOption": 4}))
    assert plan(other, results, STORE)["digest"] != plan(now, results, STORE)["digest"]


def test_digest_changes_with_the_spec_and_with_upstream_artifacts():
    base = plan(parse(FT), lookup({("DatasetBuild", "data"): DATA_RESULT}), STORE)["digest"]
    changed = copy.deepcopy(FT)
    changed["spec"]["hyperparameters"] = {"epochs": 2}
    assert plan(parse(changed), lookup({("DatasetBuild", "data"): DATA_RESULT}), STORE)["digest"] != base
    rebuilt = {**DATA_RESULT, "digest": "sha256:bbb"}
    assert plan(parse(FT), lookup({("DatasetBuild", "data"): rebuilt}), STORE)["digest"] != base
    # Scheduling and clean-up do not change what a run computes.
    queued = copy.deepcopy(FT)
    queued["spec"].update(queueName="gpu-queue", deletionPolicy="Delete", suspend=True)
    assert plan(parse(queued), lookup({("DatasetBuild", "data"): DATA_RESULT}), STORE)["digest"] == base
    # Where artifacts go is not an input: the same work has the same digest in any store.
    assert plan(parse(FT), lookup({("DatasetBuild", "data"): DATA_RESULT}), "file:///tmp/a")["digest"] == base


def test_a_resource_waits_for_what_it_references():
    waiting = plan(parse(FT), lookup({}), STORE)
    assert isinstance(waiting, Waiting)
    assert (waiting.kind, waiting.name, waiting.field) == ("DatasetBuild", "data", "spec.dataset.datasetBuildRef")
    assert "DatasetBuild data" in waiting.reason


def test_benchmark_gets_the_fine_tunes_model_base_and_data():
    task = plan(parse(BENCH), lookup({("FineTune", "ft"): FT_RESULT}), STORE)
    assert task["inputs"]["model"] == {"uri": "s3://bucket/ft/model", "digest": "sha256:fff"}
    assert task["inputs"]["baseline"] == MODEL
    assert task["inputs"]["dataset"]["uri"] == "s3://bucket/data"


def test_dangling_reference_names_the_field_and_the_known_names():
    with pytest.raises(PlanError) as err:
        dependency_order(parse(x) for x in [FT, m("DatasetBuild", "other", DATA["spec"])])
    assert err.value.resource == "FineTune default/ft"
    assert err.value.field == "spec.dataset.datasetBuildRef.name"
    assert "'data'" in err.value.message and "other" in err.value.message


def test_references_do_not_cross_namespaces():
    with pytest.raises(PlanError, match="not among the manifests"):
        dependency_order(parse(x) for x in [m("FineTune", "ft", FT["spec"], namespace="team-a"), DATA])


def test_duplicate_names_are_an_error():
    with pytest.raises(PlanError, match="defined twice"):
        dependency_order(parse(x) for x in [DATA, DATA])


def test_cycles_are_reported_with_their_path():
    deps = {"a": ["b"], "b": ["c"], "c": ["a"], "d": []}
    with pytest.raises(PlanError, match="cycle: a -> b -> c -> a"):
        topological(deps)
    assert topological({"a": ["b"], "b": []}) == ["b", "a"]


def test_a_chat_template_of_ones_own_that_does_not_parse_is_refused_with_its_line():
    broken = "{% for message in messages %}\n{{ message['content'] }}\n{% endfor"
    with pytest.raises(PlanError) as err:
        plan(parse(_jinja_fine_tune(broken)), lambda *key: None, STORE)
    assert err.value.field == "spec.chatTemplateJinja" and "line 3" in err.value.message
    assert isinstance(plan(parse(_jinja_fine_tune(broken + " %}")), lambda *key: None, STORE), Waiting)


def _jinja_fine_tune(template: str) -> dict:
    return {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": "own"},
            "spec": {"baseModel": {"huggingface": "someone/model"}, "dataset": {"datasetBuildRef": {"name": "data"}},
                     "chatTemplate": "jinja", "chatTemplateJinja": template, "chatTemplateTokens": ["<|end|>"]}}


def test_bad_field_is_named_with_its_path():
    bad = copy.deepcopy(FT)
    bad["spec"]["hyperparameters"] = {"learningRate": -1}
    with pytest.raises(PlanError) as err:
        parse(bad)
    assert err.value.field == "spec.hyperparameters.learningRate"
    unknown = copy.deepcopy(FT)
    unknown["spec"]["epochs"] = 3
    with pytest.raises(PlanError) as err:
        parse(unknown)
    assert err.value.field == "spec.epochs"
    with pytest.raises(PlanError, match="apiVersion"):
        parse({**FT, "apiVersion": "llmfactory.dev/v1"})
    secret_in_url = copy.deepcopy(FT)
    secret_in_url["spec"]["tracking"] = {"mlflow": {"trackingUri": "https://me:token@mlflow.example.com"}}
    with pytest.raises(PlanError) as err:
        parse(secret_in_url)
    assert err.value.field == "spec.tracking.mlflow.trackingUri" and "apiKeySecret" in err.value.message
    assert "token" not in str(err.value).replace("trackingUri", "")  # the error does not repeat the credential


def test_gate_on_an_unknown_metric_is_refused_with_the_valid_ones():
    bad = copy.deepcopy(BENCH)
    bad["spec"]["gates"] = [{"metric": "judge.score", "op": ">=", "value": 5},
                            {"metric": "mtbench.score", "op": ">=", "value": 5}]
    with pytest.raises(PlanError) as err:
        plan(parse(bad), lookup({("FineTune", "ft"): FT_RESULT}), STORE)
    assert err.value.field == "spec.gates[1].metric"
    assert "judge.score.ru" in err.value.message


def test_a_gate_on_a_metric_never_reported_is_refused_before_waiting_for_the_fine_tune():
    """Not hours later, when the FineTune it waits for has trained: a typo is refused when applied. A
    gate on a metric that depends on the dataset (a preference pair's) waits to be checked with it."""
    typo = copy.deepcopy(BENCH)
    typo["spec"]["gates"] = [{"metric": "judge.scor", "op": ">=", "value": 5}]
    with pytest.raises(PlanError) as err:
        plan(parse(typo), lookup({}), STORE)
    assert err.value.field == "spec.gates[0].metric" and "'judge.score'" in err.value.message
    pairs = copy.deepcopy(BENCH)
    pairs["spec"]["gates"] = [{"metric": "preference.accuracy", "op": ">=", "value": 0.6}]
    assert isinstance(plan(parse(pairs), lookup({}), STORE), Waiting)
    with pytest.raises(PlanError, match=r"spec.gates\[0\].metric: 'preference.accuracy' is not reported"):
        plan(parse(pairs), lookup({("FineTune", "ft"): FT_RESULT}), STORE)  # trained on conversations, not pairs


def test_metric_names_depend_on_the_suites_and_the_baseline():
    spec = parse(BENCH).spec
    assert "judge.baseline.ru" in benchmark_metric_names(spec, baseline=True)
    assert "perplexity.changePercent" not in benchmark_metric_names(spec, baseline=False)


def test_quantization_validation_needs_held_out_data():
    q = m("Quantization", "q", {"model": {"source": MODEL}, "validation": {"maxPerplexityIncreasePercent": 1}})
    with pytest.raises(PlanError) as err:
        plan(parse(q), lookup({}), STORE)
    assert err.value.field == "spec.validation.maxPerplexityIncreasePercent"


@pytest.mark.parametrize("detection, wanted, words", [
    ({}, {"en": 10, "english": 10}, "names english, but languageDetection (without candidates) detects among its "
                                    "languages, and the 140 py3langid knows are ISO 639 codes"),
    ({"candidates": ["en", "ru"]}, {"en": 10, "zh": 10, "ru": 0},
     "counts zh, which languageDetection never assigns: its candidates are en, ru"),
])
def test_samples_per_language_counts_languages_the_detection_assigns(detection, wanted, words):
    """Refused when applied, not once the build has read every prompt (or, without candidates, at its
    start in a pod: the runtime's own check is the last)."""
    spec = {"sources": [{"uri": "s3://b/p.jsonl"}], "teacher": {"openai": {"model": "gpt-4o"}},
            "languageDetection": detection, "samplesPerLanguage": wanted}
    with pytest.raises(PlanError) as err:
        plan(parse(m("DatasetBuild", "d", spec)), lookup({}), STORE)
    assert err.value.field == "spec.samplesPerLanguage" and words in err.value.message
    plan(parse(m("DatasetBuild", "d", {**spec, "samplesPerLanguage": {"en": 10, "ru": 10}})), lookup({}), STORE)


@pytest.mark.parametrize("spec, words", [
    ({"model": {"source": MODEL}, "types": ["q4_k_m"], "importanceMatrix": True}, "calibration data"),
    ({"model": {"fineTuneRef": {"name": "ft"}}, "types": ["q8_0"], "importanceMatrix": True}, "K-quants only"),
])
def test_importance_matrix_needs_k_quants_and_calibration_data(spec, words):
    with pytest.raises(PlanError) as err:  # before waiting for the FineTune, where the spec alone says it
        plan(parse(m("Quantization", "q", spec)), lookup({}), STORE)
    assert err.value.field == "spec.importanceMatrix" and words in err.value.message


@pytest.mark.parametrize("spec, field, words", [
    ({"model": {"source": MODEL}, "format": "compressed-tensors", "types": ["fp8", "gptq"]},
     "spec.types", "gptq calibrates on the rows a model was tuned on (conversations or documents), which only a "
     "fineTuneRef model provides"),
    ({"model": {"fineTuneRef": {"name": "ft"}}, "format": "compressed-tensors", "types": ["awq"],
      "resources": {"gpusPerNode": 0}}, "spec.resources.gpusPerNode", "awq runs on a CUDA GPU"),
])
def test_compressed_tensors_types_get_what_they_need(spec, field, words):
    with pytest.raises(PlanError) as err:  # before waiting for the FineTune, where the spec alone says it
        plan(parse(m("Quantization", "q", spec)), lookup({}), STORE)
    assert err.value.field == field and words in err.value.message
    # fp8 needs no calibration data; types of the other format are refused by the API types.
    fp8 = m("Quantization", "q", {"model": {"source": MODEL}, "format": "compressed-tensors", "types": ["fp8"]})
    assert plan(parse(fp8), lookup({}), STORE)["spec"]["types"] == ["fp8"]
    with pytest.raises(ValueError, match="format compressed-tensors takes: fp8, gptq, awq"):
        parse(m("Quantization", "q", {"model": {"source": MODEL}, "format": "compressed-tensors", "types": ["q8_0"]}))


def test_scheduling_fields_of_a_phase_do_not_change_its_digest():
    """resources of a DatasetBuild (unlike a FineTune's: processes shape the batch) say where it runs."""
    base = m("DatasetBuild", "d", {"sources": [{"inline": [{"text": "hi"}]}], "teacher": {"model": MODEL}})
    moved = copy.deepcopy(base)
    moved["spec"]["resources"] = {"gpusPerNode": 0, "memory": "8Gi"}
    assert plan(parse(base), lookup({}), STORE)["digest"] == plan(parse(moved), lookup({}), STORE)["digest"]


def test_how_qlora_runs_its_4bit_weights_does_not_change_its_digest():
    """Dequantized once or in every pass, the adapter is the same: a QLoRA FineTune that names either,
    or none (the default changed from auto to never), is not run again."""
    results = lookup({("DatasetBuild", "data"): DATA_RESULT})
    digests = set()
    for setting in (None, "auto", "never", "always"):
        ft = copy.deepcopy(FT)
        ft["spec"] |= {"method": "qlora", **({"qlora": {"dequantizeOnce": setting}} if setting else {})}
        task = plan(parse(ft), results, STORE)
        assert task["spec"]["qlora"]["dequantizeOnce"] == (setting or "never")  # the runtime still gets it
        digests.add(task["digest"])
    assert len(digests) == 1
    ft["spec"]["qlora"] = {"quantType": "fp4"}  # what the weights are does change it
    assert plan(parse(ft), results, STORE)["digest"] not in digests


def test_benchmark_of_a_quantization_loads_its_first_artifact():
    result = {"artifacts": [{"type": "q8_0", "uri": "s3://b/q/gguf/x-q8_0.gguf", "sha256": "abc", "sizeBytes": 1,
                             "bitsPerWeight": 8.5}], "passed": True, "datasetUri": "s3://b/d",
              "datasetFormat": "chatml", "datasetDigest": "sha256:d"}
    b = m("Benchmark", "b", {"model": {"quantizationRef": {"name": "q"}}, "perplexity": {}})
    task = plan(parse(b), lookup({("Quantization", "q"): result}), STORE)
    assert task["inputs"]["model"] == {"uri": "s3://b/q/gguf", "ggufFile": "x-q8_0.gguf", "digest": "abc"}
    assert task["inputs"]["baseline"] is None and task["inputs"]["dataset"]["uri"] == "s3://b/d"
    # A compressed-tensors artifact is a model folder.
    result["artifacts"][0].update(type="fp8", uri="s3://b/q/compressed/x-fp8")
    task = plan(parse(b), lookup({("Quantization", "q"): result}), STORE)
    assert task["inputs"]["model"] == {"uri": "s3://b/q/compressed/x-fp8", "digest": "abc"}


def test_a_model_under_tests_chat_template_kwargs_go_with_it_and_to_the_base_it_is_compared_with():
    """spec.model.chatTemplateKwargs ({enable_thinking: false}: Qwen3 without reasoning) is how the model
    under test is rendered, and its base (the baseline it implies), so the two are asked alike; a
    baselineModel has its own; a Benchmark without any plans as it did (the same digest)."""
    results = lookup({("FineTune", "ft"): FT_RESULT, ("DatasetBuild", "data"): DATA_RESULT})
    before = plan(parse(BENCH), results, STORE)
    plain = {"enable_thinking": False}
    spec = {**BENCH["spec"], "model": {"fineTuneRef": {"name": "ft"}, "chatTemplateKwargs": plain}}
    task = plan(parse(m("Benchmark", "bench", spec)), results, STORE)
    assert task["inputs"]["model"] == {"uri": "s3://bucket/ft/model", "digest": "sha256:fff", "chatTemplateKwargs": plain}
    assert task["inputs"]["baseline"] == {**MODEL, "chatTemplateKwargs": plain} and task["digest"] != before["digest"]
    spec["baselineModel"] = {"source": MODEL}
    assert plan(parse(m("Benchmark", "bench", spec)), results, STORE)["inputs"]["baseline"] == MODEL
    assert before["inputs"]["model"] == {"uri": "s3://bucket/ft/model", "digest": "sha256:fff"}
    assert before["digest"] == plan(parse(copy.deepcopy(BENCH)), results, STORE)["digest"]


def test_a_local_teachers_chat_template_kwargs_go_with_it_to_the_runtime_from_a_fine_tunes_model_too():
    """A local teacher (or judge) model's chatTemplateKwargs reach the runtime with it, where a FineTune's
    model (fineTuneRef) is read by URI as where it is named by one."""
    plain = {"enable_thinking": False}
    for model, read in (({**MODEL, "chatTemplateKwargs": plain}, MODEL["uri"]),
                        ({"fineTuneRef": {"name": "ft"}, "chatTemplateKwargs": plain}, "s3://bucket/ft/model")):
        taught = m("DatasetBuild", "d", {"sources": [{"inline": [{"text": "hi"}]}], "teacher": {"model": model}})
        task = plan(parse(taught), lookup({("FineTune", "ft"): FT_RESULT}), STORE)
        assert task["inputs"]["teacher"] == {"uri": read, "chatTemplateKwargs": plain}


def test_a_fine_tunes_chat_template_kwargs_are_how_it_renders_not_what_it_trains_or_promises():
    """baseModel.chatTemplateKwargs reach the runtime in the task's spec; the base it trains (its input,
    what its result names and its spec promises) is the model alone, of a source or a FineTune's model."""
    from llmfactory.planner import promises_among

    plain = {"enable_thinking": False}
    for base, read in (({**MODEL, "chatTemplateKwargs": plain}, MODEL), ({"fineTuneRef": {"name": "ft"},
                                                                          "chatTemplateKwargs": plain},
                                                                         {"uri": "s3://bucket/ft/model"})):
        tuned = m("FineTune", "next", {"baseModel": base, "dataset": {"uri": "s3://bucket/chat"}})
        task = plan(parse(tuned), lookup({("FineTune", "ft"): FT_RESULT}), STORE)
        assert task["spec"]["baseModel"]["chatTemplateKwargs"] == plain and task["inputs"]["baseModel"] == read
        promised = promises_among([parse(tuned), parse(FT)])("FineTune", "default", "next")
        assert promised["baseModel"] in (MODEL, {"uri": "pending://"})


def test_a_quantization_is_compared_with_the_fine_tune_it_was_made_from():
    """spec.baselineModel: the baseline is the named FineTune's model, not a base; the Benchmark
    waits for it, runs after it, and its digest follows that model's."""
    gguf = {"artifacts": [{"type": "q4_k_m", "uri": "s3://b/q/gguf/x-q4_k_m.gguf", "sha256": "abc", "sizeBytes": 1}],
            "passed": True, "datasetUri": "s3://b/d", "datasetFormat": "chatml", "datasetDigest": "sha256:d"}
    b = m("Benchmark", "b", {"model": {"quantizationRef": {"name": "q"}}, "baselineModel": {"fineTuneRef": {"name": "ft"}},
                             "judge": {"openai": {"model": "judge"}, "mode": "pairwise"}, "perplexity": {},
                             "gates": [{"metric": "judge.winRate", "op": ">=", "value": 0.45},
                                       {"metric": "perplexity.changePercent", "op": "<=", "value": 2}]})
    waiting = plan(parse(b), lookup({("Quantization", "q"): gguf}), STORE)
    assert isinstance(waiting, Waiting) and waiting.field == "spec.baselineModel.fineTuneRef"
    results = {("Quantization", "q"): gguf, ("FineTune", "ft"): FT_RESULT}
    task = plan(parse(b), lookup(results), STORE)
    assert task["inputs"]["baseline"] == {"uri": "s3://bucket/ft/model", "digest": "sha256:fff"}
    retrained = plan(parse(b), lookup({**results, ("FineTune", "ft"): {**FT_RESULT, "digest": "sha256:ggg"}}), STORE)
    assert retrained["digest"] != task["digest"]
    order = [r.name for r in dependency_order(parse(x) for x in [b, QUANT, FT, DATA])]
    assert order.index("ft") < order.index("b")
    with pytest.raises(PlanError, match="baselineModel is the baseline to evaluate: set baseline true"):
        parse(m("Benchmark", "b", {**b["spec"], "baseline": False, "judge": {"openai": {"model": "judge"}}}))
    # Without it, a GGUF has nothing to be compared with (no base): refused before waiting for the Quantization.
    alone = copy.deepcopy(b)
    del alone["spec"]["baselineModel"]
    with pytest.raises(PlanError, match="spec.judge.mode: is pairwise, which compares the model with its baseline"):
        plan(parse(alone), lookup({}), STORE)


def test_vllm_is_refused_for_a_gguf_model_before_a_job_runs():
    gguf = {"artifacts": [{"type": "q8_0", "uri": "s3://b/q/gguf/x-q8_0.gguf", "sha256": "abc", "sizeBytes": 1}],
            "passed": True}
    vllm_judge = {"openai": {"model": "judge"}, "engine": "vllm"}
    b = m("Benchmark", "b", {"model": {"quantizationRef": {"name": "q"}}, "judge": vllm_judge})
    with pytest.raises(PlanError) as err:
        plan(parse(b), lookup({("Quantization", "q"): gguf}), STORE)
    assert err.value.field == "spec.judge.engine" and "x-q8_0.gguf" in err.value.message
    assert "compressed-tensors" in err.value.message
    # auto picks transformers for it at run time; a compressed-tensors folder is served by vLLM.
    plan(parse(m("Benchmark", "b", {"model": {"quantizationRef": {"name": "q"}}, "judge": {**vllm_judge, "engine": "auto"}})),
         lookup({("Quantization", "q"): gguf}), STORE)
    gguf["artifacts"][0]["uri"] = "s3://b/q/compressed/x-fp8"
    plan(parse(b), lookup({("Quantization", "q"): gguf}), STORE)
    teacher = m("DatasetBuild", "d", {"sources": [{"inline": [{"text": "hi"}]}],
                                      "teacher": {"model": {"uri": "file:///m/x.gguf"}, "engine": "vllm"}})
    with pytest.raises(PlanError, match="spec.teacher.engine: is vllm, but the model is the GGUF file x.gguf"):
        plan(parse(teacher), lookup({}), STORE)
    # ... and runs on a GPU.
    teacher["spec"]["teacher"]["model"]["uri"] = "file:///m/x"
    teacher["spec"]["resources"] = {"gpusPerNode": 0}
    with pytest.raises(PlanError, match="spec.resources.gpusPerNode: is 0, but spec.teacher.engine is vllm"):
        plan(parse(teacher), lookup({}), STORE)
    # A Benchmark of a GGUF file given as a source, and a GRPO FineTune sampling a GGUF base, with vLLM:
    # refused before waiting for their data.
    bench = m("Benchmark", "b", {"model": {"source": {"uri": "file:///m/x.gguf"}}, "judge": vllm_judge,
                                 "perplexity": {"dataset": {"datasetBuildRef": {"name": "data"}}}})
    with pytest.raises(PlanError, match="spec.judge.engine: is vllm, but the model is the GGUF file x.gguf"):
        plan(parse(bench), lookup({}), STORE)
    grpo = copy.deepcopy(GRPO)
    grpo["spec"] |= {"baseModel": {"uri": "file:///m/x.gguf"}, "dataset": {"datasetBuildRef": {"name": "data"}}}
    grpo["spec"]["grpo"] |= {"engine": "vllm", "grader": {**grpo["spec"]["grpo"]["grader"], "referenceField": "reference"}}
    with pytest.raises(PlanError, match="spec.grpo.engine: is vllm, but the model is the GGUF file x.gguf"):
        plan(parse(grpo), lookup({}), STORE)


def refused_before_waiting(res: dict, *others: dict) -> PlanError:
    """The error planning `res` raises with nothing run yet, when `others` are applied beside it."""
    resources = [parse(x) for x in (res, *others)]
    with pytest.raises(PlanError) as err:
        plan(resources[0], lookup({}), STORE, promise_of=promises_among(resources))
    return err.value


def waits(res: dict, *others: dict) -> Waiting:
    resources = [parse(x) for x in (res, *others)]
    waiting = plan(resources[0], lookup({}), STORE, promise_of=promises_among(resources))
    assert isinstance(waiting, Waiting)
    return waiting


def test_what_a_referenced_resources_spec_promises_is_checked_before_waiting_for_it():
    """Applied together, a resource is refused for what the spec of one it references decides (the rows a
    DatasetBuild writes, a FineTune's objective and whether it keeps its model, a Quantization's format),
    not once that one has run for hours; what only a result will say (what the rows hold) waits for it."""
    dpo = copy.deepcopy(FT)
    dpo["spec"]["objective"] = "dpo"
    err = refused_before_waiting(dpo, DATA)
    assert err.field == "spec.dataset.datasetBuildRef" and err.message.startswith(
        "DatasetBuild data writes conversations (format chatml), but objective dpo trains on preference pairs")
    assert waits(dpo).field == "spec.dataset.datasetBuildRef"  # nothing known of a build not applied
    assert waits(BENCH, FT).field == "spec.model.fineTuneRef"  # nor of the rows its FineTune trains on
    pairs = copy.deepcopy(DATA)
    pairs["spec"]["preferences"] = {"rejected": {"model": MODEL}}
    assert waits(dpo, pairs).field == "spec.dataset.datasetBuildRef"

    # A GRPO curriculum by pass rate on a graded build that samples none.
    gsm8k = m("DatasetBuild", "data", {"sources": [{"uri": "s3://bucket/gsm8k.jsonl", "fields": "prompt",
                                                    "promptField": "question", "answerField": "answer"}],
                                       "format": "graded", "referencePattern": "#### (.+)"})
    curriculum = copy.deepcopy(GRPO)
    curriculum["spec"]["dataset"] = {"datasetBuildRef": {"name": "data"}}
    curriculum["spec"]["grpo"] |= {"promptOrder": "easyFirst",
                                   "grader": {**GRPO["spec"]["grpo"]["grader"], "referenceField": "reference"}}
    err = refused_before_waiting(curriculum, gsm8k)
    assert err.field == "spec.grpo.promptOrder" and "DatasetBuild data measures none" in err.message
    gsm8k["spec"]["difficulty"] = {"model": MODEL, "grader": {"operation": "number", "extract": "#### (.+)"}}
    waits(curriculum, gsm8k)

    # A FineTune that keeps only its adapter: not quantized, nor trained on; benchmarked on its base,
    # which vLLM cannot load when it is a GGUF file.
    adapter_only = m("FineTune", "ft", {"baseModel": {"uri": "file:///m/base.gguf"}, "mergeAdapter": False,
                                        "dataset": {"uri": "s3://bucket/chat"}})
    err = refused_before_waiting(QUANT, adapter_only)
    assert err.field == "spec.model.fineTuneRef" and "FineTune ft keeps only its adapter" in err.message
    staged = m("FineTune", "next", {"baseModel": {"fineTuneRef": {"name": "ft"}}, "dataset": {"uri": "s3://bucket/chat"}})
    assert "keeps only its adapter" in refused_before_waiting(staged, adapter_only).message
    vllm_judge = {"openai": {"model": "judge"}, "engine": "vllm"}
    judged = m("Benchmark", "bench", {"model": {"fineTuneRef": {"name": "ft"}}, "judge": vllm_judge})
    err = refused_before_waiting(judged, adapter_only)
    assert err.field == "spec.judge.engine" and "the GGUF file base.gguf" in err.message
    merged = copy.deepcopy(adapter_only)
    merged["spec"]["mergeAdapter"] = True
    waits(QUANT, merged)
    assert "the GGUF file base.gguf" in refused_before_waiting(judged, merged).message  # the base, its baseline
    judged["spec"]["baseline"] = False
    waits(judged, merged)

    # A reward model where text is written, a language model where one scores.
    rm = m("FineTune", "rm", {"baseModel": MODEL, "objective": "reward", "dataset": {"uri": "s3://bucket/pairs"}})
    taught = m("DatasetBuild", "d", {"sources": [{"inline": [{"text": "hi"}]}], "teacher": {"model": {"fineTuneRef": {
        "name": "rm"}}}})
    err = refused_before_waiting(taught, rm)
    assert err.field == "spec.teacher.model.fineTuneRef" and "FineTune rm trains a reward model" in err.message
    ranked = m("Benchmark", "bench", {"model": {"fineTuneRef": {"name": "ft"}}, "ranking": {"dataset": {
        "uri": "s3://bucket/pairs"}}})
    assert "FineTune ft trains with objective sft, so it is a language model" in refused_before_waiting(
        ranked, merged).message
    waits(m("Benchmark", "bench", {"model": {"fineTuneRef": {"name": "rm"}}, "ranking": {"dataset": {
        "uri": "s3://bucket/pairs"}}}), rm)

    # A Quantization's GGUF file (named as its run names it) for vLLM; its compressed-tensors folder is fine.
    of_quantization = m("Benchmark", "bench", {"model": {"quantizationRef": {"name": "q"}}, "judge": vllm_judge})
    err = refused_before_waiting(of_quantization, QUANT, FT, DATA)
    assert err.field == "spec.judge.engine" and "the GGUF file q-q8_0.gguf" in err.message
    fp8 = copy.deepcopy(QUANT)
    fp8["spec"] |= {"format": "compressed-tensors", "types": ["fp8"]}
    waits(of_quantization, fp8, FT, DATA)

    # Through a FineTune to the build it trains on: perplexity on the prompts a GRPO FineTune trains on.
    grpo = copy.deepcopy(curriculum)
    grpo["spec"]["grpo"].pop("promptOrder")
    err = refused_before_waiting(BENCH, grpo, gsm8k)
    assert err.field == "spec.perplexity.dataset" and "FineTune ft trains with objective grpo" in err.message
    # Which fields of the prompts hold references only the GRPO run finds: a reward grader reading
    # another field waits for it, and is checked then.
    reward = m("Benchmark", "bench", {"model": {"fineTuneRef": {"name": "ft"}},
                                      "reward": {"grader": {"operation": "number", "referenceField": "answer"}}})
    waits(reward, grpo, gsm8k)
    with pytest.raises(PlanError, match=r"spec.reward.grader.referenceField: is 'answer'"):
        plan(parse(reward), lookup({("FineTune", "ft"): {**FT_RESULT, "objective": "grpo", "datasetFormat": "graded",
                                                         "datasetReferenceFields": ["reference"]}}), STORE)


def test_config_map_sources_wait_for_the_config_map_and_its_content_is_in_the_digest():
    import base64

    doc = m("DatasetBuild", "data", {"sources": [{"configMap": {"name": "prompts", "key": "en.jsonl"}},
                                                 {"configMap": {"name": "prompts", "key": "zh.parquet"}}],
                                     "teacher": {"model": MODEL}})
    res = parse(doc)
    cm = {"data": {"en.jsonl": '{"prompt": "hi"}\n'}, "binaryData": {"zh.parquet": base64.b64encode(b"PAR1").decode()}}
    waiting = plan(res, lookup({}), STORE, lambda ns, name: None)
    assert isinstance(waiting, Waiting) and waiting.reason == \
        "waiting for ConfigMap prompts (spec.sources[0].configMap) to exist"
    task = plan(res, lookup({}), STORE, lambda ns, name: cm if (ns, name) == ("default", "prompts") else None)
    assert task["inputs"]["configMaps"]["1"] == {"name": "prompts", "key": "zh.parquet",
                                                 "sha256": __import__("hashlib").sha256(b"PAR1").hexdigest()}
    edited = {**cm, "data": {"en.jsonl": '{"prompt": "hello"}\n'}}
    assert plan(res, lookup({}), STORE, lambda ns, name: edited)["digest"] != task["digest"]
    with pytest.raises(PlanError, match=r"spec.sources\[1\].configMap.key: ConfigMap prompts has no key 'zh.parquet' "
                                        r"\(it has: \['en.jsonl'\]\)"):
        plan(res, lookup({}), STORE, lambda ns, name: {"data": cm["data"]})
    with pytest.raises(PlanError, match="needs a cluster, or the ConfigMap among the manifests"):
        plan(res, lookup({}), STORE)


def test_gates_may_name_any_metric_of_a_listed_lm_eval_task_and_nothing_else():
    spec = {"model": {"source": MODEL}, "baseline": False, "lmEval": {"tasks": ["mmlu", "arc_easy"]},
            "gates": [{"metric": "lmEval.mmlu.acc", "op": ">=", "value": 0.6},
                      {"metric": "lmEval.arc_easy.acc_norm", "op": ">=", "value": 0.7}]}
    assert plan(parse(m("Benchmark", "b", spec)), lookup({}), STORE)["inputs"]["model"] == MODEL
    spec["gates"].append({"metric": "lmEval.hellaswag.acc", "op": ">=", "value": 0.5})
    with pytest.raises(PlanError, match=r"spec.gates\[2\].metric: 'lmEval.hellaswag.acc' is not reported.*"
                                        r"'lmEval.arc_easy.<metric>', 'lmEval.mmlu.<metric>'"):
        plan(parse(m("Benchmark", "b", spec)), lookup({}), STORE)


def test_a_quantization_or_fine_tune_gated_on_a_benchmark_waits_until_it_passes():
    gated = m("Quantization", "q", {"model": {"fineTuneRef": {"name": "ft"}}, "types": ["q8_0"],
                                    "benchmarkRef": {"name": "bench"}})
    names = [r.name for r in dependency_order(parse(x) for x in [gated, BENCH, FT, DATA])]
    assert names.index("bench") < names.index("q")
    waiting = plan(parse(gated), lookup({("FineTune", "ft"): FT_RESULT}), STORE)
    assert isinstance(waiting, Waiting) and waiting.reason == "waiting for Benchmark bench (spec.benchmarkRef) to succeed"
    passed = {"metrics": {}, "gates": [], "passed": True, "reportUri": "s3://b/r"}
    task = plan(parse(gated), lookup({("FineTune", "ft"): FT_RESULT, ("Benchmark", "bench"): passed}), STORE)
    assert task["inputs"]["model"]["uri"] == FT_RESULT["modelUri"]
    # A gate, not an input: the same conversion with or without it (adding one reruns nothing).
    ungated = {**gated, "spec": {k: v for k, v in gated["spec"].items() if k != "benchmarkRef"}}
    assert plan(parse(ungated), lookup({("FineTune", "ft"): FT_RESULT}), STORE)["digest"] == task["digest"]
    assert "benchmarkRef" not in task["spec"]
    # A FineTune is gated the same way: GRPO against a reward model once a Benchmark of it passed.
    grpo = copy.deepcopy(GRPO)
    grpo["spec"]["benchmarkRef"] = {"name": "bench"}
    waiting = plan(parse(grpo), lookup({}), STORE)
    assert isinstance(waiting, Waiting) and waiting.field == "spec.benchmarkRef"
    assert plan(parse(grpo), lookup({("Benchmark", "bench"): passed}), STORE)["digest"] == plan(
        parse(GRPO), lookup({}), STORE)["digest"]
    with pytest.raises(PlanError, match="cycle"):
        looped = m("Benchmark", "bench", {"model": {"quantizationRef": {"name": "q"}}, "perplexity": {
            "dataset": {"uri": "s3://b/d"}}})
        dependency_order(parse(x) for x in [gated, looped, FT, DATA])


def test_an_adapter_only_fine_tune_is_benchmarked_on_its_base_but_not_quantized():
    adapter_only = {k: v for k, v in FT_RESULT.items() if k != "modelUri"} | {"adapterUri": "s3://bucket/ft/adapter"}
    task = plan(parse(BENCH), lookup({("FineTune", "ft"): adapter_only}), STORE)
    assert task["inputs"]["model"] == {**MODEL, "adapterUri": "s3://bucket/ft/adapter", "digest": "sha256:fff"}
    assert task["inputs"]["baseline"] == MODEL
    with pytest.raises(PlanError, match="spec.model.fineTuneRef: FineTune ft keeps only its adapter.*mergeAdapter: true"):
        plan(parse(QUANT), lookup({("FineTune", "ft"): adapter_only}), STORE)


def test_a_fine_tune_goes_on_training_another_fine_tunes_model_after_it_and_reruns_when_it_does():
    staged = m("FineTune", "domain", {"baseModel": {"fineTuneRef": {"name": "ft"}},
                                      "dataset": {"uri": "s3://bucket/domain-data"}})
    names = [r.name for r in dependency_order(parse(x) for x in [staged, FT, DATA])]
    assert names.index("data") < names.index("ft") < names.index("domain")
    waiting = plan(parse(staged), lookup({}), STORE)
    assert isinstance(waiting, Waiting) and waiting.field == "spec.baseModel.fineTuneRef"
    task = plan(parse(staged), lookup({("FineTune", "ft"): FT_RESULT}), STORE)
    assert task["inputs"]["baseModel"] == {"uri": FT_RESULT["modelUri"]}
    retrained = {**FT_RESULT, "modelUri": "s3://bucket/default/finetune/ft/0123456789abcdef/model"}
    assert plan(parse(staged), lookup({("FineTune", "ft"): retrained}), STORE)["digest"] != task["digest"]
    adapter_only = {k: v for k, v in FT_RESULT.items() if k != "modelUri"} | {"adapterUri": "s3://bucket/ft/adapter"}
    with pytest.raises(PlanError, match="spec.baseModel.fineTuneRef: FineTune ft keeps only its adapter.*mergeAdapter: true"):
        plan(parse(staged), lookup({("FineTune", "ft"): adapter_only}), STORE)
    with pytest.raises(PlanError, match="spec.baseModel: .*set exactly one of huggingface, uri or fineTuneRef"):
        parse(m("FineTune", "x", {"baseModel": {"fineTuneRef": {"name": "ft"}, "uri": "file:///m"},
                                  "dataset": {"uri": "s3://d"}}))
    with pytest.raises(PlanError, match="cycle"):
        dependency_order(parse(x) for x in [m("FineTune", "ft", {"baseModel": {"fineTuneRef": {"name": "domain"}},
                                                                  "dataset": {"uri": "s3://d"}}), staged])


GRPO = m("FineTune", "ft", {"baseModel": MODEL, "dataset": {"uri": "s3://bucket/prompts"}, "objective": "grpo",
                            "grpo": {"grader": {"referenceField": "answer", "operation": "number",
                                                "extract": "#### (.+)"}}})


def test_a_grpo_fine_tune_reads_prompts_which_benchmarks_and_quantizations_cannot_measure_answers_on():
    task = plan(parse(GRPO), lookup({}), STORE)
    assert task["inputs"]["dataset"]["format"] == "graded"
    assert task["spec"]["grpo"] == {"generations": 8, "temperature": 1.0, "topP": 1.0, "topK": 0, "minP": 0.0,
                                    "maxNewTokens": 256, "scaleRewards": "group",
                                    "beta": 0.0, "lossType": "dapo", "maskTruncated": False, "iterations": 1,
                                    "epsilon": 0.2,
                                    "importanceSamplingLevel": "token", "topEntropyQuantile": 1.0,
                                    "grader": {"referenceField": "answer", "operation": "number",
                                               "extract": "#### (.+)"}, "engine": "transformers",
                                    "vllmImportanceSamplingCorrection": True, "vllmImportanceSamplingCap": 2.0,
                                    "vllmImportanceSamplingMode": "token_truncate"}
    dynamic = copy.deepcopy(GRPO)
    dynamic["spec"]["grpo"]["dynamicSampling"] = {}
    assert plan(parse(dynamic), lookup({}), STORE)["spec"]["grpo"]["dynamicSampling"] == {"oversampling": 3}
    on_cpu = copy.deepcopy(GRPO)
    on_cpu["spec"] |= {"method": "lora", "resources": {"gpusPerNode": 0}}
    on_cpu["spec"]["grpo"]["engine"] = "vllm"
    with pytest.raises(PlanError, match=r"spec.resources.gpusPerNode: is 0, but spec.grpo.engine is vllm, which runs "
                                        r"on a GPU"):
        plan(parse(on_cpu), lookup({}), STORE)
    bad = copy.deepcopy(GRPO)
    bad["spec"]["grpo"]["grader"]["extract"] = "#### (.+"
    with pytest.raises(PlanError, match=r"spec.grpo.grader.extract: '#### \(.\+' is not a regular expression"):
        plan(parse(bad), lookup({}), STORE)
    python = copy.deepcopy(GRPO)
    python["spec"]["grpo"]["grader"] = {"operation": "python", "source": "def grade(sample, item):\n    return 1\n"}
    assert plan(parse(python), lookup({}), STORE)["spec"]["grpo"]["grader"]["source"].startswith("def grade(")
    for source, error in (("def grade(sample, item)\n    return 1", "does not parse as Python: line 1: expected ':'"),
                          ("def score(sample, item): return 1", "defines no function grade\\(sample, item\\)"),
                          ("def grade(sample): return 1", "grade must take two arguments"),
                          ("def grade(a, b, c): return 1", "grade must take two arguments"),
                          ("async def grade(sample, item): return 1", "grade is async")):
        python["spec"]["grpo"]["grader"]["source"] = source
        with pytest.raises(PlanError, match=f"spec.grpo.grader.source: {error}"):
            plan(parse(python), lookup({}), STORE)
    # On prompts a DatasetBuild has yet to make: refused before waiting for it.
    python["spec"]["dataset"] = {"datasetBuildRef": {"name": "data"}}
    python["spec"]["grpo"]["grader"]["referenceField"] = "reference"
    with pytest.raises(PlanError, match="spec.grpo.grader.source: grade is async"):
        plan(parse(python), lookup({}), STORE)
    # A label grader's prompt: only what the runtime fills in; labels told apart case aside, as it reads them.
    labelled = copy.deepcopy(GRPO)
    labelled["spec"]["grpo"]["grader"] = {
        "operation": "label", "judge": {"model": "gpt-4o-mini"}, "labels": ["kind", "unkind"],
        "passingLabels": ["kind"], "prompt": "Asked {{prompt}} ({{ item.topic }}), it said {{sample.output_text}}."}
    assert plan(parse(labelled), lookup({}), STORE)["spec"]["grpo"]["grader"]["labels"] == ["kind", "unkind"]
    labelled["spec"]["grpo"]["grader"]["prompt"] += " Expected: {{item.answer}}; {{sample.reference}} {{item.}}"
    with pytest.raises(PlanError, match=r"spec.grpo.grader.prompt: has {{sample.reference}}, which names nothing: "
                                        r"write {{sample.output_text}} \(the answer\)"):
        plan(parse(labelled), lookup({}), STORE)
    labelled["spec"]["grpo"]["grader"] |= {"prompt": "Kind? {{sample.output_text}}", "labels": ["kind", "Kind"]}
    with pytest.raises(PlanError, match=r"spec.grpo.grader.labels: \['kind', 'Kind'\] holds two labels that differ "
                                        "only in case"):
        plan(parse(labelled), lookup({}), STORE)
    summed = copy.deepcopy(GRPO)
    summed["spec"]["grpo"]["grader"] = {"operation": "sum", "parts": [
        {"name": "correct", "operation": "number", "referenceField": "answer"},
        {"name": "brief", "operation": "python", "weight": -0.1, "source": "def grade(sample, item) return 1"}]}
    with pytest.raises(PlanError, match=r"spec.grpo.grader.parts\[1\].source: does not parse as Python"):
        plan(parse(summed), lookup({}), STORE)
    summed["spec"]["grpo"]["grader"]["parts"][0]["extract"] = "#### (.+"
    with pytest.raises(PlanError, match=r"spec.grpo.grader.parts\[0\].extract: '#### \(.\+' is not a regular"):
        plan(parse(summed), lookup({}), STORE)
    for source in ("from graders import grade", "def _g(s, i): return 1\ngrade = _g", "def grade(*args): return 1",
                   "def grade(sample, item, weight=2): return weight"):
        python["spec"]["grpo"]["grader"]["source"] = source
        assert plan(parse(python), lookup({}), STORE)
    trained = {("FineTune", "ft"): {**FT_RESULT, "datasetFormat": "graded", "datasetUri": "s3://bucket/prompts"}}
    with pytest.raises(PlanError, match="spec.perplexity.dataset: is required: FineTune ft trains with objective "
                                        "grpo on prompts without answers"):
        plan(parse(BENCH), lookup(trained), STORE)
    judged = copy.deepcopy(BENCH)
    judged["spec"]["perplexity"] = {"dataset": {"uri": "s3://bucket/held-out"}}
    assert plan(parse(judged), lookup(trained), STORE)["inputs"]["dataset"]["uri"] == "s3://bucket/held-out"
    # GGUF types need no data; a Quantization validated on held-out conversations does. Its task carries
    # the prompts on (unused in it) for a Benchmark of the quantized model's reward.
    assert plan(parse(QUANT), lookup(trained), STORE)["inputs"]["dataset"]["format"] == "graded"
    validated = copy.deepcopy(QUANT)
    validated["spec"]["validation"] = {"maxPerplexityIncreasePercent": 5}
    with pytest.raises(PlanError, match="spec.validation.maxPerplexityIncreasePercent: needs conversations with "
                                        "answers, but FineTune ft trains with objective grpo"):
        plan(parse(validated), lookup(trained), STORE)


def test_a_benchmarks_reward_reads_a_grpo_fine_tunes_prompts_or_a_named_dataset():
    rewarded = m("Benchmark", "bench", {"model": {"fineTuneRef": {"name": "ft"}},
                                        "reward": {"grader": {"referenceField": "answer", "operation": "number"}},
                                        "gates": [{"metric": "reward.value", "op": ">=", "value": 0.6},
                                                  {"metric": "reward.baseline", "op": "<", "value": 0.6}]})
    graded = {("FineTune", "ft"): {**FT_RESULT, "datasetFormat": "graded", "datasetUri": "s3://bucket/prompts"}}
    task = plan(parse(rewarded), lookup(graded), STORE)
    assert task["inputs"]["rewardDataset"]["uri"] == "s3://bucket/prompts"
    # Where the FineTune's result says its prompts hold references, the grader must read one of those fields.
    held = {("FineTune", "ft"): {**graded["FineTune", "ft"], "datasetReferenceFields": ["answer", "language"]}}
    assert plan(parse(rewarded), lookup(held), STORE)["inputs"]["rewardDataset"]["referenceFields"] == [
        "answer", "language"]
    built = {("FineTune", "ft"): {**graded["FineTune", "ft"], "datasetReferenceFields": ["language", "reference"]}}
    with pytest.raises(PlanError, match=r"spec.reward.grader.referenceField: is 'answer', but the prompts FineTune ft "
                                        r"trained on hold a string or a number in every row only in fields "
                                        r"\['language', 'reference'\]: set referenceField to the one with the "
                                        "reference answer, or name spec.reward.dataset"):
        plan(parse(rewarded), lookup(built), STORE)
    # A judge asked its own prompt reads what the prompt names, not the referenceField.
    rubric = copy.deepcopy(rewarded)
    rubric["spec"]["reward"]["grader"] = {"operation": "judge", "judge": {"model": "gpt-4o"},
                                          "prompt": "Polite? {{sample.output_text}}"}
    unreferenced = {("FineTune", "ft"): {**graded["FineTune", "ft"], "datasetReferenceFields": ["language"]}}
    assert plan(parse(rubric), lookup(unreferenced), STORE)["inputs"]["rewardDataset"]["uri"] == "s3://bucket/prompts"
    del rubric["spec"]["reward"]["grader"]["prompt"]  # the MT-Bench prompt, reference-guided
    with pytest.raises(PlanError, match="spec.reward.grader.referenceField: is 'reference', but the prompts"):
        plan(parse(rubric), lookup(unreferenced), STORE)
    assert benchmark_metric_names(parse(rewarded).spec, baseline=True) == {"reward.value", "reward.baseline"}
    with pytest.raises(PlanError, match="spec.reward.dataset: is required unless the model comes from a fineTuneRef "
                                        "that trained with objective grpo"):
        plan(parse(rewarded), lookup({("FineTune", "ft"): FT_RESULT}), STORE)
    # A toolCalls grader reads the calls of the conversations a FineTune trained on by dataset.uri (format
    # chatml), alone or beside parts that read no reference field; not a DatasetBuild's ShareGPT rows.
    calls = copy.deepcopy(rewarded)
    calls["spec"]["reward"]["grader"] = {"operation": "toolCalls"}
    assert plan(parse(calls), lookup({("FineTune", "ft"): FT_RESULT}), STORE)["inputs"]["rewardDataset"]["uri"] == \
        "s3://bucket/data"
    calls["spec"]["reward"]["grader"] = {"operation": "sum", "parts": [
        {"name": "calls", "operation": "toolCalls"}, {"name": "brief", "operation": "python", "weight": 0.1,
                                                     "source": "def grade(s, i): return 1"}]}
    assert plan(parse(calls), lookup({("FineTune", "ft"): FT_RESULT}), STORE)["inputs"]["rewardDataset"]["uri"] == \
        "s3://bucket/data"
    calls["spec"]["reward"]["grader"]["parts"][1] = {"name": "exact", "operation": "equals", "weight": 0.1}
    with pytest.raises(PlanError, match="spec.reward.dataset: is required unless .* or the grader is toolCalls and "
                                        "the FineTune trained on conversations"):
        plan(parse(calls), lookup({("FineTune", "ft"): FT_RESULT}), STORE)
    calls["spec"]["reward"]["grader"] = {"operation": "toolCalls"}
    with pytest.raises(PlanError, match="spec.reward.dataset: is required unless"):
        plan(parse(calls), lookup({("FineTune", "ft"): {**FT_RESULT, "datasetFormat": "sharegpt"}}), STORE)
    # Of a Quantization of the GRPO FineTune: the prompts its result passes on (perplexity still needs a dataset).
    quantized = copy.deepcopy(rewarded)
    quantized["spec"]["model"] = {"quantizationRef": {"name": "q"}}
    quantized["spec"]["gates"] = quantized["spec"]["gates"][:1]  # no baseline: a GGUF has no base model
    gguf = {("Quantization", "q"): {"artifacts": [{"uri": "s3://bucket/q/ft-q8_0.gguf", "sha256": "q"}],
                                    "datasetUri": "s3://bucket/prompts", "datasetFormat": "graded", "datasetDigest": "d"}}
    assert plan(parse(quantized), lookup(gguf), STORE)["inputs"]["rewardDataset"]["uri"] == "s3://bucket/prompts"
    passed_on = {("Quantization", "q"): {**gguf["Quantization", "q"], "datasetReferenceFields": ["reference"]}}
    with pytest.raises(PlanError, match="referenceField: is 'answer', but the prompts the FineTune that "
                                        "Quantization q quantized trained on hold"):
        plan(parse(quantized), lookup(passed_on), STORE)
    quantized["spec"]["perplexity"] = {}
    with pytest.raises(PlanError, match="spec.perplexity.dataset: is required: the FineTune that Quantization q "
                                        "quantized trains with objective grpo"):
        plan(parse(quantized), lookup(gguf), STORE)
    named = copy.deepcopy(rewarded)
    named["spec"]["reward"]["dataset"] = {"uri": "s3://bucket/math"}
    assert plan(parse(named), lookup({("FineTune", "ft"): FT_RESULT}), STORE)["inputs"]["rewardDataset"]["uri"] == \
        "s3://bucket/math"
    alone = copy.deepcopy(rewarded)
    alone["spec"]["baseline"] = False
    with pytest.raises(PlanError, match=r"spec.gates\[1\].metric: 'reward.baseline' is not reported"):
        plan(parse(alone), lookup(graded), STORE)
    # A sum grader's parts are metrics of their own, as judge.score.<language>; a gate may name one.
    summed = copy.deepcopy(rewarded)
    summed["spec"]["reward"]["grader"] = {"operation": "sum", "parts": [
        {"name": "correct", "referenceField": "answer", "operation": "number"},
        {"name": "format", "operation": "python", "source": "def grade(s, i): return 1", "weight": 0.2}]}
    summed["spec"]["gates"] = [{"metric": "reward.value.correct", "op": ">=", "value": 0.6}]
    assert benchmark_metric_names(parse(summed).spec, baseline=True) == {
        "reward.value", "reward.baseline", "reward.value.correct", "reward.baseline.correct", "reward.value.format",
        "reward.baseline.format"}
    plan(parse(summed), lookup(graded), STORE)
    summed["spec"]["gates"][0]["metric"] = "reward.value.style"
    with pytest.raises(PlanError, match=r"spec.gates\[0\].metric: 'reward.value.style' is not reported.*"
                                        r"'reward.value.correct'"):
        plan(parse(summed), lookup(graded), STORE)
    bad = copy.deepcopy(rewarded)
    bad["spec"]["reward"]["grader"]["extract"] = "[0-9"
    with pytest.raises(PlanError, match="spec.reward.grader.extract: '\\[0-9' is not a regular expression"):
        plan(parse(bad), lookup({}), STORE)  # before waiting for the FineTune


def test_a_reward_model_fine_tune_feeds_a_grpo_grader_by_reference_and_nothing_that_needs_text():
    """objective reward trains on preference pairs; a GRPO FineTune's (or a Benchmark's) sum grader names
    it by fineTuneRef: it waits for it, its task reads the trained model's URI (a retrained reward model is
    a new run), and a language model named there, an adapter alone, or a Benchmark, Quantization or
    further SFT of the reward model are refused naming the field."""
    rm = m("FineTune", "rm", {"baseModel": MODEL, "dataset": {"datasetBuildRef": {"name": "data"}}, "objective": "reward"})
    with pytest.raises(PlanError, match="spec.dataset.datasetBuildRef: DatasetBuild data writes conversations .*"
                                        "objective reward trains on preference pairs"):
        plan(parse(rm), lookup({("DatasetBuild", "data"): DATA_RESULT}), STORE)
    pairs = {**DATA_RESULT, "format": "preference"}
    task = plan(parse(rm), lookup({("DatasetBuild", "data"): pairs}), STORE)
    assert task["inputs"]["dataset"]["format"] == "preference" and task["spec"]["reward"] == {}
    with pytest.raises(PlanError, match="reward settings apply only to objective reward"):
        parse(m("FineTune", "x", {"baseModel": MODEL, "dataset": {"uri": "s3://d"}, "reward": {}}))

    grpo = copy.deepcopy(GRPO)
    grpo["spec"]["grpo"]["grader"] = {"operation": "sum", "parts": [
        {"name": "correct", "operation": "number", "referenceField": "answer"},
        {"name": "preferred", "operation": "rewardModel", "weight": 0.5, "rewardModel": {"fineTuneRef": {"name": "rm"}}}]}
    names = [r.name for r in dependency_order(parse(x) for x in [grpo, rm, DATA])]
    assert names.index("data") < names.index("rm") < names.index("ft")
    waiting = plan(parse(grpo), lookup({}), STORE)
    assert isinstance(waiting, Waiting) and waiting.field == "spec.grpo.grader.parts[1].rewardModel.fineTuneRef"
    trained = {**FT_RESULT, "objective": "reward", "datasetFormat": "preference"}
    task = plan(parse(grpo), lookup({("FineTune", "rm"): trained}), STORE)
    assert task["spec"]["grpo"]["grader"]["parts"][1]["rewardModel"] == {"uri": FT_RESULT["modelUri"]}
    retrained = {**trained, "modelUri": "s3://bucket/default/finetune/rm/0123456789abcdef/model"}
    assert plan(parse(grpo), lookup({("FineTune", "rm"): retrained}), STORE)["digest"] != task["digest"]
    with pytest.raises(PlanError, match=r"spec.grpo.grader.parts\[1\].rewardModel.fineTuneRef: FineTune rm trains "
                                        "with objective sft, so it is a language model, not a reward model"):
        plan(parse(grpo), lookup({("FineTune", "rm"): FT_RESULT}), STORE)
    adapter_only = {k: v for k, v in trained.items() if k != "modelUri"} | {"adapterUri": "s3://bucket/rm/adapter"}
    with pytest.raises(PlanError, match=r"parts\[1\].rewardModel.fineTuneRef: FineTune rm keeps only its adapter"):
        plan(parse(grpo), lookup({("FineTune", "rm"): adapter_only}), STORE)
    benchmark = m("Benchmark", "b", {"model": {"source": {"uri": "s3://bucket/tuned"}}, "baseline": False, "reward": {
        "dataset": {"uri": "s3://bucket/prompts"},
        "grader": {"operation": "rewardModel", "rewardModel": {"fineTuneRef": {"name": "rm"}}}}})
    task = plan(parse(benchmark), lookup({("FineTune", "rm"): trained}), STORE)
    assert task["spec"]["reward"]["grader"]["rewardModel"] == {"uri": FT_RESULT["modelUri"]}

    with pytest.raises(PlanError, match="spec.model.fineTuneRef: FineTune ft trains a reward model, which scores "
                                        "conversations and writes none: benchmark it with spec.ranking"):
        plan(parse(BENCH), lookup({("FineTune", "ft"): trained}), STORE)
    with pytest.raises(PlanError, match="spec.model.fineTuneRef: FineTune ft trains a reward model, .*nothing to "
                                        "quantize; benchmark it with a Benchmark's spec.ranking"):
        plan(parse(QUANT), lookup({("FineTune", "ft"): trained}), STORE)
    further = m("FineTune", "more", {"baseModel": {"fineTuneRef": {"name": "ft"}}, "dataset": {"uri": "s3://d"}})
    with pytest.raises(PlanError, match="spec.baseModel.fineTuneRef: FineTune ft trains a reward model, which "
                                        "scores conversations and cannot write them: objective sft"):
        plan(parse(further), lookup({("FineTune", "ft"): trained}), STORE)
    further["spec"]["objective"] = "reward"  # a reward model trained further on other pairs
    assert plan(parse(further), lookup({("FineTune", "ft"): trained}), STORE)["inputs"]["baseModel"] == {
        "uri": FT_RESULT["modelUri"]}


def test_a_benchmark_ranks_pairs_with_a_reward_model_and_with_nothing_else():
    """spec.ranking: a reward model's accuracy on held-out preference pairs, by default the test split
    of those it trained on; its base (a language model) is no baseline, another reward model is. A
    language model or an adapter alone named there and a DatasetBuild of conversations are refused
    naming the field (ranking beside a section that needs text: the CRD's rule, test_crds)."""
    rm_result = {**FT_RESULT, "objective": "reward", "datasetFormat": "preference"}
    ranking = m("Benchmark", "b", {"model": {"fineTuneRef": {"name": "rm"}}, "ranking": {},
                                   "gates": [{"metric": "ranking.accuracy", "op": ">=", "value": 0.7}]})
    waiting = plan(parse(ranking), lookup({}), STORE)
    assert isinstance(waiting, Waiting) and waiting.field == "spec.model.fineTuneRef"
    task = plan(parse(ranking), lookup({("FineTune", "rm"): rm_result}), STORE)
    assert task["inputs"]["model"] == {"uri": FT_RESULT["modelUri"], "digest": FT_RESULT["digest"]}
    assert task["inputs"]["baseline"] is None  # its base is a language model
    assert task["inputs"]["rankingDataset"] == {"uri": "s3://bucket/data", "format": "preference", "digest": "sha256:aaa"}
    assert task["spec"]["ranking"] == {"split": "test", "batchSize": 8, "languages": []}
    assert benchmark_metric_names(parse(ranking).spec, baseline=False) == {"ranking.accuracy", "ranking.margin"}
    with pytest.raises(PlanError, match=r"spec.gates\[0\].metric: 'ranking.baseline' is not reported"):
        plan(parse({**ranking, "spec": {**ranking["spec"], "gates": [{"metric": "ranking.baseline", "op": ">", "value": 0}]}}),
             lookup({("FineTune", "rm"): rm_result}), STORE)
    # By language: only those listed are metrics a gate may name.
    by_language = copy.deepcopy(ranking)
    by_language["spec"]["gates"] = [{"metric": "ranking.accuracy.ru", "op": ">=", "value": 0.6}]
    with pytest.raises(PlanError, match=r"spec.gates\[0\].metric: 'ranking.accuracy.ru' is not reported"):
        plan(parse(by_language), lookup({("FineTune", "rm"): rm_result}), STORE)
    by_language["spec"]["ranking"]["languages"] = ["en", "ru"]
    assert plan(parse(by_language), lookup({("FineTune", "rm"): rm_result}), STORE)["spec"]["ranking"]["languages"] == [
        "en", "ru"]
    by_language["spec"]["ranking"]["languages"] = ["Russian"]
    with pytest.raises(PlanError, match=r"spec.ranking.languages\[0\]"):
        parse(by_language)
    # Against an earlier reward model: both rank the same pairs.
    against = copy.deepcopy(ranking)
    against["spec"]["baselineModel"] = {"fineTuneRef": {"name": "rm0"}}
    against["spec"]["gates"].append({"metric": "ranking.baseline", "op": "<", "value": 1})
    earlier = {**rm_result, "modelUri": "s3://bucket/rm0/model", "digest": "sha256:000"}
    task = plan(parse(against), lookup({("FineTune", "rm"): rm_result, ("FineTune", "rm0"): earlier}), STORE)
    assert task["inputs"]["baseline"] == {"uri": "s3://bucket/rm0/model", "digest": "sha256:000"}
    with pytest.raises(PlanError, match="spec.baselineModel.fineTuneRef: FineTune rm0 trains with objective sft, so "
                                        "it is a language model, which spec.ranking cannot score"):
        plan(parse(against), lookup({("FineTune", "rm"): rm_result, ("FineTune", "rm0"): FT_RESULT}), STORE)
    with pytest.raises(PlanError, match="spec.model.fineTuneRef: FineTune rm trains with objective dpo, so it is a "
                                        "language model"):
        plan(parse(ranking), lookup({("FineTune", "rm"): {**rm_result, "objective": "dpo"}}), STORE)
    adapter_only = {k: v for k, v in rm_result.items() if k != "modelUri"} | {"adapterUri": "s3://bucket/rm/adapter"}
    with pytest.raises(PlanError, match="spec.model.fineTuneRef: FineTune rm keeps only its adapter"):
        plan(parse(ranking), lookup({("FineTune", "rm"): adapter_only}), STORE)

    # Pairs from a DatasetBuild: waited for, and refused unless it wrote preference pairs.
    built = copy.deepcopy(ranking)
    built["spec"]["ranking"] = {"dataset": {"datasetBuildRef": {"name": "data"}}, "split": "validation"}
    waiting = plan(parse(built), lookup({("FineTune", "rm"): rm_result}), STORE)
    assert isinstance(waiting, Waiting) and waiting.field == "spec.ranking.dataset.datasetBuildRef"
    pairs = {**DATA_RESULT, "format": "preference"}
    task = plan(parse(built), lookup({("FineTune", "rm"): rm_result, ("DatasetBuild", "data"): pairs}), STORE)
    assert task["inputs"]["rankingDataset"]["uri"] == DATA_RESULT["uri"]
    with pytest.raises(PlanError, match="spec.ranking.dataset.datasetBuildRef: DatasetBuild data writes conversations"):
        plan(parse(built), lookup({("FineTune", "rm"): rm_result, ("DatasetBuild", "data"): DATA_RESULT}), STORE)
    # A reward model by source: the runtime checks it is one; its pairs must be named.
    by_source = m("Benchmark", "b", {"model": {"source": {"uri": "s3://bucket/rm"}}, "ranking": {}})
    with pytest.raises(PlanError, match="spec.ranking.dataset: is required when the model does not come from a "
                                        "fineTuneRef"):
        plan(parse(by_source), lookup({}), STORE)
    by_source["spec"]["ranking"]["dataset"] = {"uri": "s3://bucket/pairs"}
    assert plan(parse(by_source), lookup({}), STORE)["inputs"]["rankingDataset"]["uri"] == "s3://bucket/pairs"


def test_a_benchmarks_reward_prompts_from_a_dataset_build_are_waited_for_and_read():
    """spec.reward.dataset may name a DatasetBuild of prompts with references (format graded), like
    perplexity's of conversations: the Benchmark waits for it; one of conversations, or a grader that
    reads the reference elsewhere than the build writes it, is refused naming the field."""
    rewarded = m("Benchmark", "b", {"model": {"source": MODEL}, "reward": {
        "dataset": {"datasetBuildRef": {"name": "data"}}, "grader": {"operation": "number", "referenceField": "answer"}}})
    assert [r.name for r in dependency_order(parse(x) for x in [rewarded, DATA])] == ["data", "b"]
    waiting = plan(parse(rewarded), lookup({}), STORE)
    assert isinstance(waiting, Waiting) and waiting.field == "spec.reward.dataset.datasetBuildRef"
    graded = {**DATA_RESULT, "format": "graded"}
    with pytest.raises(PlanError, match="spec.reward.grader.referenceField: is 'answer', but the DatasetBuild's rows "
                                        r"\(format graded\) hold each prompt's reference answer in field 'reference'"):
        plan(parse(rewarded), lookup({("DatasetBuild", "data"): graded}), STORE)
    del rewarded["spec"]["reward"]["grader"]["referenceField"]
    task = plan(parse(rewarded), lookup({("DatasetBuild", "data"): graded}), STORE)
    assert task["inputs"]["rewardDataset"] == {"uri": DATA_RESULT["uri"], "format": "graded", "digest": "sha256:aaa"}
    with pytest.raises(PlanError, match=r"spec.reward.dataset.datasetBuildRef: DatasetBuild data writes conversations "
                                        r"\(format chatml\), but spec.reward grades answers to prompts with reference "
                                        "answers: set spec.format graded there, or point dataset.uri at such rows"):
        plan(parse(rewarded), lookup({("DatasetBuild", "data"): DATA_RESULT}), STORE)


def test_documents_a_dataset_build_writes_train_sft_and_are_measured_by_perplexity_and_nothing_else_reads_them():
    """A DatasetBuild with format text writes documents (continued pre-training): a FineTune with objective
    sft and a Benchmark's perplexity read them by datasetBuildRef; an objective that needs prompts or
    pairs is refused, naming the setting that writes what it needs."""
    corpus = m("DatasetBuild", "data", {"sources": [{"uri": "s3://bucket/wiki.parquet"}], "format": "text"})
    assert parse(corpus).spec.written_format() == "text" and not parse(corpus).spec.runs_a_local_model()
    documents = {**DATA_RESULT, "format": "text"}
    task = plan(parse(FT), lookup({("DatasetBuild", "data"): documents}), STORE)
    assert task["inputs"]["dataset"] == {"uri": DATA_RESULT["uri"], "format": "text", "digest": "sha256:aaa"}
    ppl = m("Benchmark", "b", {"model": {"source": MODEL}, "perplexity": {"dataset": {"datasetBuildRef": {"name": "data"}}}})
    assert plan(parse(ppl), lookup({("DatasetBuild", "data"): documents}), STORE)["inputs"]["dataset"]["format"] == "text"
    dpo = copy.deepcopy(FT)
    dpo["spec"]["objective"] = "dpo"
    with pytest.raises(PlanError, match=r"spec.dataset.datasetBuildRef: DatasetBuild data writes documents \(format "
                                        r"text\), but objective dpo trains on preference pairs: set spec.preferences"):
        plan(parse(dpo), lookup({("DatasetBuild", "data"): documents}), STORE)
    assert headline("DatasetBuild", {**documents, "rows": {"train": 8, "validation": 1, "test": 1}}) == \
        "10 documents (8/1/1)"


def test_a_grpo_fine_tune_reads_a_dataset_builds_prompts_with_references_and_nothing_else_does():
    """A DatasetBuild with format graded writes GRPO's prompts (its answers made references): a GRPO
    FineTune reads it by datasetBuildRef, its grader (each part of a sum) at field reference; one of
    conversations is refused for GRPO, and prompts without answers for supervised fine-tuning or
    perplexity, each naming the field and the setting that writes what it needs."""
    gsm8k = m("DatasetBuild", "data", {"sources": [{"uri": "s3://bucket/gsm8k.jsonl", "fields": "prompt",
                                                    "promptField": "question", "answerField": "answer"}],
                                       "format": "graded", "referencePattern": "#### (.+)"})
    assert parse(gsm8k).spec.written_format() == "graded"
    graded = {**DATA_RESULT, "format": "graded"}
    grpo = copy.deepcopy(GRPO)
    grpo["spec"]["dataset"] = {"datasetBuildRef": {"name": "data"}}
    grpo["spec"]["grpo"]["grader"]["referenceField"] = "reference"
    assert [r.name for r in dependency_order(parse(x) for x in [grpo, gsm8k])] == ["data", "ft"]
    task = plan(parse(grpo), lookup({("DatasetBuild", "data"): graded}), STORE)
    assert task["inputs"]["dataset"] == {"uri": DATA_RESULT["uri"], "format": "graded", "digest": "sha256:aaa"}
    # A curriculum by pass rate needs a build that measured them (difficulty, which reports its sampling).
    curriculum = copy.deepcopy(grpo)
    curriculum["spec"]["grpo"]["promptOrder"] = "easyFirst"
    with pytest.raises(PlanError, match="spec.grpo.promptOrder: is easyFirst, which orders the prompts by their "
                                        "pass_rate, but DatasetBuild data measures none: set spec.difficulty there"):
        plan(parse(curriculum), lookup({("DatasetBuild", "data"): graded}), STORE)
    measured = {**graded, "difficultyUsage": {"requests": 8, "cached": 0, "promptTokens": 0, "completionTokens": 0}}
    assert plan(parse(curriculum), lookup({("DatasetBuild", "data"): measured}), STORE)["spec"]["grpo"][
        "promptOrder"] == "easyFirst"
    with pytest.raises(PlanError, match=r"spec.dataset.datasetBuildRef: DatasetBuild data writes conversations \(format "
                                        r"chatml\), but objective grpo trains on prompts with reference answers for its "
                                        "grader: set spec.format graded there"):
        plan(parse(grpo), lookup({("DatasetBuild", "data"): DATA_RESULT}), STORE)
    # A toolCalls grader reads a build's chatml conversations (function-calling rows kept whole), their calls
    # the references; not its ShareGPT rows, which hold none. A Benchmark's reward.dataset alike.
    calls = copy.deepcopy(grpo)
    calls["spec"]["grpo"]["grader"] = {"operation": "toolCalls"}
    assert plan(parse(calls), lookup({("DatasetBuild", "data"): DATA_RESULT}), STORE)["inputs"]["dataset"]["uri"] == \
        DATA_RESULT["uri"]
    sharegpt = {("DatasetBuild", "data"): {**DATA_RESULT, "format": "sharegpt"}}
    with pytest.raises(PlanError, match=r"spec.dataset.datasetBuildRef: writes ShareGPT rows, which hold no tool calls "
                                        "for grader toolCalls to compare with .*: set spec.format chatml there"):
        plan(parse(calls), lookup(sharegpt), STORE)
    bench = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Benchmark", "metadata": {"name": "b"}, "spec": {
        "model": {"source": {"huggingface": "org/m"}}, "reward": {"dataset": {"datasetBuildRef": {"name": "data"}},
                                                      "grader": {"operation": "toolCalls"}}}}
    assert plan(parse(bench), lookup({("DatasetBuild", "data"): DATA_RESULT}), STORE)["inputs"]["rewardDataset"][
        "format"] == "chatml"
    with pytest.raises(PlanError, match="spec.reward.dataset.datasetBuildRef: writes ShareGPT rows"):
        plan(parse(bench), lookup(sharegpt), STORE)
    bench["spec"]["reward"]["grader"] = {"operation": "number"}
    with pytest.raises(PlanError, match=r"spec.reward.dataset.datasetBuildRef: DatasetBuild data writes conversations "
                                        r"\(format chatml\), but spec.reward grades answers to prompts with reference"):
        plan(parse(bench), lookup({("DatasetBuild", "data"): DATA_RESULT}), STORE)
    grpo["spec"]["grpo"]["grader"] = {"operation": "sum", "parts": [
        {"name": "format", "operation": "python", "source": "def grade(sample, item):\n    return 1.0\n"},
        {"name": "correct", "operation": "number", "referenceField": "answer"}]}
    with pytest.raises(PlanError, match=r"spec.grpo.grader.parts\[1\].referenceField: is 'answer'"):
        plan(parse(grpo), lookup({("DatasetBuild", "data"): graded}), STORE)

    sft = copy.deepcopy(FT)
    with pytest.raises(PlanError, match=r"spec.dataset.datasetBuildRef: DatasetBuild data writes prompts with reference "
                                        r"answers \(format graded\), but objective sft learns from answers: leave "
                                        r"spec.format chatml \(or sharegpt\) there"):
        plan(parse(sft), lookup({("DatasetBuild", "data"): graded}), STORE)
    ppl = m("Benchmark", "b", {"model": {"source": MODEL}, "perplexity": {"dataset": {"datasetBuildRef": {"name": "data"}}}})
    with pytest.raises(PlanError, match="spec.perplexity.dataset.datasetBuildRef: DatasetBuild data writes prompts with "
                                        "reference answers"):
        plan(parse(ppl), lookup({("DatasetBuild", "data"): graded}), STORE)
    bad = copy.deepcopy(gsm8k)
    bad["spec"]["referencePattern"] = "#### ([0-9"
    with pytest.raises(PlanError, match=r"spec.referencePattern: '#### \(\[0-9' is not a regular expression"):
        plan(parse(bad), lookup({}), STORE)

    # difficulty: the student by fineTuneRef (waited for, read by URI), its grader checked as GRPO's.
    filtered = copy.deepcopy(gsm8k)
    filtered["spec"]["difficulty"] = {"model": {"fineTuneRef": {"name": "ft"}},
                                      "grader": {"operation": "number", "extract": "#### (.+)"}}
    waiting = plan(parse(filtered), lookup({}), STORE)
    assert isinstance(waiting, Waiting) and waiting.field == "spec.difficulty.model.fineTuneRef"
    task = plan(parse(filtered), lookup({("FineTune", "ft"): FT_RESULT}), STORE)
    assert task["inputs"]["difficulty"] == {"uri": FT_RESULT["modelUri"]}
    assert parse(filtered).spec.runs_a_local_model()
    for wrong, error in (({"extract": "#### ([0-9"}, r"spec.difficulty.grader.extract: .* is not a regular expression"),
                         ({"referenceField": "answer"}, "spec.difficulty.grader.referenceField: is 'answer'")):
        bad = copy.deepcopy(filtered)
        bad["spec"]["difficulty"]["grader"] |= wrong
        with pytest.raises(PlanError, match=error):
            plan(parse(bad), lookup({}), STORE)  # before waiting for the FineTune


def test_a_model_trained_by_a_fine_tune_writes_rejected_answers_teaches_and_judges_by_reference():
    """On-policy preference pairs (the SFT model answers, its answers rejected, then DPO on top of it)
    in one apply: a DatasetBuild names the FineTune by fineTuneRef, waits for it, and reads its merged
    model by URI (a retrained SFT model is a new build). Every field that reads a model to write or
    grade text takes one the same way; a reward model or an adapter alone there is refused."""
    sft = m("FineTune", "sft", {"baseModel": MODEL, "dataset": {"datasetBuildRef": {"name": "data"}}})
    pairs = m("DatasetBuild", "pairs", {"sources": [{"uri": "s3://bucket/prompts.jsonl"}], "teacher": {"model": MODEL},
                                        "preferences": {"rejected": {"model": {"fineTuneRef": {"name": "sft"}}}}})
    dpo = m("FineTune", "dpo", {"baseModel": {"fineTuneRef": {"name": "sft"}}, "objective": "dpo",
                                "dataset": {"datasetBuildRef": {"name": "pairs"}}})
    assert [r.name for r in dependency_order(parse(x) for x in [dpo, pairs, sft, DATA])] == ["data", "sft", "pairs", "dpo"]
    waiting = plan(parse(pairs), lookup({}), STORE)
    assert isinstance(waiting, Waiting) and waiting.field == "spec.preferences.rejected.model.fineTuneRef"
    task = plan(parse(pairs), lookup({("FineTune", "sft"): FT_RESULT}), STORE)
    assert task["inputs"]["rejected"] == task["spec"]["preferences"]["rejected"]["model"] == {"uri": FT_RESULT["modelUri"]}
    retrained = {**FT_RESULT, "modelUri": "s3://bucket/default/finetune/sft/0123456789abcdef/model"}
    assert plan(parse(pairs), lookup({("FineTune", "sft"): retrained}), STORE)["digest"] != task["digest"]
    # The same model by URI is the same build: the reference is resolved before the digest.
    by_uri = copy.deepcopy(pairs)
    by_uri["spec"]["preferences"]["rejected"]["model"] = {"uri": FT_RESULT["modelUri"]}
    assert plan(parse(by_uri), lookup({}), STORE)["digest"] == task["digest"]
    reward = {**FT_RESULT, "objective": "reward"}
    with pytest.raises(PlanError, match="spec.preferences.rejected.model.fineTuneRef: FineTune sft trains a reward "
                                        "model, which scores conversations and writes none"):
        plan(parse(pairs), lookup({("FineTune", "sft"): reward}), STORE)
    adapter_only = {k: v for k, v in FT_RESULT.items() if k != "modelUri"} | {"adapterUri": "s3://bucket/sft/adapter"}
    with pytest.raises(PlanError, match="spec.preferences.rejected.model.fineTuneRef: FineTune sft keeps only its adapter"):
        plan(parse(pairs), lookup({("FineTune", "sft"): adapter_only}), STORE)

    # A teacher, a DatasetBuild's judge, a Benchmark's judge and a grader's local judge alike.
    ref = {"fineTuneRef": {"name": "sft"}}
    teacher = m("DatasetBuild", "d", {"sources": [{"uri": "s3://bucket/p.jsonl"}], "teacher": {"model": ref},
                                      "filters": {"judge": {"model": ref}}})
    judged = m("Benchmark", "b", {"model": {"source": MODEL}, "judge": {"model": ref}})
    graded = copy.deepcopy(GRPO)
    graded["spec"]["grpo"]["grader"] = {"operation": "judge", "referenceField": "answer", "judgeModel": ref}
    for doc, fields in ((teacher, ["spec.teacher.model", "spec.filters.judge.model"]), (judged, ["spec.judge.model"]),
                        (graded, ["spec.grpo.grader.judgeModel"])):
        assert [path for path, _, _ in references(parse(doc))] == [f"{f}.fineTuneRef" for f in fields]
        task = plan(parse(doc), lookup({("FineTune", "sft"): FT_RESULT}), STORE)
        for field in fields:
            node = task["spec"]
            for key in field.split(".")[1:]:
                node = node[key]
            assert node == {"uri": FT_RESULT["modelUri"]}
    assert task["spec"]["grpo"]["grader"]["judgeModel"] == {"uri": FT_RESULT["modelUri"]}
    inputs = plan(parse(teacher), lookup({("FineTune", "sft"): FT_RESULT}), STORE)["inputs"]
    assert inputs["teacher"] == inputs["judge"] == {"uri": FT_RESULT["modelUri"]}
    assert plan(parse(judged), lookup({("FineTune", "sft"): FT_RESULT}), STORE)["inputs"]["judge"] == {
        "uri": FT_RESULT["modelUri"]}
    # The pairs ranked by a reward model trained in the same apply: a reward model, where one scores.
    ranked = copy.deepcopy(pairs)
    ranked["spec"]["preferences"]["rewardModel"] = {"fineTuneRef": {"name": "rm"}}
    assert "spec.preferences.rewardModel.fineTuneRef" in [path for path, _, _ in references(parse(ranked))]
    upstream = lookup({("FineTune", "sft"): FT_RESULT, ("FineTune", "rm"): reward})
    assert plan(parse(ranked), upstream, STORE)["spec"]["preferences"]["rewardModel"] == {"uri": FT_RESULT["modelUri"]}
    with pytest.raises(PlanError, match="spec.preferences.rewardModel.fineTuneRef: FineTune rm trains with objective "
                                        "sft, so it is a language model, not a reward model"):
        plan(parse(ranked), lookup({("FineTune", "sft"): FT_RESULT, ("FineTune", "rm"): FT_RESULT}), STORE)


def test_other_objects_in_a_gitops_folder_are_left_out_by_name_and_a_wrong_llmfactory_version_is_not():
    """`llmfactory plan -f` on an Argo CD or Flux folder: its Secret, Namespace or Application are
    not the planner's (named, left out); a ConfigMap is read as a DatasetBuild's source; a document
    of llmfactory's group at a version it does not serve is refused, not left out."""
    docs = [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "openai", "namespace": "ml"}},
            {"apiVersion": "argoproj.io/v1alpha1", "kind": "Application", "metadata": {"name": "app"}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "prompts"}},
            {"apiVersion": "llmfactory.dev/v1", "kind": "FineTune", "metadata": {"name": "x"}}]
    rest, config_maps, others = config_maps_among(docs)
    assert others == ["Secret ml/openai", "Application default/app"]
    assert list(config_maps) == [("default", "prompts")]
    with pytest.raises(PlanError, match="expected apiVersion llmfactory.dev/v1alpha1"):
        [parse(doc) for doc in rest]


def test_llmfactory_plan_refuses_what_a_referenced_resources_spec_does_not_fit(tmp_path):
    """`llmfactory plan -f` (a CI step before a GitOps merge) checks each resource against the specs of
    those it references, as the operator and `llmfactory run` do."""
    dpo = copy.deepcopy(FT)
    dpo["spec"]["objective"] = "dpo"
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump_all([DATA, dpo]))
    plan_cli = [sys.executable, "-m", "llmfactory.cli", "plan", "-f", str(tmp_path / "pipeline.yaml")]
    refused = subprocess.run(plan_cli, capture_output=True, text=True)
    assert refused.returncode == 2 and "FineTune default/ft: spec.dataset.datasetBuildRef: DatasetBuild data writes " \
                                       "conversations (format chatml)" in refused.stderr, refused.stderr
    pairs = copy.deepcopy(DATA)
    pairs["spec"]["preferences"] = {"rejected": {"model": MODEL}}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump_all([pairs, dpo]))
    planned = subprocess.run(plan_cli, capture_output=True, text=True, check=True)
    assert "FineTune default/ft: waiting for DatasetBuild data (spec.dataset.datasetBuildRef) to succeed" in planned.stdout


@pytest.mark.parametrize("text, expected", [
    ("apiVersion: llmfactory.dev/v1alpha1\nkind: FineTune\nmetadata: {name: ft\n",
     ["pipeline.yaml: not valid YAML: while parsing a flow mapping", 'in "', 'pipeline.yaml", line 3, column 11']),
    ("- apiVersion: llmfactory.dev/v1alpha1\n- kind: FineTune\n",
     ["pipeline.yaml: document 1 is not a Kubernetes object (a mapping of apiVersion, kind, metadata and spec)"]),
    ("apiVersion: llmfactory.dev/v1alpha1\nkind: FineTune\nmetadata: ft\n",
     ["pipeline.yaml: document 1 is not a Kubernetes object"]),
])
def test_a_manifest_file_that_is_not_kubernetes_objects_is_refused_naming_the_file_and_line(tmp_path, text, expected):
    (tmp_path / "pipeline.yaml").write_text(text)
    for command in ("plan", "run"):
        refused = subprocess.run([sys.executable, "-m", "llmfactory.cli", command, "-f", str(tmp_path / "pipeline.yaml"),
                                  "--store", str(tmp_path / "store")], capture_output=True, text=True, cwd=tmp_path)
        out = " ".join((refused.stdout + refused.stderr).split())  # rich wraps long lines
        assert refused.returncode == 2 and "Traceback" not in out and all(e in out for e in expected), out
