"""MT-Bench-style questions: {question_id, category, turns (one or two), reference?, language}.
The project's own sets (a dozen each in en, ru, zh, two turns each) or a JSONL file."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from ..data import language_code
from ..store import read_file
from ..task import InvalidTask


def builtin_questions(language: str) -> list[dict]:
    """The project's own question set for a language (en, ru, zh)."""
    path = resources.files("llmfactory_runtime.benchmark") / "questions" / f"{language}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no built-in questions for language {language!r}")
    return [{**json.loads(line), "language": language}
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _rows_of(judge: dict[str, Any]) -> tuple[str, Any]:
    """(field name for errors, the question rows) of questionsUri or questionsDataset."""
    if judge.get("questionsDataset"):
        from ..dataset.sources import rows_of_huggingface  # noqa: PLC0415

        return "spec.judge.questionsDataset", rows_of_huggingface(judge["questionsDataset"])
    lines = _read_given(judge["questionsUri"], "spec.judge.questionsUri").decode().splitlines()
    return "spec.judge.questionsUri", (line for line in lines if line.strip())


def _read_given(uri: str, field: str) -> bytes:
    try:
        return read_file(uri)
    except FileNotFoundError:
        raise InvalidTask(f"{field}: there is no file at {uri}") from None


def _external(judge: dict[str, Any]) -> list[dict]:
    field, rows = _rows_of(judge)
    questions = []
    for n, q in enumerate(rows, 1):
        try:
            q = json.loads(q) if isinstance(q, str) else q
            if not isinstance(q, dict):
                raise ValueError(f"a question is a JSON object, got {type(q).__name__}")
            # MT-Bench's own columns on the hub (HuggingFaceH4/mt_bench_prompts) are prompt and prompt_id.
            turns = q.get("turns") or q.get("prompt")
            if not (isinstance(turns, list) and 1 <= len(turns) <= 2 and all(isinstance(t, str) for t in turns)):
                raise ValueError(f"turns must be a list of one or two strings (its fields: {', '.join(q)})")
            qid = q.get("question_id", q.get("prompt_id"))
            if qid is None:
                raise ValueError(f"no question_id (its fields: {', '.join(q)})")
            questions.append({"question_id": str(qid), "category": q.get("category") or "general",
                              "turns": turns, "reference": q.get("reference") or None,
                              "language": language_code(q.get("language") or "en")})
        except ValueError as exc:  # json's JSONDecodeError too
            raise InvalidTask(f"{field}: question {n}: {exc}") from None
    return questions


def load(judge: dict[str, Any]) -> list[dict]:
    limit = judge.get("maxQuestions") or None
    if judge.get("questionsUri") or judge.get("questionsDataset"):
        pool = _external(judge)
        chosen = []
        for lang in judge["languages"]:
            chosen += [q for q in pool if q["language"] == lang][:limit]
        if not chosen:
            raise InvalidTask(f"spec.judge: no question in languages {judge['languages']}; the questions' "
                              f"`language` column says {sorted({q['language'] for q in pool})}")
        return chosen
    chosen = []
    for lang in judge["languages"]:
        try:
            chosen += builtin_questions(lang)[:limit]
        except FileNotFoundError as exc:
            raise InvalidTask(f"spec.judge.languages: {exc}; built-in: en, ru, zh (or give questionsUri)") from None
    return chosen


def opponent_answers(uri: str, questions: list[dict]) -> dict[str, list[str]]:
    """judge.opponentAnswersUri: another model's answers, {question_id: [answer per turn]}, for each
    question asked; MT-Bench's model_answer rows ({question_id, choices: [{turns}]}) or {question_id,
    turns}. A question without an answer to each of its turns is an invalid task."""
    field = "spec.judge.opponentAnswersUri"
    found: dict[str, list[str]] = {}
    for n, line in enumerate(_read_given(uri, field).decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = row["choices"][0]["turns"] if "choices" in row else row["turns"]
            if not (isinstance(turns, list) and all(isinstance(t, str) for t in turns)):
                raise ValueError("turns must be a list of strings")
            found[str(row["question_id"])] = turns
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            what = f"no {exc.args[0]}" if isinstance(exc, KeyError) else exc
            raise InvalidTask(f"{field}: row {n}: {what} (MT-Bench's model_answer rows: question_id, "
                              "choices: [{turns: [...]}])") from None
    short = [q["question_id"] for q in questions if len(found.get(q["question_id"], [])) < len(q["turns"])]
    if short:
        raise InvalidTask(f"{field}: no answer to every turn of {len(short)} of the {len(questions)} questions "
                          f"asked: {', '.join(short[:10])}{' ...' if len(short) > 10 else ''}")
    return {q["question_id"]: found[q["question_id"]][:len(q["turns"])] for q in questions}


def reference(question: dict, turn: int) -> str | None:
    ref = question.get("reference")
    if isinstance(ref, list):
        return ref[turn] if turn < len(ref) else None
    return ref if turn == 0 else None
