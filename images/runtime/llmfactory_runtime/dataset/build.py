"""DatasetBuild: prompts -> language detection, dedup, sampling -> teacher answers (cached
across runs, never paid twice; without a teacher, the sources' own answers) -> filters ->
(preferences: a second, rejected answer to each conversation's last turn) -> train/validation/test
splits as JSONL and Parquet (splits.py). Format text: documents streamed through the length
bounds, the same language detection, dedup and sampling, then splits (corpus.py).

Sharded (spec.shards = N): every shard selects the same prompts (the selection is
deterministic and cheap next to the models), asks the teacher (or, without one, the judge and
the preferences' models) about its every N-th one, which fills their caches, and commits what it
paid; the merge is then an ordinary build that finds every answer and rating in the caches, plus
the shards' bills.
"""

from __future__ import annotations

import copy
import hashlib
from collections import Counter
from typing import Any

from .. import DATASET_BUILD_ENDPOINTS, at_path
from ..data import SPLITS, preference_row, to_row, without_reasoning
from ..grader import api_usage, last_match
from ..usage import Usage
from ..progress import Progress
from ..store import SHARDS, Store, finished_result
from ..task import InvalidTask
from . import corpus, teacher as teacher_
from .answer_judge import AnswerJudge
from .dedupe import dedupe
from .difficulty import FIELD as DIFFICULTY, by_difficulty
from .reward_scorer import RewardScorer
from .filters import AnswerFilter, drop_long_prompts, token_counter
from .languages import detect
from .pieces import pod_workers
from .sources import HELD_OUT_FIRST, Drops, collect
from .splits import row_key, sample_per_language, split_rows, write_split


# Each model's line on the dataset card: who, and what it gave
CARD_USAGES = {"teacher": ("Teacher", "answers received"), "judge": ("Judge (filters.judge)", "ratings"),
               "rejected": ("Rejected answers (preferences)", "generated"),
               "rewardModel": ("Reward model (preferences.rewardModel)", "scores computed"),
               "difficulty": ("Difficulty samples (difficulty)", "answers sampled")}


def _card(result: dict) -> str:
    fmt = result["format"]
    lines = ["# Dataset card", "", f"Built by llmfactory: format `{fmt}`, digest `{result['digest']}`.", "",
             "| split | rows |", "|---|---|"]
    lines += [f"| {s} | {n} |" for s, n in result["rows"].items()]
    lines += ["", "| language | rows |", "|---|---|"]
    lines += [f"| {lang} | {n} |" for lang, n in sorted(result["rowsPerLanguage"].items())]
    lines += ["", "| dropped because | rows | for example |", "|---|---|---|"]
    examples = result.get("droppedExamples") or {}
    lines += [f"| {why} | {n} | {' / '.join(examples.get(why, []))[:300].replace('|', '/')} |"
              for why, n in sorted(result["dropped"].items())] or ["| - | 0 | |"]
    if fmt == "graded":
        lines += ["", "Rows: prompts (up to the last user turn), each with its reference answer in `reference`, "
                      "for a FineTune with objective grpo."]
    if fmt == "text":
        lines += ["", "Rows: documents in `text`, for continued pre-training (a FineTune with objective sft)."]
    elif "teacherUsage" not in result:  # every build with a teacher reports what it asked
        lines += ["", "Answers: the sources' own (no teacher), kept by the filters."]
    for role, (who, what) in CARD_USAGES.items():
        usage = result.get(f"{role}Usage")
        if usage:
            tokens = (f", {usage['promptTokens']} prompt and {usage['completionTokens']} completion tokens"
                      if usage["promptTokens"] or usage["completionTokens"] else "")
            cost = f", ${usage['costUsd']:.2f}" if usage.get("costUsd") is not None else ""
            lines += ["", f"{who}: {usage['requests']} {what}, {usage['cached']} from the cache{tokens}{cost}."]
    return "\n".join(lines)


def _prompts(task: dict[str, Any], drops: Drops, progress: Progress) -> list[dict]:
    spec = task["spec"]
    progress.stage("reading prompts")
    # Without a teacher, the turns the sources answer, with their answers.
    prompts = collect(spec["sources"], drops, task["inputs"].get("configMaps"), with_answers=not spec.get("teacher"),
                      whole_tools=keeps_tool_calls(spec))
    wanted, filters = spec.get("samplesPerLanguage"), spec.get("filters") or {}
    with pod_workers() as workers:  # language detection and MinHash signatures on each of the pod's CPUs
        if spec.get("languageDetection") is not None:
            prompts = detect(prompts, spec["languageDetection"], wanted, drops, workers)
        prompts = list(dedupe(prompts, filters.get("nearDuplicateThreshold") or None, drops,  # 0: off
                              workers=workers))
    if filters.get("maxPromptTokens"):
        prompts = drop_long_prompts(prompts, filters["maxPromptTokens"], task["inputs"]["tokenizer"], drops)
    return sample_per_language(prompts, wanted, spec["split"]["seed"], drops)


def keeps_tool_calls(spec: dict[str, Any]) -> bool:
    """Whether the build keeps function-calling conversations whole: it writes the sources' own
    conversations (no teacher) as chatml, unjudged and unpaired; every other build rebuilds turns as
    text, or writes rows without their calls, and drops them (tool_calls)."""
    return (not spec.get("teacher") and spec.get("format", "chatml") == "chatml" and not spec.get("preferences")
            and not _pairs_from_sources(spec) and not (spec.get("filters") or {}).get("judge"))


def _answer(task: dict[str, Any], prompts: list[dict], drops: Drops, progress: Progress, transport=None):
    spec, filters = task["spec"], task["spec"].get("filters") or {}
    judge = (AnswerJudge(filters["judge"], task["inputs"].get("judge"), task["cacheUri"], transport)
             if filters.get("judge") else None)
    if not spec.get("teacher"):  # the sources' own answers, kept as a teacher's would be: nothing is asked
        count = token_counter(task["inputs"]["tokenizer"]) if filters.get("maxAnswerTokens") else None
        return teacher_.keep_given(prompts, AnswerFilter(filters), drops, progress, judge, count), None, judge
    rows, usage = teacher_.answer(prompts, spec["teacher"], task["inputs"].get("teacher"), task["cacheUri"],
                                  AnswerFilter(filters), drops, progress, transport=transport, judge=judge)
    return rows, usage, judge


def _rejected(task: dict[str, Any], rows: list[dict], drops: Drops, progress: Progress, judge: AnswerJudge | None,
              transport=None):
    """spec.preferences: each kept conversation gets preferences.rejected's answers to its last turn
    (rejected.samples of them; the teacher's answer there is the chosen one); a sample equal to the
    teacher's answer teaches nothing, nor does a pair without a rejected answer (every sample empty,
    or refused by an API).
    With filters.judge, the answers are rated (the teacher's rating comes from the cache), or with
    preferences.rewardModel scored; the lowest-scored sample is rejected (with chosen best, the
    highest-scored of the teacher's answer and the samples is chosen and the lowest rejected), and a
    pair whose rejected answer rates at least as high as the chosen one is dropped (_chosen_better).
    Without preferences, a source's pairs are kept by _kept_pairs."""
    prefs = task["spec"].get("preferences")
    if not prefs:
        return _kept_pairs(rows, drops, progress, judge) if _pairs_from_sources(task["spec"]) else rows, None, None
    scorer = RewardScorer(prefs["rewardModel"], task["cacheUri"]) if prefs.get("rewardModel") else None
    answers, usage = teacher_.answer_again([r["messages"][:-1] for r in rows], prefs["rejected"],
                                           task["inputs"].get("rejected"), task["cacheUri"],
                                           "spec.preferences.rejected", progress,
                                           share_gpu=judge is not None and judge.model_input is not None,
                                           transport=transport)
    pairs = []  # (row, its samples: written, distinct, and not the teacher's answer)
    for row, got in zip(rows, answers):
        written = teacher_.distinct([a["text"] for a in got if not a.get("rejected") and a["text"].strip()])
        samples = teacher_.distinct(written, besides=row["messages"][-1]["content"])
        refused = next((a["rejected"] for a in got if a.get("rejected")), None)
        if samples:
            pairs.append((row, samples))
        elif written:
            drops.add("preference_tie", row["messages"][-2]["content"])
        elif refused:  # the endpoint refused this prompt (kept in the cache as such)
            drops.add("rejected_refused", refused)
        else:
            drops.add("rejected_empty", row["messages"][-2]["content"])
    sides = {f"{i}.{k}": row["messages"][:-1] + [{"role": "assistant", "content": text}]
             for i, (row, samples) in enumerate(pairs) for k, text in enumerate([row["messages"][-1]["content"], *samples])}
    scores: dict[str, float | None] = {}
    if judge is not None and pairs:
        progress.stage(f"judging {len(sides) - len(pairs)} rejected answers")
        scores = judge.ratings(sides)
    elif scorer is not None and pairs:
        progress.stage(f"scoring {len(sides)} answers with the reward model", total=len(sides), unit="answers")
        scores = scorer.scores(sides, lambda done: progress.update(done, figure=f"{done} scored"))
    kept = []
    for i, (row, samples) in enumerate(pairs):
        # Candidates (score, text), the teacher's first: where scores tie, the teacher's is chosen.
        teacher_answer, *rivals = [(scores.get(f"{i}.{k}"), text)
                                   for k, text in enumerate([row["messages"][-1]["content"], *samples])]
        (chosen, chosen_text), (rejected, rejected_text) = _pick(teacher_answer, rivals, prefs.get("chosen", "teacher"))
        if _chosen_better(row, (chosen, rejected), drops):
            pair = {**row, "messages": row["messages"][:-1] + [{"role": "assistant", "content": chosen_text}],
                    "rejected": rejected_text}
            kept.append({**pair, "scores": (chosen, rejected)} if scores else pair)
    return kept, usage, scorer


def _pairs_from_sources(spec: dict[str, Any]) -> bool:
    """Whether the sources hold preference pairs (fields preference: then all of them do), whose
    rejected answers the dataset keeps."""
    return spec["sources"][0].get("fields") == "preference"


def _kept_pairs(rows: list[dict], drops: Drops, progress: Progress, judge: AnswerJudge | None) -> list[dict]:
    """The sources' pairs that teach something: a rejected answer, one other than the chosen, and
    one scored below the chosen where both are scored: by the judge (filters.judge, whose ratings
    replace the source's; the chosen answer's comes from its cache) or by the source's own scores."""
    pairs = []
    for row in rows:
        if not row["rejected"]:
            drops.add("rejected_empty", row["messages"][-2]["content"])
        elif not teacher_.distinct([row["rejected"]], besides=row["messages"][-1]["content"]):
            drops.add("preference_tie", row["messages"][-2]["content"])
        else:
            pairs.append(row)
    if judge is not None and pairs:
        progress.stage(f"judging {len(pairs)} rejected answers")
        ratings = judge.ratings({f"{i}.{side}": row["messages"][:-1] + [{"role": "assistant", "content": text}]
                                 for i, row in enumerate(pairs)
                                 for side, text in (("chosen", row["messages"][-1]["content"]),
                                                    ("rejected", row["rejected"]))})
        pairs = [{**row, "scores": (ratings.get(f"{i}.chosen"), ratings.get(f"{i}.rejected"))}
                 for i, row in enumerate(pairs)]
    return [row for row in pairs if _chosen_better(row, row.get("scores") or (None, None), drops)]


def _chosen_better(row: dict, scores: tuple[float | None, float | None], drops: Drops) -> bool:
    """Whether a pair (its conversation ending with the chosen answer) teaches a preference by its
    (chosen, rejected) scores: unless the rejected answer scores at least as high (then it is dropped,
    preference_not_better: DPO would push the student away from an answer as good as the one it is
    pulled to). An unscored side decides nothing."""
    chosen, rejected = scores
    if chosen is not None and rejected is not None and rejected >= chosen:
        drops.add("preference_not_better", f"{rejected:.1f} >= {chosen:.1f}: {row['messages'][-2]['content']}")
        return False
    return True


def _pick(teacher: tuple, samples: list[tuple], chosen: str) -> tuple[tuple, tuple]:
    """(chosen, rejected) of one conversation's candidates, each (score or None, text): the lowest-
    scored sample rejected, and the teacher's answer chosen, or with chosen best the highest-scored of
    all (and then the lowest of all rejected, the teacher's too). Unscored (no scorer, or an API judge
    that gave no rating), the first sample is rejected."""
    scored = [c for c in [teacher, *samples] if c[0] is not None]
    if chosen == "best" and len(scored) > 1:
        best = max(scored, key=lambda c: c[0])  # the first of equals: the teacher's
        return best, min((c for c in scored if c is not best), key=lambda c: c[0])
    rated = [c for c in samples if c[0] is not None]
    return teacher, min(rated, key=lambda c: c[0]) if rated else samples[0]


SHARED_LIMITS = ("concurrency", "requestsPerMinute", "tokensPerMinute")
def _shared_limits(spec: dict[str, Any], shards: int) -> dict[str, Any]:
    """The spec with every API endpoint's limits divided among the shards."""
    spec = copy.deepcopy(spec)
    for path, _ in DATASET_BUILD_ENDPOINTS:
        endpoint = at_path(spec, path)
        for name in SHARED_LIMITS:
            if endpoint and endpoint.get(name):
                endpoint[name] = max(1, endpoint[name] // shards)
    return spec


def run_shard(task: dict[str, Any], run: Store, progress: Progress, shard: int, transport=None) -> dict[str, Any]:
    """Answer (rate, pair) every shards-th prompt, starting at `shard`, into the caches, at 1/shards
    of each API's limits (the provider's limits are the account's, not the pod's)."""
    shards = task["spec"]["shards"]
    task = {**task, "spec": _shared_limits(task["spec"], shards)}
    before = _grader_usages(task["spec"])
    prompts = _prompts(task, Drops(), progress)[shard::shards]
    rows, usage, judge = _answer(task, prompts, Drops(), progress, transport)
    # Into the caches, for the merge:
    paired, rejected, scorer = _rejected(task, rows, Drops(), progress, judge, transport)
    _, sampled = _graded(task, paired, Drops(), progress, transport)
    return {"shard": shard, "prompts": len(prompts), "kept": len(rows),
            "usage": {role: u.report() for role, u in _usages(usage, judge, rejected, scorer, sampled).items()},
            "graderUsage": {name: u.report() for name, (u, _) in _grader_usages(task["spec"], before).items()}}


def _usages(teacher: Usage | None, judge: AnswerJudge | None, rejected: Usage | None,
            scorer: RewardScorer | None, difficulty: Usage | None) -> dict[str, Usage]:
    """What a build asked of each of its models, by their names in the result's usages."""
    return {role: u for role, u in (("teacher", teacher), ("judge", judge and judge.usage), ("rejected", rejected),
                                    ("rewardModel", scorer and scorer.usage), ("difficulty", difficulty))
            if u is not None}


def _grader_usages(spec: dict[str, Any], since: dict | None = None) -> dict[str, tuple[Usage, dict[str, float] | None]]:
    """What difficulty's grader asked of its API endpoints, with their prices: since `since` (an earlier
    answer of this; the last shard merges in its own process, whose count its shard's work is in)."""
    if not spec.get("difficulty"):
        return {}
    return {name: (u.since((since or {}).get(name, (Usage(), None))[0]), price)
            for name, (u, price) in api_usage(spec["difficulty"]["grader"], f"{DIFFICULTY}.grader").items()}


def _add_shard_bills(run: Store, shards: int, usages: dict[str, Usage], graders: dict[str, Usage]) -> None:
    """What the shards paid for, added to the merge's usages (by role) and its grader's (by endpoint):
    the merge found those answers in the cache, and counted them as cached. (Two shards may both pay for
    one text, e.g. a reference both embed: the cached count never goes below zero.)"""
    for i in range(shards):
        shard = finished_result(run.child(f"{SHARDS}/{i}")) or {}
        for counts, bills in ((usages, shard.get("usage", {})), (graders, shard.get("graderUsage", {}))):
            for name, bill in bills.items():
                if name in counts:
                    counts[name].cached = max(0, counts[name].cached - bill["requests"])
                    counts[name].requests += bill["requests"]
                    counts[name].billed(bill["promptTokens"], bill["completionTokens"])


def run(task: dict[str, Any], run: Store, progress: Progress, transport=None) -> dict[str, Any]:
    spec = task["spec"]
    drops, before, data = Drops(), _grader_usages(spec), run.child("data")
    if spec.get("format") == "text":  # documents, as they are: nothing to answer, rate or pair; streamed
        fmt, usage, usages = "text", None, {}
        written = corpus.write(task, data, drops, progress, run.child(corpus.STATE))
    else:
        # The prompts let go once answered: the rows hold what of them the dataset keeps.
        rows, usage, judge = _answer(task, _prompts(task, drops, progress), drops, progress, transport)
        rows, rejected_usage, scorer = _rejected(task, rows, drops, progress, judge, transport)
        rows, difficulty_usage = _graded(task, rows, drops, progress, transport)
        usages = _usages(usage, judge, rejected_usage, scorer, difficulty_usage)
        fmt = "preference" if spec.get("preferences") or _pairs_from_sources(spec) else spec.get("format", "chatml")
        written = _write(rows, fmt, spec, data, progress)
    if not any(written["rows"].values()):  # not a dataset a FineTune or a Benchmark could read
        raise InvalidTask(f"the build kept no rows: {_nothing_kept(drops)}")
    graders = _grader_usages(spec, before)
    if spec.get("shards", 1) > 1:
        _add_shard_bills(run, spec["shards"], usages, {name: u for name, (u, _) in graders.items()})
    result = {
        "uri": data.uri,
        "format": fmt,
        "digest": written["digest"],
        "rows": written["rows"],
        "rowsPerLanguage": written["rowsPerLanguage"],
        "dropped": dict(drops.counts),
        "droppedExamples": drops.examples,
        "teacherTokens": usage.used_tokens if usage else 0,
    }
    # Each model's usage, with the cost at its endpoint's price (an API's).
    endpoints = {"teacher": spec.get("teacher"), "judge": (spec.get("filters") or {}).get("judge"),
                 "rejected": (spec.get("preferences") or {}).get("rejected"), "difficulty": spec.get("difficulty")}
    for role, u in usages.items():
        result[f"{role}Usage"] = u.report(((endpoints.get(role) or {}).get("openai") or {}).get("price"))
    if graders:  # difficulty's grader's API endpoints
        result["graderUsage"] = {name: u.report(price) for name, (u, price) in graders.items()}
    data.write_bytes("README.md", _card(result).encode())
    data.commit()
    if fmt == "text":
        run.child(corpus.STATE).delete_prefix()  # the dataset is whole: what a restart would need is not
    return result


def _nothing_kept(drops: Drops) -> str:
    """Why a build kept no rows: what dropped them, the commonest reason first with an example."""
    if not drops.counts:
        return "its sources hold none"
    reasons = [f"{n} as {why}" for why, n in drops.counts.most_common()]
    top = drops.counts.most_common(1)[0][0]
    if drops.examples.get(top):
        reasons[0] += f" (e.g. {drops.examples[top][0]})"
    return "dropped " + ", ".join(reasons)


def _write(rows: list[dict], fmt: str, spec: dict[str, Any], data: Store, progress: Progress) -> dict[str, Any]:
    """The kept conversations' splits written to data: {rows: per split, rowsPerLanguage, digest}."""
    for row in rows:
        row["key"] = _first_user_key(row["messages"])
    progress.stage("writing splits")
    splits, digest = split_rows(rows, spec["split"]), hashlib.sha256()
    counts = {name: write_split(data, name, (_rendered(r, fmt) for r in splits[name]), digest, spec.get("parquet", True))
              for name in SPLITS}
    return {"rows": counts, "rowsPerLanguage": dict(Counter(r["language"] for r in rows)),
            "digest": "sha256:" + digest.hexdigest()}


def _graded(task: dict[str, Any], rows: list[dict], drops: Drops, progress: Progress,
            transport=None) -> tuple[list[dict], Usage | None]:
    """format graded: the rows with their references, and with difficulty those neither too easy nor too
    hard (and what its sampling asked), but for a held-out source's rows, which a benchmark measures
    whole; other formats' rows as they are."""
    spec = task["spec"]
    if spec.get("format") != "graded":
        return rows, None
    rows = _with_references(rows, spec.get("referencePattern"), drops)
    if not spec.get("difficulty"):
        return rows, None
    held_out = [row for row in rows if row.get("split") in HELD_OUT_FIRST]
    kept, usage = by_difficulty(task, [row for row in rows if row.get("split") not in HELD_OUT_FIRST], drops,
                                progress, transport)
    return kept + held_out, usage


def _with_references(rows: list[dict], pattern: str | None, drops: Drops) -> list[dict]:
    """format graded: each conversation's last answer made its reference (referencePattern's last
    match, as a grader's extract reads an answer); one whose answer gives none is dropped (no_reference)."""
    kept = []
    for row in rows:
        reference = last_match(pattern, row["messages"][-1]["content"])
        if reference:
            kept.append({**row, "reference": reference})
        else:
            drops.add("no_reference", row["messages"][-1]["content"])
    return kept


def _rendered(row: dict, fmt: str) -> dict[str, Any]:
    """A kept conversation as a row of the dataset's format: a preference pair, a prompt with its
    reference (graded: the conversation up to its last user turn), or the conversation."""
    if fmt == "preference":  # answers alone: the rejected side has no reasoning to weigh against
        return preference_row(without_reasoning(row["messages"]), row["rejected"], language=row["language"],
                              **_scores(row))
    if fmt == "graded":
        rate = {"pass_rate": row["passRate"]} if "passRate" in row else {}
        return to_row(without_reasoning(row["messages"][:-1]), "chatml", reference=row["reference"], **rate,
                      language=row["language"])
    return to_row(row["messages"], fmt, language=row["language"], **({"tools": row["tools"]} if "tools" in row else {}))


def _scores(row: dict) -> dict[str, float]:
    """A judged pair's ratings, in UltraFeedback's column names."""
    chosen, rejected = row.get("scores") or (None, None)
    return {k: v for k, v in (("score_chosen", chosen), ("score_rejected", rejected)) if v is not None}


def _first_user_key(messages: list[dict[str, str]]) -> str:
    """A conversation's row_key: its system message and opening prompt (unique after dedupe)."""
    first = next(m["content"] for m in messages if m["role"] == "user")
    return row_key(messages[0]["content"] if messages[0]["role"] == "system" else None, first)
