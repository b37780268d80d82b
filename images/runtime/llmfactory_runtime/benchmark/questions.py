"""MT-Bench-style questions: {question_id, category, turns (one or two), reference?, language}.
The project's own sets (a dozen each in en, ru, zh, two turns each) or a JSONL file."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from ..store import open_store
from ..task import InvalidTask


def builtin_questions(language: str) -> list[dict]:
    """The project's own question set for a language (en, ru, zh)."""
    path = resources.files("llmfactory_runtime.benchmark") / "questions" / f"{language}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no built-in questions for language {language!r}")
    return [{**json.loads(line), "language": language}
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _from_uri(uri: str) -> list[dict]:
    folder, name = uri.rstrip("/").rsplit("/", 1)
    questions = []
    for n, line in enumerate(open_store(folder).read_bytes(name).decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
            turns = q["turns"]
            if not (isinstance(turns, list) and 1 <= len(turns) <= 2 and all(isinstance(t, str) for t in turns)):
                raise ValueError("turns must be a list of one or two strings")
            questions.append({"question_id": str(q["question_id"]), "category": q.get("category", "general"),
                              "turns": turns, "reference": q.get("reference"), "language": q.get("language", "en")})
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidTask(f"spec.judge.questionsUri: line {n} of {uri}: {exc}") from None
    return questions


def load(judge: dict[str, Any]) -> list[dict]:
    limit = judge.get("maxQuestions") or None
    if judge.get("questionsUri"):
        pool = _from_uri(judge["questionsUri"])
        chosen = []
        for lang in judge["languages"]:
            chosen += [q for q in pool if q["language"] == lang][:limit]
        if not chosen:
            raise InvalidTask(f"spec.judge.questionsUri: no question in languages {judge['languages']}")
        return chosen
    chosen = []
    for lang in judge["languages"]:
        try:
            chosen += builtin_questions(lang)[:limit]
        except FileNotFoundError as exc:
            raise InvalidTask(f"spec.judge.languages: {exc}; built-in: en, ru, zh (or give questionsUri)") from None
    return chosen


def reference(question: dict, turn: int) -> str | None:
    ref = question.get("reference")
    if isinstance(ref, list):
        return ref[turn] if turn < len(ref) else None
    return ref if turn == 0 else None
