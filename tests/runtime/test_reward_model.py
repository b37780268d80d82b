"""A reward model trained by a FineTune (objective reward), as TRL's RewardTrainer: preference pairs
in, a sequence-classification model out that the grader (operation rewardModel) scores with."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer

from llmfactory.api.headline import headline
from llmfactory_runtime import reward_model
from llmfactory_runtime.preference import encode_pairs
from llmfactory_runtime.store import open_store

from finetune_helpers import finetune_task, loss_curve, run_finetune, write_task
from test_preference import (_dataset, _ok, _resumed_from_step_4_ends_with_the_same_weights, _rows,
                             two_processes_and_one)


def test_the_reward_loss_by_hand():
    """Bradley-Terry: -log sigmoid(chosen - rejected); the centring term adds c (chosen + rejected)^2."""
    rewards = torch.tensor([[2.0, -1.0], [0.5, 1.5]])
    loss, margin = reward_model.reward_terms(rewards, {})
    assert margin.tolist() == [3.0, -1.0]
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-3)), math.log(1 + math.exp(1))])
    centred, _ = reward_model.reward_terms(rewards, {"centerRewardsCoefficient": 0.1})
    assert (centred - loss).tolist() == pytest.approx([0.1 * 1.0, 0.1 * 4.0])


def test_a_trained_reward_model_ranks_the_chosen_answers_first_where_the_grader_scores_it(tiny_model, tmp_path):
    """LoRA on the tiny model learns to score each answer above a refusal: the validation pairs all
    ranked right; the saved model, loaded as the rewardModel grader loads it and scoring one
    conversation at a time, gives the margin the run reported (padding in training did not move
    where a conversation is read); the adapter loads as peft's sequence classifier; and a run
    resumed from a checkpoint ends with the uninterrupted run's weights."""
    task = finetune_task(tiny_model, _dataset(tmp_path / "data"), f"file://{tmp_path}/store", objective="reward",
                         checkpointing={"everySteps": 4, "keepLast": 20},
                         hyperparameters={"epochs": 2, "batchSize": 4, "learningRate": 0.02, "packing": True})
    path = write_task(task, tmp_path)
    _ok(run_finetune(path))
    run = open_store(task["artifactUri"])
    result = run.read_json("result.json")
    assert result["objective"] == "reward" and result["datasetFormat"] == "preference"
    assert result["rewardAccuracy"] == 1.0 and result["evalLoss"] < 0.3 < result["firstLoss"]
    assert abs(loss_curve(task)[0] - math.log(2)) < 0.3  # a new score layer: rewards near 0 at first

    rm, tok = reward_model.load({"uri": result["modelUri"]}, "spec.grpo.grader.rewardModel")
    assert type(rm).__name__ == "LlamaForSequenceClassification"
    chosen = reward_model.scores(rm, tok, [r["prompt"] + r["chosen"] for r in _rows()])
    rejected = reward_model.scores(rm, tok, [r["prompt"] + r["rejected"] for r in _rows()])
    assert all(c > r for c, r in zip(chosen, rejected))
    assert sum(c - r for c, r in zip(chosen, rejected)) / len(chosen) == pytest.approx(result["rewardMargin"], abs=1e-3)
    # The adapter alone, on its base, is the same model.
    adapter = AutoPeftModelForSequenceClassification.from_pretrained(result["adapterUri"][7:], num_labels=1).eval()
    adapter.config.pad_token_id = tok.pad_token_id
    assert reward_model.scores(adapter, tok, [_rows()[0]["prompt"] + _rows()[0]["chosen"]])[0] == pytest.approx(
        chosen[0], abs=1e-4)
    assert "reward model on the validation pairs: reward accuracy 1.0" in (Path(result["modelUri"][7:]) / "README.md").read_text()
    assert headline("FineTune", result).endswith("reward accuracy 1.00")

    _resumed_from_step_4_ends_with_the_same_weights(run, path, result)


def test_pairs_scored_in_a_padded_batch_get_the_scores_they_get_alone(tiny_model, tmp_path):
    """pair_batch (training) and reward_model.scores (a grader) right-pad conversations of different
    lengths; each row's score is read at its own last token, where a conversation alone is read. A
    model whose config names no pad token is read one conversation at a time, to the same scores."""
    from transformers import AutoModelForSequenceClassification  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1,
                                                               pad_token_id=tok.pad_token_id).eval()
    rows = _rows()[:4]
    convs = encode_pairs(tok, rows, 96, "validation.jsonl")
    assert len({len(c["input_ids"]) for c in convs}) > 1  # padding happens
    batched = reward_model.evaluate_pairs(model, convs, list(range(4)), 4, tok.pad_token_id, "cpu")
    conversations = [r["prompt"] + r[side] for r in rows for side in ("chosen", "rejected")]
    alone = reward_model.scores(model, tok, conversations, batch_size=1)
    torch.testing.assert_close(batched.flatten(), torch.tensor(alone), rtol=0, atol=1e-5)
    assert reward_model.scores(model, tok, conversations) == pytest.approx(alone, abs=1e-5)
    model.config.pad_token_id = None
    assert reward_model.scores(model, tok, conversations) == pytest.approx(alone, abs=1e-5)


@pytest.mark.extended(reason=(
    "test_a_trained_reward_model_ranks_the_chosen_answers_first_where_the_grader_scores_it trains a reward "
    "model in one process and tests/runtime/test_finetune.py's test_two_processes_follow_the_loss_curve_of_one "
    "splits sft's steps over two; this one splits a reward model's pairs, whose new score layer peft trains "
    "whole (modules_to_save), under DDP and DeepSpeed ZeRO-2"))
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("deepspeed", marks=pytest.mark.deepspeed("ShareMemCommBuilder"))])
def test_a_reward_model_on_two_processes_follows_one_process_with_accumulation_2(tiny_model, tmp_path, strategy):
    """The same global batch, 1 process x accumulation 2 and 2 processes x 1: the same loss curve and
    validation accuracy and margin (each process starts from the same score layer)."""
    one, two = two_processes_and_one(tiny_model, tmp_path, strategy, _dataset(tmp_path / "data"), objective="reward",
                                     lora={"dropout": 0.0}, hyperparameters={"epochs": 2, "learningRate": 0.02})
    assert two["rewardAccuracy"] == one["rewardAccuracy"]
    assert two["rewardMargin"] == pytest.approx(one["rewardMargin"], abs=1e-3)
