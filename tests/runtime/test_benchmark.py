"""Judge scoring (local and API judges), built-in questions, multi-turn answering, the language
rule, the rating cache, and gates."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmfactory.api.headline import headline
from llmfactory.planner import PlanError, parse, plan
from llmfactory_runtime import grader as grader_module
from llmfactory_runtime.benchmark import run as benchmark
from llmfactory_runtime.benchmark.judge import (RATINGS, comparison_outcome, expected_rating, judge_messages,
                                                parse_rating, parse_verdict, rating_distribution)
from llmfactory_runtime.benchmark.questions import builtin_questions
from llmfactory_runtime.benchmark.run import evaluate_gates
from llmfactory_runtime.chat import render
from llmfactory_runtime.progress import Progress
from llmfactory_runtime.store import open_store
from llmfactory_runtime.task import InvalidTask

QUESTION = {"question_id": "q", "category": "math", "turns": ["What is 2+2?"], "reference": "4", "language": "en"}


def _planned(doc: dict, tmp_path, fine_tune: dict | None = None, store: str = "store"):
    """The Benchmark's task, planned as the operator would (fine_tune: the result its fineTuneRef
    names), and its run's store."""
    task = plan(parse(doc), lambda *k: fine_tune, f"file://{tmp_path}/{store}")
    return task, open_store(task["artifactUri"])


def _run(doc: dict, tmp_path, fine_tune: dict | None = None) -> tuple[dict, object]:
    """The Benchmark run to its result, and its run's store."""
    task, store = _planned(doc, tmp_path, fine_tune)
    return benchmark.run(task, store, Progress(store)), store


@pytest.mark.parametrize("lang", ["en", "ru", "zh"])
def test_builtin_question_sets_have_a_dozen_two_turn_questions(lang):
    questions = builtin_questions(lang)
    assert len(questions) == 12
    assert len({q["question_id"] for q in questions}) == 12
    assert all(len(q["turns"]) == 2 and q["category"] and q["language"] == lang for q in questions)
    for q in questions:  # a reference, where given, covers both turns
        assert q.get("reference") is None or len(q["reference"]) == 2


@pytest.mark.parametrize("reply, rating", [
    ("The answer is correct and clear. Rating: [[8]]", 8.0),
    ("Format: [[rating]], e.g. [[5]]. My verdict: [[7.5]]", 7.5),
    ("I would give it 7/10.", None),
    ("[[11]]", None),
    ("[[ 3 ]]", 3.0),
])
def test_ratings_are_parsed_from_the_last_double_bracket(reply, rating):
    assert parse_rating(reply) == rating


def test_unknown_language_is_named():
    with pytest.raises(FileNotFoundError, match="'fr'"):
        builtin_questions("fr")


def test_rating_distribution_is_a_probability_over_1_to_10(tiny_model):
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    probs = rating_distribution(model, tok, judge_messages(QUESTION, ["4"], 0))
    assert len(probs) == len(RATINGS) and abs(sum(probs) - 1) < 1e-5
    assert 1 <= expected_rating(probs) <= 10
    assert expected_rating([0] * 9 + [1]) == 10
    # The cached computation equals scoring each "[[k]]" as a whole sequence.
    prompt = tok(render(tok, judge_messages(QUESTION, ["4"], 0), add_generation_prompt=True) + "[[",
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


def scripted_judge(request) -> dict:
    """An API judge: rambles without a rating the first time it sees a prompt, fails once with a
    500, and rates turn-2 prompts 4 and turn-1 prompts 8."""
    last = request.messages[-1]["content"]
    prompt = request.messages[1]["content"]
    scripted_judge.seen[prompt] = scripted_judge.seen.get(prompt, 0) + 1
    if scripted_judge.seen[prompt] == 1 and len(request.messages) == 2 and "turn-two-please" not in prompt:
        return {"text": "This answer is rather good, I think it deserves a seven out of ten."}
    if "Give only the rating" in last and scripted_judge.seen[prompt] == 2:
        return {"status": 500, "error": "upstream hiccup"}
    return {"text": "Explanation. [[4]]" if "[Conversation]" in prompt else "Explanation. [[8]]"}


def test_api_judge_grades_two_turns_reasks_and_never_pays_twice(tiny_model, tmp_path, openai_server, monkeypatch):
    scripted_judge.seen = {}
    openai_server.reply = scripted_judge
    monkeypatch.setenv("LLMFACTORY_JUDGE_API_KEY", "sk-judge")
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Benchmark", "metadata": {"name": "mt"},
           "spec": {"model": {"source": {"uri": f"file://{tiny_model}"}}, "baseline": False,
                    "judge": {"openai": {"baseUrl": openai_server.url, "model": "gpt-4o",
                                         "apiKeySecret": {"name": "openai", "key": "k"}, "maxRetries": 2,
                                         "price": {"inputPerMillion": 2.5, "outputPerMillion": 10}},
                              "languages": ["en"], "maxQuestions": 3, "maxNewTokens": 6, "languageRule": False},
                    "gates": [{"metric": "judge.turn1", "op": ">=", "value": 7}]}}
    result, store = _run(doc, tmp_path)
    # Six judgements paid for (three questions, two turns); the tokens of every request, re-asks too.
    usage = result["judgeUsage"]
    assert usage == {"requests": 6, "cached": 0, **openai_server.billed("gpt-4o"), "costUsd": usage["costUsd"]}
    assert usage["costUsd"] == pytest.approx(usage["promptTokens"] * 2.5e-6 + usage["completionTokens"] * 1e-5,
                                             abs=1e-6) and usage["costUsd"] > 0
    m = result["metrics"]
    assert (m["judge.turn1"], m["judge.turn2"], m["judge.score"], m["judge.unrated"]) == (8, 4, 6, 0)
    assert result["passed"] is True
    # Turn 2 was judged with the model's own first answer in the conversation.
    answers = store.read_json("answers/model.json")
    turn2 = [r for r in openai_server.requests if "[Conversation]" in r.messages[1]["content"]]
    assert len(turn2) >= 3 and all(r.authorization == "Bearer sk-judge" for r in openai_server.requests)
    q = builtin_questions("en")[0]
    assert any(q["turns"][1] in r.messages[1]["content"] and answers["en-01"][0] in r.messages[1]["content"]
               for r in turn2)
    report = open_store(result["reportUri"])
    assert report.read_bytes("scores.png")[:4] == b"\x89PNG"
    assert json.loads(report.read_bytes("report.json"))["categories"]["model"]
    # A second benchmark of the same answers (say, after a restart or with another gate) pays nothing.
    asked = len(openai_server.requests)
    doc["spec"]["gates"] = [{"metric": "judge.score", "op": ">=", "value": 5}]
    again, _ = _run(doc, tmp_path)
    assert len(openai_server.requests) == asked and again["metrics"]["judge.score"] == 6
    assert again["judgeUsage"] == {"requests": 0, "cached": 6, "promptTokens": 0, "completionTokens": 0, "costUsd": 0}


def test_an_answer_in_another_language_scores_one_without_the_judge(tiny_model, tmp_path, monkeypatch):
    from llmfactory_runtime.benchmark.judge import LanguageRule

    rule = LanguageRule(["en", "ru", "zh"])
    assert rule.off_language("ru", "The sky is blue because air scatters blue light more than red light.")
    assert not rule.off_language("ru", "Небо голубое, потому что воздух рассеивает синий свет сильнее красного.")
    assert not rule.off_language("zh", "def f(x): return x")  # too little text to tell


def test_questions_from_a_file_or_a_hugging_face_dataset_in_mt_bench_columns(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmfactory_runtime.benchmark.questions import load
    from llmfactory_runtime.task import InvalidTask

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = tmp_path / "mt_bench_prompts" / "data"
    hub.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([
        {"prompt_id": 81, "category": "writing", "prompt": ["Write a travel blog post.", "Rewrite it in rhymes."],
         "reference": []},
        {"prompt_id": 111, "category": "math", "prompt": ["Area of a 3-4-5 triangle?", "And its perimeter?"],
         "reference": ["6", "12"]}]), hub / "train-00000-of-00001.parquet")
    found = load({"questionsDataset": {"id": str(hub.parent), "split": "train"}, "languages": ["en"]})
    assert [(q["question_id"], q["category"], len(q["turns"]), q["reference"]) for q in found] == [
        ("81", "writing", 2, None), ("111", "math", 2, ["6", "12"])]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": "a", "turns": ["one"], "language": "ru"}\n{"question_id": "b", "turns": "x"}\n')
    with pytest.raises(InvalidTask, match="questionsUri: question 2: turns must be a list of one or two strings "
                                          r"\(its fields: question_id, turns\)"):
        load({"questionsUri": f"file://{bad}", "languages": ["ru"]})
    with pytest.raises(InvalidTask, match=f"spec.judge.questionsUri: there is no file at file://{tmp_path}/nope.jsonl"):
        load({"questionsUri": f"file://{tmp_path}/nope.jsonl", "languages": ["ru"]})
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"question_id": "a", "turns": ["one"], "language": "ru"}\n'
                  '{"question_id": "b", "turns": ["um"], "language": "pt-BR"}\n'  # a tag: its language
                  '{"question_id": "c", "turns": ["два"], "language": "Russian"}\n')  # a name: its language
    assert [q["question_id"] for q in load({"questionsUri": f"file://{ok}", "languages": ["ru"]})] == ["a", "c"]
    assert [q["language"] for q in load({"questionsUri": f"file://{ok}", "languages": ["pt"]})] == ["pt"]
    with pytest.raises(InvalidTask, match="no question in languages.*'ru'"):
        load({"questionsUri": f"file://{ok}", "languages": ["zh"]})


def test_lm_eval_task_from_a_local_folder_scores_as_the_log_likelihoods_say(tiny_model, tmp_path):
    """A two-question multiple-choice task (YAML + JSONL, lm-eval's own format, offline): the
    accuracy lm-eval reports equals picking, per question, the choice the model finds likeliest."""
    from pathlib import Path

    folder = Path(__file__).parents[1] / "fixtures" / "lm_eval_tasks"
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Benchmark", "metadata": {"name": "mc"},
           "spec": {"model": {"source": {"uri": f"file://{tiny_model}"}}, "baseline": False,
                    "lmEval": {"tasks": ["tiny_quiz"], "tasksUri": f"file://{folder}"},
                    "gates": [{"metric": "lmEval.tiny_quiz.acc", "op": ">=", "value": 0.5}]}}
    result, store = _run(doc, tmp_path)

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    expected = []
    for line in (folder / "tiny_quiz.jsonl").read_text().splitlines():
        row = json.loads(line)
        context = f"Question: {row['question']}\nAnswer:"
        scores = []
        for choice in row["choices"]:
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            n_context = len(tok(context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            scores.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(n_context, len(whole))))
        expected.append(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    acc = sum(expected) / len(expected)
    assert result["metrics"]["lmEval.tiny_quiz.acc"] == pytest.approx(acc)
    assert 0 <= result["metrics"]["lmEval.tiny_quiz.acc_norm"] <= 1
    assert result["passed"] == (acc >= 0.5)
    assert store.read_json("lm-eval/model.json")["tiny_quiz.acc"] == pytest.approx(acc)  # a restart redoes nothing

    doc["spec"]["lmEval"]["tasks"] = ["no_such_task"]
    doc["spec"]["gates"] = []
    task, store = _planned(doc, tmp_path, store="store2")
    from llmfactory_runtime.task import InvalidTask
    with pytest.raises(InvalidTask, match=r"spec.lmEval.tasks: no task named \['no_such_task'\]"):
        benchmark.run(task, store, Progress(store))
    # A task whose data file is misnamed: refused (no retry would find it), naming the file.
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_quiz.yaml").write_text(
        (folder / "tiny_quiz.yaml").read_text().replace("test: tiny_quiz.jsonl", "test: tiny_quizz.jsonl"))
    doc["spec"]["lmEval"] = {"tasks": ["tiny_quiz"], "tasksUri": f"file://{tmp_path}/tasks"}
    task, store = _planned(doc, tmp_path, store="store3")
    with pytest.raises(InvalidTask, match=r"spec.lmEval.tasks: a task's data is not there: .*tiny_quizz.jsonl"):
        benchmark.run(task, store, Progress(store))


def test_lm_eval_prompts_in_the_chat_template_are_rendered_with_the_models_template_arguments(
        tiny_model, tmp_path, monkeypatch):
    """lmEval.chatTemplate on Qwen3 with chatTemplateKwargs {enable_thinking: false}: every prompt lm-eval
    scores ends as the model's answers without reasoning begin (the empty think block), as the judged
    answers' prompts do."""
    from pathlib import Path

    from lm_eval.models.huggingface import HFLM

    from finetune_helpers import qwen3_like

    qwen3_like(tiny_model, tmp_path / "qwen3-like")
    rendered = []
    original = HFLM.apply_chat_template
    monkeypatch.setattr(HFLM, "apply_chat_template",
                        lambda self, *a, **k: rendered.append(original(self, *a, **k)) or rendered[-1])
    folder = Path(__file__).parents[1] / "fixtures" / "lm_eval_tasks"
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Benchmark", "metadata": {"name": "mc"},
           "spec": {"model": {"source": {"uri": f"file://{tmp_path}/qwen3-like"},
                              "chatTemplateKwargs": {"enable_thinking": False}}, "baseline": False,
                    "lmEval": {"tasks": ["tiny_quiz"], "tasksUri": f"file://{folder}", "chatTemplate": True}}}
    result, _ = _run(doc, tmp_path)
    assert 0 <= result["metrics"]["lmEval.tiny_quiz.acc"] <= 1
    assert rendered and all(p.startswith("<|im_start|>user\nQuestion: ") and
                            p.endswith("Answer:<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
                            for p in rendered), rendered


def _random_adapter(tiny_model, folder, seed: int):
    """A LoRA adapter with random (not zero) B matrices, saved with its tokenizer: a "fine-tuned"
    model whose answers differ from its base's."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return adapter


def test_a_lora_adapter_is_merged_onto_its_base_when_loaded(tiny_model, tmp_path):
    from peft import PeftModel

    from llmfactory_runtime.models import load_model, load_tokenizer

    _random_adapter(tiny_model, tmp_path / "adapter", seed=1)
    source = {"uri": f"file://{tiny_model}", "adapterUri": f"file://{tmp_path / 'adapter'}"}
    merged = load_model(source, dtype=torch.float32, to=torch.device("cpu"))
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                         tmp_path / "adapter").merge_and_unload()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = load_tokenizer(source)("Почему небо голубое?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-3)  # the adapter changed it


def test_perplexity_of_a_split_the_dataset_lacks_is_refused_naming_the_splits_it_has(tiny_model, tmp_path):
    """Not a run without perplexity whose gate then fails as if it were too high: the field, the
    URI and what is there (a mistyped folder, a dataset built without that split, an empty file)."""
    from llmfactory_runtime.data import dumps_jsonl

    data = tmp_path / "rows"
    data.mkdir()
    (data / "train.jsonl").write_bytes(dumps_jsonl([{"messages": [{"role": "user", "content": "Hi"},
                                                                  {"role": "assistant", "content": "Hello."}]}]))
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Benchmark", "metadata": {"name": "ppl"},
           "spec": {"model": {"source": {"uri": f"file://{tiny_model}"}}, "baseline": False,
                    "perplexity": {"dataset": {"uri": f"file://{data}"}, "split": "test"},
                    "gates": [{"metric": "perplexity.value", "op": "<=", "value": 10}]}}
    for made, why in [(None, "no test.jsonl there, only train.jsonl"), ("", "its test.jsonl is empty")]:
        if made is not None:
            (data / "test.jsonl").write_text(made)
        task, store = _planned(doc, tmp_path, store=f"store-{made is None}")
        with pytest.raises(InvalidTask, match=rf"^spec.perplexity.split: file://{data} has no test rows \({why}\)$"):
            benchmark.run(task, store, Progress(store))
        assert not store.list()  # refused before any model was loaded or answered
    doc["spec"]["perplexity"]["dataset"]["uri"] = f"file://{tmp_path}"  # the folder above the dataset's
    task, store = _planned(doc, tmp_path, store="above")
    with pytest.raises(InvalidTask, match=r"\(none of train.jsonl, validation.jsonl, test.jsonl there: name the "
                                          r"dataset's folder\)$"):
        benchmark.run(task, store, Progress(store))


def _benchmark_of_held_out_rows(tiny_model, tmp_path, rows: list[dict], dataset_format: str, seed: int):
    """A Benchmark of a FineTune (a random adapter on the tiny model) whose dataset is `rows` in
    `dataset_format`, the test split; its gate names preference.rewardAccuracy. Returns the
    adapter, the manifest, the FineTune's result as the planner reads it, the metrics and the run."""
    from llmfactory_runtime.data import dumps_jsonl

    adapter = _random_adapter(tiny_model, tmp_path / "adapter", seed=seed)
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "test.jsonl").write_bytes(dumps_jsonl(rows))
    fine_tune = {"adapterUri": f"file://{tmp_path / 'adapter'}", "digest": "sha256:a",
                 "baseModel": {"uri": f"file://{tiny_model}"}, "datasetUri": f"file://{tmp_path / 'rows'}",
                 "datasetFormat": dataset_format, "datasetDigest": "sha256:d"}
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Benchmark", "metadata": {"name": "held-out"},
           "spec": {"model": {"fineTuneRef": {"name": "tuned"}}, "perplexity": {},
                    "gates": [{"metric": "preference.rewardAccuracy", "op": ">=", "value": 0.0}]}}
    result, store = _run(doc, tmp_path, fine_tune)
    return adapter, doc, fine_tune, result["metrics"], store


def test_a_dpo_fine_tunes_held_out_pairs_are_scored_against_its_base(tiny_model, tmp_path):
    """Preference rows as the perplexity dataset (a DPO FineTune's): the pairs are scored too, per
    token for preference.accuracy, and against the baseline for DPO's implicit reward."""
    from llmfactory_runtime.preference import encode_pairs, pair_logps

    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
             "rejected": [{"role": "assistant", "content": r}]}
            for q, a, r in [("Capital of France?", "Paris.", "Lyon, I think, or maybe Marseille."),
                            ("Почему небо голубое?", "Рассеяние света.", "Не знаю."),
                            ("天空为什么是蓝色的？", "光的散射。", "因为海。"), ("2+2?", "4", "5"),
                            ("Name a colour.", "Blue.", "Seven.")]]  # five: a share and its complement differ
    adapter, doc, fine_tune, metrics, store = _benchmark_of_held_out_rows(tiny_model, tmp_path, rows, "preference", 3)

    tok = AutoTokenizer.from_pretrained(tiny_model)
    convs = encode_pairs(tok, rows, 2048, "test")
    tuned, base = (pair_logps(m.eval(), convs, list(range(5)), 4, tok.pad_token_id, "cpu")
                   for m in (adapter.merge_and_unload(), AutoModelForCausalLM.from_pretrained(tiny_model)))
    tokens = torch.tensor([[sum(label != -100 for label in convs[k]["labels"]) for k in (i, i + 1)]
                           for i in range(0, 10, 2)])
    per_token = {name: logps / tokens for name, logps in (("tuned", tuned), ("base", base))}
    assert metrics["preference.accuracy"] == pytest.approx(float((per_token["tuned"][:, 0] > per_token["tuned"][:, 1])
                                                                 .float().mean()))
    assert metrics["preference.baseline"] == pytest.approx(float((per_token["base"][:, 0] > per_token["base"][:, 1])
                                                                 .float().mean()))
    gain = tuned - base
    assert metrics["preference.rewardAccuracy"] == pytest.approx(float((gain[:, 0] > gain[:, 1]).float().mean()))
    torch.testing.assert_close(torch.tensor(store.read_json("preference/model.json")["logps"]), tuned, atol=1e-4, rtol=0)
    assert store.read_json("preference/baseline.json")["tokens"] == tokens.tolist()  # a restart redoes nothing
    # A gate on a preference metric of a dataset of conversations is refused when planned.
    with pytest.raises(PlanError, match=r"spec.gates\[0\].metric: 'preference.rewardAccuracy' is not reported"):
        plan(parse(doc), lambda *k: {**fine_tune, "datasetFormat": "chatml"}, f"file://{tmp_path}/store")


def test_a_kto_fine_tunes_held_out_labelled_answers_are_scored_against_its_base(tiny_model, tmp_path):
    """KTO's unpaired rows as the perplexity dataset: each answer's log-probability change from the
    baseline against the reference point (the mismatched conversations' mean change, at least 0),
    as the FineTune's rewardAccuracy; pair metrics are not reported, nor this one without a baseline."""
    from llmfactory_runtime.preference import encode_unpaired, pair_logps

    rows = [{"prompt": q, "completion": a, "label": good}
            for q, a, good in [("Capital of France?", "Paris.", True), ("Capital of France?", "Lyon, I think.", False),
                               ("Почему небо голубое?", "Рассеяние света.", True), ("2+2?", "5", False),
                               ("天空为什么是蓝色的？", "光的散射。", True), ("Name a colour.", "Seven.", False),
                               ("Name a fruit.", "An apple.", True)]]  # seven: a share and its complement differ
    adapter, doc, fine_tune, metrics, store = _benchmark_of_held_out_rows(tiny_model, tmp_path, rows, "unpaired", 5)

    tok = AutoTokenizer.from_pretrained(tiny_model)
    convs, desirable = encode_unpaired(tok, rows, 2048, "test")
    tuned, base = (pair_logps(m.eval(), convs, list(range(7)), 4, tok.pad_token_id, "cpu")
                   for m in (adapter.merge_and_unload(), AutoModelForCausalLM.from_pretrained(tiny_model)))
    change = tuned - base
    point = max(float(change[:, 1].mean()), 0.0)
    agrees = torch.where(desirable, change[:, 0] > point, change[:, 0] < point)
    assert 0 < agrees.sum() < 7  # the check below tells a share from its complement and from all or none
    assert metrics["preference.rewardAccuracy"] == pytest.approx(float(agrees.float().mean()), abs=1e-4)  # as reported
    assert "preference.accuracy" not in metrics and "preference.baseline" not in metrics
    torch.testing.assert_close(torch.tensor(store.read_json("preference/model.json")["logps"]), tuned, atol=1e-4, rtol=0)
    # Without a baseline there is no change to measure, and pairs there are none: gates on them are
    # refused when planned.
    alone = {**doc, "spec": {**doc["spec"], "baseline": False}}
    with pytest.raises(PlanError, match=r"spec.gates\[0\].metric: 'preference.rewardAccuracy' is not reported"):
        plan(parse(alone), lambda *k: fine_tune, f"file://{tmp_path}/store")
    with pytest.raises(PlanError, match=r"spec.gates\[0\].metric: 'preference.accuracy' is not reported"):
        plan(parse({**doc, "spec": {**doc["spec"], "gates": [{"metric": "preference.accuracy", "op": ">=", "value": 0}]}}),
             lambda *k: fine_tune, f"file://{tmp_path}/store")


def test_a_grpo_fine_tunes_held_out_prompts_are_answered_and_rewarded_against_its_base(tiny_model, tmp_path,
                                                                                       openai_server, without_wordnet):
    """reward.value and reward.baseline: the grader's mean reward of each model's greedy answers to
    the GRPO FineTune's test prompts, gate-able; each answer is kept, so a restarted run reads it
    rather than asking again. A grader that cannot score here (meteor without WordNet) is refused first."""
    from llmfactory_runtime.data import dumps_jsonl
    from llmfactory_runtime.generate import generate

    adapter = _random_adapter(tiny_model, tmp_path / "adapter", seed=5)
    questions = ["Capital of France?", "Почему небо голубое?", "天空为什么是蓝色的？", "2+2?"]
    conversations = [[{"role": "user", "content": q}] for q in questions]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tuned, base = ([g.text for g in generate(m.eval(), tok, conversations, 12)]
                   for m in (adapter.merge_and_unload(), AutoModelForCausalLM.from_pretrained(tiny_model)))
    assert all(t != b for t, b in zip(tuned, base))  # so that each reference below passes one model only
    # References: the tuned model's answers to the first two, the base's to the third, neither's to the last.
    rows = [{"messages": c, "solution": ref} for c, ref in zip(conversations, [*tuned[:2], base[2], "never"])]
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "test.jsonl").write_bytes(dumps_jsonl(rows))
    fine_tune = {"adapterUri": f"file://{tmp_path / 'adapter'}", "digest": "sha256:a",
                 "baseModel": {"uri": f"file://{tiny_model}"}, "datasetUri": f"file://{tmp_path / 'prompts'}",
                 "datasetFormat": "graded", "datasetDigest": "sha256:d"}
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Benchmark", "metadata": {"name": "rewarded"},
           "spec": {"model": {"fineTuneRef": {"name": "tuned"}},
                    "reward": {"grader": {"referenceField": "solution"}, "maxNewTokens": 12},
                    "gates": [{"metric": "reward.value", "op": ">=", "value": 0.5}]}}
    task, store = _planned(doc, tmp_path, fine_tune)
    result = benchmark.run(task, store, Progress(store))
    assert result["metrics"] == {"reward.value": 0.5, "reward.baseline": 0.25} and result["passed"]
    assert headline("Benchmark", result) == "reward 0.50 (base 0.25), gates passed"
    report = store.read_json("report/report.json")["rewarded"]
    assert report["model"] == {"answers": tuned, "rewards": [1.0, 1.0, 0.0, 0.0]}
    assert report["baseline"]["rewards"] == [0.0, 0.0, 1.0, 0.0]
    assert "## Rewarded answers" in store.read_bytes("report/report.md").decode()
    # A restarted run reads the answers it has: an answer changed in the store is what gets graded.
    saved = store.read_json("answers/reward-model.json")
    store.write_json("answers/reward-model.json", {**saved, "3": "never"})
    assert benchmark.run(task, store, Progress(store))["metrics"]["reward.value"] == 0.75
    # A python grader scores the same kept answers on its own scale, reading the row it is given.
    task["spec"]["reward"]["grader"] = {"referenceField": "solution", "operation": "python", "source": (
        "def grade(sample, item):\n    return (sample['output_text'] == item['solution']) + len(item['messages'])\n")}
    assert benchmark.run(task, store, Progress(store))["metrics"] == {"reward.value": 1.75, "reward.baseline": 1.25}
    assert store.read_json("report/report.json")["rewarded"]["model"]["rewards"] == [2.0, 2.0, 1.0, 2.0]
    # A sum grader: the weighted total as reward.value, each part's mean apart (a gate may name one).
    task["spec"]["reward"]["grader"] = {"operation": "sum", "parts": [
        {"name": "exact", "referenceField": "solution", "operation": "equals", "weight": 1},
        {"name": "turns", "operation": "python", "weight": -0.5, "source": "def grade(s, i):\n    return len(i['messages'])\n"}]}
    metrics = benchmark.run(task, store, Progress(store))["metrics"]
    assert metrics == {"reward.value": 0.25, "reward.baseline": -0.25, "reward.value.exact": 0.75,
                       "reward.baseline.exact": 0.25, "reward.value.turns": 1.0, "reward.baseline.turns": 1.0}
    assert store.read_json("report/report.json")["rewarded"]["model"]["parts"] == {"exact": [1.0, 1.0, 0.0, 1.0],
                                                                                  "turns": [1, 1, 1, 1]}
    assert '| "2+2?" | "never" | 0.5 (exact 1, turns 1): "never" | -0.5 (exact 0, turns 1): ' in \
        store.read_bytes("report/report.md").decode()  # the kept answer changed above, and the base's
    # A cosine grader's embeddings endpoint: what was asked of it, with its cost, in the result.
    grader_module._usage.clear()  # as in a new process
    task["spec"]["reward"]["grader"] = {"referenceField": "solution", "operation": "similarity", "metric": "cosine",
                                        "embeddings": {"baseUrl": openai_server.url, "model": "embed",
                                                       "price": {"inputPerMillion": 100, "outputPerMillion": 0}}}
    result = benchmark.run(task, store, Progress(store))
    rewarded = store.read_json("report/report.json")["rewarded"]
    scored = {(a, row["solution"]) for label in ("model", "baseline")
              for a, row in zip(rewarded[label]["answers"], rows) if a}
    assert result["graderUsage"] == {"embeddings": {
        "requests": len(scored), "cached": 0, "promptTokens": openai_server.embedding_tokens, "completionTokens": 0,
        "costUsd": round(openai_server.embedding_tokens * 1e-4, 6)}} and openai_server.embedding_tokens > 0
    # METEOR where nltk finds no WordNet: refused before any model answers, naming the field.
    doc["spec"]["reward"]["grader"] = {"referenceField": "solution", "operation": "similarity", "metric": "meteor"}
    task, store = _planned(doc, tmp_path, fine_tune, store="meteor")
    with pytest.raises(InvalidTask, match=r"spec.reward.grader.metric: meteor matches synonyms by WordNet 3.0"):
        benchmark.run(task, store, Progress(store))
    assert not store.list("answers")
    doc["spec"]["reward"]["grader"] = {"referenceField": "solution"}
    # A malformed row fails naming the field, the file and the row.
    (tmp_path / "prompts" / "test.jsonl").write_bytes(dumps_jsonl(rows + [{"messages": conversations[0]}]))
    task, store = _planned(doc, tmp_path, fine_tune, store="other")
    with pytest.raises(InvalidTask, match="spec.reward.dataset: test.jsonl row 5: needs its reference answer in "
                                          "field 'solution'"):
        benchmark.run(task, store, Progress(store))


@pytest.mark.parametrize("reply, verdict", [
    ("Assistant A explains the cause; B does not. [[A]]", "A"),
    ("Format: [[A]], [[B]] or [[C]]. Both are equally vague: [[ C ]]", "C"),
    ("B is better.", None),
    ("[[D]]", None),
])
def test_verdicts_are_parsed_from_the_last_double_bracket(reply, verdict):
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize("model_first, model_second, outcome", [
    ("A", "B", "win"), ("B", "A", "loss"),  # both orders agree
    ("A", "A", "tie"), ("B", "B", "tie"),  # the judge prefers a position, not an answer
    ("A", "C", "tie"), ("C", "A", "tie"), ("C", "C", "tie"),
    ("A", None, None), (None, None, None),  # undecided
])
def test_a_comparison_is_won_only_when_both_orders_agree(model_first, model_second, outcome):
    assert comparison_outcome(model_first, model_second) == outcome


def test_pairwise_language_rule_and_win_rate():
    """An answer in another language loses without the judge; both in another language tie; the
    judge's verdicts are read from the model's side in each order."""
    from llmfactory_runtime.benchmark.judge import LanguageRule
    from llmfactory_runtime.benchmark.run import _compare, _pairwise_metrics

    en = "The sky looks blue because the air scatters blue sunlight far more than red sunlight."
    ru = "Небо голубое, потому что воздух рассеивает синий солнечный свет сильнее, чем красный."
    questions = [{"question_id": q, "category": "stem", "turns": ["Why is the sky blue?", "Shorter?"], "language": "en"}
                 for q in ("judged", "off")] + [{"question_id": "both-off", "category": "stem",
                                                 "turns": ["Why is the sky blue?"], "language": "en"}]
    answers = {"model": {"judged": [en, en + " Yes."], "off": [ru, en], "both-off": [ru]},
               "baseline": {"judged": [en + " Indeed.", en], "off": [en, ru], "both-off": [ru]}}
    asked = []

    def judging(items, kind, stage):
        asked.extend(item_id for item_id, _ in items)
        # judged/0: the model wins in both orders; judged/1: one order is undecided.
        return {"judged/0/0": "A", "judged/0/1": "B", "judged/1/0": "B", "judged/1/1": None}

    outcomes, games, why = _compare({"openai": {}}, questions, answers["model"], answers["baseline"], "baseline",
                                    LanguageRule(["en", "ru"]), judging)
    assert asked == ["judged/0/0", "judged/0/1", "judged/1/0", "judged/1/1"]  # nothing else needed the judge
    assert outcomes == {"judged": ["win", None], "off": ["loss", "win"], "both-off": ["tie"]}
    assert games["judged"] == [["A", "B"], ["B", None]]
    assert why["off/0"] == "the model answered in another language" and why["both-off/0"].startswith("both")
    metrics = _pairwise_metrics(outcomes, questions)
    assert (metrics["judge.wins"], metrics["judge.ties"], metrics["judge.losses"], metrics["judge.undecided"]) == (2, 1, 1, 1)
    assert metrics["judge.winRate"] == pytest.approx(2.5 / 4)
    assert (metrics["judge.winRate.turn1"], metrics["judge.winRate.turn2"]) == (pytest.approx(1.5 / 3), 1.0)


def _scripted_comparer(answers_of):
    """An API judge comparing the model's answer (found with answers_of()) with the baseline's, by the
    question: "win" favours the model, "lose" the baseline, "bias" always says A, "mute" never gives a
    verdict, "two" favours the model in turn 1 and calls turn 2 a tie. Its first reply to each "win"
    prompt has no verdict (it is asked again)."""
    seen = {}

    def reply(request) -> dict:
        prompt = request.messages[1]["content"]
        seen[prompt] = seen.get(prompt, 0) + 1
        qid = next(q for q in ("win", "lose", "bias", "mute", "two") if f"Question {q}:" in prompt)
        if "[Conversation with assistant A]" in prompt:
            return {"text": "Equally good second answers. [[C]]"}
        model_answer = answers_of()[qid][0]
        model_is_a = f"[Assistant A's answer]\n{model_answer}\n\n[Assistant B's answer]" in prompt
        if qid == "mute" or (qid == "win" and seen[prompt] == 1):
            return {"text": "Both answers have merits."}
        if qid == "bias":
            return {"text": "The first one. [[A]]"}
        better_is_model = qid in ("win", "two")
        return {"text": "Verdict: " + ("[[A]]" if model_is_a == better_is_model else "[[B]]")}

    return reply


def test_api_judge_compares_the_model_with_its_baseline_in_both_orders(tiny_model, tmp_path, openai_server,
                                                                        monkeypatch):
    from llmfactory.api.headline import headline

    _random_adapter(tiny_model, tmp_path / "adapter", seed=5)
    questions = [{"question_id": q, "category": "general", "turns": [f"Question {q}: why is the sky blue?"]}
                 for q in ("win", "lose", "bias", "mute")]
    questions.append({"question_id": "two", "category": "general",
                      "turns": ["Question two: name a colour.", "Now name another one."]})
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    fine_tune = {"adapterUri": f"file://{tmp_path / 'adapter'}", "digest": "sha256:a",
                 "baseModel": {"uri": f"file://{tiny_model}"}, "datasetUri": "file:///unused",
                 "datasetFormat": "chatml", "datasetDigest": "sha256:d"}
    monkeypatch.setenv("LLMFACTORY_JUDGE_API_KEY", "sk-judge")
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Benchmark", "metadata": {"name": "pairs"},
           "spec": {"model": {"fineTuneRef": {"name": "tuned"}},
                    "judge": {"openai": {"baseUrl": openai_server.url, "model": "gpt-4o",
                                         "apiKeySecret": {"name": "openai", "key": "k"}},
                              "mode": "pairwise", "questionsUri": f"file://{tmp_path}/questions.jsonl",
                              "languages": ["en"], "maxNewTokens": 6, "maxReasks": 1, "languageRule": False},
                    "gates": [{"metric": "judge.winRate", "op": ">=", "value": 0.5}]}}
    task, store = _planned(doc, tmp_path, fine_tune)
    openai_server.reply = _scripted_comparer(lambda: store.read_json("answers/model.json"))
    result = benchmark.run(task, store, Progress(store))

    model, base = store.read_json("answers/model.json"), store.read_json("answers/baseline.json")
    assert all(model[q] != base[q] for q in model)  # the adapter changed every answer: the script can tell them apart
    m = result["metrics"]
    # win, loss, tie (position bias), undecided, and "two": a win then a tie
    assert (m["judge.wins"], m["judge.ties"], m["judge.losses"], m["judge.undecided"]) == (2, 2, 1, 1)
    assert m["judge.winRate"] == 0.6 and m["judge.winRate.turn1"] == 0.625 and m["judge.winRate.turn2"] == 0.5
    assert "judge.score" not in m and result["passed"] is True
    assert headline("Benchmark", result) == "win rate 0.60 vs baseline, gates passed"
    # Turn 2 shows each assistant's own conversation; every comparison was asked in both orders.
    turn2 = [r.messages[1]["content"] for r in openai_server.requests
             if "[Conversation with assistant A]" in r.messages[1]["content"]]
    assert len(turn2) == 2 and all(model["two"][0] in p and base["two"][0] in p for p in turn2)
    assert turn2[0].index(model["two"][1]) < turn2[0].index(base["two"][1]) or \
        turn2[1].index(model["two"][1]) < turn2[1].index(base["two"][1])
    report = open_store(result["reportUri"])
    assert report.read_bytes("win-rate.png")[:4] == b"\x89PNG"
    assert "| general | 2 | 2 | 1 | 1 | 0.6 |" in report.read_bytes("report.md").decode()
    # A second run with another gate pays for nothing: every verdict, the undecided ones too, is cached.
    asked = len(openai_server.requests)
    doc["spec"]["gates"] = [{"metric": "judge.losses", "op": "<=", "value": 0}]
    again, _ = _run(doc, tmp_path, fine_tune)
    assert len(openai_server.requests) == asked and again["metrics"]["judge.winRate"] == 0.6
    assert again["passed"] is False
    # Without a baseline there is nothing to compare with: refused when planned.
    doc["spec"]["model"] = {"source": {"uri": f"file://{tiny_model}"}}
    with pytest.raises(PlanError, match=r"spec.judge.mode: is pairwise, which compares the model with its baseline"):
        plan(parse(doc), lambda *k: None, f"file://{tmp_path}/store")


def test_pairwise_against_an_opponents_answers_from_a_file_needs_no_baseline(tiny_model, tmp_path, openai_server,
                                                                              monkeypatch):
    """judge.opponentAnswersUri: the model's answers compared with another model's, written once
    (MT-Bench's model_answer rows), as the scripted judge decides; a question they do not answer (to
    every turn) refuses the run before the model answers anything."""
    questions = [{"question_id": q, "category": "general", "turns": [f"Question {q}: why is the sky blue?"]}
                 for q in ("win", "lose", "bias", "mute")]
    questions.append({"question_id": "two", "category": "general",
                      "turns": ["Question two: name a colour.", "Now name another one."]})
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    gpt = [{"question_id": q["question_id"], "model_id": "gpt-4",
            "choices": [{"index": 0, "turns": [f"GPT-4 on {q['question_id']}, turn {t + 1}." for t in range(len(q["turns"]))]}]}
           for q in questions]
    (tmp_path / "gpt-4.jsonl").write_text("".join(json.dumps(a) + "\n" for a in gpt))
    monkeypatch.setenv("LLMFACTORY_JUDGE_API_KEY", "sk-judge")
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Benchmark", "metadata": {"name": "vs-gpt4"},
           "spec": {"model": {"source": {"uri": f"file://{tiny_model}"}},
                    "judge": {"openai": {"baseUrl": openai_server.url, "model": "gpt-4o",
                                         "apiKeySecret": {"name": "openai", "key": "k"}},
                              "mode": "pairwise", "questionsUri": f"file://{tmp_path}/questions.jsonl",
                              "opponentAnswersUri": f"file://{tmp_path}/gpt-4.jsonl",
                              "languages": ["en"], "maxNewTokens": 6, "maxReasks": 1, "languageRule": False}}}
    task, store = _planned(doc, tmp_path)
    assert task["inputs"]["baseline"] is None
    openai_server.reply = _scripted_comparer(lambda: store.read_json("answers/model.json"))
    result = benchmark.run(task, store, Progress(store))

    m = result["metrics"]
    assert (m["judge.wins"], m["judge.ties"], m["judge.losses"], m["judge.undecided"]) == (2, 2, 1, 1)
    assert result["comparedWith"] == "opponent" and headline("Benchmark", result) == "win rate 0.60 vs opponent"
    turn2 = [r.messages[1]["content"] for r in openai_server.requests
             if "[Conversation with assistant A]" in r.messages[1]["content"]]
    assert len(turn2) == 2 and all("GPT-4 on two, turn 1." in p and "GPT-4 on two, turn 2." in p for p in turn2)
    report = open_store(result["reportUri"]).read_bytes("report.md").decode()
    assert "## The model against its opponent" in report and '- **opponent**: "GPT-4 on win, turn 1."' in report

    (tmp_path / "gpt-4.jsonl").write_text("".join(json.dumps(a) + "\n" for a in gpt[:4])
                                          + json.dumps({"question_id": "two", "turns": ["Blue."]}) + "\n")
    task, store = _planned(doc, tmp_path, store="other")
    with pytest.raises(InvalidTask, match="spec.judge.opponentAnswersUri: no answer to every turn of 1 of the 5 "
                                          "questions asked: two"):
        benchmark.run(task, store, Progress(store))
    assert not store.exists("answers/model.json")


def test_a_local_judge_grades_and_compares_by_its_likeliest_verdict(tiny_model, tmp_path):
    """mode both with a local judge: the ratings and the two orders' verdicts are what the judge
    model's log-probabilities give for the prompts, kept in the run."""
    from llmfactory_runtime.benchmark.judge import local_judgement, pairwise_messages
    from llmfactory_runtime.benchmark.questions import builtin_questions

    _random_adapter(tiny_model, tmp_path / "adapter", seed=5)
    fine_tune = {"adapterUri": f"file://{tmp_path / 'adapter'}", "digest": "sha256:a",
                 "baseModel": {"uri": f"file://{tiny_model}"}, "datasetUri": "file:///unused",
                 "datasetFormat": "chatml", "datasetDigest": "sha256:d"}
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Benchmark", "metadata": {"name": "local"},
           "spec": {"model": {"fineTuneRef": {"name": "tuned"}},
                    "judge": {"model": {"uri": f"file://{tiny_model}"}, "mode": "both", "languages": ["en"],
                              "maxQuestions": 1, "maxNewTokens": 4, "languageRule": False}}}
    result, store = _run(doc, tmp_path, fine_tune)
    metrics = result["metrics"]

    judge, tok = AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)
    model, base = store.read_json("answers/model.json"), store.read_json("answers/baseline.json")
    verdicts = store.read_json("ratings/local-pairwise.json")
    outcomes = []
    for q in builtin_questions("en")[:1]:
        for turn in (0, 1):
            pair = [local_judgement(judge, tok, pairwise_messages(q, *answers, turn), "verdict")
                    for answers in ((model[q["question_id"]], base[q["question_id"]]),
                                    (base[q["question_id"]], model[q["question_id"]]))]
            assert [verdicts[f"{q['question_id']}/{turn}/{order}"] for order in (0, 1)] == pair
            outcomes.append(comparison_outcome(*pair))
    assert metrics["judge.winRate"] == pytest.approx(sum({"win": 1, "tie": 0.5, "loss": 0}[o] for o in outcomes) / 2)
    assert metrics["judge.undecided"] == 0 and {"judge.score", "judge.baseline"} <= metrics.keys()


def test_a_reasoning_models_answers_are_judged_by_what_they_say_after_their_thoughts(tmp_path, monkeypatch):
    """A model trained on reasoning traces answers "<think>...</think> answer": the judge rates, and the
    language rule reads, the answer alone, and the question's second turn sees the answer alone; an
    answer whose reasoning never ended (cut at maxNewTokens) said nothing."""
    from types import SimpleNamespace

    from llmfactory_runtime.chat import said

    assert said("<think>\nHm, 2+2.\n</think>\n\n4") == "4" and said("4") == "4" and said("<think>\nHm, 2+") == ""
    assert said("Hm, 2+2.\n</think>\n\n4") == "4"  # DeepSeek-R1's distilled models: their prompt opens the tag
    assert said("Write <think> and </think> around it.") == "Write <think> and </think> around it."
    thoughts = ("<think>\nПользователь спрашивает, почему небо голубое. Воздух рассеивает синий свет сильнее, чем "
                "красный, поэтому небо кажется голубым. Отвечу по-английски.\n</think>\n\n")
    answer = "Air scatters blue sunlight far more than red sunlight, so the sky looks blue."
    questions = [{"question_id": "q", "category": "stem", "turns": ["Why is the sky blue?", "Shorter?"],
                  "language": "en"}]
    seen = []
    monkeypatch.setattr(benchmark, "_judge_items", lambda judge, items, *_: seen.extend(items) or {i: 8.0 for i, _ in items})
    store = open_store(f"file://{tmp_path}")
    out = benchmark._judge({"languages": ["en", "ru"], "openai": {}}, None, questions,
                       {"model": {"q": [thoughts + answer, "Scattering."]}}, None, {}, store, Progress(store))
    assert out["ratings"] == {"model": {"q": [8.0, 8.0]}}  # thought in Russian, answered in English: judged
    assert answer in seen[0][1][1]["content"] and "<think>" not in seen[0][1][1]["content"] + seen[1][1][1]["content"]
    asked = []

    def ask(conversations, max_new_tokens, temperature, seed, on_answer):
        asked.extend(conversations)
        for i in range(len(conversations)):
            on_answer(i, SimpleNamespace(text="Scattering."))

    benchmark._answer(ask, {"maxNewTokens": 8}, questions, {"q": [thoughts + answer]}, lambda: None, Progress(store))
    assert asked[0][1] == {"role": "assistant", "content": answer}


def test_a_reasoning_model_judge_is_asked_its_effort_with_room_to_reason(tmp_path, openai_server):
    """A reasoning judge (openai.reasoningEffort) is asked max_completion_tokens, which counts its
    reasoning, with room for thousands of tokens of it before the rating, and no temperature."""
    from llmfactory_runtime.benchmark.judge import REASONING_REPLY_TOKENS, judge_with_api

    openai_server.reply = lambda request: {"text": "Fine. [[7]]"}
    endpoint = {"baseUrl": openai_server.url, "model": "o3", "reasoningEffort": "medium"}
    verdicts = judge_with_api(endpoint, [("q", judge_messages({"turns": ["Hi?"]}, ["Hello."], 0, "api"))],
                              f"file://{tmp_path}/cache", 1, lambda *_, **__: None)
    assert verdicts["q"]["rating"] == 7
    [asked] = openai_server.requests
    assert asked.body["max_completion_tokens"] == REASONING_REPLY_TOKENS and asked.body["reasoning_effort"] == "medium"
    assert "max_tokens" not in asked.body and "temperature" not in asked.body
