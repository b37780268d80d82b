"""Judge scoring, built-in questions and gates."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmfactory_runtime.benchmark.judge import (RATINGS, builtin_questions, expected_rating, judge_messages,
                                                rating_distribution)
from llmfactory_runtime.benchmark.run import evaluate_gates
from llmfactory_runtime.chat import render


@pytest.mark.parametrize("lang", ["en", "ru", "zh"])
def test_builtin_question_sets_have_a_dozen_questions(lang):
    questions = builtin_questions(lang)
    assert len(questions) == 12
    assert len({q["question_id"] for q in questions}) == 12
    assert all(q["turns"] and q["category"] for q in questions)


def test_unknown_language_is_named():
    with pytest.raises(FileNotFoundError, match="'fr'"):
        builtin_questions("fr")


def test_rating_distribution_is_a_probability_over_1_to_10(tiny_model):
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    probs = rating_distribution(model, tok, judge_messages("What is 2+2?", "4", reference="4"))
    assert len(probs) == len(RATINGS) and abs(sum(probs) - 1) < 1e-5
    assert 1 <= expected_rating(probs) <= 10
    assert expected_rating([0] * 9 + [1]) == 10
    # The cached computation equals scoring each "[[k]]" as a whole sequence.
    prompt = tok(render(tok, judge_messages("What is 2+2?", "4", reference="4"), add_generation_prompt=True) + "[[",
                 add_special_tokens=False)["input_ids"]
    naive = []
    for k in RATINGS:
        cand = tok(f"{k}]]", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([prompt + cand])).logits[0], -1)
        naive.append(sum(float(logprobs[len(prompt) - 1 + j, t]) for j, t in enumerate(cand)))
    assert torch.allclose(torch.tensor(probs), torch.softmax(torch.tensor(naive), 0), atol=1e-4)


def test_gates_pass_fail_and_missing_metrics():
    metrics = {"judge.score": 6.6, "perplexity.changePercent": 3.0}
    outcomes = evaluate_gates([
        {"metric": "judge.score", "op": ">=", "value": 6.5},
        {"metric": "perplexity.changePercent", "op": "<", "value": 2},
        {"metric": "judge.score.ru", "op": ">", "value": 1},
    ], metrics)
    assert [o["passed"] for o in outcomes] == [True, False, False]
    assert outcomes[0]["gate"] == "judge.score >= 6.5" and outcomes[2]["value"] is None
