"""Rewards for objective grpo and a Benchmark's reward: an answer scored 1 or 0 against the reference
answer its row holds, as OpenAI's string_check grader and GSM8K's final-answer check do, or rated by
an LLM judge against it (OpenAI's score_model grader)."""

from __future__ import annotations

import math
import re
from typing import Any

from . import GRADER_KEY_ENV
from .data import prompt_of
from .task import InvalidTask

# A number as final answers write it: sign, thousands commas, decimals, an exponent.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text.replace("$", ""))
    return float(found[-1].replace(",", "")) if found else None


def graded_of(row: dict[str, Any], field: str) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, reference answer) of a row for objective grpo. A ValueError says what the row lacks."""
    reference = row.get(field)
    if isinstance(reference, bool) or not isinstance(reference, (str, int, float)):
        raise ValueError(f"needs its reference answer in field {field!r} (spec.grpo.grader.referenceField) as "
                         f"a string or a number, got {reference!r}")
    return prompt_of(row), str(reference)


def graded_rows(rows: list[dict[str, Any]], field: str, where: str) -> list[tuple[list[dict[str, str]], str]]:
    """graded_of each row; a malformed one is an invalid task naming `where` (field and file) and the row."""
    out = []
    for n, row in enumerate(rows, 1):
        try:
            out.append(graded_of(row, field))
        except ValueError as e:
            raise InvalidTask(f"{where} row {n}: {e}") from None
    return out


def rewards(grader: dict[str, Any], questions: list[str], answers: list[str], references: list[str],
            cache_uri: str, field: str) -> list[float]:
    """The grader's reward of each answer to its question against its reference, 0-1. A judge
    (operation judge) is asked about all of them at once, within its limits; `field` names the grader
    in the spec, for its errors."""
    if grader["operation"] != "judge":
        return [reward(a, ref, grader) for a, ref in zip(answers, references)]
    from .benchmark.judge import judge_messages, judge_with_api  # noqa: PLC0415 - its client only where it judges

    items = [(str(i), judge_messages({"turns": [q], "reference": ref}, [a], 0, "api"))
             for i, (q, a, ref) in enumerate(zip(questions, answers, references))]
    rated = judge_with_api(grader["judge"], items, cache_uri, max_reasks=2, on_rating=lambda *_, **__: None,
                           field=f"{field}.judge", key_env=GRADER_KEY_ENV)
    return [(rated[str(i)]["rating"] - 1) / 9 if rated[str(i)]["rating"] is not None else 0.0
            for i in range(len(items))]


def reward(answer: str, reference: str, grader: dict[str, Any]) -> float:
    """1.0 when the answer passes the grader's check (every operation but judge), else 0.0."""
    if grader.get("extract"):
        matches = list(re.finditer(grader["extract"], answer, re.DOTALL))
        if not matches:
            return 0.0
        last = matches[-1]
        answer = last.group(1) if last.re.groups else last.group(0)
    answer, reference = answer.strip(), reference.strip()
    operation = grader["operation"]
    if operation == "equals":
        passed = answer == reference
    elif operation == "contains":
        passed = reference in answer
    elif operation == "icontains":
        passed = reference.lower() in answer.lower()
    else:  # number
        got, want = last_number(answer), last_number(reference)
        passed = got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)
    return float(passed)
