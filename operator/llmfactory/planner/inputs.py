"""What each kind reads of the resources it references: their results' URIs and digests, checked
against what it does with them (a DPO FineTune reads preference pairs; a Quantization, a merged model).
Before they have results, the same checks run on what their specs promise (promise.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..api.common import ApiModel, RewardModelSource
from ..api.quantization import CALIBRATED_TYPES
from .checks import (PERPLEXITY_NEEDS_DATASET, benchmark_metric_names, check_built_references, check_engine,
                     check_gates, check_references, grades_tool_calls)
from .digest import canonical_digest
from .errors import PlanError
from .graph import trained_models
from .manifests import Resource
from .promise import Unknown, trained_format


# What a DatasetBuild writes, by its result's format, and the setting there that writes each.
BUILT = {"chatml": "conversations", "sharegpt": "conversations", "preference": "preference pairs",
         "graded": "prompts with reference answers", "text": "documents"}
HOW_BUILT = {"conversations": "leave spec.format chatml (or sharegpt) there",
             "preference pairs": "set spec.preferences there (or read pairs: sources with fields preference)",
             "prompts with reference answers": "set spec.format graded there",
             "documents": "set spec.format text there"}


def _dataset(res: Resource, dataset, upstream: dict, path: str, reads: tuple[str, ...], use: str,
             elsewhere: str) -> dict[str, Any]:
    """The dataset's URI, format and digest. A DatasetBuild's must have written one of `reads` (BUILT's
    kinds), else it is refused naming the field, what `use` needs, and where to get it: that build's
    setting, or `elsewhere`, the rows to point dataset.uri at."""
    if not dataset.dataset_build_ref:
        return {"uri": dataset.uri, "format": "chatml", "digest": canonical_digest(dataset.uri)}
    r, name = upstream[f"{path}.datasetBuildRef"], dataset.dataset_build_ref.name
    if BUILT[r["format"]] not in reads:
        raise PlanError(res.ref, f"{path}.datasetBuildRef", f"DatasetBuild {name} writes {BUILT[r['format']]} "
                        f"(format {r['format']}), but {use}: {HOW_BUILT[reads[0]]}, or point dataset.uri at "
                        f"{elsewhere}")
    return {"uri": r["uri"], "format": r["format"], "digest": r["digest"]}


def _dataset_build_inputs(res: Resource, upstream: dict) -> dict[str, Any]:
    spec, inputs = res.spec, {}
    teacher_model = spec.teacher and spec.teacher.model
    if teacher_model:
        inputs["teacher"] = teacher_model.wire()
    # The tokens maxPromptTokens counts, and without a teacher maxAnswerTokens (a teacher counts its own).
    counted = [name for name, limit in (("maxPromptTokens", spec.filters.max_prompt_tokens),
                                        ("maxAnswerTokens", spec.teacher is None and spec.filters.max_answer_tokens))
               if limit]
    if counted:
        tokenizer = spec.filters.tokenizer or teacher_model
        if tokenizer is None:
            whose = "an openai teacher" if spec.teacher else "no teacher"
            raise PlanError(res.ref, "spec.filters.tokenizer", f"is required with {' and '.join(counted)} and {whose}: "
                                                              "name the model whose tokens count (the student's)")
        inputs["tokenizer"] = tokenizer.wire()
    if spec.filters.judge and spec.filters.judge.model:
        inputs["judge"] = spec.filters.judge.model.wire()
    if spec.preferences and spec.preferences.rejected.model:
        inputs["rejected"] = spec.preferences.rejected.model.wire()
    if spec.difficulty and spec.difficulty.model:
        inputs["difficulty"] = spec.difficulty.model.wire()
    return inputs


# What each objective reads of a DatasetBuild's rows (BUILT's kinds, the first the one to build), in
# words, and the rows it reads at a dataset.uri instead.
OBJECTIVE_READS = {
    "sft": (("conversations", "preference pairs", "documents"), "learns from answers", "conversations"),
    "dpo": (("preference pairs",), "trains on preference pairs", "preference rows"),
    "reward": (("preference pairs",), "trains on preference pairs", "preference rows"),
    "kto": (("preference pairs",), "trains on answers labelled desirable or not",
            "unpaired rows (prompt, completion, label) or preference rows"),
    "grpo": (("prompts with reference answers",), "trains on prompts with reference answers for its grader",
             "such rows ({messages} ending with a user turn, beside grpo.grader.referenceField)"),
}


def _graded(reads: tuple[str, ...], grader) -> tuple[str, ...]:
    """What a grader's prompts may be read from: `reads`, and for a grader of tool calls alone, conversations
    too (a DatasetBuild's chatml keeps function-calling rows whole): their calling turns are the prompts,
    their calls the references."""
    return (*reads, "conversations") if grades_tool_calls(grader) else reads


def _check_calls_kept(res: Resource, path: str, dataset: dict[str, Any], grader) -> None:
    """A grader of tool calls reads them in conversations a DatasetBuild kept whole, which only chatml
    writes: its ShareGPT rows hold none."""
    if dataset["format"] == "sharegpt" and grades_tool_calls(grader):
        raise PlanError(res.ref, f"{path}.datasetBuildRef", "writes ShareGPT rows, which hold no tool calls for grader "
                        "toolCalls to compare with (a build keeps function-calling rows whole only in chatml): set "
                        "spec.format chatml there")


def _fine_tune_inputs(res: Resource, upstream: dict) -> dict[str, Any]:
    objective, built = res.spec.objective, res.spec.dataset.dataset_build_ref
    reads, use, elsewhere = OBJECTIVE_READS[objective]
    if objective == "grpo":
        reads = _graded(reads, res.spec.grpo.grader)
    dataset = _dataset(res, res.spec.dataset, upstream, "spec.dataset", reads, f"objective {objective} {use}",
                       elsewhere)
    if objective == "grpo":
        check_built_references(res, "spec.grpo.grader", res.spec.grpo.grader, dataset)
        _check_calls_kept(res, "spec.dataset", dataset, res.spec.grpo.grader)
        # A build measured pass rates where its result says what difficulty's sampling asked.
        if res.spec.grpo.prompt_order == "easyFirst" and built and "difficultyUsage" not in upstream[
                "spec.dataset.datasetBuildRef"]:
            raise PlanError(res.ref, "spec.grpo.promptOrder", f"is easyFirst, which orders the prompts by their "
                            f"pass_rate, but DatasetBuild {built.name} measures none: set spec.difficulty there "
                            "(the student answers each prompt and the grader scores it), or leave promptOrder unset "
                            "(shuffled)")
    dataset["format"] = trained_format(objective, built is not None, dataset["format"])
    return {"baseModel": _base_model(res, upstream), "dataset": dataset}


def _base_model(res: Resource, upstream: dict) -> dict[str, Any]:
    """A FineTune's base: its source, or the merged model of the FineTune it names (whose URI holds
    that one's task digest, so a retrained base is a new run here too)."""
    ref = res.spec.base_model.fine_tune_ref
    if ref is None:
        return res.spec.base_model.as_source()
    trained = upstream["spec.baseModel.fineTuneRef"]
    if trained.get("objective") == "reward" and res.spec.objective != "reward":
        raise PlanError(res.ref, "spec.baseModel.fineTuneRef", f"FineTune {ref.name} trains a reward model, which "
                        f"scores conversations and cannot write them: objective {res.spec.objective} needs a language "
                        "model (name its base, or the FineTune that trained it)")
    if not trained.get("modelUri"):  # an adapter alone is relative to a base this run would not know
        raise PlanError(res.ref, "spec.baseModel.fineTuneRef", f"FineTune {ref.name} keeps only its adapter "
                        "(spec.mergeAdapter: false); set mergeAdapter: true there to train on its model")
    return {"uri": trained["modelUri"]}


def _trained_model(res: Resource, upstream: dict, field: str = "spec.model") -> tuple[dict, dict | None, dict | None]:
    """(model, its base model, the dataset it was trained on) for a model input with refs: the
    resource's spec.model, or another field of that type (a Benchmark's spec.baselineModel)."""
    spec = res.spec.baseline_model if field == "spec.baselineModel" else res.spec.model
    if spec.fine_tune_ref:
        ft = upstream[f"{field}.fineTuneRef"]
        _check_ranks(res, f"{field}.fineTuneRef", ft)
        if res.kind == "Quantization" and not ft.get("modelUri"):  # conversion reads a whole safetensors model
            raise PlanError(res.ref, f"{field}.fineTuneRef", f"FineTune {spec.fine_tune_ref.name} keeps only its "
                            "adapter (spec.mergeAdapter: false); set mergeAdapter: true there to quantize it")
        dataset = {"uri": ft["datasetUri"], "format": ft["datasetFormat"], "digest": ft["datasetDigest"],
                   **_reference_fields(ft)}
        if ft.get("modelUri"):
            return {"uri": ft["modelUri"], "digest": ft["digest"]}, ft["baseModel"], dataset
        # A Benchmark evaluates the adapter on its base, merged when loaded.
        return {**ft["baseModel"], "adapterUri": ft["adapterUri"], "digest": ft["digest"]}, ft["baseModel"], dataset
    if getattr(spec, "quantization_ref", None):
        q = upstream[f"{field}.quantizationRef"]
        first = q["artifacts"][0]
        dataset = ({"uri": q["datasetUri"], "format": q["datasetFormat"], "digest": q["datasetDigest"],
                    **_reference_fields(q)} if q.get("datasetUri") else None)
        if not first["uri"].endswith(".gguf"):  # a compressed-tensors folder
            return {"uri": first["uri"], "digest": first["sha256"]}, None, dataset
        folder, gguf_file = first["uri"].rsplit("/", 1)
        return {"uri": folder, "ggufFile": gguf_file, "digest": first["sha256"]}, None, dataset
    return spec.source.wire(), None, None


def _reference_fields(result: dict) -> dict[str, list[str]]:
    """Where a GRPO FineTune's prompts (or a Quantization's of such a model, passed on) hold references,
    for a Benchmark's reward grader to be checked against: none known of an earlier release's result."""
    held = result.get("datasetReferenceFields")
    return {"referenceFields": held} if held is not None else {}


def _check_ranks(res: Resource, field: str, trained: dict) -> None:
    """A reward model (objective reward) is what a Benchmark's ranking scores, and all it scores: it
    writes no text, so a Quantization or another Benchmark section has nothing to read, and a
    language model has no score to rank pairs by. Its model, merged: an adapter alone is a score
    layer and low-rank weights for a base it would be loaded onto."""
    name, reward = field.removesuffix(".fineTuneRef"), trained.get("objective") == "reward"
    ranking = res.kind == "Benchmark" and res.spec.ranking is not None
    ref = (res.spec.baseline_model if name == "spec.baselineModel" else res.spec.model).fine_tune_ref.name
    if reward and not ranking:
        use = "benchmark it with spec.ranking" if res.kind == "Benchmark" else "there is nothing to quantize; benchmark it with a " \
              "Benchmark's spec.ranking"
        raise PlanError(res.ref, field, f"FineTune {ref} trains a reward model, which scores conversations and "
                        f"writes none: {use} (how it ranks held-out preference pairs), or use it as "
                        "grader.rewardModel (fineTuneRef) of a GRPO FineTune or a Benchmark's reward")
    if ranking and not reward:
        raise PlanError(res.ref, field, f"FineTune {ref} trains with objective {trained.get('objective') or 'sft'}, "
                        "so it is a language model, which spec.ranking cannot score: name a FineTune with objective "
                        "reward (a language model's preference is perplexity's preference.accuracy on preference pairs)")
    if ranking and not trained.get("modelUri"):
        raise PlanError(res.ref, field, f"FineTune {ref} keeps only its adapter (spec.mergeAdapter: false); set "
                        "mergeAdapter: true there to rank pairs with its model")


def _with_trained_models(res: Resource, upstream: dict) -> Resource:
    """res with each model it names by fineTuneRef to read (graph.trained_models: a teacher, a judge,
    a grader's reward model...) replaced by that FineTune's merged model, by URI: the task reads it
    there and its digest holds it (the URI holds that FineTune's task digest, so a retrained model is
    a new run here too). A reward model where text is written or graded, a language model where a
    reward model scores, and an adapter alone are refused naming the field."""
    uris = {}
    for path, source in trained_models(res.spec):
        field, name = f"{path}.fineTuneRef", source.fine_tune_ref.name
        trained, scores = upstream[field], isinstance(source, RewardModelSource)
        if scores and trained.get("objective") != "reward":
            raise PlanError(res.ref, field, f"FineTune {name} trains with objective "
                            f"{trained.get('objective') or 'sft'}, so it is a language model, not a reward model: "
                            "name a FineTune with objective reward")
        if not scores and trained.get("objective") == "reward":
            raise PlanError(res.ref, field, f"FineTune {name} trains a reward model, which scores conversations and "
                            "writes none: name a FineTune that trained a language model")
        if not trained.get("modelUri"):
            raise PlanError(res.ref, field, f"FineTune {name} keeps only its adapter (spec.mergeAdapter: false); "
                            "set mergeAdapter: true there to read its model")
        uris[path] = trained["modelUri"]
    return dataclasses.replace(res, spec=_replaced(res.spec, "spec", uris)) if uris else res


def _replaced(node: Any, path: str, uris: dict[str, str]) -> Any:
    """node (a spec or part of one at path) with the sources at the paths in uris read from those URIs."""
    if path in uris:
        return node.model_copy(update={"fine_tune_ref": None, "uri": uris[path]})
    if isinstance(node, list):
        return [_replaced(item, f"{path}[{i}]", uris) for i, item in enumerate(node)]
    if not isinstance(node, ApiModel):
        return node
    updates = {name: new for name, field in type(node).model_fields.items()
               if (new := _replaced(old := getattr(node, name), f"{path}.{field.alias or name}", uris)) is not old}
    return node.model_copy(update=updates) if updates else node


def _rendered_with(model: dict[str, Any], spec) -> dict[str, Any]:
    """A model input with the chat template arguments (chatTemplateKwargs) of the model under test
    `spec` names; as it was where it names none (so that a task's digest is what it was)."""
    return {**model, "chatTemplateKwargs": spec.chat_template_kwargs} if spec.chat_template_kwargs else model


def _benchmark_inputs(res: Resource, upstream: dict) -> dict[str, Any]:
    spec = res.spec
    model, base, trained_on = _trained_model(res, upstream)
    if spec.ranking:  # a reward model's base is a language model: nothing to rank pairs with
        base = None
    if spec.baseline_model:  # another model to compare with than the FineTune's base
        base = _trained_model(res, upstream, "spec.baselineModel")[0]
    model, base = _rendered_with(model, spec.model), base and _rendered_with(base, spec.baseline_model or spec.model)
    baseline = base if spec.baseline else None
    inputs: dict[str, Any] = {"model": model, "baseline": baseline}
    if spec.ranking:
        inputs["rankingDataset"] = _ranking_dataset(res, upstream, trained_on)
    if spec.perplexity:
        if spec.perplexity.dataset:
            inputs["dataset"] = _dataset(res, spec.perplexity.dataset, upstream, "spec.perplexity.dataset",
                                         ("conversations", "preference pairs", "documents"),
                                         "perplexity is measured on answers and documents", "conversations")
        elif trained_on and trained_on["format"] == "graded":
            raise PlanError(res.ref, "spec.perplexity.dataset", f"is required: {_trainer(res)} trains with objective "
                            "grpo on prompts without answers, which perplexity cannot be measured on; name a dataset "
                            "of conversations")
        elif trained_on:
            inputs["dataset"] = trained_on
        else:
            raise PlanError(res.ref, "spec.perplexity.dataset", PERPLEXITY_NEEDS_DATASET)
    if spec.judge:
        check_engine(res, "spec.judge.engine", spec.judge.engine, model)
        if baseline:
            check_engine(res, "spec.judge.engine", spec.judge.engine, baseline)
    if spec.judge and spec.judge.model:
        inputs["judge"] = spec.judge.model.wire()
    if spec.reward:
        for source in (model, baseline) if baseline else (model,):
            check_engine(res, "spec.reward.engine", spec.reward.engine, source)
        if spec.reward.dataset:
            inputs["rewardDataset"] = _dataset(res, spec.reward.dataset, upstream, "spec.reward.dataset",
                                               _graded(("prompts with reference answers",), spec.reward.grader),
                                               "spec.reward grades answers to prompts with reference answers",
                                               "such rows ({messages} ending with a user turn, beside "
                                               "reward.grader.referenceField)")
            check_built_references(res, "spec.reward.grader", spec.reward.grader, inputs["rewardDataset"])
            _check_calls_kept(res, "spec.reward.dataset", inputs["rewardDataset"], spec.reward.grader)
        elif trained_on and trained_on["format"] == "graded":
            held = trained_on.get("referenceFields")
            if held is not None:
                check_references(res, "spec.reward.grader", spec.reward.grader, held,
                                  f"the prompts {_trainer(res)} trained on hold a string or a number in every row "
                                  f"only in fields {held}: set referenceField to the one with the reference answer, "
                                  "or name spec.reward.dataset")
            inputs["rewardDataset"] = trained_on
        elif trained_on and trained_on["format"] == "chatml" and grades_tool_calls(spec.reward.grader):
            inputs["rewardDataset"] = trained_on  # its conversations' calls are the references
        else:
            raise PlanError(res.ref, "spec.reward.dataset", "is required unless the model comes from a fineTuneRef "
                            "that trained with objective grpo, or a quantizationRef of one (whose prompts and "
                            "reference answers it reads), or the grader is toolCalls and the FineTune trained on "
                            "conversations: name a dataset of prompts with reference answers")
    check_gates(res, benchmark_metric_names(spec, baseline is not None, (inputs.get("dataset") or {}).get("format")))
    return inputs


def _trainer(res: Resource) -> str:
    """The FineTune a Benchmark's model comes from, in words."""
    ref = res.spec.model
    return (f"FineTune {ref.fine_tune_ref.name}" if ref.fine_tune_ref else
            f"the FineTune that Quantization {ref.quantization_ref.name} quantized")


def _ranking_dataset(res: Resource, upstream: dict, trained_on: dict | None) -> dict[str, Any]:
    """spec.ranking's preference pairs: its dataset, or those the reward model trained on."""
    if res.spec.ranking.dataset:
        return _dataset(res, res.spec.ranking.dataset, upstream, "spec.ranking.dataset", ("preference pairs",),
                        "a reward model ranks preference pairs", "preference rows")
    if trained_on is None:
        raise PlanError(res.ref, "spec.ranking.dataset", "is required when the model does not come from a "
                        "fineTuneRef: name preference rows (prompt, chosen, rejected)")
    return trained_on


def _quantization_inputs(res: Resource, upstream: dict) -> dict[str, Any]:
    model, _, trained_on = _trained_model(res, upstream)
    calibrated = [t for t in res.spec.types if t in CALIBRATED_TYPES]
    # Prompts alone: nothing to calibrate or validate on. The dataset is still passed on in the result,
    # for a Benchmark of the quantized model to read its reward prompts from.
    if trained_on and trained_on["format"] == "graded":
        validation = res.spec.validation
        needs = ("spec.types" if calibrated else "spec.importanceMatrix" if res.spec.importance_matrix else
                 "spec.validation.minTopTokenAgreementPercent" if validation.min_top_token_agreement_percent is not None
                 else "spec.validation.maxPerplexityIncreasePercent"
                 if validation.max_perplexity_increase_percent is not None else None)
        if needs:
            raise PlanError(res.ref, needs, f"needs conversations with answers, but FineTune "
                            f"{res.spec.model.fine_tune_ref.name} trains with objective grpo on prompts alone "
                            "(its answers are sampled in training)")
    if calibrated and not trained_on:
        raise PlanError(res.ref, "spec.types", f"{calibrated[0]} calibrates on the rows a model was tuned on "
                        "(conversations or documents), which only a fineTuneRef model provides (its dataset's "
                        "train split); fp8 needs none")
    if res.spec.importance_matrix and not trained_on:
        raise PlanError(res.ref, "spec.importanceMatrix", "needs calibration data, which only a fineTuneRef model "
                                                          "provides (its dataset's train split)")
    if res.spec.validation.min_top_token_agreement_percent is not None and not trained_on:
        raise PlanError(res.ref, "spec.validation.minTopTokenAgreementPercent",
                        "needs held-out data, which only a fineTuneRef model provides")
    if res.spec.validation.max_perplexity_increase_percent is not None and not trained_on:
        raise PlanError(res.ref, "spec.validation.maxPerplexityIncreasePercent",
                        "needs held-out data, which only a fineTuneRef model provides")
    return {"model": model, "dataset": trained_on}


_INPUTS = {
    "DatasetBuild": _dataset_build_inputs,
    "FineTune": _fine_tune_inputs,
    "Benchmark": _benchmark_inputs,
    "Quantization": _quantization_inputs,
}


def inputs_of(res: Resource, upstream: dict[str, dict[str, Any]]) -> tuple[Resource, dict[str, Any]]:
    """`res` with the models it names by fineTuneRef read by URI, and its task's inputs, from the
    results of what it references (`upstream`, by field path); what does not fit them is refused."""
    res = _with_trained_models(res, upstream)
    return res, _INPUTS[res.kind](res, upstream)


def check_promises(res: Resource, upstream: dict[str, dict[str, Any]]) -> None:
    """inputs_of's checks, made on what the referenced resources promise: the first that reads what
    only a result will say ends them, to be made again with the results."""
    try:
        inputs_of(res, upstream)
    except Unknown:
        pass
