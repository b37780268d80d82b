"""Benchmark: perplexity on held-out conversations, LLM-judge scores of multi-turn answers (graded
alone, or compared with the baseline's), lm-evaluation-harness tasks and a grader's reward of
answers to held-out prompts, for the model under test and (optionally) its base model -- or, of a
reward model, how it ranks held-out preference pairs -- then gates. Answers, judgements and scores
are saved as they are made, so a restarted benchmark redoes none of them."""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from statistics import mean
from typing import Any

from .. import markdown_cell
from ..batching import perplexity
from ..chat import said
from ..preference import labelled_agreement, labelled_scores, pair_scores
from ..data import no_rows, preference_of, read_split
from ..generate import generate
from ..grader import api_usage, check_scorable, graded_rows, rewards_by_part
from ..models import LazyModel
from ..usage import Usage
from ..progress import Progress
from ..store import Store
from ..task import InvalidTask
from ..vllm_server import VllmServer, choose_engine
from . import lm_eval_tasks
from . import questions as questions_
from .judge import (LanguageRule, comparison_outcome, judge_messages, judge_with_api, local_judgement,
                    pairwise_messages)

OPS = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}


def _answer(ask, judge: dict, questions: list[dict], answers: dict[str, list[str]], save, progress: Progress) -> int:
    """Answer every turn with ask(conversations, max_new_tokens, temperature, seed, on_answer); turn 2
    sees the model's own first answer. Sampled at each category's temperature (greedy where
    unlisted), one request per temperature; each answer is saved as it finishes. Returns the turns
    answered."""
    temperatures = judge.get("temperatures") or {}
    total = sum(len(q["turns"]) for q in questions)
    progress.stage("answering questions", total=total, unit="turns")
    answered = 0
    for turn in (0, 1):
        todo = [q for q in questions if turn < len(q["turns"]) and len(answers.get(q["question_id"], [])) == turn]
        by_temperature: dict[float, list[dict]] = defaultdict(list)
        for q in todo:
            by_temperature[float(temperatures.get(q["category"], 0.0))].append(q)
        for temperature, group in sorted(by_temperature.items()):
            conversations = []
            for q in group:
                earlier = answers.get(q["question_id"], [])
                messages = []
                for i in range(turn):  # the earlier answer as said, its reasoning left out (as Qwen3's template does)
                    messages += [{"role": "user", "content": q["turns"][i]}, {"role": "assistant", "content": said(earlier[i])}]
                conversations.append(messages + [{"role": "user", "content": q["turns"][turn]}])

            def done(i: int, g, group=group) -> None:
                answers.setdefault(group[i]["question_id"], []).append(g.text)
                save()
                progress.update(sum(len(a) for a in answers.values()))

            ask(conversations, judge["maxNewTokens"], temperature, turn, on_answer=done)
            answered += len(group)
    return answered


class _Answering:
    """ask(conversations, max_new_tokens, temperature, seed, on_answer=..., tools=...) of one model, for
    as long as it answers: a vLLM server's, started once for the judge's questions and the reward
    prompts alike, or transformers' continuous batching. Never both at once: the server gives the
    GPU back before transformers loads the model, and a model transformers holds is let go before
    the server starts."""

    def __init__(self, label: str, source: dict, loaded, progress: Progress):
        self.label, self.source, self.loaded, self.progress = label, source, loaded, progress
        self.running = contextlib.ExitStack()
        self.server: VllmServer | None = None

    def ask(self, engine: str, batch_size: int):
        if engine != "vllm":
            self.close()
            model, tokenizer = self.loaded()
            return partial(generate, model, tokenizer, concurrency=batch_size)
        if self.server is None:
            self.loaded.release()  # the judge's answers by transformers, the reward's by vLLM: its GPU memory back
            self.progress.stage(f"starting vLLM for {self.label}")
            self.server = self.running.enter_context(VllmServer(self.source))
        return self.server.generate

    def close(self) -> None:
        self.running.close()
        self.server = None


def _answer_questions(label: str, source: dict, judge: dict, questions: list[dict], run: Store, progress: Progress,
                      answering: _Answering) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """The model's answers, and how they were made (engine, answers per second)."""
    answers = run.read_json_or_none(f"answers/{label}.json") or {}
    engine = choose_engine(judge.get("engine", "auto"), source, "spec.judge.engine")
    if all(len(answers.get(q["question_id"], [])) == len(q["turns"]) for q in questions):
        return answers, {"engine": engine, "answered": 0, "seconds": 0.0, "answersPerSecond": None}  # restarted
    ask = answering.ask(engine, judge["batchSize"])
    started = time.monotonic()  # from the first question: loading the model or starting a server is not answering
    answered = _answer(ask, judge, questions, answers, lambda: run.write_json(f"answers/{label}.json", answers),
                       progress)
    seconds = time.monotonic() - started
    return answers, {"engine": engine, "answered": answered, "seconds": round(seconds, 2),
                     "answersPerSecond": round(answered / seconds, 3) if answered and seconds else None}


def _rewarded(label: str, source: dict, spec: dict, prompts: list[dict], run: Store, progress: Progress,
              answering: _Answering) -> dict[str, list]:
    """{answers}: the model's greedy answer to each graded row's prompt (offered its row's tools), which
    the grader then rewards. Each answer is saved as it comes (a restarted benchmark asks only for the
    missing ones)."""
    path = f"answers/reward-{label}.json"
    answers: dict[str, str] = run.read_json_or_none(path) or {}
    todo = [i for i in range(len(prompts)) if str(i) not in answers]
    if todo:
        ask = answering.ask(choose_engine(spec["engine"], source, "spec.reward.engine"), spec["batchSize"])
        progress.stage(f"answering the reward prompts ({label})", total=len(prompts), unit="answers")

        def done(i: int, g) -> None:
            answers[str(todo[i])] = g.text
            run.write_json(path, answers)
            progress.update(len(answers))

        ask([prompts[i]["messages"] for i in todo], spec["maxNewTokens"], 0.0, 0, on_answer=done,
            tools=[prompts[i]["tools"] for i in todo])
    return {"answers": [answers[str(i)] for i in range(len(prompts))]}


def _ranked(label: str, source: dict, spec: dict, rows: list[dict], run: Store, progress: Progress) -> dict:
    """{rewards: [[chosen, rejected] per pair]}: the reward model's score of each pair's two
    conversations, each scored alone as a grader scores an answer (reward_model.scores)."""
    from .. import reward_model  # noqa: PLC0415

    def rank() -> dict:
        where = f"spec.ranking.dataset: {spec['split']}.jsonl"
        conversations = []
        for n, row in enumerate(rows, 1):
            try:
                prompt, chosen, rejected = preference_of(row)
            except ValueError as e:
                raise InvalidTask(f"{where} row {n}: {e}") from None
            conversations += [prompt + chosen, prompt + rejected]
        progress.stage(f"ranking {len(rows)} pairs with {label}")
        scored = reward_model.scores_of(source, "spec.model" if label == "model" else "spec.baselineModel",
                                        conversations, spec["batchSize"])
        return {"rewards": [scored[i:i + 2] for i in range(0, len(scored), 2)]}

    return run.once(f"ranking/{label}.json", rank)


# How a Benchmark scores rows that say which answers are wanted, by the dataset's format: preference
# pairs (DPO's), or answers labelled one by one (KTO's unpaired rows).
LABELLED_ROWS = {"preference": ("preference pairs", pair_scores), "unpaired": ("labelled answers", labelled_scores)}


def _evaluate_model(label: str, source: dict, spec: dict, rows: list[dict], labelled: str | None,
                    questions: list[dict], prompts: list[dict], run: Store, progress: Progress,
                    tasks_dir: Path | None) -> dict[str, Any]:
    """Answers, rewarded answers, perplexity (and, of rows in a LABELLED_ROWS format, the answers'
    log-probabilities) and lm-eval scores of one model (label: model or baseline). Answers first: a
    vLLM server (one for the questions and the prompts) has given the GPU back before transformers loads
    the model, if it must."""
    loaded = LazyModel(source, on_load=lambda: progress.stage(f"loading {label}"))
    out: dict[str, Any] = {}
    answering = _Answering(label, source, loaded, progress)
    try:
        if questions:
            out["answers"], out["generation"] = _answer_questions(label, source, spec["judge"], questions, run,
                                                                  progress, answering)
        if prompts:
            out["reward"] = _rewarded(label, source, spec["reward"], prompts, run, progress, answering)
    finally:
        answering.close()
    if rows:
        where = f"spec.perplexity.dataset: {spec['perplexity']['split']}.jsonl"
        progress.stage(f"perplexity of {label}")
        out["perplexity"] = run.once(f"perplexity/{label}.json", lambda: perplexity(*loaded(), rows, where=where))
    if rows and labelled:
        what, scores = LABELLED_ROWS[labelled]
        progress.stage(f"{what} of {label}")
        out["preference"] = run.once(f"preference/{label}.json", lambda: scores(*loaded(), rows, where))
    if spec.get("lmEval"):
        progress.stage(f"lm-eval tasks on {label}")
        out["lmEval"] = run.once(f"lm-eval/{label}.json",
                                lambda: lm_eval_tasks.evaluate(*loaded(), spec["lmEval"], tasks_dir))
    loaded.release()
    return out


def _judge_items(judge: dict, items: list[tuple[str, list[dict[str, str]]]], kind: str, task: dict, run: Store,
                 progress: Progress, local_judge, usage: Usage) -> dict[str, Any]:
    """{item id: rating (kind rating) or verdict A/B/C (kind verdict), None where an API judge gave
    none} for each (item id, judge messages). Each judgement is kept as it comes (an API judge's in
    the namespace's cache, a local judge's in the run), and counted in `usage`; local_judge() loads
    the local judge."""
    out: dict[str, Any] = {}

    def on_verdict(item_id: str, verdict: dict, cached: bool) -> None:
        out[item_id] = verdict[kind]
        progress.update(len(out), figure=f"judged {len(out)}/{len(items)}")

    if "openai" in judge:
        judge_with_api(judge["openai"], items, task["cacheUri"], judge.get("maxReasks", 2), on_verdict, kind=kind,
                       usage=usage)
    elif items:
        model, tokenizer = local_judge()
        path = f"ratings/local{'' if kind == 'rating' else '-pairwise'}.json"
        saved = run.read_json_or_none(path) or {}
        for item_id, messages in items:
            if item_id not in saved:
                saved[item_id] = local_judgement(model, tokenizer, messages, kind)
                run.write_json(path, saved)
                usage.paid()
            else:
                usage.cached += 1
            on_verdict(item_id, {kind: saved[item_id]}, cached=False)
    return out


def _grade(judge: dict, questions: list[dict], answers: dict[str, dict[str, list[str]]], rule: LanguageRule | None,
           judging) -> tuple[dict[str, dict[str, list[float | None]]], dict[str, str]]:
    """Single-answer grading: {label: {question_id: [rating per turn]}} (None where an API judge gave
    no rating), and why answers were rated without the judge."""
    items, ratings, why = [], {}, {}
    style = "api" if "openai" in judge else "local"
    for label, by_id in answers.items():
        ratings[label] = {q["question_id"]: [None] * len(q["turns"]) for q in questions}
        for q in questions:
            for turn in range(len(q["turns"])):
                if rule and rule.off_language(q["language"], by_id[q["question_id"]][turn]):
                    ratings[label][q["question_id"]][turn] = 1.0
                    why[f"{label}/{q['question_id']}/{turn}"] = "answered in another language"
                    continue
                items.append((f"{label}/{q['question_id']}/{turn}", judge_messages(q, by_id[q["question_id"]], turn, style)))
    for item_id, rating in judging(items, "rating", "judging").items():
        label, qid, turn = item_id.split("/")
        ratings[label][qid][int(turn)] = rating
    return ratings, why


def _compare(judge: dict, questions: list[dict], model: dict[str, list[str]], base: dict[str, list[str]],
             against: str, rule: LanguageRule | None,
             judging) -> tuple[dict[str, list[str | None]], dict[str, list[str | None]], dict[str, str]]:
    """Pairwise comparison with the other answers (`against`: the baseline's, or the opponent's of
    judge.opponentAnswersUri): {question_id: [the model's outcome per turn: win, tie, loss, None when
    undecided]}, the two orders' verdicts per turn ([model as A, model as B]), and why comparisons
    were decided without the judge (an answer in another language loses)."""
    style = "api" if "openai" in judge else "local"
    outcomes = {q["question_id"]: [None] * len(q["turns"]) for q in questions}
    games: dict[str, list[list[str | None]]] = {q["question_id"]: [[None, None] for _ in q["turns"]] for q in questions}
    items, why = [], {}
    for q in questions:
        qid = q["question_id"]
        for turn in range(len(q["turns"])):
            off = [bool(rule and rule.off_language(q["language"], a[qid][turn])) for a in (model, base)]
            if any(off):
                outcomes[qid][turn] = "tie" if all(off) else ("loss" if off[0] else "win")
                why[f"{qid}/{turn}"] = ("both answered in another language" if all(off) else
                                        f"the {'model' if off[0] else against} answered in another language")
                continue
            items += [(f"{qid}/{turn}/0", pairwise_messages(q, model[qid], base[qid], turn, style)),
                      (f"{qid}/{turn}/1", pairwise_messages(q, base[qid], model[qid], turn, style))]
    for item_id, verdict in judging(items, "verdict", f"comparing with the {against}").items():
        qid, turn, order = item_id.split("/")
        games[qid][int(turn)][int(order)] = verdict
    for item_id, _ in items[::2]:
        qid, turn, _ = item_id.split("/")
        outcomes[qid][int(turn)] = comparison_outcome(*games[qid][int(turn)])
    return outcomes, games, why


def _judge(judge: dict, judge_model: dict | None, questions: list[dict], answers: dict[str, dict[str, list[str]]],
           opponent: dict[str, list[str]] | None, task: dict, run: Store, progress: Progress) -> dict[str, Any]:
    """The judge's work, as judge.mode asks: {ratings (single), pairwise: {outcomes, games, against}
    (pairwise: against the opponent's answers where given, else the baseline's)}."""
    rule = LanguageRule(judge["languages"]) if judge.get("languageRule", True) else None
    local_judge = LazyModel(judge_model)
    usage = Usage()
    # A reasoning model's answers are rated, and their language told, by what they say after their <think>.
    answers = {label: {qid: list(map(said, turns)) for qid, turns in by_id.items()} for label, by_id in answers.items()}
    opponent = opponent and {qid: list(map(said, turns)) for qid, turns in opponent.items()}

    def judging(items, kind, stage):
        progress.stage(stage, total=len(items), unit="judgements")
        return _judge_items(judge, items, kind, task, run, progress, local_judge, usage)

    out: dict[str, Any] = {}
    why: dict[str, str] = {}
    mode = judge.get("mode", "single")
    if mode != "pairwise":
        out["ratings"], why = _grade(judge, questions, answers, rule, judging)
    if mode != "single":
        against = "opponent" if opponent else "baseline"
        outcomes, games, pair_why = _compare(judge, questions, answers["model"], opponent or answers["baseline"],
                                             against, rule, judging)
        out["pairwise"] = {"outcomes": outcomes, "games": games, "against": against}
        why |= {f"pairwise/{k}": v for k, v in pair_why.items()}
    run.write_json("ratings/language-rule.json", why)
    local_judge.release()
    out["usage"] = usage.report((judge.get("openai") or {}).get("price"))
    return out


def _mean(values: list[float | None]) -> float | None:
    rated = [v for v in values if v is not None]
    return mean(rated) if rated else None


def _prefers_chosen(scores: dict[str, list[list[float]]]) -> float | None:
    """Share of pairs whose chosen answer the model finds likelier per token than the rejected one."""
    return _mean([float(c / max(nc, 1) > r / max(nr, 1)) for (c, r), (nc, nr) in zip(scores["logps"], scores["tokens"])])


OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def _win_rate(outcomes: list[str | None]) -> float | None:
    """Wins plus half the ties, of the decided comparisons."""
    return _mean([OUTCOME_SCORE[o] if o else None for o in outcomes])


def _pairwise_metrics(outcomes: dict[str, list[str | None]], questions: list[dict]) -> dict[str, float | None]:
    every = [o for q in questions for o in outcomes[q["question_id"]]]
    metrics = {"judge.winRate": _win_rate(every), "judge.undecided": every.count(None)}
    metrics |= {"judge.wins": every.count("win"), "judge.ties": every.count("tie"), "judge.losses": every.count("loss")}
    for lang in sorted({q["language"] for q in questions}):
        metrics[f"judge.winRate.{lang}"] = _win_rate([o for q in questions if q["language"] == lang
                                                      for o in outcomes[q["question_id"]]])
    for turn in (0, 1):
        metrics[f"judge.winRate.turn{turn + 1}"] = _win_rate([outcomes[q["question_id"]][turn] for q in questions
                                                              if turn < len(q["turns"])])
    return metrics


def _ranking_metrics(results: dict[str, dict], pairs: list[dict], languages: list[str]) -> dict[str, float | None]:
    """ranking.accuracy (ranking.baseline for the baseline), each also by the listed languages, and
    ranking.margin."""
    metrics: dict[str, float | None] = {}
    for label, name in (("model", "ranking.accuracy"), ("baseline", "ranking.baseline")):
        if "ranking" in (results.get(label) or {}):
            right = [float(c > r) for c, r in results[label]["ranking"]["rewards"]]
            metrics[name] = _mean(right)
            for lang in languages:
                metrics[f"{name}.{lang}"] = _mean([ok for ok, row in zip(right, pairs) if row.get("language") == lang])
    if "ranking" in results["model"]:
        metrics["ranking.margin"] = _mean([c - r for c, r in results["model"]["ranking"]["rewards"]])
    return metrics


def _metrics(results: dict[str, dict], judged: dict[str, Any], questions: list[dict]) -> dict[str, float]:
    metrics: dict[str, float | None] = {}
    if "desirable" in results["model"].get("preference", {}):  # labelled answers: scored with a baseline only
        metrics["preference.rewardAccuracy"] = labelled_agreement(results["model"]["preference"],
                                                                  results["baseline"]["preference"])
    elif "preference" in results["model"]:
        tuned = results["model"]["preference"]
        metrics["preference.accuracy"] = _prefers_chosen(tuned)
        if "baseline" in results:
            base = results["baseline"]["preference"]
            metrics["preference.baseline"] = _prefers_chosen(base)
            # DPO's implicit reward against the baseline: did the chosen answer gain more than the rejected?
            metrics["preference.rewardAccuracy"] = _mean([
                float(mc - bc > mr - br) for (mc, mr), (bc, br) in zip(tuned["logps"], base["logps"])])
    for label, name in (("model", "reward.value"), ("baseline", "reward.baseline")):
        if "reward" in (results.get(label) or {}):
            metrics[name] = _mean(results[label]["reward"]["rewards"])
            for part, got in results[label]["reward"].get("parts", {}).items():  # as judge.score.<language>
                metrics[f"{name}.{part}"] = _mean(got)
    if "perplexity" in results["model"]:
        metrics["perplexity.value"] = results["model"]["perplexity"]["assistant"]
        metrics["perplexity.allTokens"] = results["model"]["perplexity"]["all"]
        if "baseline" in results:
            base = results["baseline"]["perplexity"]["assistant"]
            metrics["perplexity.baseline"] = base
            metrics["perplexity.changePercent"] = 100 * (metrics["perplexity.value"] - base) / base
    for label, prefix in (("model", "lmEval"), ("baseline", "lmEval.baseline")):
        for name, value in (results.get(label) or {}).get("lmEval", {}).items():
            metrics[f"{prefix}.{name}"] = value
    if "pairwise" in judged:
        metrics |= _pairwise_metrics(judged["pairwise"]["outcomes"], questions)
    ratings = judged.get("ratings", {})
    for label, prefix in (("model", "judge.score"), ("baseline", "judge.baseline")):
        if label not in ratings:
            continue
        every = [r for q in questions for r in ratings[label][q["question_id"]]]
        metrics[prefix] = _mean(every)
        for lang in sorted({q["language"] for q in questions}):
            metrics[f"{prefix}.{lang}"] = _mean([r for q in questions if q["language"] == lang
                                                 for r in ratings[label][q["question_id"]]])
        turn_prefix = "judge" if label == "model" else prefix
        for turn in (0, 1):
            metrics[f"{turn_prefix}.turn{turn + 1}"] = _mean([ratings[label][q["question_id"]][turn] for q in questions
                                                              if turn < len(q["turns"])])
        if label == "model":
            metrics["judge.unrated"] = sum(r is None for r in every)
    return {k: round(v, 4) for k, v in metrics.items() if v is not None}


def _categories(ratings: dict, questions: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for label, by_id in ratings.items():
        groups: dict[str, list] = defaultdict(list)
        for q in questions:
            groups[q["category"]] += by_id[q["question_id"]]
        out[label] = {cat: round(m, 3) for cat, values in sorted(groups.items()) if (m := _mean(values)) is not None}
    return out


def _pairwise_categories(outcomes: dict[str, list[str | None]], questions: list[dict]) -> dict[str, dict[str, float]]:
    """Per category: wins, ties, losses, undecided and the win rate."""
    groups: dict[str, list] = defaultdict(list)
    for q in questions:
        groups[q["category"]] += outcomes[q["question_id"]]
    return {cat: {"wins": found.count("win"), "ties": found.count("tie"), "losses": found.count("loss"),
                  "undecided": found.count(None), "winRate": _win_rate(found)} for cat, found in sorted(groups.items())}


def _chart(categories: dict[str, dict[str, float]], ylabel: str = "judge score (1-10)", top: float = 10) -> bytes:
    """Per-category figures, the model beside its baseline."""
    import io  # noqa: PLC0415

    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = sorted({c for scores in categories.values() for c in scores})
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.9), 4))
    width = 0.8 / max(len(categories), 1)
    for i, (label, scores) in enumerate(categories.items()):
        ax.bar([x + i * width for x in range(len(names))], [scores.get(n, 0) for n in names], width, label=label)
    ax.set_xticks([x + width * (len(categories) - 1) / 2 for x in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylim(0, top)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def evaluate_gates(gates: list[dict], metrics: dict[str, float]) -> list[dict[str, Any]]:
    outcomes = []
    for gate in gates:
        value = metrics.get(gate["metric"])
        outcomes.append({"gate": f"{gate['metric']} {gate['op']} {gate['value']}", "value": value,
                         "passed": value is not None and OPS[gate["op"]](value, gate["value"])})
    return outcomes


def _reward_prompts(spec: dict, dataset: dict) -> list[dict]:
    """The reward dataset's rows as the grader sees them (grader.graded_of: prompt messages, reference...)."""
    check_scorable(spec["grader"], "spec.reward.grader")
    rows = read_split(dataset["uri"], spec["split"], spec.get("maxSamples") or None)
    if not rows:
        raise InvalidTask(f"spec.reward.dataset: {no_rows(dataset['uri'], spec['split'])}")
    return graded_rows(rows, spec["grader"], f"spec.reward.dataset: {spec['split']}.jsonl")  # a row each


def _ranking_lines(pairs: list[dict], ranked: dict[str, list[list[float]]], shown: int = 20) -> list[str]:
    """Accuracy by language, where the rows say theirs (a DatasetBuild's do), and the pairs the model
    ranks wrong, worst first (at most `shown`): what to read before trusting it."""
    lines = []
    languages = sorted({row["language"] for row in pairs if row.get("language")})
    if languages:
        lines += ["", "| language | pairs | " + " | ".join(f"{label} accuracy" for label in ranked) + " |",
                  "|---|---|" + "---|" * len(ranked)]
        for lang in languages:
            of = [i for i, row in enumerate(pairs) if row.get("language") == lang]
            rates = [f"{sum(got[i][0] > got[i][1] for i in of) / len(of):.3f}" for got in ranked.values()]
            lines.append(f"| {lang} | {len(of)} | " + " | ".join(rates) + " |")
    wrong = sorted((c - r, i) for i, (c, r) in enumerate(ranked["model"]) if not c > r)
    lines += ["", "## Pairs ranked wrong", "",
             f"{len(wrong)} of {len(pairs)} pairs: the rejected answer scored at least as high as the chosen one"
             + (f" (the {shown} with the lowest margin)" if len(wrong) > shown else "") + "."]
    if not wrong:
        return lines
    lines += ["", "| pair | prompt | chosen | rejected | margin | " + " | ".join(f"{label} scores" for label in ranked)
              + " |", "|---|---|---|---|---|" + "---|" * len(ranked)]
    for margin, i in wrong[:shown]:
        prompt, chosen, rejected = preference_of(pairs[i])
        texts = [markdown_cell(messages[-1]["content"], 120) for messages in (prompt, chosen, rejected)]
        scores = [f"{got[i][0]:.3g} / {got[i][1]:.3g}" for got in ranked.values()]
        lines.append(f"| {i + 1} | " + " | ".join(texts) + f" | {margin:.3g} | " + " | ".join(scores) + " |")
    return lines


def _report(task: dict, metrics: dict, gates: list, questions: list, judged: dict, answers: dict,
            categories: dict, generation: dict, prompts: list, rewarded: dict, pairs: list, ranked: dict) -> str:
    ratings, pairwise = judged.get("ratings", {}), judged.get("pairwise")
    lines = [f"# Benchmark {task['resource']['name']}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    if gates:
        lines += ["", "| gate | value | passed |", "|---|---|---|"]
        lines += [f"| {g['gate']} | {g['value']} | {'yes' if g['passed'] else 'NO'} |" for g in gates]
    if categories:
        labels = list(categories)
        cats = sorted({c for scores in categories.values() for c in scores})
        lines += ["", "![scores by category](scores.png)", "", "| category | " + " | ".join(labels) + " |",
                  "|---|" + "---|" * len(labels)]
        lines += [f"| {c} | " + " | ".join(str(categories[lb].get(c, "")) for lb in labels) + " |" for c in cats]
    if pairwise:
        lines += ["", f"## The model against its {pairwise['against']}", "", "Each turn's two answers compared twice, in swapped "
                  "places; a win needs both orders to agree.", "", "![win rate by category](win-rate.png)", "",
                  "| category | wins | ties | losses | undecided | win rate |", "|---|---|---|---|---|---|"]
        lines += [f"| {c} | {v['wins']} | {v['ties']} | {v['losses']} | {v['undecided']} | "
                  f"{'' if v['winRate'] is None else round(v['winRate'], 3)} |" for c, v in pairwise["categories"].items()]
    if generation:
        lines += ["", "| answered by | engine | turns | answers/s |", "|---|---|---|---|"]
        lines += [f"| {label} | {g['engine']} | {g['answered']} | {g['answersPerSecond']} |"
                  for label, g in generation.items()]
    if rewarded:
        lines += ["", "## Rewarded answers", "", "Greedy answers to the reward prompts, each after its reward "
                  "(a check's 1 when it passes; a sum's parts in brackets).", "",
                  "| prompt | reference | " + " | ".join(rewarded) + " |", "|---|---|" + "---|" * len(rewarded)]
        def scored(r: dict, i: int) -> str:
            parts = ", ".join(f"{name} {got[i]:.3g}" for name, got in r.get("parts", {}).items())
            return f"{r['rewards'][i]:.3g}" + (f" ({parts})" if parts else "")
        for i, p in enumerate(prompts):
            cells = [f"{scored(r, i)}: {markdown_cell(r['answers'][i], 200)}" for r in rewarded.values()]
            lines.append(f"| {markdown_cell(p['question'], 120)} | {markdown_cell(p['reference'] or '', 120)} | "
                         + " | ".join(cells) + " |")
    if ranked:
        lines += _ranking_lines(pairs, ranked)
    if questions:
        def fmt(r):
            return "unrated" if r is None else f"{r:.2f}"
        columns = [*ratings, *([f"vs {pairwise['against']}"] if pairwise else [])]
        lines += ["", "| question | category | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
        for q in questions:
            cells = [" / ".join(fmt(r) for r in ratings[label][q["question_id"]]) for label in ratings]
            if pairwise:
                cells.append(" / ".join(o or "undecided" for o in pairwise["outcomes"][q["question_id"]]))
            lines.append(f"| {q['question_id']} | {q['category']} | " + " | ".join(cells) + " |")
        lines += ["", "## Answers", ""]
        for q in questions:
            for turn, text in enumerate(q["turns"]):
                lines += [f"### {q['question_id']}, turn {turn + 1}: {text}", ""]
                lines += [f"- **{label}**: {json.dumps(a[q['question_id']][turn], ensure_ascii=False)}"
                          for label, a in answers.items()]
                lines.append("")
    return "\n".join(lines)


def run(task: dict[str, Any], run: Store, progress: Progress) -> dict[str, Any]:
    spec, inputs = task["spec"], task["inputs"]
    rows: list[dict] = []
    if spec.get("perplexity"):
        ppl = spec["perplexity"]
        rows = read_split(inputs["dataset"]["uri"], ppl["split"], ppl.get("maxSamples") or None)
        if not rows:  # else no perplexity at all, and a gate on it failing as if it were too high
            raise InvalidTask(f"spec.perplexity.split: {no_rows(inputs['dataset']['uri'], ppl['split'])}")
    questions = questions_.load(spec["judge"]) if spec.get("judge") else []
    opponent = (questions_.opponent_answers(spec["judge"]["opponentAnswersUri"], questions)  # refused before answering
                if questions and spec["judge"].get("opponentAnswersUri") else None)
    prompts = _reward_prompts(spec["reward"], inputs["rewardDataset"]) if spec.get("reward") else []

    models = {"model": inputs["model"]}
    if inputs.get("baseline"):
        models["baseline"] = inputs["baseline"]
    tasks_dir = lm_eval_tasks.task_folder((spec.get("lmEval") or {}).get("tasksUri"))
    labelled = inputs["dataset"].get("format") if rows else None
    if labelled not in LABELLED_ROWS or labelled == "unpaired" and "baseline" not in models:
        labelled = None  # a labelled answer's log-probability says something only as a change from the baseline's
    pairs: list[dict] = []
    if spec.get("ranking"):  # a reward model: ranking alone (the CRD's rule)
        pairs = read_split(inputs["rankingDataset"]["uri"], spec["ranking"]["split"],
                           spec["ranking"].get("maxSamples") or None)
        if not pairs:
            ranked = no_rows(inputs["rankingDataset"]["uri"], spec["ranking"]["split"], "pairs")
            raise InvalidTask(f"spec.ranking.dataset: {ranked}")
        found = {row.get("language") for row in pairs} - {None}
        missing = [lang for lang in spec["ranking"].get("languages") or [] if lang not in found]
        if missing:
            raise InvalidTask(f"spec.ranking.languages: no {spec['ranking']['split']} pairs in {', '.join(missing)}; "
                              f"the rows' languages: {', '.join(sorted(found)) or 'none (no language field)'}")
        results = {label: {"ranking": _ranked(label, source, spec["ranking"], pairs, run, progress)}
                   for label, source in models.items()}
    else:
        results = {label: _evaluate_model(label, source, spec, rows, labelled, questions, prompts, run, progress,
                                          tasks_dir) for label, source in models.items()}
    rewarded = {label: r["reward"] for label, r in results.items() if "reward" in r}
    for answered in rewarded.values():  # after every model has answered: a judge asked once for all
        answered["rewards"], parts = rewards_by_part(spec["reward"]["grader"], answered["answers"], prompts,
                                                     task["cacheUri"], "spec.reward.grader")
        if parts:  # a sum grader's: each part's reward of each answer, by name
            answered["parts"] = parts
    # What the grader asked of its API endpoints (its judge, its embeddings), with the cost
    grader_usage = {name: usage.report(price) for name, (usage, price)
                    in api_usage(spec["reward"]["grader"], "spec.reward.grader").items()} if rewarded else {}
    answers = {label: r["answers"] for label, r in results.items() if "answers" in r}
    judged = _judge(spec["judge"], inputs.get("judge"), questions, answers, opponent, task, run, progress) if questions else {}
    if opponent:  # shown beside the model's in the report, not graded
        answers["opponent"] = opponent
    if "pairwise" in judged:
        judged["pairwise"]["categories"] = _pairwise_categories(judged["pairwise"]["outcomes"], questions)

    metrics = _ranking_metrics(results, pairs, spec["ranking"].get("languages") or []) if pairs else {}
    metrics |= _metrics(results, judged, questions)
    gates = evaluate_gates(spec.get("gates", []), metrics)
    categories = _categories(judged.get("ratings", {}), questions)
    generation = {label: r["generation"] for label, r in results.items() if "generation" in r}
    ranked = {label: r["ranking"]["rewards"] for label, r in results.items() if "ranking" in r}
    report = {"metrics": metrics, "gates": gates, "categories": categories, "ratings": judged.get("ratings", {}),
              "answers": answers, "generation": generation, **({"pairwise": judged["pairwise"]} if "pairwise" in judged else {}),
              **({"rewarded": rewarded} if rewarded else {}), **({"ranking": ranked} if ranked else {})}
    run.write_json("report/report.json", report)
    if categories:
        run.write_bytes("report/scores.png", _chart(categories))
    if "pairwise" in judged:
        rates = {c: v["winRate"] for c, v in judged["pairwise"]["categories"].items() if v["winRate"] is not None}
        run.write_bytes("report/win-rate.png", _chart({f"model vs {judged['pairwise']['against']}": rates},
                                                      "win rate (ties count half)", 1))
    run.write_bytes("report/report.md", _report(task, metrics, gates, questions, judged, answers, categories, generation,
                                                prompts, rewarded, pairs, ranked).encode())
    run.commit("report")
    return {"metrics": metrics, "gates": gates, "passed": all(g["passed"] for g in gates),
            "reportUri": run.child("report").uri,
            **({"comparedWith": judged["pairwise"]["against"]} if "pairwise" in judged else {}),
            **({"judgeUsage": judged["usage"]} if judged else {}),
            **({"graderUsage": grader_usage} if grader_usage else {})}
