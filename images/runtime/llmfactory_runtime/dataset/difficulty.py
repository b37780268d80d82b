"""spec.difficulty: offline difficulty filtering of GRPO's prompts (format graded), as Skywork-OR1's
and Polaris' data. The model GRPO will train answers each prompt `samples` times (cached like any
answer, so a rebuild or a larger `samples` asks only for what is new), the grader scores each answer
against the prompt's reference as grpo.grader will, and a prompt whose pass rate (the mean reward) is
at or below minPassRate (too_hard) or at or above maxPassRate (too_easy) is dropped: a group of
answers that all score the same gives GRPO no advantage to learn from."""

from __future__ import annotations

from typing import Any

from .. import DIFFICULTY_KEY_ENV
from ..grader import check_scorable, graded_of, rewards
from ..progress import Progress
from . import teacher
from .sources import Drops

FIELD = "spec.difficulty"


def by_difficulty(task: dict[str, Any], rows: list[dict], drops: Drops, progress: Progress,
                  transport=None) -> tuple[list[dict], teacher.Usage]:
    """The graded rows (each with its reference) whose pass rate is within the bounds, each with it
    (passRate), and what the sampling asked."""
    spec = task["spec"]["difficulty"]
    grader, field = spec["grader"], f"{FIELD}.grader"
    check_scorable(grader, field)  # before any answer is sampled
    prompts = [row["messages"][:-1] for row in rows]
    judged_here = "judge" in task["inputs"]  # a local filters.judge stays loaded beside a vLLM student
    answers, usage = teacher.answer_again(prompts, spec, task["inputs"].get("difficulty"), task["cacheUri"], FIELD,
                                          progress, share_gpu=judged_here, transport=transport,
                                          key_env=DIFFICULTY_KEY_ENV, what="the difficulty samples")
    sampled, texts, graded = [], [], []
    for row, prompt, got in zip(rows, prompts, answers):
        refused = next((a["rejected"] for a in got if a.get("rejected")), None)
        if refused:  # the endpoint refused this prompt (kept in the cache as such)
            drops.add("difficulty_refused", refused)
            continue
        # What the grader sees of the row: GRPO's row, as the build writes it.
        item = graded_of({"messages": prompt, "reference": row["reference"], "language": row["language"]}, grader)
        sampled.append(row)
        texts += [a["text"] for a in got]
        graded += [item] * len(got)
    progress.stage(f"grading {len(texts)} sampled answers")
    scores = rewards(grader, texts, graded, task["cacheUri"], field) if texts else []
    n, kept = spec["samples"], []
    for i, row in enumerate(sampled):
        rate = sum(scores[i * n:(i + 1) * n]) / n
        if rate <= spec["minPassRate"]:
            drops.add("too_hard", f"{rate:.2f}: {row['messages'][-2]['content']}")
        elif rate >= spec["maxPassRate"]:
            drops.add("too_easy", f"{rate:.2f}: {row['messages'][-2]['content']}")
        else:
            kept.append({**row, "passRate": round(rate, 4)})
    return kept, usage
