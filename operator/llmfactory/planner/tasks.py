"""A resource plus the results of what it references -> the task document of one run.

The task is the whole contract with the runtime: it holds the spec with defaults filled in,
the resolved inputs (URIs and digests of upstream artifacts), where to write, and a digest
over all of that. Same inputs, same digest, same artifact prefix: finished work is reused.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from llmfactory_runtime.grader import reads_reference, unknown_placeholders

from .. import API_VERSION
from ..api import KINDS
from ..api.common import RUNTIME_ONLY_FIELDS, ApiModel, RewardModelSource, operational_fields
from ..api.quantization import CALIBRATED_TYPES
from .errors import PlanError
from .estimate import check_fits
from .graph import references, trained_models
from .manifests import Resource, config_map_bytes
from .promise import Promise, PromiseLookup, Unknown, trained_format

ResultLookup = Callable[[str, str, str], "dict[str, Any] | None"]  # (kind, namespace, name) -> status.result
ConfigMapLookup = Callable[[str, str], "dict[str, Any] | None"]  # (namespace, name) -> the ConfigMap


@dataclass(frozen=True)
class Waiting:
    """A referenced resource has no result yet."""

    kind: str
    name: str
    field: str
    estimate: dict[str, Any] | None = None  # a FineTune's resource estimate, known before its inputs

    @property
    def reason(self) -> str:
        until = "exist" if self.kind == "ConfigMap" else "succeed"
        return f"waiting for {self.kind} {self.name} ({self.field}) to {until}"


def canonical_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def artifact_uri(store_uri: str, res: Resource, digest: str) -> str:
    return f"{store_uri.rstrip('/')}/{res.namespace}/{res.kind.lower()}/{res.name}/{digest[:16]}"


ANY_FORMAT = "any"  # benchmark_metric_names before the dataset is known
# A Benchmark's perplexity of a model given as a source, or of a Quantization that kept no dataset.
PERPLEXITY_NEEDS_DATASET = "is required when the model does not come from a fineTuneRef"


def benchmark_metric_names(spec, baseline: bool, dataset_format: str | None = None) -> set[str]:
    """The metrics a Benchmark with this spec reports (what gates may name); dataset_format: its
    perplexity dataset's, whose preference pairs it scores too, and (against a baseline) unpaired
    rows' labelled answers; ANY_FORMAT: what it may report on any dataset."""
    names: set[str] = set()
    if spec.ranking:
        names |= {"ranking.accuracy", "ranking.margin"} | ({"ranking.baseline"} if baseline else set())
        for lang in spec.ranking.languages:
            names |= {f"ranking.accuracy.{lang}"} | ({f"ranking.baseline.{lang}"} if baseline else set())
    if spec.perplexity:
        names |= {"perplexity.value", "perplexity.allTokens"}
        if baseline:
            names |= {"perplexity.baseline", "perplexity.changePercent"}
        if dataset_format in ("preference", ANY_FORMAT):
            names |= {"preference.accuracy"} | ({"preference.baseline", "preference.rewardAccuracy"} if baseline else set())
        elif dataset_format == "unpaired" and baseline:
            names |= {"preference.rewardAccuracy"}
    if spec.reward:
        parts = [f".{part.name}" for part in spec.reward.grader.parts or []]  # a sum grader's, each apart
        for name in ("reward.value", *(["reward.baseline"] if baseline else [])):
            names |= {name} | {name + part for part in parts}
    if spec.judge:
        langs = spec.judge.languages
        if spec.judge.mode != "pairwise":
            names |= {"judge.score", "judge.turn1", "judge.turn2", "judge.unrated"} | {
                f"judge.score.{lang}" for lang in langs}
            if baseline:
                names |= {"judge.baseline", "judge.baseline.turn1", "judge.baseline.turn2"} | {
                    f"judge.baseline.{lang}" for lang in langs}
        if spec.judge.mode != "single":
            names |= {"judge.winRate", "judge.winRate.turn1", "judge.winRate.turn2", "judge.wins", "judge.ties",
                      "judge.losses", "judge.undecided"} | {f"judge.winRate.{lang}" for lang in langs}
    return names


def digest_spec(res: Resource) -> dict[str, Any]:
    """The part of the spec a run's result depends on, as the digest sees it: fields left at their
    default are left out, so a field added with a default in a later version (which the CRD then
    fills into every stored object) does not make finished resources run again after an upgrade.
    How often to checkpoint or where to report does not change what is computed either."""
    written = res.spec.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True, mode="json")
    digested = {k: v for k, v in written.items() if k not in operational_fields(res.kind)}
    for path in RUNTIME_ONLY_FIELDS:
        *parents, field = path.split(".")
        holder = digested
        for key in parents:
            holder = holder.get(key) or {}
        holder.pop(field, None)
    return digested


def plan(res: Resource, result_of: ResultLookup, store_uri: str, config_map_of: ConfigMapLookup | None = None,
         promise_of: PromiseLookup | None = None) -> dict[str, Any] | Waiting:
    """The task document for `res`, or Waiting when a referenced resource has not succeeded (or a
    ConfigMap it reads does not exist yet). Before it waits, `res` is checked against what those
    resources' specs promise (`promise_of`, where their manifests are known)."""
    _check_spec(res)
    estimate = check_fits(res) if res.kind == "FineTune" else None
    upstream: dict[str, dict[str, Any]] = {}
    waiting = None
    for path, kind, name in references(res):
        result = result_of(kind, res.namespace, name)
        if result is None:
            waiting = waiting or Waiting(kind, name, path, estimate.as_dict() if estimate else None)
            result = promise_of(kind, res.namespace, name) if promise_of else Promise()
        upstream[path] = result
    if waiting:
        _check_promises(res, upstream)
        return waiting
    res = _with_trained_models(res, upstream)
    inputs = _INPUTS[res.kind](res, upstream)
    if res.kind == "DatasetBuild":
        files = config_map_files(res, config_map_of)
        if isinstance(files, Waiting):
            return files
        if files:
            inputs["configMaps"] = files
    spec = {k: v for k, v in res.spec.wire().items() if k not in operational_fields(res.kind)}
    digested = digest_spec(res)
    body = {"phase": KINDS[res.kind].phase, "spec": spec, "inputs": inputs}
    digest = canonical_digest({**body, "spec": digested})
    task = {
        "apiVersion": API_VERSION,
        "kind": "Task",
        "resource": {"kind": res.kind, "namespace": res.namespace, "name": res.name},
        **body,
        "digest": digest,
        "artifactUri": artifact_uri(store_uri, res, digest),
        # Paid answers (teacher, judge) are kept per namespace, outside any run: a changed filter
        # or split is a new run that must not pay for them again.
        "cacheUri": f"{store_uri.rstrip('/')}/{res.namespace}/cache",
    }
    if estimate is not None:
        task["estimate"] = estimate.as_dict()
    return task


def _check_promises(res: Resource, upstream: dict[str, dict[str, Any]]) -> None:
    """The checks of the inputs, made on what the referenced resources promise: the first that reads
    what only a result will say ends them, to be made again with the results."""
    try:
        _INPUTS[res.kind](_with_trained_models(res, upstream), upstream)
    except Unknown:
        pass


def config_map_files(res: Resource, config_map_of: ConfigMapLookup | None) -> dict[str, dict] | Waiting:
    """{source index: {name, key, sha256}} for the sources kept in ConfigMaps: the content's
    digest goes into the task's, so an edited ConfigMap is a new run."""
    files: dict[str, dict[str, Any]] = {}
    for i, source in enumerate(res.spec.sources):
        if source.config_map is None:
            continue
        field, ref = f"spec.sources[{i}].configMap", source.config_map
        if config_map_of is None:
            raise PlanError(res.ref, field, "a ConfigMap source needs a cluster, or the ConfigMap among the manifests")
        found = config_map_of(res.namespace, ref.name)
        if found is None:
            return Waiting("ConfigMap", ref.name, field)
        content = config_map_bytes(found, ref.key)
        if content is None:
            keys = sorted({**(found.get("data") or {}), **(found.get("binaryData") or {})})
            raise PlanError(res.ref, f"{field}.key", f"ConfigMap {ref.name} has no key {ref.key!r} (it has: {keys})")
        files[str(i)] = {"name": ref.name, "key": ref.key, "sha256": hashlib.sha256(content).hexdigest()}
    return files


# What a DatasetBuild wrote, by its result's format, and the setting there that writes each.
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


def _check_built_references(res: Resource, field: str, grader, dataset: dict[str, Any]) -> None:
    """A DatasetBuild's graded rows hold each prompt's reference in field reference: every part of the
    grader that compares with a reference must read it there."""
    if dataset["format"] == "graded":
        _check_references(res, field, grader, ["reference"], "the DatasetBuild's rows (format graded) hold each "
                          "prompt's reference answer in field 'reference': set referenceField: reference (the default)")


def _check_references(res: Resource, field: str, grader, held: list[str], why: str) -> None:
    """Every part of the grader that compares with a reference must read it in one of the fields the
    rows hold one in (`held`); `why` says which rows hold what, and what to set."""
    parts = [(f"{field}.parts[{i}]", part) for i, part in enumerate(grader.parts)] if grader.parts else [(field, grader)]
    for where, part in parts:
        if reads_reference(part.wire()) and part.reference_field not in held:
            raise PlanError(res.ref, f"{where}.referenceField", f"is {part.reference_field!r}, but {why}")


def _model(source) -> dict[str, Any]:
    return source.wire()


def _dataset_build_inputs(res: Resource, upstream: dict) -> dict[str, Any]:
    spec, inputs = res.spec, {}
    teacher_model = spec.teacher and spec.teacher.model
    if teacher_model:
        inputs["teacher"] = _model(teacher_model)
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
        inputs["tokenizer"] = _model(tokenizer)
    if spec.filters.judge and spec.filters.judge.model:
        inputs["judge"] = _model(spec.filters.judge.model)
    if spec.preferences and spec.preferences.rejected.model:
        inputs["rejected"] = _model(spec.preferences.rejected.model)
    if spec.difficulty and spec.difficulty.model:
        inputs["difficulty"] = _model(spec.difficulty.model)
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


def _fine_tune_inputs(res: Resource, upstream: dict) -> dict[str, Any]:
    objective, built = res.spec.objective, res.spec.dataset.dataset_build_ref
    reads, use, elsewhere = OBJECTIVE_READS[objective]
    dataset = _dataset(res, res.spec.dataset, upstream, "spec.dataset", reads, f"objective {objective} {use}",
                       elsewhere)
    if objective == "grpo":
        _check_built_references(res, "spec.grpo.grader", res.spec.grpo.grader, dataset)
        # A build measured pass rates where its result says what difficulty's sampling asked.
        if res.spec.grpo.prompt_order == "easyFirst" and built and "difficultyUsage" not in upstream[
                "spec.dataset.datasetBuildRef"]:
            raise PlanError(res.ref, "spec.grpo.promptOrder", f"is easyFirst, which orders the prompts by their "
                            f"pass_rate, but DatasetBuild {built.name} measures none: set spec.difficulty there "
                            "(the student answers each prompt and the grader scores it), or leave promptOrder unset "
                            "(shuffled)")
    dataset["format"] = trained_format(objective, built is not None, dataset["format"])
    return {"baseModel": _base_model(res, upstream), "dataset": dataset}


def _check_spec(res: Resource) -> None:
    """What a spec shows wrong by itself, refused before it waits on anything: not once the FineTune or
    DatasetBuild it waits for has run for hours. A gate is checked against the metrics the Benchmark may
    report on any dataset, and again once it is planned (those of a preference dataset depend on it)."""
    spec = res.spec
    if res.kind == "FineTune":
        _check_chat_template(res)
        if spec.objective == "grpo":
            _check_grader(res, "spec.grpo.grader", spec.grpo.grader)
            _check_engine(res, "spec.grpo.engine", spec.grpo.engine, _model(spec.base_model))
    elif res.kind == "DatasetBuild":
        _check_pattern(res, "spec.referencePattern", spec.reference_pattern)
        # Models named by fineTuneRef are a FineTune's merged safetensors, which vLLM reads.
        for field, part in (("spec.teacher", spec.teacher), ("spec.preferences.rejected",
                                                              spec.preferences and spec.preferences.rejected),
                            ("spec.difficulty", spec.difficulty)):
            if part and part.model:
                _check_engine(res, f"{field}.engine", part.engine, _model(part.model))
        if spec.difficulty:
            _check_grader(res, "spec.difficulty.grader", spec.difficulty.grader)
            _check_built_references(res, "spec.difficulty.grader", spec.difficulty.grader, {"format": "graded"})
    elif res.kind == "Quantization":
        _check_quantization_types(res)
    elif res.kind == "Benchmark":
        _check_benchmark_spec(res)


def _check_benchmark_spec(res: Resource) -> None:
    """A Benchmark's checks of its spec alone: what needs a baseline where it can have none, a model
    given as a source that vLLM cannot serve, its reward's grader, its gates."""
    spec = res.spec
    # Its baseline: the baselineModel, else the base of the FineTune it measures (none for a reward model's).
    baseline = spec.baseline and bool(spec.baseline_model or (spec.model.fine_tune_ref and not spec.ranking))
    if spec.judge and spec.judge.mode != "single" and not baseline and not spec.judge.opponent_answers_uri:
        raise PlanError(res.ref, "spec.judge.mode", f"is {spec.judge.mode}, which compares the model with its "
                        "baseline, the base model of a fineTuneRef; this model has none: name one in "
                        "spec.baselineModel, give spec.judge.opponentAnswersUri, or use mode single")
    if spec.perplexity and not spec.perplexity.dataset and spec.model.source:
        raise PlanError(res.ref, "spec.perplexity.dataset", PERPLEXITY_NEEDS_DATASET)
    sources = [spec.model.source] + ([spec.baseline_model.source] if spec.baseline and spec.baseline_model else [])
    for source in filter(None, sources):  # a fineTuneRef's or quantizationRef's model: once it is known
        for part, field in ((spec.judge, "spec.judge.engine"), (spec.reward, "spec.reward.engine")):
            if part:
                _check_engine(res, field, part.engine, _model(source))
    if spec.reward:
        _check_grader(res, "spec.reward.grader", spec.reward.grader)
    _check_gates(res, benchmark_metric_names(spec, baseline, ANY_FORMAT))


def _check_quantization_types(res: Resource) -> None:
    gpus = res.spec.resources.gpus_per_node if res.spec.resources else None
    if "awq" in res.spec.types and gpus == 0:
        raise PlanError(res.ref, "spec.resources.gpusPerNode", "is 0, but awq runs on a CUDA GPU (llmcompressor's "
                        "AWQ); leave it unset or give 1, or use gptq or fp8, which also run on CPU")
    if res.spec.importance_matrix and not any(t.endswith(("_k", "_k_m", "_k_s")) for t in res.spec.types):
        raise PlanError(res.ref, "spec.importanceMatrix", "applies to K-quants only (q4_k_m, q5_k_m, q6_k, ...)")


def _check_chat_template(res: Resource) -> None:
    """Refuse, before a Job runs, a chatTemplateJinja that does not parse (in transformers' own Jinja
    environment: sandboxed, with loop controls); how it renders is the runtime's to check."""
    if res.spec.chat_template_jinja is None:
        return
    from jinja2 import TemplateSyntaxError  # noqa: PLC0415
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(res.spec.chat_template_jinja)
    except TemplateSyntaxError as e:
        raise PlanError(res.ref, "spec.chatTemplateJinja", f"does not parse as Jinja: line {e.lineno}: {e.message}") from None


def _grades_tool_calls(grader) -> bool:
    """Whether the grader's references are all tool calls, which conversations hold (a toolCalls part,
    and no other part that reads a reference field)."""
    compared = [p for p in (grader.parts or [grader]) if reads_reference(p.wire())]
    return bool(compared) and all(p.operation == "toolCalls" for p in compared)


def _check_grader(res: Resource, field: str, grader) -> None:
    """Refuse, before a Job runs, a grader the runtime could not use: an extract Python's re cannot
    compile, a judge's prompt's {{...}} that names nothing, or python source that does not parse or defines
    no grade(sample, item); a sum's parts alike."""
    for i, part in enumerate(getattr(grader, "parts", None) or []):
        _check_grader(res, f"{field}.parts[{i}]", part)
    _check_pattern(res, f"{field}.extract", grader.extract)
    folded = [label.casefold() for label in grader.labels or []]
    if len(set(folded)) < len(folded):  # the judge's [[label]] is read case aside
        raise PlanError(res.ref, f"{field}.labels", f"{grader.labels} holds two labels that differ only in case")
    unknown = unknown_placeholders(grader.prompt or "")
    if unknown:
        raise PlanError(res.ref, f"{field}.prompt", f"has {{{{{unknown[0]}}}}}, which names nothing: write "
                        "{{sample.output_text}} (the answer), {{prompt}} (the prompt's last user message) or "
                        "{{item.<field>}} (a field of the row)")
    if grader.source is None:
        return
    try:
        module = ast.parse(grader.source)
    except SyntaxError as e:
        raise PlanError(res.ref, f"{field}.source", f"does not parse as Python: line {e.lineno}: {e.msg}") from None
    grade, bound = None, set()  # bound: names the top level assigns or imports (grade = ..., from x import grade)
    for node in module.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "grade":
            grade = node
        elif isinstance(node, ast.Assign):
            bound |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {a.asname or a.name for a in node.names}
    if grade is None and "grade" not in bound:
        raise PlanError(res.ref, f"{field}.source", "defines no function grade(sample, item) at its top level")
    if isinstance(grade, ast.AsyncFunctionDef):
        raise PlanError(res.ref, f"{field}.source", "grade is async: it must be a plain function grade(sample, item)")
    if grade is not None:
        positional = len(grade.args.posonlyargs + grade.args.args)
        if positional - len(grade.args.defaults) > 2 or positional < 2 and not grade.args.vararg:
            raise PlanError(res.ref, f"{field}.source", "grade must take two arguments, grade(sample, item)")


def _check_pattern(res: Resource, field: str, pattern: str | None) -> None:
    """Refuse a regular expression the runtime's re (Python's) cannot compile."""
    try:
        re.compile(pattern or "")
    except re.error as e:
        raise PlanError(res.ref, field, f"{pattern!r} is not a regular expression (Python's re): {e}") from None


def _base_model(res: Resource, upstream: dict) -> dict[str, Any]:
    """A FineTune's base: its source, or the merged model of the FineTune it names (whose URI holds
    that one's task digest, so a retrained base is a new run here too)."""
    ref = res.spec.base_model.fine_tune_ref
    if ref is None:
        return _model(res.spec.base_model)
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
    return _model(spec.source), None, None


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
        use = "benchmark it with spec.ranking" if res.kind == "Benchmark" else "there is nothing to quantize"
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


def _check_engine(res: Resource, field: str, engine: str, model: dict[str, Any]) -> None:
    """vLLM runs on a GPU and reads safetensors, not GGUF (a Quantization's GGUF file, a source's ggufFile)."""
    if engine != "vllm":
        return
    gguf = model.get("ggufFile") or (model.get("uri") or "").rsplit("/", 1)[-1]
    if gguf.endswith(".gguf"):
        raise PlanError(res.ref, field, f"is vllm, but the model is the GGUF file {gguf}, which vLLM does not "
                        "load: use engine transformers (or auto), or a Quantization with format compressed-tensors")
    if res.spec.resources and res.spec.resources.gpus_per_node == 0:
        raise PlanError(res.ref, "spec.resources.gpusPerNode", f"is 0, but {field} is vllm, which runs on a GPU: "
                        "leave it unset or give 1 or more, or use engine transformers (or auto)")


def _benchmark_inputs(res: Resource, upstream: dict) -> dict[str, Any]:
    spec = res.spec
    model, base, trained_on = _trained_model(res, upstream)
    if spec.ranking:  # a reward model's base is a language model: nothing to rank pairs with
        base = None
    if spec.baseline_model:  # another model to compare with than the FineTune's base
        base = _trained_model(res, upstream, "spec.baselineModel")[0]
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
        _check_engine(res, "spec.judge.engine", spec.judge.engine, model)
        if baseline:
            _check_engine(res, "spec.judge.engine", spec.judge.engine, baseline)
    if spec.judge and spec.judge.model:
        inputs["judge"] = _model(spec.judge.model)
    if spec.reward:
        for source in (model, baseline) if baseline else (model,):
            _check_engine(res, "spec.reward.engine", spec.reward.engine, source)
        if spec.reward.dataset:
            inputs["rewardDataset"] = _dataset(res, spec.reward.dataset, upstream, "spec.reward.dataset",
                                               ("prompts with reference answers",),
                                               "spec.reward grades answers to prompts with reference answers",
                                               "such rows ({messages} ending with a user turn, beside "
                                               "reward.grader.referenceField)")
            _check_built_references(res, "spec.reward.grader", spec.reward.grader, inputs["rewardDataset"])
        elif trained_on and trained_on["format"] == "graded":
            held = trained_on.get("referenceFields")
            if held is not None:
                _check_references(res, "spec.reward.grader", spec.reward.grader, held,
                                  f"the prompts {_trainer(res)} trained on hold a string or a number in every row "
                                  f"only in fields {held}: set referenceField to the one with the reference answer, "
                                  "or name spec.reward.dataset")
            inputs["rewardDataset"] = trained_on
        elif trained_on and trained_on["format"] == "chatml" and _grades_tool_calls(spec.reward.grader):
            inputs["rewardDataset"] = trained_on  # its conversations' calls are the references
        else:
            raise PlanError(res.ref, "spec.reward.dataset", "is required unless the model comes from a fineTuneRef "
                            "that trained with objective grpo, or a quantizationRef of one (whose prompts and "
                            "reference answers it reads), or the grader is toolCalls and the FineTune trained on "
                            "conversations: name a dataset of prompts with reference answers")
    _check_gates(res, benchmark_metric_names(spec, baseline is not None, (inputs.get("dataset") or {}).get("format")))
    return inputs


def _check_gates(res: Resource, known: set[str]) -> None:
    """Each gate names a metric in `known` or of a listed lm-eval task (whose metrics its YAML names)."""
    tasks = set(res.spec.lm_eval.tasks) if res.spec.lm_eval else set()
    for i, gate in enumerate(res.spec.gates):
        parts = gate.metric.split(".")
        of_task = parts[0] == "lmEval" and len(parts) >= 3 and parts[-2] in tasks
        if gate.metric not in known and not of_task:
            valid = sorted(known) + [f"lmEval.{t}.<metric>" for t in sorted(tasks)]
            raise PlanError(res.ref, f"spec.gates[{i}].metric",
                            f"{gate.metric!r} is not reported by this benchmark; valid: {valid}")




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
