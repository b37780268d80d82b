"""DatasetBuild: prompts -> language detection, dedup, sampling -> teacher answers (cached
across runs, never paid twice) -> filters -> train/validation/test splits as JSONL and Parquet.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import Counter
from typing import Any

from ..data import SPLITS, dumps_jsonl, to_row
from ..progress import Progress
from ..store import Store
from . import teacher as teacher_
from .dedupe import dedupe
from .filters import AnswerFilter
from .languages import detect
from .sources import Drops, collect


def sample_per_language(prompts: list[dict], counts: dict[str, int] | None, seed: int,
                        drops: Drops) -> list[dict]:
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
        for p in group:
            if id(p) not in chosen:
                drops.add("language_not_requested" if lang not in counts else "over_language_count",
                          f"[{lang}] {p['turns'][0]}")
    return kept


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
    fmt = spec.get("format", "chatml")
    lines = ["# Dataset card", "", f"Built by llmfactory: format `{fmt}`, digest `{result['digest']}`.", "",
             "| split | rows |", "|---|---|"]
    lines += [f"| {s} | {n} |" for s, n in result["rows"].items()]
    lines += ["", "| language | rows |", "|---|---|"]
    lines += [f"| {lang} | {n} |" for lang, n in sorted(result["rowsPerLanguage"].items())]
    lines += ["", "| dropped because | rows | for example |", "|---|---|---|"]
    examples = result.get("droppedExamples") or {}
    lines += [f"| {why} | {n} | {' / '.join(examples.get(why, []))[:300].replace('|', '/')} |"
              for why, n in sorted(result["dropped"].items())] or ["| - | 0 | |"]
    usage = result.get("teacherUsage") or {}
    lines += ["", f"Teacher: {usage.get('requests', 0)} answers received, {usage.get('cached', 0)} from the cache, "
              f"{usage.get('promptTokens', 0)} prompt and {usage.get('completionTokens', 0)} completion tokens"
              + (f", ${usage['costUsd']:.2f}" if usage.get("costUsd") is not None else "") + ".", ""]
    return "\n".join(lines)


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, compression="zstd")
    return buf.getvalue()


def run(task: dict[str, Any], run: Store, progress: Progress, transport=None) -> dict[str, Any]:
    spec = task["spec"]
    drops = Drops()
    progress.stage("reading prompts")
    prompts = collect(spec["sources"], drops)
    wanted = spec.get("samplesPerLanguage")
    if spec.get("languageDetection") is not None:
        prompts = detect(prompts, spec["languageDetection"], wanted, drops)
    prompts = dedupe(prompts, (spec.get("filters") or {}).get("nearDuplicateThreshold") or None, drops)  # 0: off
    prompts = sample_per_language(prompts, wanted, spec["split"]["seed"], drops)

    keep = AnswerFilter(spec.get("filters", {}))
    rows, usage = teacher_.answer(prompts, spec["teacher"], task["inputs"].get("teacher"), task["cacheUri"],
                                  keep, drops, progress, transport=transport)
    for row in rows:
        row["key"] = _first_user_key(row["messages"])

    progress.stage("writing splits")
    fmt = spec.get("format", "chatml")
    splits = split_rows(rows, spec["split"])
    data = run.child("data")
    digest = hashlib.sha256()
    for name in SPLITS:
        rendered = [to_row(r["messages"], fmt, language=r["language"]) for r in splits[name]]
        blob = dumps_jsonl(rendered)
        data.write_bytes(f"{name}.jsonl", blob)
        digest.update(name.encode() + b"\0" + blob)
        if spec.get("parquet", True):
            data.write_bytes(f"{name}.parquet", _parquet(rendered))
    price = ((spec["teacher"].get("openai") or {}).get("price"))
    teacher_usage = {"requests": usage.requests, "cached": usage.cached, "promptTokens": usage.prompt_tokens,
                     "completionTokens": usage.completion_tokens}
    if price:
        teacher_usage["costUsd"] = round(usage.prompt_tokens * price["inputPerMillion"] / 1e6
                                         + usage.completion_tokens * price["outputPerMillion"] / 1e6, 6)
    result = {
        "uri": data.uri,
        "format": fmt,
        "digest": "sha256:" + digest.hexdigest(),
        "rows": {name: len(splits[name]) for name in SPLITS},
        "rowsPerLanguage": dict(Counter(r["language"] for r in rows)),
        "dropped": dict(drops.counts),
        "droppedExamples": drops.examples,
        "teacherTokens": usage.used_tokens,
        "teacherUsage": teacher_usage,
    }
    data.write_bytes("README.md", _card(spec, result).encode())
    data.commit()
    return result


def _first_user_key(messages: list[dict[str, str]]) -> str:
    """What orders rows before the seeded shuffle: the system message and the opening prompt
    (unique after dedupe), so the same data and seed always give the same split."""
    first = next(m["content"] for m in messages if m["role"] == "user")
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    return hashlib.sha256(json.dumps([system, first]).encode()).hexdigest()[:32]
