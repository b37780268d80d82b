"""What grading costs per answer, by grader, as GRPO's step and a Benchmark's reward run them: the
quickstart's prompts answered by SmolLM2-135M-Instruct (greedy, up to --max-new-tokens), then scored
by each grader through `llmfactory_runtime.grader.rewards`:

- a string check (icontains), math (math-verify: each answer parsed to sympy and compared with the
  reference 42), the similarity metrics (all but cosine: fuzzy ... rougeL) and a python grader (its own
  process; the first call starts it);
- a local judge (grader.judgeModel): SmolLM2-135M-Instruct itself, one prompt pass plus the ten
  ratings' continuations per answer, each rating written to the store's cache (file:// here);
- a reward model (grader.rewardModel): SmolLM2-135M's weights under a one-label head (untrained: the
  speed does not depend on the head's values), eight conversations a pass, and (the last row) one
  at a time, as it scored them before 2026-12-03.

Loading a grader's model is timed apart (once a process). Run twice from the same cache folder and
the local judge's second pass reads its ratings instead (a resumed run's cost).

    .venv/bin/python benchmarks/grader_cost.py [--answers 32] [--max-new-tokens 64] [--only math]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForSequenceClassification

from llmfactory_runtime import grader as grader_module, reward_model
from llmfactory_runtime.generate import generate
from llmfactory_runtime.grader import graded_rows, rewards
from llmfactory_runtime.models import load_model, load_tokenizer

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "01-dataset.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--only", help="the graders whose names contain this (all by default)")
    args = parser.parse_args()

    spec = yaml.safe_load(QUICKSTART.read_text())["spec"]
    source = spec["teacher"]["model"]
    tokenizer = load_tokenizer(source)
    model = load_model(source).eval()
    rows = [{"prompt": p["text"], "reference": "the", "number": "42"}
            for p in spec["sources"][0]["inline"][:args.answers]]
    answers = [g.text for g in generate(model, tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in rows],
                                        args.max_new_tokens)]
    with tempfile.TemporaryDirectory(prefix="llmfactory-rm-") as tmp:
        # A reward model of SmolLM2's shape: its weights under a fresh one-label head.
        torch.manual_seed(0)
        config = model.config.__class__(**model.config.to_dict())
        config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
        classifier = AutoModelForSequenceClassification.from_config(config)
        classifier.load_state_dict(model.state_dict(), strict=False)  # all but lm_head; score stays fresh
        classifier.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del classifier, model
        graders = {
            "icontains": {"referenceField": "reference", "operation": "icontains"},
            "math": {"referenceField": "number", "operation": "math"},
            **{f"similarity {metric}": {"referenceField": "reference", "operation": "similarity", "metric": metric}
               for metric in ("fuzzy", "bleu", "gleu", "chrf", "meteor", "rouge1", "rouge2", "rouge3", "rouge4", "rouge5",
                              "rougeL")},
            "python": {"referenceField": "reference", "operation": "python",
                       "source": "def grade(sample, item):\n    return len(sample['output_text'].split()) / 100\n"},
            "judgeModel (SmolLM2-135M)": {"referenceField": "reference", "operation": "judge", "judgeModel": source},
            "rewardModel (SmolLM2-135M shape)": {"referenceField": "reference", "operation": "rewardModel",
                                                 "rewardModel": {"uri": f"file://{tmp}"}},
        }
        cache = f"file://{tmp}/cache"
        tokens = sum(len(tokenizer(a)["input_ids"]) for a in answers)
        print(f"{len(answers)} answers of {tokens / len(answers):.0f} tokens on average, {torch.get_num_threads()} "
              f"threads, {'cuda' if torch.cuda.is_available() else 'cpu'}")
        print("| grader | first call s (loads) | s per answer | answers/s | cached rerun s per answer |")
        print("|---|---|---|---|---|")
        for name, grader in graders.items():
            if args.only and args.only not in name:
                continue
            graded = graded_rows(rows, grader, "prompts")
            began = time.perf_counter()
            rewards(grader, answers[:1], graded[:1], cache, "grader")  # loads its model or starts its process
            first = time.perf_counter() - began
            began = time.perf_counter()
            rewards(grader, answers[1:], graded[1:], cache, "grader")
            each = (time.perf_counter() - began) / (len(answers) - 1)
            began = time.perf_counter()
            rewards(grader, answers[1:], graded[1:], cache, "grader")  # a resumed run: the judge's cache answers
            again = (time.perf_counter() - began) / (len(answers) - 1)
            print(f"| {name} | {first:.2f} | {each:.4f} | {1 / each:.1f} | {again:.4f} |", flush=True)
            if grader["operation"] == "rewardModel":  # the same model and answers, one conversation a pass
                (held, held_tokenizer), = grader_module._models.values()
                conversations = [[*g["messages"], {"role": "assistant", "content": a}]
                                 for a, g in zip(answers[1:], graded[1:])]
                began = time.perf_counter()
                reward_model.scores(held, held_tokenizer, conversations, batch_size=1)
                alone = (time.perf_counter() - began) / (len(answers) - 1)
                print(f"| {name}, one at a time | - | {alone:.4f} | {1 / alone:.1f} | {alone:.4f} |", flush=True)
            grader_module._models.clear()
    if not args.only or args.only in "math":
        math_answers()


# Final answers as a math model writes them, with references as MATH-style datasets give them, each
# of a kind for n = 1, 2, ...: what operation math costs where sympy has work to do (the quickstart's
# answers give it almost none).
MATH_ANSWERS = {
    "integer": lambda n: (rf"{n} x 7 = {7 * n}, so the answer is $\\boxed{{{7 * n}}}$.", f"{7 * n}"),
    "fraction vs decimal": lambda n: (rf"Half of it: $\\boxed{{\\frac{{{n}}}{{2}}}}$", f"{n / 2}"),
    "interval": lambda n: (rf"So $x$ lies in $\\boxed{{[{n}, {n + 1})}}$.", f"[{n},{n + 1})"),
    "polynomial, expanded vs factored": lambda n: (rf"Expanding, $\\boxed{{x^2+{2 * n}x+{n * n}}}$", f"(x+{n})^2"),
    "wrong (a root for a fraction)": lambda n: (rf"$\\boxed{{{n}+\\sqrt{{2}}}}$", rf"{n}+\\frac{{3}}{{2}}"),
}


def math_answers(answers: int = 20) -> None:
    """Per kind: the first answer (sympy's code paths warm up) and then `answers` new ones, each parsed and
    compared once, as GRPO's sampled answers are."""
    from llmfactory_runtime.grader import reward  # noqa: PLC0415

    print("\n| math answer | reward | first ms | ms per new answer |\n|---|---|---|---|")
    grader = {"referenceField": "reference", "operation": "math"}
    for name, kind in MATH_ANSWERS.items():
        began = time.perf_counter()
        got = reward(*kind(0), grader)
        first = time.perf_counter() - began
        began = time.perf_counter()
        assert all(reward(*kind(n), grader) == got for n in range(1, answers + 1)), name
        each = (time.perf_counter() - began) / answers
        print(f"| {name} | {got:.0f} | {first * 1000:.1f} | {each * 1000:.1f} |", flush=True)

if __name__ == "__main__":
    main()
