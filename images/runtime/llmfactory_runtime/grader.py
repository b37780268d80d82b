"""Rewards for objective grpo and a Benchmark's reward: an answer scored 1 or 0 against the reference
answer its row holds, as OpenAI's string_check grader and GSM8K's final-answer check do, by how alike
the two are (its text_similarity grader: similarity.py), rated by an
LLM judge against it or as the spec's prompt asks (OpenAI's score_model grader; an API, or a local
model in this process) or labelled by one as the spec's prompt asks (its label_model grader), scored
by the spec's own Python (its python grader) or by a reward model (TRL's), or a weighted sum of such
(TRL's reward functions and weights, OpenAI's multi grader)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from . import GRADER_KEY_ENV, math_answer, python_grader
from .chat import reasoning_apart, said
from .data import ends_with_answer, graded_turn, messages_of, prompt_of, tools_of
from .usage import Usage
from .similarity import missing, similarity
from .task import InvalidTask
from .tool_calls import answered_calls, expected_calls, same_calls, shown

# A number as final answers write it: sign, thousands commas, decimals, an exponent.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text.replace("$", ""))
    return float(found[-1].replace(",", "")) if found else None


# Graders whose model runs in the grading process (judgeModel, rewardModel, embeddingModel), by the field
# naming it.
MODEL_FIELDS = {"judge": "judgeModel", "label": "judgeModel", "rewardModel": "rewardModel",
                "similarity": "embeddingModel"}
# What a label grader's prompt may hold: {{sample.output_text}}, {{prompt}}, {{item.<field>}} (OpenAI's forms).
PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
ANSWER, PROMPT, ITEM = "sample.output_text", "prompt", "item."


def reads_reference(part: dict[str, Any]) -> bool:
    """Whether a grader (not a sum) compares the answer with the row's reference (its referenceField):
    not a python grader, which reads the row itself, a reward model, which reads the prompt and
    answer, nor a judge asked its own prompt (label, or judge with one), which reads what it names."""
    return part["operation"] not in ("python", "rewardModel", "label") and not part.get("prompt")


def unknown_placeholders(prompt: str) -> list[str]:
    """The {{...}} of a judge's prompt (grader.prompt) that name nothing it fills in."""
    return [name for name in PLACEHOLDER.findall(prompt)
            if name not in (ANSWER, PROMPT) and not (name.startswith(ITEM) and len(name) > len(ITEM))]


def _item_fields(grader: dict[str, Any]) -> list[str]:
    """The row fields a judge's prompt reads ({{item.<field>}})."""
    return [name[len(ITEM):] for name in PLACEHOLDER.findall(grader.get("prompt") or "") if name.startswith(ITEM)]


def filled(prompt: str, graded: dict[str, Any], answer: str) -> str:
    """A judge's prompt (grader.prompt) for one answer to one graded row: the answer, the prompt's
    last user message and the row's fields in their places (a list or an object as JSON)."""
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name == ANSWER:
            return answer
        if name == PROMPT:
            return graded["question"]
        found = graded["item"][name[len(ITEM):]]
        return found if isinstance(found, str) else json.dumps(found, ensure_ascii=False)

    return PLACEHOLDER.sub(value, prompt)


def parts_of(grader: dict[str, Any]) -> list[dict[str, Any]]:
    """The graders whose rewards make the grader's: a sum's parts, or the grader itself."""
    return grader["parts"] if grader["operation"] == "sum" else [grader]


def placed_parts(grader: dict[str, Any], field: str) -> list[tuple[dict[str, Any], str]]:
    """parts_of the grader, each with where it is in the spec (`field`: the grader's place)."""
    if grader["operation"] != "sum":
        return [(grader, field)]
    return [(part, f"{field}.parts[{i}]") for i, part in enumerate(grader["parts"])]


def check_scorable(grader: dict[str, Any], field: str) -> None:
    """An invalid task, before any answer is made, when a part of the grader cannot score in this
    process: metric meteor without WordNet."""
    for part, where in placed_parts(grader, field):
        if part["operation"] == "similarity" and (problem := missing(part["metric"])):
            raise InvalidTask(f"{where}.metric: {problem}")


def reference_of(row: dict[str, Any], grader: dict[str, Any]) -> str | None:
    """The row's reference answer in the grader's referenceField, as text; None unless a string or a number."""
    value = row.get(grader["referenceField"])
    return str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None


def reference_fields(rows: list[dict[str, Any]]) -> list[str]:
    """The fields in which every row holds what a grader could read as its reference (reference_of:
    a string or a number)."""
    held = None
    for row in rows:
        fields = {name for name in row if reference_of(row, {"referenceField": name}) is not None}
        held = fields if held is None else held & fields
    return sorted(held or ())


def graded_of(row: dict[str, Any], grader: dict[str, Any]) -> dict[str, Any]:
    """{messages: the prompt, tools: the functions it offers (or None), question: its last user message,
    reference, item: the row} of a row for the grader; for a toolCalls grader, a conversation ending with
    the assistant's turn is graded on its last turn that calls tools (calls: those calls). A ValueError
    says what the row lacks: every operation but python compares the answer with the reference the row
    holds (a python grader reads what it needs of the row itself)."""
    parts = parts_of(grader)
    calls = None
    if any(part["operation"] == "toolCalls" for part in parts) and ends_with_answer(row):
        messages, calls = graded_turn(messages_of(row))
    else:
        messages = prompt_of(row)
    for part in parts:
        for name in _item_fields(part):
            if name not in row:
                raise ValueError(f"needs field {name!r}, which grader.prompt reads ({{{{item.{name}}}}})")
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
    graded = {"messages": messages, "tools": tools_of(row), "question": question, "item": row,
              **({"calls": calls} if calls is not None else {})}
    compared = [part for part in parts if reads_reference(part)]
    for part in compared:
        if part["operation"] == "toolCalls":
            calls_of(graded, part)
        elif reference_of(row, part) is None:
            raise ValueError(f"needs its reference answer in field {part['referenceField']!r} (grader.referenceField) "
                             f"as a string or a number, got {row.get(part['referenceField'])!r}")
    first = compared[0] if compared else grader
    graded["reference"] = (shown(calls_of(graded, first)) if first["operation"] == "toolCalls"
                           else reference_of(row, first))
    return graded


def calls_of(graded: dict[str, Any], part: dict[str, Any]) -> list[dict[str, Any]]:
    """The tool calls a toolCalls grader expects of a graded row: its conversation's graded turn's, else
    those in the row's referenceField. A ValueError names the field when they are missing or malformed."""
    if graded.get("calls") is not None:
        return graded["calls"]
    try:
        return expected_calls(graded["item"].get(part["referenceField"]))
    except ValueError as e:
        raise ValueError(f"needs the tool calls it expects in field {part['referenceField']!r} (grader.referenceField), "
                         f"or to be a conversation ending with the assistant's turn: {e}") from None


def graded_rows(rows: list[dict[str, Any]], grader: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """graded_of each row; a malformed one is an invalid task naming `where` (field and file) and the row,
    as are rows of which none expects a tool call for a toolCalls grader (a DatasetBuild's conversations)."""
    out = []
    for n, row in enumerate(rows, 1):
        try:
            out.append(graded_of(row, grader))
        except ValueError as e:
            raise InvalidTask(f"{where} row {n}: {e}") from None
    calling = [part for part in parts_of(grader) if part["operation"] == "toolCalls"]
    if out and calling and not any(calls_of(g, part) for g in out for part in calling):
        raise InvalidTask(f"{where}: no row expects a tool call, so grader toolCalls would only check that the "
                          "answers make none: give conversations that call tools (OpenAI's tool_calls beside the "
                          "row's tools), or prompts with the calls they expect in its referenceField")
    return out


def rewards(grader: dict[str, Any], answers: list[str], graded: list[dict[str, Any]], cache_uri: str,
            field: str) -> list[float]:
    """The grader's reward of each answer to its graded row (as graded_of gives them): 0-1, what a
    python grader returns, a reward model's score, or a sum's weighted parts. An answer is what it says
    after a reasoning model's reasoning (chat.reasoning_apart), as OpenAI's graders read a reasoning
    model's output_text; a python grader is given the reasoning too. An API judge is asked about all of
    them at once, within its limits; `field` names the grader in the spec, for its errors."""
    operation = grader["operation"]
    if operation == "sum":
        return rewards_by_part(grader, answers, graded, cache_uri, field)[0]
    if operation == "python":
        return python_grader.grade(grader["source"], list(map(reasoning_apart, answers)), [g["item"] for g in graded],
                                   field)
    answers = list(map(said, answers))
    if operation == "label":
        return _labelled(grader, answers, graded, cache_uri, field)
    if operation == "toolCalls":
        return [float(same_calls(answered_calls(a), calls_of(g, grader))) for a, g in zip(answers, graded)]
    if operation == "rewardModel":
        from . import reward_model  # noqa: PLC0415 - torch only for a reward model

        source = grader["rewardModel"]
        model, tokenizer = _held(operation, source, lambda: reward_model.load(source, f"{field}.rewardModel"))
        return reward_model.scores(model, tokenizer, [[*g["messages"], {"role": "assistant", "content": a}]
                                                      for a, g in zip(answers, graded)])
    references = [reference_of(g["item"], grader) for g in graded]
    if grader.get("metric") == "cosine":  # the embeddings of all of them at once
        from . import embedding_similarity as embedding  # noqa: PLC0415 - only for metric cosine

        local, usage = grader.get("embeddingModel"), None
        if local:  # loaded only when a score is not in the cache, then held for the process's later calls
            embedder = embedding.local_embedder(local, lambda: _held(operation, local,
                                                                     lambda: embedding.load_encoder(local)),
                                                grader.get("embeddingPrompt"))
        else:
            usage = _usage_of(field)
            embedder = embedding.api_embedder(grader["embeddings"], f"{field}.embeddings", usage)
        return embedding.cosines(embedder, [extracted(a, grader) for a in answers], [r.strip() for r in references],
                                 cache_uri, usage)
    if operation != "judge":
        return [reward(a, ref, grader) for a, ref in zip(answers, references)]
    from .benchmark.judge import (judge_messages, judge_with_api, judge_with_model,  # noqa: PLC0415 - only to judge
                                  scored_messages)

    local = grader.get("judgeModel")
    style = "local" if local else "api"
    items = [(str(i), scored_messages(filled(grader["prompt"], g, a), style) if grader.get("prompt")
              else judge_messages({"turns": [g["question"]], "reference": ref}, [a], 0, style))
             for i, (a, g, ref) in enumerate(zip(answers, graded, references))]
    if local:
        from .models import LazyModel  # noqa: PLC0415 - torch only for a local judge

        # Loaded only when a rating is not in the cache, then held for the process's later calls.
        rated = judge_with_model(lambda: _held(operation, local, LazyModel(local)), local, items, cache_uri, held=True)
    else:
        rated = judge_with_api(grader["judge"], items, cache_uri, max_reasks=2, on_rating=lambda *_, **__: None,
                               field=f"{field}.judge", key_env=GRADER_KEY_ENV, held=True, usage=_usage_of(field))
    return [(rated[str(i)]["rating"] - 1) / 9 if rated[str(i)]["rating"] is not None else 0.0
            for i in range(len(items))]


def _labelled(grader: dict[str, Any], answers: list[str], graded: list[dict[str, Any]], cache_uri: str,
              field: str) -> list[float]:
    """A label grader's rewards: 1 for an API judge's passing label, else 0 (no label after its re-asks
    too); a local judge's probability of writing a passing one. Its judgements are cached as a judge's."""
    from .benchmark.judge import (judge_with_api, judge_with_model, label_distribution,  # noqa: PLC0415
                                  label_messages, label_parser)

    labels, passing, local = grader["labels"], set(grader["passingLabels"]), grader.get("judgeModel")
    items = [(str(i), label_messages(filled(grader["prompt"], g, a), labels, "local" if local else "api"))
             for i, (a, g) in enumerate(zip(answers, graded))]
    if local:
        from .models import LazyModel  # noqa: PLC0415 - torch only for a local judge

        judged = judge_with_model(lambda: _held("judge", local, LazyModel(local)), local, items, cache_uri, held=True,
                                  judged=lambda model, tokenizer, messages: {
                                      "labels": label_distribution(model, tokenizer, messages, labels)})
        return [sum(p for label, p in judged[str(i)]["labels"].items() if label in passing) for i in range(len(items))]
    judged = judge_with_api(grader["judge"], items, cache_uri, max_reasks=2, on_rating=lambda *_, **__: None,
                            field=f"{field}.judge", kind="label", key_env=GRADER_KEY_ENV, held=True,
                            usage=_usage_of(field), parser=label_parser(labels))
    return [1.0 if judged[str(i)]["label"] in passing else 0.0 for i in range(len(items))]


_models: dict[str, tuple[Any, Any]] = {}  # (model, tokenizer) graders loaded, by operation and source: once a process


def _held(operation: str, source: dict[str, Any], load) -> tuple[Any, Any]:
    key = json.dumps([operation, source], sort_keys=True)
    if key not in _models:
        _models[key] = load()
    return _models[key]


_usage: dict[str, Usage] = {}  # what this process asked of each grader's API endpoint, by the grader's field


def _usage_of(field: str) -> Usage:
    return _usage.setdefault(field, Usage())


def api_endpoint(grader: dict[str, Any]) -> str | None:
    """The field of the API endpoint a grader (not a sum) asks: judge (an API judge), embeddings (metric
    cosine), or None."""
    if grader["operation"] in ("judge", "label") and grader.get("judge"):
        return "judge"
    return "embeddings" if grader.get("embeddings") else None


def api_usage(grader: dict[str, Any], field: str) -> dict[str, tuple[Usage, dict[str, float] | None]]:
    """What this process asked of each API endpoint of the grader (`field`: where it is in the spec),
    with the endpoint's price: by part name for a sum's parts, else by the endpoint's field (judge or
    embeddings); none unasked yet count zeros, so every process of a run has the same ones."""
    summed = grader["operation"] == "sum"
    return {part["name"] if summed else endpoint: (_usage_of(where), part[endpoint].get("price"))
            for part, where in placed_parts(grader, field) if (endpoint := api_endpoint(part))}


def grader_models(grader: dict[str, Any] | None) -> list[tuple[dict[str, Any], str]]:
    """(source, operation) of each model the grader, or a sum's parts, loads beside the model being
    trained: local judges and reward models (none without a grader)."""
    parts = parts_of(grader) if grader else []
    return [(part[MODEL_FIELDS[part["operation"]]], part["operation"]) for part in parts
            if part.get(MODEL_FIELDS.get(part["operation"], ""))]


def rewards_by_part(grader: dict[str, Any], answers: list[str], graded: list[dict[str, Any]], cache_uri: str,
                    field: str) -> tuple[list[float], dict[str, list[float]]]:
    """The grader's rewards (as rewards gives them) and, of a sum grader, each part's by name (else none)."""
    if grader["operation"] != "sum":
        return rewards(grader, answers, graded, cache_uri, field), {}
    parts = part_rewards(grader, answers, graded, cache_uri, field)
    return weighted(grader, parts), parts


def part_rewards(grader: dict[str, Any], answers: list[str], graded: list[dict[str, Any]], cache_uri: str,
                 field: str) -> dict[str, list[float]]:
    """Each part's rewards of a sum grader (operation sum), by the part's name."""
    return {part["name"]: rewards(part, answers, graded, cache_uri, where)
            for part, where in placed_parts(grader, field)}


def weighted(grader: dict[str, Any], parts: dict[str, list[float]]) -> list[float]:
    """A sum grader's reward of each answer: its parts' rewards (part_rewards), each times its weight."""
    n = len(next(iter(parts.values())))
    return [sum(part["weight"] * parts[part["name"]][k] for part in grader["parts"]) for k in range(n)]


def describe(grader: dict[str, Any]) -> str:
    """The grader in a few words, for the model card."""
    if grader["operation"] == "sum":
        return "sum of " + ", ".join(f"{p['weight']:g} x {p['name']} ({describe(p)})" for p in grader["parts"])
    if grader["operation"] == "python":
        return "python, its source in the task document"
    model = grader.get(MODEL_FIELDS.get(grader["operation"], ""))
    name = model and (model.get("huggingface") or model["uri"])
    judge = grader["operation"] in ("judge", "label") and (f"the local judge {name}" if model
                                                           else grader["judge"]["model"])
    if grader["operation"] == "label":
        return f"label by {judge}, passing {', '.join(grader['passingLabels'])} of {', '.join(grader['labels'])}"
    if grader["operation"] == "judge" and grader.get("prompt"):
        return f"judge by {judge}, asked the grader's own prompt"
    if grader["operation"] == "rewardModel":
        return f"reward model {name}"
    if grader["operation"] == "toolCalls":
        return (f"toolCalls: the calls of a conversation's last calling turn, or those in field "
                f"{grader['referenceField']!r}")
    by = f" by {judge}" if judge else f" by {name}'s embeddings (local)" if model else ""
    by += f" by {grader['embeddings']['model']}'s embeddings" if grader.get("embeddings") else ""
    metric = f" ({grader['metric']})" if grader.get("metric") else ""
    return f"{grader['operation']}{metric} against field {grader['referenceField']!r}{by}"


def extracted(answer: str, grader: dict[str, Any]) -> str | None:
    """What of the answer the grader compares: grader.extract's last match, or the whole answer (last_match).
    None when extract finds nothing (the answer scores 0)."""
    return last_match(grader.get("extract"), answer)


def last_match(pattern: str | None, text: str) -> str | None:
    """The pattern's last match in the text (its first group, if it has one; the whole text without a
    pattern), stripped; None when it finds nothing. A grader's extract reads answers so, and a
    DatasetBuild's referencePattern the answers it makes references of."""
    if pattern:
        matches = list(re.finditer(pattern, text, re.DOTALL))
        if not matches:
            return None
        last = matches[-1]
        text = last.group(1) if last.re.groups else last.group(0)
    return text.strip()


def reward(answer: str, reference: str, grader: dict[str, Any]) -> float:
    """1.0 when the answer passes the grader's check (equals, contains, icontains, number, math), else 0.0;
    operation similarity: how alike they are, 0-1 (grader.metric; cosine: see rewards)."""
    answer = extracted(answer, grader)
    if answer is None:
        return 0.0
    reference = reference.strip()
    operation = grader["operation"]
    if operation == "similarity":
        return similarity(answer, reference, grader["metric"])
    if operation == "equals":
        passed = answer == reference
    elif operation == "contains":
        passed = reference in answer
    elif operation == "icontains":
        passed = reference.lower() in answer.lower()
    elif operation == "math":
        passed = math_answer.equal(answer, reference)
    else:  # number
        got, want = last_number(answer), last_number(reference)
        passed = got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)
    return float(passed)
