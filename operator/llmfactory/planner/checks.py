"""What a spec shows wrong by itself, refused before the resource waits for anything, and the checks
that what it reads (inputs.py) shares: engines, graders' references, gates."""

from __future__ import annotations

import ast
import re
from typing import Any

from llmfactory_runtime.grader import reads_reference, unknown_placeholders

from ..api.dataset_build import DETECTABLE_LANGUAGES
from .errors import PlanError
from .manifests import Resource


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


def check_spec(res: Resource) -> None:
    """What a spec shows wrong by itself, refused before it waits on anything: not once the FineTune or
    DatasetBuild it waits for has run for hours. A gate is checked against the metrics the Benchmark may
    report on any dataset, and again once it is planned (those of a preference dataset depend on it)."""
    spec = res.spec
    if res.kind == "FineTune":
        _check_chat_template(res)
        if spec.objective == "grpo":
            _check_grader(res, "spec.grpo.grader", spec.grpo.grader)
            check_engine(res, "spec.grpo.engine", spec.grpo.engine, spec.base_model.as_source())
    elif res.kind == "DatasetBuild":
        _check_pattern(res, "spec.referencePattern", spec.reference_pattern)
        _check_detected_languages(res)
        # Models named by fineTuneRef are a FineTune's merged safetensors, which vLLM reads.
        for field, part in (("spec.teacher", spec.teacher), ("spec.preferences.rejected",
                                                              spec.preferences and spec.preferences.rejected),
                            ("spec.difficulty", spec.difficulty)):
            if part and part.model:
                check_engine(res, f"{field}.engine", part.engine, part.model.wire())
        if spec.difficulty:
            _check_grader(res, "spec.difficulty.grader", spec.difficulty.grader)
            check_built_references(res, "spec.difficulty.grader", spec.difficulty.grader, {"format": "graded"})
    elif res.kind == "Quantization":
        _check_quantization_types(res)
    elif res.kind == "Benchmark":
        _check_benchmark_spec(res)


def _check_detected_languages(res: Resource) -> None:
    """With languageDetection, samplesPerLanguage names languages the detector assigns: without candidates
    they are its candidates, each one it must know (the CRD checks candidates; a CEL rule over a map's keys
    would cost the API server too much); with candidates, a language it counts is one of them, or no prompt
    is ever in it and the build fails once it has read them all."""
    spec = res.spec
    detection, wanted = spec.language_detection, spec.samples_per_language or {}
    if not detection:
        return
    if detection.candidates:
        never = sorted(lang for lang, count in wanted.items() if count > 0 and lang not in detection.candidates)
        if never:
            raise PlanError(res.ref, "spec.samplesPerLanguage", f"counts {', '.join(never)}, which languageDetection "
                            f"never assigns: its candidates are {', '.join(detection.candidates)}")
        return
    unknown = sorted(set(wanted) - set(DETECTABLE_LANGUAGES))
    if unknown:
        raise PlanError(res.ref, "spec.samplesPerLanguage", f"names {', '.join(unknown)}, but languageDetection "
                        f"(without candidates) detects among its languages, and the {len(DETECTABLE_LANGUAGES)} "
                        "py3langid knows are ISO 639 codes such as en, ru, zh, de, ja (`kubectl explain "
                        "datasetbuild.spec.languageDetection.candidates` lists them)")


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
                check_engine(res, field, part.engine, source.wire())
    if spec.reward:
        _check_grader(res, "spec.reward.grader", spec.reward.grader)
    check_gates(res, benchmark_metric_names(spec, baseline, ANY_FORMAT))


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


def grades_tool_calls(grader) -> bool:
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


def check_engine(res: Resource, field: str, engine: str, model: dict[str, Any]) -> None:
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


def check_gates(res: Resource, known: set[str]) -> None:
    """Each gate names a metric in `known` or of a listed lm-eval task (whose metrics its YAML names)."""
    tasks = set(res.spec.lm_eval.tasks) if res.spec.lm_eval else set()
    for i, gate in enumerate(res.spec.gates):
        parts = gate.metric.split(".")
        of_task = parts[0] == "lmEval" and len(parts) >= 3 and parts[-2] in tasks
        if gate.metric not in known and not of_task:
            valid = sorted(known) + [f"lmEval.{t}.<metric>" for t in sorted(tasks)]
            raise PlanError(res.ref, f"spec.gates[{i}].metric",
                            f"{gate.metric!r} is not reported by this benchmark; valid: {valid}")


def check_references(res: Resource, field: str, grader, held: list[str], why: str) -> None:
    """Every part of the grader that compares with a reference must read it in one of the fields the
    rows hold one in (`held`); `why` says which rows hold what, and what to set."""
    parts = [(f"{field}.parts[{i}]", part) for i, part in enumerate(grader.parts)] if grader.parts else [(field, grader)]
    for where, part in parts:
        if reads_reference(part.wire()) and part.reference_field not in held:
            raise PlanError(res.ref, f"{where}.referenceField", f"is {part.reference_field!r}, but {why}")


def check_built_references(res: Resource, field: str, grader, dataset: dict[str, Any]) -> None:
    """A DatasetBuild's graded rows hold each prompt's reference in field reference: every part of the
    grader that compares with a reference must read it there."""
    if dataset["format"] == "graded":
        check_references(res, field, grader, ["reference"], "the DatasetBuild's rows (format graded) hold each "
                          "prompt's reference answer in field 'reference': set referenceField: reference (the default)")
