"""The one-line figure of a result: status.headline, the printer column and the summary table;
and the sentence that makes a finished Benchmark a failure."""

from __future__ import annotations

from typing import Any


def headline(kind: str, result: dict[str, Any] | None) -> str:
    if not result:
        return ""
    if kind == "DatasetBuild":
        rows = result["rows"]
        unit = {"preference": "preference pairs", "graded": "prompts with references",
                "text": "documents"}.get(result.get("format"), "rows")
        # rows a source held that could not be read: a sign of a mapping that half fits the data
        malformed = (result.get("dropped") or {}).get("malformed")
        unread = f", {malformed} malformed source row{'s' * (malformed > 1)} left out" if malformed else ""
        return (f"{sum(rows.values())} {unit} ({rows.get('train', 0)}/{rows.get('validation', 0)}/{rows.get('test', 0)})"
                f"{unread}")
    if kind == "FineTune":
        best = (f", best eval at step {result['bestStep']}" + (" (stopped early)" if result.get("stoppedEarly") else "")
                if result.get("bestStep") else "")
        if result.get("reward") is not None:  # objective grpo: the reward is what it raises; its loss stays near 0
            base = f"{result['baseReward']:.2f} -> " if result.get("baseReward") is not None else ""
            return f"reward {base}{result['reward']:.2f}"
        rewards = f", reward accuracy {result['rewardAccuracy']:.2f}" if result.get("rewardAccuracy") is not None else ""
        cut = f", {result['truncatedRows']} rows cut at maxSeqLength" if result.get("truncatedRows") else ""
        return f"loss {result['firstLoss']:.3f} -> {result['finalLoss']:.3f}{rewards}{best}{cut}"
    if kind == "Benchmark":
        m = result["metrics"]
        parts = []
        if "ranking.accuracy" in m:
            parts.append(f"ranking accuracy {m['ranking.accuracy']:.2f}" + (
                f" (base {m['ranking.baseline']:.2f})" if "ranking.baseline" in m else ""))
        if "judge.score" in m:
            parts.append(f"judge {m['judge.score']:.2f}" + (f" (base {m['judge.baseline']:.2f})" if "judge.baseline" in m else ""))
        if "judge.winRate" in m:
            parts.append(f"win rate {m['judge.winRate']:.2f} vs {result.get('comparedWith') or 'baseline'}")
        if "reward.value" in m:
            parts.append(f"reward {m['reward.value']:.2f}" + (f" (base {m['reward.baseline']:.2f})" if "reward.baseline" in m else ""))
        if "perplexity.value" in m:
            parts.append(f"ppl {m['perplexity.value']:.2f}" + (f" (base {m['perplexity.baseline']:.2f})" if "perplexity.baseline" in m else ""))
        # lm-eval: the first task's accuracy (acc_norm when the task reports it)
        acc = sorted(k for k in m if k.startswith("lmEval.") and not k.startswith("lmEval.baseline.")
                     and k.endswith((".acc", ".acc_norm")))
        if acc:
            key = next((k for k in acc if k.endswith(".acc_norm")), acc[0])
            base = m.get(key.replace("lmEval.", "lmEval.baseline.", 1))
            parts.append(f"{key.removeprefix('lmEval.')} {m[key]:.3f}" + (f" (base {base:.3f})" if base is not None else ""))
        if result.get("gates"):
            parts.append("gates passed" if result["passed"] else "gates FAILED")
        return ", ".join(parts)
    if kind == "Quantization":
        return ", ".join(f"{a['type']} {a['sizeBytes'] / 1e6:.1f} MB" + (
            f" (ppl {a['perplexityIncreasePercent']:+.2f}%)" if a.get("perplexityIncreasePercent") is not None else "")
            for a in result["artifacts"])
    return ""


def gates_failed(kind: str, result: dict[str, Any]) -> str | None:
    """Why a finished run counts as failed, or None: a Benchmark whose gates did not all pass, a
    Quantization an artifact of which failed validation. What waits on it (spec.benchmarkRef, a
    Benchmark of the Quantization) does not start: the operator and `llmfactory run` alike."""
    if kind == "Quantization":
        failed = [f"{a['type']}: {why}" for a in result["artifacts"] for why in a.get("failures") or []]
        return f"quantization finished but validation failed: {'; '.join(failed)}" if failed else None
    if kind != "Benchmark" or not result.get("gates") or result.get("passed"):
        return None
    failed = [f"{g['gate']} ({_measured(g.get('value'))})" for g in result["gates"] if not g["passed"]]
    return f"benchmark finished but gates failed: {', '.join(failed)}"


def _measured(value: float | None) -> str:
    return "not measured" if value is None else f"got {value:.4g}"
