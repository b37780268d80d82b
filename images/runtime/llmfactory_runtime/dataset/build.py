"""DatasetBuild: prompts -> teacher answers -> filters -> train/validation/test splits.

Teacher answers are the expensive part, so they are saved to the store batch by batch and a
restarted build asks only for the prompts that have no saved answer yet.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from typing import Any

from ..data import SPLITS, dumps_jsonl, to_row
from ..generate import generate
from ..models import load_model, load_tokenizer
from ..progress import Progress
from ..store import Store
from .filters import AnswerFilter
from .sources import collect

ANSWERS = "answers"


def _prompt_key(prompt: str, system: str | None) -> str:
    return hashlib.sha256(json.dumps([system, prompt]).encode()).hexdigest()[:32]


def _conversation(prompt: str, system: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def dedupe(prompts: list[dict], dropped: Counter) -> list[dict]:
    seen, kept = set(), []
    for p in prompts:
        key = " ".join(p["prompt"].split()).casefold()
        if key in seen:
            dropped["duplicate_prompt"] += 1
            continue
        seen.add(key)
        kept.append(p)
    return kept


def sample_per_language(prompts: list[dict], counts: dict[str, int] | None, seed: int,
                        dropped: Counter) -> list[dict]:
    if not counts:
        return prompts
    rng, kept = random.Random(seed), []
    by_lang: dict[str, list[dict]] = {}
    for p in prompts:
        by_lang.setdefault(p["language"], []).append(p)
    for lang, group in by_lang.items():
        take = min(len(group), counts.get(lang, 0))
        chosen = set(map(id, rng.sample(group, take)))
        kept += [p for p in group if id(p) in chosen]
        dropped["language_not_requested" if lang not in counts else "over_language_count"] += len(group) - take
    return kept


def answer_all(prompts: list[dict], teacher: dict, source: dict, run: Store, progress: Progress) -> dict:
    """{prompt key: answer}; answers already in the store are reused, new ones saved per batch."""
    system = teacher.get("systemPrompt")
    answers: dict[str, dict] = {}
    for name in run.list(ANSWERS):
        answers.update(run.read_json(f"{ANSWERS}/{name}"))
    todo = [p for p in prompts if _prompt_key(p["prompt"], system) not in answers]
    progress.stage("answering prompts", total=len(prompts), unit="prompts")
    progress.update(len(prompts) - len(todo), reused=len(prompts) - len(todo))
    if not todo:
        return answers
    model = load_model(source)
    tokenizer = load_tokenizer(source)
    model.eval()
    batch_size = teacher.get("batchSize", 8)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        outs = generate(model, tokenizer, [_conversation(p["prompt"], system) for p in batch],
                        teacher.get("maxNewTokens", 256), teacher.get("temperature", 0.0),
                        teacher.get("seed", 0) + start)
        fresh = {_prompt_key(p["prompt"], system): {"text": o.text, "tokens": o.tokens, "finished": o.finished}
                 for p, o in zip(batch, outs)}
        # Saved before moving on: a killed build never asks the teacher for these again.
        run.write_json(f"{ANSWERS}/{len(answers):08d}.json", fresh)
        answers.update(fresh)
        progress.update(len(prompts) - len(todo) + start + len(batch))
    return answers


def split_rows(rows: list[dict], split: dict) -> dict[str, list[dict]]:
    """Seeded shuffle, then test, validation and train cuts. Prompts are unique, so no prompt
    appears in two splits; a non-zero share gets at least one row when there are enough."""
    rows = sorted(rows, key=lambda r: r["key"])
    random.Random(split.get("seed", 42)).shuffle(rows)
    n = len(rows)
    sizes = {}
    for name in ("test", "validation"):
        share = split.get(name, 0.1)
        sizes[name] = max(1, round(n * share)) if share > 0 and n >= 3 else round(n * share)
    cut_test, cut_val = sizes["test"], sizes["test"] + sizes["validation"]
    return {"test": rows[:cut_test], "validation": rows[cut_test:cut_val], "train": rows[cut_val:]}


def _card(spec: dict, result: dict) -> str:
    lines = ["# Dataset card", "", f"Built by llmfactory, format `{spec.get('format', 'chatml')}`.", "",
             "| split | rows |", "|---|---|"]
    lines += [f"| {s} | {n} |" for s, n in result["rows"].items()]
    lines += ["", "| language | rows |", "|---|---|"]
    lines += [f"| {lang} | {n} |" for lang, n in sorted(result["rowsPerLanguage"].items())]
    lines += ["", "| dropped because | rows |", "|---|---|"]
    lines += [f"| {why} | {n} |" for why, n in sorted(result["dropped"].items())] or ["| - | 0 |"]
    lines += ["", f"Teacher tokens generated: {result['teacherTokens']}", ""]
    return "\n".join(lines)


def run(task: dict[str, Any], run: Store, progress: Progress) -> dict[str, Any]:
    spec = task["spec"]
    teacher = spec["teacher"]
    dropped: Counter = Counter()
    progress.stage("reading prompts")
    prompts = collect(spec["sources"], dropped)
    prompts = dedupe(prompts, dropped)
    prompts = sample_per_language(prompts, spec.get("samplesPerLanguage"), spec["split"]["seed"], dropped)

    answers = answer_all(prompts, teacher, task["inputs"]["teacher"], run, progress)

    keep = AnswerFilter(spec.get("filters", {}))
    system, fmt, rows, tokens = teacher.get("systemPrompt"), spec.get("format", "chatml"), [], 0
    for p in prompts:
        key = _prompt_key(p["prompt"], system)
        answer = answers[key]
        tokens += answer["tokens"]
        reason = keep.reason_to_drop(answer["text"], answer["finished"])
        if reason:
            dropped[reason] += 1
            continue
        messages = _conversation(p["prompt"], system) + [{"role": "assistant", "content": answer["text"]}]
        rows.append({"key": key, "language": p["language"], "messages": messages})

    progress.stage("writing splits")
    splits = split_rows(rows, spec["split"])
    data = run.child("data")
    digest = hashlib.sha256()
    for name in SPLITS:
        blob = dumps_jsonl(to_row(r["messages"], fmt, language=r["language"]) for r in splits[name])
        data.write_bytes(f"{name}.jsonl", blob)
        digest.update(name.encode() + b"\0" + blob)
    result = {
        "uri": data.uri,
        "format": fmt,
        "digest": "sha256:" + digest.hexdigest(),
        "rows": {name: len(splits[name]) for name in SPLITS},
        "rowsPerLanguage": dict(Counter(r["language"] for r in rows)),
        "dropped": dict(dropped),
        "teacherTokens": tokens,
    }
    data.write_bytes("README.md", _card(spec, result).encode())
    data.commit()
    return result
