"""DPO (objective dpo): preference rows in OpenAI's and TRL's forms, pairs kept apart in packed
sequences, a run that learns its preferences, and a resumed run that keeps its reference; KTO
(objective kto): unpaired rows, its loss by hand, and a run that learns from them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmfactory.api.headline import headline
from llmfactory_runtime.chat import IGNORE
from llmfactory_runtime.batching import encode_rows
from llmfactory_runtime.data import dumps_jsonl, labelled_of, messages_of, preference_of
from llmfactory_runtime.preference import (answer_logps, collate_pairs, dpo_terms, encode_pairs, encode_unpaired,
                                           kto_agrees, kto_terms, pair_logps, token_counts)
from llmfactory_runtime.store import open_store

from finetune_helpers import PAIRS, finetune_task, loss_curve, run_finetune, succeeded, write_task

REFUSAL = "I cannot answer that."


def _rows() -> list[dict]:
    """Each question's answer preferred to a refusal: a preference a tiny random model can learn."""
    return [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
             "rejected": [{"role": "assistant", "content": REFUSAL}]} for q, a in PAIRS]


def _dataset(folder: Path) -> str:
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(dumps_jsonl(_rows() * 3))
    (folder / "validation.jsonl").write_bytes(dumps_jsonl(_rows()))
    return f"file://{folder}"



def _resumed_from_step_4_ends_with_the_same_weights(run, task_path: Path, result: dict) -> None:
    """As if the run had been killed after its checkpoint at step 4 (later checkpoints and the result
    gone): the next attempt resumes there, with the reference kept in it, and ends with the same adapter."""
    uninterrupted = load_file(Path(result["adapterUri"][7:]) / "adapter_model.safetensors")
    run.delete("COMMITTED")
    for key in run.list("checkpoints"):
        if not key.startswith("step-4/"):
            run.delete(f"checkpoints/{key}")
    succeeded(run_finetune(task_path))
    result = run.read_json("result.json")
    assert result["resumedFromStep"] == 4
    resumed = load_file(Path(result["adapterUri"][7:]) / "adapter_model.safetensors")
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(resumed[name], weight, rtol=0, atol=1e-6)


def test_openai_and_trl_preference_rows_give_the_same_prompt_and_answers():
    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}
    good, bad = {"role": "assistant", "content": "Paris."}, {"role": "assistant", "content": "Lyon."}
    forms = [
        {"input": {"messages": [system, user]}, "preferred_output": [good], "non_preferred_output": [bad]},  # OpenAI
        {"prompt": [system, user], "chosen": [good], "rejected": [bad]},  # TRL, explicit prompt
        {"chosen": [system, user, good], "rejected": [system, user, bad]},  # TRL, implicit prompt
        # UltraFeedback's binarized rows: a prompt column beside whole conversations (TRL's maybe_extract_prompt)
        {"prompt": "Capital of France?", "chosen": [system, user, good], "rejected": [system, user, bad]},
    ]
    for row in forms:
        assert preference_of(row) == ([system, user], [good], [bad])
        assert messages_of(row) == [system, user, good]  # what perplexity and calibration read
    assert preference_of({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}) == \
        ([user], [good], [bad])
    # Anthropic HH's transcripts, read by a FineTune as a DatasetBuild reads them.
    assert preference_of({"chosen": "\n\nHuman: Capital of France?\n\nAssistant: Paris.",
                          "rejected": "\n\nHuman: Capital of France?\n\nAssistant: Lyon."}) == ([user], [good], [bad])
    # Two whole conversations that differ in a later turn share the earlier turns as their prompt.
    follow = {"role": "user", "content": "And of Italy?"}
    assert preference_of({"chosen": [user, good, follow, {"role": "assistant", "content": "Rome."}],
                          "rejected": [user, good, follow, bad]})[0] == [user, good, follow]
    with pytest.raises(ValueError, match="needs chosen and rejected"):
        preference_of({"messages": [user, good]} | {"chosen": [good]})
    with pytest.raises(ValueError, match="rejected answer must be one or more assistant messages"):
        preference_of({"prompt": [user], "chosen": [good], "rejected": [user]})
    with pytest.raises(ValueError, match="prompt must end with a user"):
        preference_of({"prompt": [user, good], "chosen": [good], "rejected": [bad]})


def test_pairs_and_kto_examples_cut_at_max_seq_length_and_left_out_for_it_are_counted(tiny_model):
    """What result.truncatedRows and rowsLeftOut report for dpo and reward: a pair whose either
    answer runs past maxSeqLength is cut; one whose answers start past it is left out. For kto, its
    examples (a preference row gives two: its chosen answer and its rejected one)."""
    from llmfactory_runtime.finetune import encoding

    tok = AutoTokenizer.from_pretrained(tiny_model)
    short, long = "Blue.", " ".join(["the sea is wide and blue"] * 20)
    rows = [{"prompt": "Sky?", "chosen": short, "rejected": "Red."},  # fits
            {"prompt": "Sky?", "chosen": short, "rejected": long},  # cut
            {"prompt": " ".join(["why"] * 80), "chosen": short, "rejected": "Red."}]  # answers past it: left out
    for objective, counts in (("dpo", (2, 1, 1)), ("reward", (2, 1, 1)), ("kto", (4, 1, 2))):
        spec = {"objective": objective, "hyperparameters": {"maxSeqLength": 40}}
        split = encoding.encode(spec, tok, rows, "train")
        assert (split.units, split.truncated, split.unlearned) == counts, objective
        assert not any("truncated" in c for c in split.examples)  # counted, not carried into the batches
    # kto's unpaired rows: one example each; a mismatched conversation cut (its answer is the next
    # example's long one) is no one's answer cut.
    unpaired = [{"prompt": "Sky?", "completion": short, "label": True},
                {"prompt": "Sky?", "completion": long, "label": False}]
    split = encoding.encode({"objective": "kto", "hyperparameters": {"maxSeqLength": 40}}, tok, unpaired, "train")
    assert (split.units, split.truncated, split.unlearned) == (2, 1, 0)


def test_the_preference_losses_by_hand_and_sft_weight_adds_the_chosen_answers_mean_token_nll():
    policy = torch.tensor([[-10.0, -12.0], [-8.0, -6.0]])  # summed answer log-probabilities: chosen, rejected
    reference = torch.tensor([[-11.0, -11.0], [-8.0, -6.0]])
    tokens = torch.tensor([[5.0, 2.0], [4.0, 3.0]])  # their answer tokens
    loss, margin = dpo_terms(policy, reference, tokens, {"beta": 0.5})
    assert margin.tolist() == [1.0, 0.0]  # 0.5 x ((-10 + 11) - (-12 + 11)); unchanged from the reference
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-1.0)), math.log(2)])
    rpo, _ = dpo_terms(policy, reference, tokens, {"beta": 0.5, "sftWeight": 0.2})
    assert (rpo - loss).tolist() == pytest.approx([0.2 * 10 / 5, 0.2 * 8 / 4])
    # Conservative DPO: a share of the pairs counted as if the other answer had been chosen.
    smoothed, _ = dpo_terms(policy, reference, tokens, {"beta": 0.5, "labelSmoothing": 0.1})
    assert smoothed.tolist() == pytest.approx([0.9 * math.log(1 + math.exp(-1.0)) + 0.1 * math.log(1 + math.e),
                                               math.log(2)])
    # IPO on per-token means: pair 0's h = (-10 + 11) / 5 - (-12 + 11) / 2 = 0.7, aimed at 1 / (2 x 0.5) = 1.
    ipo, ipo_margin = dpo_terms(policy, reference, tokens, {"beta": 0.5, "loss": "ipo"})
    assert ipo.tolist() == pytest.approx([(0.7 - 1) ** 2, 1.0]) and ipo_margin.tolist() == pytest.approx([0.35, 0.0])
    hinge, _ = dpo_terms(policy, reference, tokens, {"beta": 0.5, "loss": "hinge"})
    assert hinge.tolist() == [0.0, 1.0]  # a margin of 1 is enough; none costs 1
    # Reference-free, on per-token means: pair 0's are -10 / 5 = -2 and -12 / 2 = -6, pair 1's -2 and -2.
    simpo, simpo_margin = dpo_terms(policy, None, tokens, {"beta": 0.5, "loss": "simpo", "gamma": 0.5})
    assert simpo_margin.tolist() == [2.0, 0.0]
    assert simpo.tolist() == pytest.approx([math.log(1 + math.exp(-1.5)), math.log(1 + math.exp(0.5))])
    orpo, _ = dpo_terms(policy, None, tokens, {"beta": 0.5, "loss": "orpo"})

    def log_odds(mean):
        return mean - math.log(1 - math.exp(mean))
    assert orpo.tolist() == pytest.approx([2 + 0.5 * math.log(1 + math.exp(-(log_odds(-2) - log_odds(-6)))),
                                           2 + 0.5 * math.log(2)])


def test_a_pair_packed_beside_others_gets_the_answer_log_probabilities_it_gets_alone(tiny_model):
    """Only the answers count (not the prompt's earlier assistant turn), and packed pairs do not see each other."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = _rows()[:3]
    rows[0]["prompt"] = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}] + rows[0]["prompt"]
    convs = encode_pairs(tok, rows, 96, "train.jsonl")
    learned = tok.decode([t for t, label in zip(convs[0]["input_ids"], convs[0]["labels"]) if label != IGNORE])
    assert learned == PAIRS[0][1] + "<|im_end|>\n"
    batch, counts = collate_pairs(convs, [[0, 2], [1]], tok.pad_token_id)
    with torch.no_grad():
        packed = answer_logps(model, batch, counts)
        alone = []
        for c in convs:
            ids = torch.tensor(c["input_ids"])
            logp = model(input_ids=ids[None]).logits[0, :-1].log_softmax(-1)
            scored = torch.tensor(c["labels"][1:]) != IGNORE
            alone.append(float(logp[torch.arange(len(ids) - 1), ids[1:]][scored].sum()))
    assert packed.flatten().tolist() == pytest.approx(alone[0:2] + alone[4:6] + alone[2:4], abs=1e-4)


def test_dpo_learns_to_prefer_the_chosen_answers_and_a_resumed_run_keeps_its_reference(tiny_model, tmp_path):
    """The loss starts at ln 2 (the model is its own reference), the saved model prefers the chosen
    answers by the margin reported, and a run resumed from a checkpoint, whose weights have moved,
    takes the reference from the checkpoint and ends with the uninterrupted run's weights."""
    task = finetune_task(tiny_model, _dataset(tmp_path / "data"), f"file://{tmp_path}/store", objective="dpo",
                         dpo={"beta": 0.2}, checkpointing={"everySteps": 4, "keepLast": 20},
                         hyperparameters={"epochs": 3, "learningRate": 0.02})
    path = write_task(task, tmp_path)
    succeeded(run_finetune(path))
    run = open_store(task["artifactUri"])
    result = run.read_json("result.json")
    assert loss_curve(task)[0] == pytest.approx(math.log(2), abs=1e-5)
    assert result["evalLoss"] < 0.5 and result["finalLoss"] < result["firstLoss"]
    assert result["rewardAccuracy"] == 1.0 and result["datasetFormat"] == "preference"
    # The saved model prefers the chosen answers by the margin reported, measured here on its own.
    tok = AutoTokenizer.from_pretrained(tiny_model)
    val = encode_pairs(tok, _rows(), 96, "validation.jsonl")
    pairs = list(range(len(val) // 2))
    logps = {name: pair_logps(AutoModelForCausalLM.from_pretrained(folder), val, pairs, 4, tok.pad_token_id, "cpu")
             for name, folder in (("base", tiny_model), ("tuned", result["modelUri"][7:]))}
    change = logps["tuned"] - logps["base"]
    assert float((0.2 * (change[:, 0] - change[:, 1])).mean()) == pytest.approx(result["rewardMargin"], abs=1e-3)
    assert "reward accuracy 1.0" in (Path(result["modelUri"][7:]) / "README.md").read_text()
    assert headline("FineTune", result).endswith("reward accuracy 1.00")

    _resumed_from_step_4_ends_with_the_same_weights(run, path, result)


def test_orpo_trains_without_a_reference_and_reports_its_own_margin(tiny_model, tmp_path):
    """A reference-free loss: no reference pass, no reference in the checkpoints; the saved model
    finds the chosen answers likelier per token, by the margin reported (measured here on its own)."""
    task = finetune_task(tiny_model, _dataset(tmp_path / "data"), f"file://{tmp_path}/store", objective="dpo",
                         dpo={"loss": "orpo", "beta": 0.2}, checkpointing={"everySteps": 4, "keepLast": 20},
                         hyperparameters={"epochs": 3, "learningRate": 0.02})
    succeeded(run_finetune(write_task(task, tmp_path)))
    run = open_store(task["artifactUri"])
    result = run.read_json("result.json")
    saved = run.list("checkpoints")
    assert any(k.endswith("/state.json") for k in saved) and not any(k.endswith("reference.pt") for k in saved)
    assert result["finalLoss"] < result["firstLoss"] and result["rewardAccuracy"] == 1.0
    tok = AutoTokenizer.from_pretrained(tiny_model)
    val = encode_pairs(tok, _rows(), 96, "validation.jsonl")
    tuned = AutoModelForCausalLM.from_pretrained(result["modelUri"][7:])
    mean = pair_logps(tuned, val, list(range(len(val) // 2)), 4, tok.pad_token_id, "cpu") / token_counts(val)
    assert float((0.2 * (mean[:, 0] - mean[:, 1])).mean()) == pytest.approx(result["rewardMargin"], abs=1e-3)


# --- KTO -------------------------------------------------------------------------------------------

def _unpaired_rows() -> list[dict]:
    """Each question's answer desirable, a refusal undesirable: labelled one by one, never paired."""
    return [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": answer}],
             "label": label} for q, a in PAIRS for answer, label in ((a, True), (REFUSAL, False))]


def _unpaired_dataset(folder: Path) -> str:
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(dumps_jsonl(_unpaired_rows() * 2))
    (folder / "validation.jsonl").write_bytes(dumps_jsonl(_unpaired_rows()))
    return f"file://{folder}"


def test_unpaired_rows_and_preference_pairs_give_kto_its_labelled_answers(tiny_model):
    user, good, bad = ({"role": r, "content": c} for r, c in (("user", "Capital of France?"), ("assistant", "Paris."),
                                                               ("assistant", "Lyon.")))
    assert labelled_of({"prompt": "Capital of France?", "completion": "Lyon.", "label": False}) == [([user], [bad], False)]
    assert labelled_of({"prompt": [user], "completion": [good], "label": True}) == [([user], [good], True)]
    assert labelled_of({"prompt": [user], "chosen": [good], "rejected": [bad]}) == [([user], [good], True),
                                                                                  ([user], [bad], False)]
    unpaired = {"prompt": [user], "completion": [bad], "label": False}
    assert messages_of(unpaired) == [user, bad]  # what a Benchmark's perplexity or a calibration reads...
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert encode_rows(tok, [unpaired, {**unpaired, "label": True}], 96) == encode_rows(tok, [{"messages": [user, bad]}], 96)
    with pytest.raises(ValueError, match="label must be true .* or false, got 'yes'"):  # ...but not an undesirable answer
        labelled_of({**unpaired, "label": "yes"})
    with pytest.raises(ValueError, match="needs prompt, completion and label"):
        labelled_of({"prompt": [user], "label": True})
    with pytest.raises(ValueError, match="completion must be one or more assistant messages"):
        labelled_of({"prompt": [user], "completion": [user], "label": True})
    # Each example beside its mismatched conversation: its own prompt, the next example's answer.
    convs, desirable = encode_unpaired(tok, [unpaired, {"prompt": "Hi", "completion": "Hello!", "label": True}], 96, "x")
    assert desirable.tolist() == [False, True]
    answers = [tok.decode([t for t, label in zip(c["input_ids"], c["labels"]) if label != IGNORE]) for c in convs]
    assert answers == [f"{a}<|im_end|>\n" for a in ("Lyon.", "Hello!", "Hello!", "Lyon.")]
    assert convs[0]["input_ids"][:5] == convs[1]["input_ids"][:5]  # the same prompt


def test_the_kto_loss_by_hand():
    policy, reference = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-12.0, -18.0, -5.0])
    desirable = torch.tensor([True, False, False])
    kto = {"beta": 0.1, "desirableWeight": 1.0, "undesirableWeight": 2.0}
    loss, reward = kto_terms(policy, reference, 0.5, desirable, kto)
    assert reward.tolist() == pytest.approx([0.2, -0.2, 0.0])  # 0.1 x the change from the reference
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # Measured against the reference point beta x kl = 0.05: a desirable answer's reward is to be above
    # it, an undesirable one's below.
    assert loss.tolist() == pytest.approx([1 - sigmoid(0.2 - 0.05), 2 * (1 - sigmoid(0.05 + 0.2)),
                                           2 * (1 - sigmoid(0.05))])
    assert kto_agrees(reward, 0.5, desirable, 0.1).tolist() == [True, True, True]
    assert kto_agrees(reward, 3.0, desirable, 0.1).tolist() == [False, True, True]  # reference point 0.3
    # The model as its own reference, no divergence yet: every loss is half its weight.
    start, _ = kto_terms(policy, policy, 0.0, desirable, kto)
    assert start.tolist() == [0.5, 1.0, 1.0]


def test_kto_learns_from_unpaired_labels_and_a_resumed_run_keeps_its_reference(tiny_model, tmp_path):
    """The loss starts at 1/2 (the model is its own reference), the saved model has raised the
    desirable answers and lowered the undesirable ones by the margin reported, and a run resumed
    from a checkpoint takes the reference from it and ends with the uninterrupted run's weights."""
    data = _unpaired_dataset(tmp_path / "data")
    task = finetune_task(tiny_model, data, f"file://{tmp_path}/store", objective="kto",
                         kto={"beta": 0.5}, checkpointing={"everySteps": 4, "keepLast": 20},
                         hyperparameters={"epochs": 2, "learningRate": 0.02})
    assert task["spec"]["kto"] == {"beta": 0.5, "desirableWeight": 1.0, "undesirableWeight": 1.0}
    path = write_task(task, tmp_path)
    succeeded(run_finetune(path))
    run = open_store(task["artifactUri"])
    result = run.read_json("result.json")
    assert loss_curve(task)[0] == pytest.approx(0.5, abs=1e-6)
    assert result["evalLoss"] < 0.4 and result["finalLoss"] < result["firstLoss"]
    assert result["rewardAccuracy"] == 1.0 and result["datasetFormat"] == "unpaired"
    assert any(k.endswith("/reference.pt") for k in run.list("checkpoints"))
    card = (Path(result["modelUri"][7:]) / "README.md").read_text()
    assert "- KTO loss: " in card and "labelled answers (validation examples): reward accuracy 1.0" in card
    assert headline("FineTune", result).endswith("reward accuracy 1.00")
    # The saved model moved each answer its label's way, by the margin reported, measured here on its own.
    tok = AutoTokenizer.from_pretrained(tiny_model)
    val, desirable = encode_unpaired(tok, _unpaired_rows(), 96, "validation.jsonl")
    examples = list(range(len(val) // 2))
    logps = {name: pair_logps(AutoModelForCausalLM.from_pretrained(folder), val, examples, 4, tok.pad_token_id, "cpu")
             for name, folder in (("base", tiny_model), ("tuned", result["modelUri"][7:]))}
    reward = 0.5 * (logps["tuned"] - logps["base"])[:, 0]
    assert (reward[desirable] > 0).all() and (reward[~desirable] < 0).all()
    assert float(reward[desirable].mean() - reward[~desirable].mean()) == pytest.approx(result["rewardMargin"], abs=1e-3)

    _resumed_from_step_4_ends_with_the_same_weights(run, path, result)


@pytest.mark.extended(reason=(
    "test_kto_learns_from_unpaired_labels_and_a_resumed_run_keeps_its_reference trains KTO in one "
    "process and tests/runtime/test_finetune.py's test_two_processes_follow_the_loss_curve_of_one splits sft's "
    "steps over two; this one splits KTO's, whose reference point spans the whole step, under DDP and "
    "DeepSpeed ZeRO-2"))
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("deepspeed", marks=pytest.mark.deepspeed("ShareMemCommBuilder"))])
def test_kto_on_two_processes_follows_one_process_with_accumulation_2(tiny_model, tmp_path, strategy):
    """The same global batch, 1 process x accumulation 2 and 2 processes x 1 (DDP, or DeepSpeed
    ZeRO-2, which sums the processes' gradients itself): KTO's reference point is taken over the
    whole step on all processes (not per micro-batch, as TRL's), so the loss curves and the rewards
    reported are the same."""
    one, two = two_processes_and_one(tiny_model, tmp_path, strategy, _unpaired_dataset(tmp_path / "data"),
                                     objective="kto", kto={"beta": 0.5},
                                     lora={"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]},
                                     hyperparameters={"epochs": 1, "learningRate": 0.02})
    assert two["rewardAccuracy"] == one["rewardAccuracy"]
    assert two["rewardMargin"] == pytest.approx(one["rewardMargin"], abs=1e-4)


def two_processes_and_one(model, tmp_path: Path, strategy: str, data: str, **spec) -> tuple[dict, dict]:
    """Results of the same global batch as 1 process x gradientAccumulation 2 and as 2 processes x 1
    under `strategy`, having checked that they follow the same loss curve."""
    hp = spec.pop("hyperparameters")
    tasks = [finetune_task(model, data, f"file://{tmp_path}/{processes}", resources={"gpusPerNode": processes},
                           distribution={"strategy": strategy} if processes == 2 else {"strategy": "ddp"},
                           hyperparameters={**hp, "gradientAccumulation": 3 - processes}, **spec)
             for processes in (1, 2)]
    for processes, task in zip((1, 2), tasks):
        succeeded(run_finetune(write_task(task, tmp_path), processes=processes))
    curves = [loss_curve(task) for task in tasks]
    assert len(curves[0]) == len(curves[1]) > 3
    assert max(abs(a - b) for a, b in zip(*curves)) < 1e-4
    one, two = (open_store(task["artifactUri"]).read_json("result.json") for task in tasks)
    assert two["processes"] == 2
    return one, two
