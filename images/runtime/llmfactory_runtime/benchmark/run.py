"""Benchmark: perplexity on held-out conversations and LLM-judge scores, for the model under test
and (optionally) its base model, then gates. Answers and ratings are saved as they are made, so a
restarted benchmark redoes none of them."""

from __future__ import annotations

import gc
import json
from collections import defaultdict
from statistics import mean
from typing import Any

from ..batching import perplexity
from ..data import read_split
from ..generate import generate
from ..models import load_model, load_tokenizer
from ..progress import Progress
from ..store import Store
from .judge import builtin_questions, expected_rating, judge_messages, rating_distribution

OPS = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}


def _questions(judge: dict) -> list[dict]:
    questions = []
    for lang in judge["languages"]:
        qs = builtin_questions(lang)[: judge.get("maxQuestions") or None]
        questions += [{**q, "language": lang} for q in qs]
    return questions


def _cached(run: Store, key: str, compute) -> Any:
    """Work saved under key in the run: done once, even across restarts."""
    found = run.read_json_or_none(key)
    if found is None:
        found = compute()
        run.write_json(key, found)
    return found


def _evaluate_model(label: str, source: dict, spec: dict, rows: list[dict], questions: list[dict],
                    run: Store, progress: Progress) -> dict[str, Any]:
    """Perplexity and answers of one model (label: model or baseline)."""
    progress.stage(f"loading {label}")
    model, tokenizer = load_model(source), load_tokenizer(source)
    model.eval()
    out: dict[str, Any] = {}
    if rows:
        progress.stage(f"perplexity of {label}")
        out["perplexity"] = _cached(run, f"perplexity/{label}.json", lambda: perplexity(model, tokenizer, rows))
    if questions:
        judge = spec["judge"]
        answers = run.read_json_or_none(f"answers/{label}.json") or {}
        progress.stage(f"answering questions ({label})", total=len(questions), unit="questions")
        todo = [q for q in questions if q["question_id"] not in answers]
        for start in range(0, len(todo), judge["batchSize"]):
            batch = todo[start:start + judge["batchSize"]]
            gens = generate(model, tokenizer, [[{"role": "user", "content": q["turns"][0]}] for q in batch],
                            judge["maxNewTokens"])
            answers.update({q["question_id"]: g.text for q, g in zip(batch, gens)})
            run.write_json(f"answers/{label}.json", answers)
            progress.update(len(questions) - len(todo) + start + len(batch))
        out["answers"] = answers
    del model
    gc.collect()
    return out


def _judge(source: dict, questions: list[dict], answers: dict[str, dict[str, str]], run: Store,
           progress: Progress) -> dict[str, dict[str, float]]:
    """{label: {question_id: rating}} with ratings saved per label as they are made."""
    model, tokenizer = load_model(source), load_tokenizer(source)
    model.eval()
    ratings: dict[str, dict[str, float]] = {}
    total = len(questions) * len(answers)
    progress.stage("judging", total=total, unit="answers")
    done = 0
    for label, by_id in answers.items():
        ratings[label] = run.read_json_or_none(f"ratings/{label}.json") or {}
        for q in questions:
            if q["question_id"] not in ratings[label]:
                probs = rating_distribution(model, tokenizer,
                                            judge_messages(q["turns"][0], by_id[q["question_id"]], q.get("reference")))
                ratings[label][q["question_id"]] = round(expected_rating(probs), 4)
                run.write_json(f"ratings/{label}.json", ratings[label])
            done += 1
            progress.update(done, figure=f"judged {done}/{total}")
    return ratings


def _metrics(results: dict[str, dict], ratings: dict[str, dict[str, float]], questions: list[dict]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if "perplexity" in results["model"]:
        metrics["perplexity.value"] = results["model"]["perplexity"]["assistant"]
        metrics["perplexity.allTokens"] = results["model"]["perplexity"]["all"]
        if "baseline" in results:
            base = results["baseline"]["perplexity"]["assistant"]
            metrics["perplexity.baseline"] = base
            metrics["perplexity.changePercent"] = 100 * (metrics["perplexity.value"] - base) / base
    for label, prefix in (("model", "judge.score"), ("baseline", "judge.baseline")):
        if label not in ratings:
            continue
        by_lang = defaultdict(list)
        for q in questions:
            by_lang[q["language"]].append(ratings[label][q["question_id"]])
        metrics[prefix] = mean(ratings[label].values())
        metrics.update({f"{prefix}.{lang}": mean(v) for lang, v in by_lang.items()})
    return {k: round(v, 4) for k, v in metrics.items()}


def evaluate_gates(gates: list[dict], metrics: dict[str, float]) -> list[dict[str, Any]]:
    outcomes = []
    for gate in gates:
        value = metrics.get(gate["metric"])
        outcomes.append({"gate": f"{gate['metric']} {gate['op']} {gate['value']}", "value": value,
                         "passed": value is not None and OPS[gate["op"]](value, gate["value"])})
    return outcomes


def _report(task: dict, metrics: dict, gates: list, questions: list, ratings: dict, answers: dict) -> str:
    lines = [f"# Benchmark {task['resource']['name']}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    if gates:
        lines += ["", "| gate | value | passed |", "|---|---|---|"]
        lines += [f"| {g['gate']} | {g['value']} | {'yes' if g['passed'] else 'NO'} |" for g in gates]
    if questions:
        lines += ["", "| question | category | " + " | ".join(ratings) + " |", "|---|---|" + "---|" * len(ratings)]
        lines += [f"| {q['question_id']} | {q['category']} | " +
                  " | ".join(f"{ratings[label][q['question_id']]:.2f}" for label in ratings) + " |" for q in questions]
        lines += ["", "## Answers", ""]
        for q in questions:
            lines += [f"### {q['question_id']}: {q['turns'][0]}", ""]
            lines += [f"- **{label}**: {json.dumps(a[q['question_id']], ensure_ascii=False)}" for label, a in answers.items()]
            lines.append("")
    return "\n".join(lines)


def run(task: dict[str, Any], run: Store, progress: Progress) -> dict[str, Any]:
    spec, inputs = task["spec"], task["inputs"]
    rows: list[dict] = []
    if spec.get("perplexity"):
        ppl = spec["perplexity"]
        rows = read_split(inputs["dataset"]["uri"], ppl["split"])[: ppl.get("maxSamples") or None]
    questions = _questions(spec["judge"]) if spec.get("judge") else []

    models = {"model": inputs["model"]}
    if inputs.get("baseline"):
        models["baseline"] = inputs["baseline"]
    results = {label: _evaluate_model(label, source, spec, rows, questions, run, progress)
               for label, source in models.items()}
    answers = {label: r["answers"] for label, r in results.items() if "answers" in r}
    ratings = _judge(inputs["judge"], questions, answers, run, progress) if questions else {}

    metrics = _metrics(results, ratings, questions)
    gates = evaluate_gates(spec.get("gates", []), metrics)
    report = {"metrics": metrics, "gates": gates, "ratings": ratings, "answers": answers}
    run.write_json("report/report.json", report)
    run.write_bytes("report/report.md", _report(task, metrics, gates, questions, ratings, answers).encode())
    run.commit("report")
    return {"metrics": metrics, "gates": gates, "passed": all(g["passed"] for g in gates),
            "reportUri": run.child("report").uri}
