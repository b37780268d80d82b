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
from llmfactory.planner import parse, plan
from llmfactory_runtime import batching, reward_model
from llmfactory_runtime.benchmark import run as benchmark
from llmfactory_runtime.data import dumps_jsonl
from llmfactory_runtime.preference import encode_pairs, pair_margins
from llmfactory_runtime.progress import Progress
from llmfactory_runtime.store import open_store
from llmfactory_runtime.task import InvalidTask

from finetune_helpers import finetune_task, loss_curve, run_finetune, succeeded, write_task
from test_preference import _resumed_from_step_4_ends_with_the_same_weights, _rows, two_processes_and_one


def test_the_reward_loss_by_hand():
    """Bradley-Terry: -log sigmoid(chosen - rejected); the centring term adds c (chosen + rejected)^2."""
    rewards = torch.tensor([[2.0, -1.0], [0.5, 1.5]])
    loss, margin = reward_model.reward_terms(rewards, {})
    assert margin.tolist() == [3.0, -1.0]
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-3)), math.log(1 + math.exp(1))])
    centred, _ = reward_model.reward_terms(rewards, {"centerRewardsCoefficient": 0.1})
    assert (centred - loss).tolist() == pytest.approx([0.1 * 1.0, 0.1 * 4.0])
    # A row's margin (Llama 2's) is subtracted from the difference: the first pair must win by 2.5.
    required, margin = reward_model.reward_terms(rewards, {}, torch.tensor([2.5, 0.0]))
    assert required.tolist() == pytest.approx([math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1))])
    assert margin.tolist() == [3.0, -1.0]


def test_a_preference_rows_margin_reaches_its_pair_and_a_bad_one_is_refused_naming_the_row(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{**_rows()[0], "margin": 2}, _rows()[1], {**_rows()[2], "margin": 0.5}]
    convs = encode_pairs(tok, rows, 96, "spec.objective reward: train.jsonl", margins=True)
    assert pair_margins(convs, [2, 0, 1]).tolist() == [0.5, 2.0, 0.0]
    for bad in ("2", True, float("nan")):
        odd = [rows[0], {**rows[1], "margin": bad}]
        with pytest.raises(InvalidTask, match=r"spec.objective reward: train.jsonl row 2: a preference row's margin "
                                              "must be a finite number"):
            encode_pairs(tok, odd, 96, "spec.objective reward: train.jsonl", margins=True)
        assert len(encode_pairs(tok, odd, 96, "spec.objective dpo: train.jsonl")) == 4  # DPO reads no margin


def _margined() -> list[dict]:
    """Preference rows, every other one with a margin (how much more its chosen answer is preferred)."""
    return [{**row, "margin": 1.5} if i % 2 else row for i, row in enumerate(_rows())]


def _margined_dataset(folder: Path) -> str:
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(dumps_jsonl(_margined() * 3))
    (folder / "validation.jsonl").write_bytes(dumps_jsonl(_margined()))
    return f"file://{folder}"


def test_a_trained_reward_model_ranks_the_chosen_answers_first_where_the_grader_scores_it(tiny_model, tmp_path):
    """LoRA on the tiny model learns to score each answer above a refusal (by a row's margin where it
    has one): the validation pairs all ranked right; the saved model, loaded as the rewardModel
    grader loads it, gives the margin and validation loss the run reported (padding in training did
    not move where a conversation is read); and the adapter loads as peft's sequence classifier."""
    task = _task(tiny_model, tmp_path)
    succeeded(run_finetune(write_task(task, tmp_path)))
    result = open_store(task["artifactUri"]).read_json("result.json")
    assert result["objective"] == "reward" and result["datasetFormat"] == "preference"
    assert result["rewardAccuracy"] == 1.0 and result["evalLoss"] < 0.3 < result["firstLoss"]
    # A new score layer: rewards near 0 at first, so a pair's loss near ln(1 + e^margin): ln 2 to ~1.70.
    assert math.log(2) - 0.3 < loss_curve(task)[0] < math.log1p(math.exp(1.5)) + 0.3

    rm, tok = reward_model.load({"uri": result["modelUri"]}, "spec.grpo.grader.rewardModel")
    assert type(rm).__name__ == "LlamaForSequenceClassification"
    chosen = reward_model.scores(rm, tok, [r["prompt"] + r["chosen"] for r in _rows()])
    rejected = reward_model.scores(rm, tok, [r["prompt"] + r["rejected"] for r in _rows()])
    assert all(c > r for c, r in zip(chosen, rejected))
    assert sum(c - r for c, r in zip(chosen, rejected)) / len(chosen) == pytest.approx(result["rewardMargin"], abs=1e-3)
    # The validation loss counted each row's margin.
    losses = [math.log1p(math.exp(-(c - r - row.get("margin", 0)))) for c, r, row in zip(chosen, rejected, _margined())]
    assert sum(losses) / len(losses) == pytest.approx(result["evalLoss"], abs=1e-3)
    # The adapter alone, on its base, is the same model.
    adapter = AutoPeftModelForSequenceClassification.from_pretrained(result["adapterUri"][7:], num_labels=1).eval()
    adapter.config.pad_token_id = tok.pad_token_id
    assert reward_model.scores(adapter, tok, [_rows()[0]["prompt"] + _rows()[0]["chosen"]])[0] == pytest.approx(
        chosen[0], abs=1e-4)
    card = (Path(result["modelUri"][7:]) / "README.md").read_text()
    assert "reward model on the validation pairs: reward accuracy 1.0" in card
    assert headline("FineTune", result).endswith("reward accuracy 1.00")

    # A Benchmark of it (spec.ranking, by fineTuneRef: the pairs it trained on) ranks them as the run did.
    ranked, store = _benchmark({"model": {"fineTuneRef": {"name": "rm"}}, "ranking": {"split": "validation"},
                                "gates": [{"metric": "ranking.accuracy", "op": ">=", "value": 0.9}]}, tmp_path, result)
    assert ranked["metrics"] == {"ranking.accuracy": 1.0, "ranking.margin": pytest.approx(result["rewardMargin"],
                                                                                          abs=1e-3)}
    assert ranked["passed"] and headline("Benchmark", ranked) == "ranking accuracy 1.00, gates passed"
    assert f"0 of {len(_rows())} pairs: the rejected answer scored at least as high" in store.read_bytes("report/report.md").decode()


def _benchmark(spec: dict, tmp_path: Path, fine_tune: dict | None = None) -> tuple[dict, object]:
    """A Benchmark run in this process, planned as the operator plans it (fine_tune: the result its
    fineTuneRef names); its result and its run's store."""
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Benchmark", "metadata": {"name": "b"}, "spec": spec}
    task = plan(parse(doc), lambda *key: fine_tune, f"file://{tmp_path}/bench")
    store = open_store(task["artifactUri"])
    return benchmark.run(task, store, Progress(store)), store


def _reward_model(tiny_model, folder: Path, seed: int) -> Path:
    """An untrained reward model on the tiny model: a score layer at random (seeded), saved as one."""
    from transformers import AutoModelForSequenceClassification  # noqa: PLC0415

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_reward_models_ranking_counts_the_pairs_it_orders_right_beside_a_baseline_reward_model(tiny_model, tmp_path):
    """Each pair twice, once with its answers swapped: whatever a model scores, exactly one of the two
    is ranked right (the scores differ), so accuracy is 1/2 and the margins cancel -- unless chosen
    and rejected were mixed up, or a conversation lost its prompt. The baseline, another reward model,
    ranks the same pairs; the report lists the pairs ranked wrong; a restart scores nothing again;
    a language model, and a row that is no preference pair, are refused naming the field."""
    rows = _rows()[:4] + [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in _rows()[:4]]
    # A DatasetBuild's rows say their language; here a pair and its swap say different ones.
    rows = [{**row, "language": "en" if i in (0, 1, 6, 7) else "ru"} for i, row in enumerate(rows)]
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "test.jsonl").write_bytes(dumps_jsonl(rows))
    rm, earlier = (_reward_model(tiny_model, tmp_path / name, seed) for name, seed in (("rm", 1), ("rm0", 2)))
    spec = {"model": {"source": {"uri": f"file://{rm}"}}, "baselineModel": {"source": {"uri": f"file://{earlier}"}},
            "ranking": {"dataset": {"uri": f"file://{tmp_path}/pairs"}, "batchSize": 3, "languages": ["en", "ru"]},
            "gates": [{"metric": "ranking.accuracy.ru", "op": ">=", "value": 0.5}]}
    result, store = _benchmark(spec, tmp_path)
    assert result["metrics"]["ranking.accuracy"] == 0.5 and result["metrics"]["ranking.baseline"] == 0.5
    assert result["metrics"]["ranking.margin"] == pytest.approx(0.0, abs=1e-5)
    model, tok = reward_model.load({"uri": f"file://{rm}"}, "spec.model")
    chosen = reward_model.scores(model, tok, [r["prompt"] + r["chosen"] for r in rows], batch_size=1)
    rejected = reward_model.scores(model, tok, [r["prompt"] + r["rejected"] for r in rows], batch_size=1)
    saved = store.read_json("ranking/model.json")["rewards"]
    assert saved == [pytest.approx([c, r], abs=1e-5) for c, r in zip(chosen, rejected)]
    assert store.read_json("ranking/baseline.json")["rewards"] != saved
    report = store.read_bytes("report/report.md").decode()
    wrong = [i + 1 for i, (c, r) in enumerate(zip(chosen, rejected)) if c <= r]
    assert "4 of 8 pairs: the rejected answer scored at least as high" in report
    by_language = {lang: sum(chosen[i] > rejected[i] for i, row in enumerate(rows) if row["language"] == lang) / 4
                   for lang in ("en", "ru")}
    assert by_language["en"] != 0.5  # else a report that mixed the languages up would pass
    assert all(f"| {lang} | 4 | {rate:.3f} |" in report for lang, rate in by_language.items())
    # The languages listed are metrics too, gated on like any other.
    assert {lang: result["metrics"][f"ranking.accuracy.{lang}"] for lang in ("en", "ru")} == by_language
    assert {f"ranking.baseline.{lang}" for lang in ("en", "ru")} <= result["metrics"].keys()
    assert result["passed"] == (by_language["ru"] >= 0.5)
    assert sorted(int(line.split("|")[1]) for line in report.splitlines() if line.startswith("| ") and
                  line.split("|")[1].strip().isdigit()) == wrong
    # Restarted: the saved scores are the ranking (scores changed by hand show through).
    store.write_json("ranking/model.json", {"rewards": [[1.0, 0.0]] * 8})
    assert _benchmark(spec, tmp_path)[0]["metrics"]["ranking.accuracy"] == 1.0

    with pytest.raises(InvalidTask, match="spec.ranking.languages: no test pairs in zh; the rows' languages: en, ru"):
        _benchmark({**spec, "ranking": {**spec["ranking"], "languages": ["en", "zh"]}, "gates": []}, tmp_path)
    with pytest.raises(InvalidTask, match="spec.model: .* is not a reward model"):
        _benchmark({**spec, "model": {"source": {"uri": f"file://{tiny_model}"}}}, tmp_path)
    (tmp_path / "pairs" / "test.jsonl").write_bytes(dumps_jsonl(rows[:2] + [{"prompt": "hi", "chosen": "x"}]))
    with pytest.raises(InvalidTask, match="spec.ranking.dataset: test.jsonl row 3: a preference row needs chosen and "
                                          "rejected"):
        _benchmark({**spec, "baseline": False, "baselineModel": None, "gates": [],
                    "ranking": {**spec["ranking"], "languages": []}}, tmp_path)


def _task(tiny_model, tmp_path: Path, **spec) -> dict:
    return finetune_task(tiny_model, _margined_dataset(tmp_path / "data"), f"file://{tmp_path}/store", name="rm",
                         objective="reward", **spec,
                         hyperparameters={"epochs": 2, "batchSize": 4, "learningRate": 0.02, "packing": True})


@pytest.mark.extended(reason=(
    "test_a_trained_reward_model_ranks_the_chosen_answers_first_where_the_grader_scores_it trains a reward "
    "model without interruption, and the DPO and KTO tests resume theirs from a checkpoint with the same "
    "code; this one resumes a reward model, whose new score layer peft trains whole (modules_to_save)"))
@pytest.mark.slow
def test_a_resumed_reward_model_run_ends_with_the_uninterrupted_weights(tiny_model, tmp_path):
    task = _task(tiny_model, tmp_path, checkpointing={"everySteps": 4, "keepLast": 20})
    path = write_task(task, tmp_path)
    succeeded(run_finetune(path))
    run = open_store(task["artifactUri"])
    _resumed_from_step_4_ends_with_the_same_weights(run, path, run.read_json("result.json"))


@pytest.mark.parametrize("width_multiple", [1, 64])  # 64: a GPU's (batching.row_width)
def test_pairs_scored_in_a_padded_batch_get_the_scores_they_get_alone(tiny_model, monkeypatch, width_multiple):
    """pair_batch (training) and reward_model.scores (a grader) right-pad conversations of different
    lengths; each row's score is read at its own last token, where a conversation alone is read. A
    model whose config names no pad token is read one conversation at a time, unpadded, to the same
    scores."""
    from transformers import AutoModelForSequenceClassification  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1,
                                                               pad_token_id=tok.pad_token_id).eval()
    rows = _rows()[:4]
    convs = encode_pairs(tok, rows, 96, "validation.jsonl")
    assert len({len(c["input_ids"]) for c in convs}) > 1  # padding happens
    conversations = [r["prompt"] + r[side] for r in rows for side in ("chosen", "rejected")]
    alone = reward_model.scores(model, tok, conversations, batch_size=1)
    monkeypatch.setattr(batching, "WIDTH_MULTIPLE", width_multiple)
    batched = reward_model.evaluate_pairs(model, convs, list(range(4)), 4, tok.pad_token_id, "cpu")
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
    one, two = two_processes_and_one(tiny_model, tmp_path, strategy, _margined_dataset(tmp_path / "data"),
                                     objective="reward", lora={"dropout": 0.0},
                                     hyperparameters={"epochs": 2, "learningRate": 0.02})
    assert two["rewardAccuracy"] == one["rewardAccuracy"]
    assert two["rewardMargin"] == pytest.approx(one["rewardMargin"], abs=1e-3)


def test_a_reward_model_without_a_chat_template_scores_chatml_with_rows_for_its_markers(tmp_path):
    """Its tokenizer gets ChatML's markers as tokens (models.load_tokenizer); the model grows rows for
    them as every load does, rather than failing on token ids beyond its embeddings."""
    from tests.tiny_model import make_tiny_reward_model

    folder = make_tiny_reward_model(tmp_path / "rm", tokenizer="sentencepiece", chat_template=False)
    model, tokenizer = reward_model.load({"uri": f"file://{folder}"}, "spec.grader.rewardModel")
    assert len(tokenizer) == model.get_input_embeddings().num_embeddings == 658
    got = reward_model.scores(model, tokenizer, [[{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello."}]])
    assert len(got) == 1 and math.isfinite(got[0])
