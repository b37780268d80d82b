"""GRPO (objective grpo): the grader, group-relative advantages, sampled answers that fit the
sequence and end at the end of turn, and a run that raises the grader's reward and resumes exactly."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmfactory.api.headline import headline
from llmfactory_runtime import answer_cache, batching
from llmfactory_runtime.answer_cache import AnswerCache
from llmfactory_runtime.batching import token_logps
from llmfactory_runtime.chat import IGNORE
from llmfactory_runtime.data import dumps_jsonl
from llmfactory_runtime.batching import collate_sequences
from llmfactory_runtime.finetune.grpo import (Groups, advantages, draw, dynamic_sampling, encode_prompts,
                                              high_entropy, loss_terms, moving_rows, normalizer, overlong_penalties,
                                              rewards_std, sample, sampled_batch, score, sequences)
from llmfactory_runtime.finetune.distributed import World
from llmfactory_runtime.finetune.grpo_step import GrpoStep
from llmfactory_runtime.generate import stop_token_ids
from llmfactory_runtime import python_grader as python_grader_module
from llmfactory_runtime.grader import describe, graded_of, last_number, reward, rewards
from llmfactory_runtime.similarity import similarity
from llmfactory_runtime.store import open_store
from llmfactory_runtime.task import InvalidTask

from finetune_helpers import PAIRS, finetune_task, run_finetune, write_task


def grader(operation: str = "equals", extract: str | None = None, field: str = "answer") -> dict:
    return {"referenceField": field, "operation": operation, **({"extract": extract} if extract else {})}


def test_the_grader_compares_the_answer_or_what_extract_picks_of_it_with_the_reference():
    assert reward("  Paris \n", "Paris", grader()) == 1.0
    assert reward("Paris.", "Paris", grader()) == 0.0
    assert reward("It is Paris.", "Paris", grader("contains")) == 1.0
    assert reward("It is PARIS.", "Paris", grader("contains")) == 0.0
    assert reward("It is PARIS.", "Paris", grader("icontains")) == 1.0
    # GSM8K's way: the final answer after ####, as a number (commas, a dollar sign and decimals allowed).
    math = grader("number", extract=r"#### (.+)")
    assert reward("6 x 7 = 42, so\n#### 42", "42", math) == 1.0
    assert reward("#### $1,250.00", "1250", math) == 1.0
    assert reward("#### 41", "42", math) == 0.0
    assert reward("The answer is 42.", "42", math) == 0.0  # no final-answer line: the format is graded too
    assert reward("#### 40 ... #### 42", "42", math) == 1.0  # the last match counts
    assert reward("2 + 40 = 42", "42", grader("number")) == 1.0  # the last number of the whole answer
    assert reward(r"so \boxed{7}", "7", grader("equals", extract=r"\\boxed\{(.+?)\}")) == 1.0
    assert reward("yes, Paris", "Paris", grader("equals", extract=r"Paris")) == 1.0  # no group: the whole match
    assert last_number("-3.5e2 and 1,000,000") == 1_000_000 and last_number("none") is None


def test_a_reasoning_models_answer_is_graded_by_what_it_says_after_its_reasoning():
    """As OpenAI's graders read a reasoning model's output_text: a GRPO run on reasoning traces (or a
    Benchmark of such a model) grades the answer after `<think>...</think>` (or after `</think>` alone,
    DeepSeek-R1's distilled models'), not the thoughts; thoughts cut at maxNewTokens answer nothing, so
    a number in them earns no reward."""
    rows = [graded_of({"prompt": "6 x 7?", "answer": "42"}, grader(op)) for op in ("equals", "number", "contains")]
    answers = ["<think>\n6 x 7... 40 + 2 = 42\n</think>\n\n42", "Six sevens: 42.\n</think>\n\n42",
               "<think>\n6 x 7 is 42, I think, or 41\n</think>\n\nIt is 41.", "<think>\n6 x 7 = 42, so the answer is"]
    got = {op: rewards(grader(op), answers, [row] * 4, "file:///unused", "spec.grpo.grader")
           for op, row in zip(("equals", "number", "contains"), rows)}
    assert got == {"equals": [1.0, 1.0, 0.0, 0.0], "number": [1.0, 1.0, 0.0, 0.0], "contains": [1.0, 1.0, 0.0, 0.0]}
    summed = {"operation": "sum", "parts": [{**grader("equals"), "name": "exact", "weight": 1.0},
                                            {**grader("number"), "name": "final", "weight": 0.5}]}
    assert rewards(summed, answers, [graded_of({"prompt": "6 x 7?", "answer": "42"}, summed)] * 4, "file:///unused",
                   "spec.grpo.grader") == [1.5, 1.5, 0.0, 0.0]


def test_a_math_grader_compares_the_final_answer_with_the_reference_as_mathematics():
    """operation math (math-verify): the boxed answer is the one compared, against a bare reference or a
    solution's boxed one, equal as numbers, fractions, expressions, intervals or choices; a wrong or
    unparsable one scores 0, and extract narrows what is read first."""
    math = grader("math")
    assert reward(r"Halving 1 gives $\boxed{\frac{1}{2}}$.", "0.5", math) == 1.0
    assert reward(r"$\boxed{0.5}$", r"\frac{1}{2}", math) == 1.0
    assert reward(r"So the total is \boxed{\frac{2}{4}}", r"The answer is $\boxed{\frac{1}{2}}$.", math) == 1.0
    assert reward(r"$\boxed{(x+1)^2}$", "x^2+2x+1", math) == 1.0  # symbolically equal
    assert reward(r"$\boxed{[1, 2)}$", "[1,2)", math) == 1.0 and reward(r"$\boxed{(1, 2]}$", "[1,2)", math) == 0.0
    assert reward(r"\boxed{B}", "B", math) == 1.0 and reward(r"\boxed{C}", "B", math) == 0.0
    assert reward(r"\boxed{3} is what I get, not 4", "3", math) == 1.0  # the boxed answer, not the last number
    assert reward(r"$\boxed{\frac{1}{3}}$", "0.33", math) == 0.0  # not rounded to the reference's digits
    assert reward("no answer at all", "7", math) == 0.0 and reward(r"\boxed{7}", "", math) == 0.0
    assert reward("#### 1/2 (I think 3)", "0.5", grader("math", extract=r"#### ([^(]+)")) == 1.0


def test_a_similarity_grader_scores_how_alike_answer_and_reference_are_in_any_language():
    """grader operation similarity (OpenAI's text_similarity) by hand, 0-1 by metric: ROUGE's F-measures
    of shared n-grams of 1 to 5 words and of the longest common subsequence, GLEU's lesser of n-gram precision and
    recall, Russian and each Chinese character counting (rouge_score's
    own tokenizer keeps a-z and 0-9 only); fuzzy's matching characters; BLEU tokenized as Chinese where the
    reference is (as one token a sentence shares nothing); chrF's character n-grams. Identical scores 1,
    nothing in common 0; extract picks what is compared, as for the checks."""
    def score(answer: str, reference: str, metric: str, extract: str | None = None) -> float:
        return reward(answer, reference, {**grader("similarity", extract), "metric": metric})

    assert score("a c d e", "a b c d", "rougeL") == pytest.approx(0.75)  # LCS a c d: 3/4 both ways
    assert score("a c d e", "a b c d", "rouge1") == pytest.approx(0.75)  # a, c, d shared
    assert score("a c d e", "a b c d", "rouge2") == pytest.approx(1 / 3)  # c d of 3 pairs each
    assert score("a b c d e", "x a b c d", "rouge3") == pytest.approx(2 / 3)  # a b c, b c d of 3 each
    assert score("a b c d e", "x a b c d", "rouge4") == pytest.approx(1 / 2) and score("a b c d e", "x a b c d", "rouge5") == 0
    assert score("in Paris", "in Paris", "rouge3") == 0.0  # no trigram to share: shorter than 3 words
    assert score("a c d e", "a b c d", "gleu") == pytest.approx(0.4)  # 1-4-grams: 4 of 10 shared, both ways
    assert score("中国 北京", "北京是中国的首都", "rouge1") == pytest.approx(2 * 4 / 8 / (1 + 4 / 8))  # 4 characters
    assert score("Москва столица", "Столица России Москва", "rougeL") == pytest.approx(0.4)  # LCS 1: P 1/2, R 1/3
    assert score("北京是首都", "北京是中国的首都", "rougeL") == pytest.approx(2 * 1 * 5 / 8 / (1 + 5 / 8))
    assert score("abc", "abd", "fuzzy") == pytest.approx(2 / 3) and score("A  b", "a b", "fuzzy") == 1.0
    import sacrebleu

    assert sacrebleu.sentence_bleu("中国的首都是北京", ["北京是中国的首都"]).score == 0  # 13a: one token each
    assert 0.3 < score("中国的首都是北京", "北京是中国的首都", "bleu") < 1
    assert score("the cat sat on the mat", "the cat sat on the mat", "bleu") == pytest.approx(1.0)
    translation, reference = "Столица России — Москва.", "Москва — столица России."
    assert score(translation, reference, "chrf") == pytest.approx(sacrebleu.sentence_chrf(translation, [reference]).score / 100)
    assert 0.5 < score(translation, reference, "chrf") < 1 and score(reference, reference, "chrf") == pytest.approx(1.0)
    for metric in ("fuzzy", "bleu", "gleu", "chrf", "rouge1", "rouge2", "rouge3", "rouge4", "rouge5", "rougeL"):
        same = "the capital is Paris, in France"
        assert score("", same, metric) == 0.0 and score(same, same, metric) == pytest.approx(1.0)
    assert score("Answer: Paris. I think so.", "Paris", "fuzzy", extract=r"Answer: (\w+)") == 1.0
    assert describe({**grader("similarity"), "metric": "chrf"}) == "similarity (chrf) against field 'answer'"


def test_meteor_matches_words_exactly_then_by_stem_then_as_wordnet_synonyms_recall_weighing_most():
    """metric meteor (nltk's, Hugging Face evaluate's) by hand: Fmean = P R / (0.9 P + 0.1 R) over the
    matched words, less 0.5 (chunks / matches)^3 for matches out of order. WordNet 3.0 is the one
    scripts/fetch_wordnet.py put in the virtualenv (make does), found by nltk by itself."""
    def score(answer: str, reference: str) -> float:
        return reward(answer, reference, {**grader("similarity"), "metric": "meteor"})

    def fmean(p: float, r: float) -> float:
        return p * r / (0.9 * p + 0.1 * r)

    assert score("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1 - 0.5 * (1 / 6) ** 3)
    assert score("The cat, sat!", "the cat sat") == pytest.approx(1 - 0.5 * (1 / 3) ** 3)  # case, punctuation aside
    assert score("the auto stopped", "the car stopped") == pytest.approx(1 - 0.5 * (1 / 3) ** 3)  # synonyms
    assert score("he running fast", "he runs fast") == pytest.approx(1 - 0.5 * (1 / 3) ** 3)  # one Porter stem
    assert score("the truck stopped", "the car stopped") == pytest.approx(2 / 3 * (1 - 0.5))  # 2 chunks of 2 matches
    assert score("stopped the car", "the car stopped") == pytest.approx(1 - 0.5 * (2 / 3) ** 3)  # out of order
    assert score("the car", "the car stopped") == pytest.approx(fmean(1, 2 / 3) * (1 - 0.5 * (1 / 2) ** 3))
    assert score("the car stopped", "the car") == pytest.approx(fmean(2 / 3, 1) * (1 - 0.5 * (1 / 2) ** 3))
    assert score("the car", "the car stopped") < score("the car stopped", "the car")  # a missed word costs more
    assert score("Москва столица", "Москва столица") == pytest.approx(1 - 0.5 * (1 / 2) ** 3)  # exact matches
    assert score("北京首都", "北京是首都") == pytest.approx(fmean(1, 4 / 5) * (1 - 0.5 * (2 / 4) ** 3))  # characters
    assert score("", "the car") == 0.0 and score("a bus", "the car") == 0.0


def test_meteor_without_wordnet_is_refused_before_the_model_loads_naming_the_field(without_wordnet, tiny_model):
    """A GRPO run whose grader (here a sum's part) scores by meteor fails as an invalid task when its
    prompts are read, before any model loads, naming the field and where WordNet comes from."""
    from llmfactory_runtime.finetune import encoding

    meteor = {**grader("similarity"), "metric": "meteor", "name": "alike", "weight": 1}
    spec = {"objective": "grpo", "hyperparameters": {"maxSeqLength": 64},
            "grpo": {"grader": {"operation": "sum", "parts": [grader("contains") | {"name": "has", "weight": 1}, meteor]}}}
    rows = [{"messages": [{"role": "user", "content": "Capital of France?"}], "answer": "Paris"}]
    with pytest.raises(InvalidTask, match=r"spec.grpo.grader.parts\[1\].metric: meteor matches synonyms by "
                                          r"WordNet 3.0, which is not in nltk's data path \(.*nltk_data\): the "
                                          r"runtime image has it; elsewhere run `python scripts/fetch_wordnet.py"):
        encoding.encode(spec, AutoTokenizer.from_pretrained(tiny_model), rows, "train")
    with pytest.raises(LookupError, match="meteor matches synonyms by WordNet 3.0"):  # never a silent 0
        reward("Paris", "Paris", meteor)
    assert reward("Paris", "Paris", {**meteor, "metric": "chrf"}) == pytest.approx(1.0)  # other metrics need none


def test_a_judge_grader_rates_each_answer_against_its_reference_scaled_to_0_1_and_never_pays_twice(
        openai_server, monkeypatch, tmp_path):
    """OpenAI's score_model grader: the Benchmark's reference-guided prompt, (rating - 1) / 9, 0 for an
    answer the judge gives no rating after its re-asks; its key from LLMFACTORY_GRADER_API_KEY. Its
    ratings are kept in the store, which a process reads once (a GRPO step asks every time)."""
    def judge(request):
        body = request.messages[1]["content"]  # the grading prompt (a re-ask follows it)
        answer = body.split("[Answer]\n", 1)[1] if "[Answer]\n" in body else ""
        if "rambling" in answer:
            return {"text": "I cannot decide."}
        return {"text": "Correct. [[10]]" if answer.startswith("Paris") else "Wrong. [[4]]"}
    openai_server.reply = judge
    monkeypatch.setenv("LLMFACTORY_GRADER_API_KEY", "sk-grader")
    spec = {"referenceField": "answer", "operation": "judge",
            "judge": {"baseUrl": openai_server.url, "model": "gpt-4o-mini", "apiKeySecret": {"name": "g", "key": "k"}}}
    graded = [graded_of({"prompt": "Capital of France?", "answer": "Paris"}, spec)] * 3
    got = rewards(spec, ["Paris.", "Lyon.", "rambling"], graded, f"file://{tmp_path}/cache", "spec.grpo.grader")
    assert got == [1.0, pytest.approx(3 / 9), 0.0]
    assert all(r.authorization == "Bearer sk-grader" for r in openai_server.requests)
    prompt = openai_server.requests[0].messages[1]["content"]
    assert "[Reference]\nParis" in prompt and "[Question]\nCapital of France?" in prompt
    assert len(openai_server.requests) == 2 + 3  # the unrated answer asked again twice
    asked = len(openai_server.requests)  # the same answers again: the cache answers, read from the store once
    load = AnswerCache.load
    monkeypatch.setattr(AnswerCache, "load", lambda self: pytest.fail("the store was read again in the same process"))
    assert rewards(spec, ["Paris.", "Lyon.", "rambling"], graded, f"file://{tmp_path}/cache", "spec.grpo.grader") == got
    monkeypatch.setattr(AnswerCache, "load", load)
    answer_cache._held.clear()  # a new process (a resumed run): from the store
    assert rewards(spec, ["Paris.", "Lyon.", "rambling"], graded, f"file://{tmp_path}/cache", "spec.grpo.grader") == got
    assert len(openai_server.requests) == asked


def test_a_cosine_grader_compares_embeddings_asks_once_for_each_text_and_a_new_process_for_nothing_it_had(
        openai_server, monkeypatch, tmp_path):
    """metric cosine (OpenAI's text_similarity cosine): the cosine of the answer's and the reference's
    embeddings from grader.embeddings (the server's: letter counts), its key from
    LLMFACTORY_EMBEDDINGS_API_KEY; a call's texts in one request, a reference embedded once; an answer
    extract finds nothing in scores 0 unasked; below 0 counts 0. Scores and reference embeddings are kept
    in the store: a new process (a resumed run) asks for nothing it had. A refused key names the field."""

    openai_server.api_key = "sk-emb"
    monkeypatch.setenv("LLMFACTORY_EMBEDDINGS_API_KEY", "sk-emb")
    endpoint = {"baseUrl": openai_server.url, "model": "text-embedding-3-large", "apiKeySecret": {"name": "e", "key": "k"}}
    spec = {"referenceField": "answer", "operation": "similarity", "metric": "cosine", "extract": "Answer: (.+)",
            "embeddings": endpoint}
    graded = [graded_of({"prompt": "Which letters?", "answer": "ab"}, spec)] * 3
    cache = f"file://{tmp_path}/cache"

    def score(answers: list[str]) -> list[float]:
        return rewards(spec, answers, graded[:len(answers)], cache, "spec.grpo.grader")

    assert score(["Answer: ab", "Answer: abb", "no answer"]) == pytest.approx([1.0, 3 / math.sqrt(10), 0.0])
    assert openai_server.embedded == ["ab", "abb"]  # the reference is the first answer: asked once
    assert describe(spec) == "similarity (cosine) against field 'answer' by text-embedding-3-large's embeddings"
    assert score(["Answer: bab"]) == [pytest.approx(3 / math.sqrt(10))]
    assert openai_server.embedded == ["ab", "abb", "bab"]  # the reference's embedding kept
    answer_cache._held.clear()  # a new process
    assert score(["Answer: abb", "Answer: ab"]) == pytest.approx([3 / math.sqrt(10), 1.0])
    assert openai_server.embedded == ["ab", "abb", "bab"]

    openai_server.embed = lambda text: [-1.0] * 26  # opposed to any letter counts
    assert score(["Answer: opposed"]) == [0.0]
    monkeypatch.setenv("LLMFACTORY_EMBEDDINGS_API_KEY", "sk-wrong")
    with pytest.raises(InvalidTask, match=r"spec.grpo.grader.embeddings: .*HTTP 401.*check apiKeySecret"):
        score(["Answer: new"])


@pytest.mark.parametrize("pooling", [None, "cls", "lasttoken", "prompt", "dense"])
def test_a_local_embedding_model_pools_its_last_hidden_states_as_its_configuration_says_and_is_loaded_once(
        tiny_model, monkeypatch, tmp_path, pooling):
    """grader.embeddingModel: the cosine of the two texts' pooled last hidden states (mean over the
    tokens without a sentence-transformers 1_Pooling/config.json, else the first or last token's; with
    a default prompt in config_sentence_transformers.json, of the prompt and text, the prompt's tokens
    out of the mean with include_prompt false, or of grader.embeddingPrompt's instead; with a Dense module
    in modules.json, through it), worked
    out here text by text; the model is loaded once a process, and a new process whose scores are all in
    the store loads nothing."""
    from safetensors.torch import save_file

    from transformers import AutoModel

    from llmfactory_runtime import embedding_similarity, grader as grader_module
    from llmfactory_runtime.embedding_similarity import cosine

    folder = tmp_path / "encoder"
    shutil.copytree(tiny_model, folder)
    prompt = "query: " if pooling == "prompt" else ""
    if pooling:
        mode = {"cls": "pooling_mode_cls_token", "lasttoken": "pooling_mode_lasttoken",
                "prompt": "pooling_mode_mean_tokens", "dense": "pooling_mode_cls_token"}[pooling]
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": False, mode: True,
                                                                      "include_prompt": not prompt}))
    if prompt:
        (folder / "config_sentence_transformers.json").write_text(json.dumps({
            "prompts": {"query": prompt, "passage": "passage: "}, "default_prompt_name": "query"}))
    head = None
    if pooling == "dense":  # LaBSE's shape: CLS pooling (here in a folder of another name), then tanh(W x + b)
        (folder / "1_Pooling").rename(folder / "pool")
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
            {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        hidden_size = json.loads((folder / "config.json").read_text())["hidden_size"]
        (folder / "2_Dense").mkdir()
        (folder / "2_Dense" / "config.json").write_text(json.dumps({
            "in_features": hidden_size, "out_features": 5, "bias": True,
            "activation_function": "torch.nn.modules.activation.Tanh"}))
        torch.manual_seed(0)
        head = {"linear.weight": torch.randn(5, hidden_size), "linear.bias": torch.randn(5)}
        save_file(head, folder / "2_Dense" / "model.safetensors")
    source = {"uri": f"file://{folder}"}
    spec = {"referenceField": "answer", "operation": "similarity", "metric": "cosine", "embeddingModel": source}
    graded = [graded_of({"prompt": "Capital of France?", "answer": "Paris is the capital"}, spec)] * 3
    answers, cache = ["Paris.", "It is Lyon, surely, and nothing else", ""], f"file://{tmp_path}/cache"
    grader_module._models.clear()
    got = rewards(spec, answers, graded, cache, "spec.grpo.grader")

    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()

    def embedded(text: str) -> list[float]:
        with torch.no_grad():
            hidden = model(**tok(prompt + text, return_tensors="pt")).last_hidden_state[0]
        # sentence-transformers leaves out of the mean the prompt's tokens less its closing one (this
        # tokenizer closes nothing: its last token counts as the text's)
        skip = len(tok(prompt)["input_ids"]) - 1 if prompt else 0
        pooled = (hidden[0] if pooling in ("cls", "dense") else hidden[-1] if pooling == "lasttoken"
                  else hidden[skip:].mean(0))
        return (torch.tanh(head["linear.weight"] @ pooled + head["linear.bias"]) if head else pooled).tolist()

    expected = [max(0.0, cosine(embedded(a), embedded("Paris is the capital"))) for a in answers[:2]]
    assert got == pytest.approx(expected + [0.0], abs=1e-5) and got[0] != got[1]  # an empty answer scores 0
    assert describe(spec) == f"similarity (cosine) against field 'answer' by file://{folder}'s embeddings (local)"
    monkeypatch.setattr(embedding_similarity, "load_encoder", lambda s: pytest.fail("the model was loaded again"))
    [new] = rewards(spec, ["Marseille"], graded[:1], cache, "spec.grpo.grader")  # the held model
    assert new == pytest.approx(max(0.0, cosine(embedded("Marseille"), embedded("Paris is the capital"))), abs=1e-5)
    grader_module._models.clear()  # a new process: its scores read from the store, nothing loaded
    answer_cache._held.clear()
    assert rewards(spec, answers + ["Marseille"], graded + graded[:1], cache, "spec.grpo.grader") == got + [new]
    if prompt:  # grader.embeddingPrompt instead of the model's default one: other embeddings, cached apart
        monkeypatch.undo()
        prompt = "passage: "
        other = rewards({**spec, "embeddingPrompt": prompt}, answers, graded, cache, "spec.grpo.grader")
        assert other == pytest.approx([max(0.0, cosine(embedded(a), embedded("Paris is the capital")))
                                       for a in answers[:2]] + [0.0], abs=1e-5) and other != got


def test_an_encoder_decoder_embedding_model_embeds_with_its_encoder_alone(tiny_model, tmp_path):
    """A T5-based embedding model (sentence-t5, GTR): the mean of its encoder's last hidden states, as
    T5EncoderModel gives them (AutoModel's encoder-decoder would want decoder inputs)."""
    from transformers import T5Config, T5EncoderModel, T5Model

    from llmfactory_runtime.embedding_similarity import cosine

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    T5Model(T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4)
            ).save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    spec = {"referenceField": "answer", "operation": "similarity", "metric": "cosine",
            "embeddingModel": {"uri": f"file://{tmp_path / 't5'}"}}
    graded = [graded_of({"prompt": "Capital of France?", "answer": "Paris is the capital"}, spec)] * 2
    got = rewards(spec, ["Paris.", "It is Lyon, surely"], graded, f"file://{tmp_path}/cache", "spec.grpo.grader")
    encoder = T5EncoderModel.from_pretrained(tmp_path / "t5").eval()

    def embedded(text: str) -> list[float]:
        with torch.no_grad():
            return encoder(**tok(text, return_tensors="pt")).last_hidden_state[0].mean(0).tolist()

    reference = embedded("Paris is the capital")
    assert got == pytest.approx([max(0.0, cosine(embedded(a), reference)) for a in ("Paris.", "It is Lyon, surely")],
                                abs=1e-5) and got[0] != got[1]


def test_a_local_judge_grader_rates_as_the_benchmarks_local_judge_and_a_resumed_run_reads_its_ratings(
        tiny_model, monkeypatch, tmp_path):
    """grader.judgeModel: a judge model in the training process, its rating the expectation over its
    probabilities of 1..10 on the reference-guided prompt, scaled to 0-1. Ratings are kept in the
    store: a resumed run (a new process) gets the same rewards without loading the judge."""
    from llmfactory_runtime import grader as grader_module, models
    from llmfactory_runtime.benchmark.judge import expected_rating, judge_messages, rating_distribution, scored_messages

    source = {"uri": f"file://{tiny_model}"}
    spec = {"referenceField": "answer", "operation": "judge", "judgeModel": source}
    graded = [graded_of({"prompt": "Capital of France?", "answer": "Paris"}, spec)] * 2
    answers, cache = ["Paris.", "Lyon, surely."], f"file://{tmp_path}/cache"
    got = rewards(spec, answers, graded, cache, "spec.grpo.grader")

    model, tokenizer = models.load_model(source), models.load_tokenizer(source)
    asked = [judge_messages({"turns": ["Capital of France?"], "reference": "Paris"}, [a], 0, "local") for a in answers]
    assert "[Reference]\nParis" in asked[0][1]["content"]
    expected = [(expected_rating(rating_distribution(model, tokenizer, m)) - 1) / 9 for m in asked]
    assert got == pytest.approx(expected, abs=1e-5) and all(0 <= r <= 1 for r in got) and got[0] != got[1]
    assert describe(spec) == f"judge against field 'answer' by the local judge file://{tiny_model}"

    # Asked grader.prompt instead (OpenAI's score_model input): the same reading of the same judge.
    rubric = {**spec, "prompt": "Is this the capital? {{sample.output_text}}"}
    expected = [(expected_rating(rating_distribution(model, tokenizer, scored_messages(f"Is this the capital? {a}",
                                                                                         "local"))) - 1) / 9
                for a in answers]
    assert rewards(rubric, answers, graded, cache, "spec.grpo.grader") == pytest.approx(expected, abs=1e-5)

    grader_module._models.clear()  # a new process: no judge loaded, its ratings read from the store
    answer_cache._held.clear()
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the judge was loaded again"))
    assert rewards(spec, answers, graded, cache, "spec.grpo.grader") == got


POLITE = {"referenceField": "answer", "operation": "label", "labels": ["polite", "neutral", "rude"],
          "passingLabels": ["polite", "neutral"],
          "prompt": "A customer wrote ({{item.channel}}): {{prompt}}\n\nThe agent replied:\n{{sample.output_text}}\n\n"
                    "How does the reply sound?"}


def test_a_label_grader_asks_its_own_prompt_and_passes_the_labels_it_names_and_never_pays_twice(
        openai_server, monkeypatch, tmp_path):
    """OpenAI's label_model grader: the spec's prompt, the answer, the prompt's last user message and the
    row's fields filled in, then the labels; the last [[label]] the judge names (case aside) scores 1 when
    it passes, else 0, as does a reply without one after its re-asks. No reference is needed; a field the
    prompt reads is. Its labels are kept in the store: the same answers again cost nothing."""
    def judge(request):
        reply = request.messages[1]["content"].split("The agent replied:\n", 1)[1].split("\n\n")[0]
        if "whatever" in reply:
            return {"text": "Dismissive: [[RUDE]]"}
        if "hmm" in reply:
            return {"text": "I would need more context."}
        return {"text": "It could be [[neutral]] but the thanks make it [[Polite]]." if "thank" in reply
                else "Plain. [[neutral]]"}
    openai_server.reply = judge
    monkeypatch.setenv("LLMFACTORY_GRADER_API_KEY", "sk-grader")
    spec = {**POLITE, "judge": {"baseUrl": openai_server.url, "model": "gpt-4o-mini",
                                "apiKeySecret": {"name": "g", "key": "k"}}}
    row = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Where is my parcel?"}],
           "channel": "email"}
    graded = [graded_of(row, spec)] * 4
    answers = ["It ships today, thank you for waiting.", "It ships today.", "whatever", "hmm"]
    cache = f"file://{tmp_path}/cache"
    assert rewards(spec, answers, graded, cache, "spec.grpo.grader") == [1.0, 1.0, 0.0, 0.0]
    # The first answer's request (the four are asked at once, in any order).
    asked = next(r.messages[1]["content"] for r in openai_server.requests if "thank you" in r.messages[1]["content"])
    assert asked.startswith("A customer wrote (email): Where is my parcel?\n\nThe agent replied:\nIt ships today, ")
    assert asked.endswith("give one label in the form [[label]]: [[polite]], [[neutral]], [[rude]].")
    assert len(openai_server.requests) == 4 + 2  # the unlabelled reply asked again twice
    assert "Give only the label now" in openai_server.requests[-1].messages[-1]["content"]
    assert rewards(spec, answers, graded, cache, "spec.grpo.grader") == [1.0, 1.0, 0.0, 0.0]
    assert len(openai_server.requests) == 6
    assert describe(spec) == "label by gpt-4o-mini, passing polite, neutral of polite, neutral, rude"
    # Only polite passing: the same cached labels, other rewards.
    assert rewards({**spec, "passingLabels": ["polite"]}, answers, graded, cache, "spec.grpo.grader") == [1.0, 0, 0, 0]
    assert len(openai_server.requests) == 6
    with pytest.raises(ValueError, match=r"needs field 'channel', which grader.prompt reads \({{item.channel}}\)"):
        graded_of({"prompt": "Where is my parcel?"}, spec)


def test_a_judge_grader_with_a_prompt_of_its_own_rates_what_the_prompt_shows_without_a_reference(
        openai_server, monkeypatch, tmp_path):
    """OpenAI's score_model grader: grader.prompt (a rubric, the answer, a field of the row) instead of
    the MT-Bench prompt, then the 1-10 scale and [[rating]]; the rating scaled to 0-1, the rows needing
    the fields it reads and no referenceField. The same answers again cost nothing."""
    openai_server.reply = lambda request: {"text": "Warm and exact. [[9]]" if "thank" in request.messages[1]["content"]
                                           else "Curt. [[3]]"}
    monkeypatch.setenv("LLMFACTORY_GRADER_API_KEY", "sk-grader")
    spec = {"referenceField": "answer", "operation": "judge",
            "prompt": "Rubric: polite, and names the day ({{item.day}}).\n\nReply:\n{{sample.output_text}}",
            "judge": {"baseUrl": openai_server.url, "model": "gpt-4o-mini", "apiKeySecret": {"name": "g", "key": "k"}}}
    graded = [graded_of({"prompt": "Where is my parcel?", "day": "Monday"}, spec)] * 2  # no 'answer' field
    answers, cache = ["It ships Monday, thank you for waiting.", "Monday."], f"file://{tmp_path}/cache"
    assert rewards(spec, answers, graded, cache, "spec.grpo.grader") == pytest.approx([8 / 9, 2 / 9])
    asked = next(r.messages[1]["content"] for r in openai_server.requests if "thank" in r.messages[1]["content"])
    assert asked.startswith("Rubric: polite, and names the day (Monday).\n\nReply:\nIt ships Monday, thank you")
    assert asked.endswith("Rate it on a scale of 1 to 10. Explain your judgement in a few sentences, then give the "
                          "rating in the form [[rating]], for example [[5]].")
    assert "[Reference]" not in asked and len(openai_server.requests) == 2
    assert describe(spec) == "judge by gpt-4o-mini, asked the grader's own prompt"
    assert describe({**spec, "prompt": None}) == "judge against field 'answer' by gpt-4o-mini"
    assert rewards(spec, answers, graded, cache, "spec.grpo.grader") == pytest.approx([8 / 9, 2 / 9])
    assert len(openai_server.requests) == 2
    with pytest.raises(ValueError, match=r"needs field 'day', which grader.prompt reads"):
        graded_of({"prompt": "Where is my parcel?"}, spec)
    with pytest.raises(ValueError, match="needs its reference answer in field 'answer'"):  # the MT-Bench prompt's
        graded_of({"prompt": "Where is my parcel?", "day": "Monday"}, {k: v for k, v in spec.items() if k != "prompt"})


def test_a_local_label_grader_rewards_its_probability_of_a_passing_label(tiny_model, tmp_path):
    """grader.judgeModel with operation label: the reward is the judge's probability of writing one of
    the passing labels (each label's, from its log-probabilities after "[["), worked out here."""
    from llmfactory_runtime import models
    from llmfactory_runtime.benchmark.judge import label_distribution, label_messages
    from llmfactory_runtime.grader import filled

    source = {"uri": f"file://{tiny_model}"}
    spec = {**POLITE, "judgeModel": source}
    graded = [graded_of({"prompt": "Where is my parcel?", "channel": "chat"}, spec)] * 2
    answers = ["It ships today, thank you.", "whatever"]
    got = rewards(spec, answers, graded, f"file://{tmp_path}/cache", "spec.grpo.grader")
    model, tokenizer = models.load_model(source), models.load_tokenizer(source)
    expected = []
    for answer in answers:
        messages = label_messages(filled(POLITE["prompt"], graded[0], answer), POLITE["labels"], "local")
        assert "(chat): Where is my parcel?" in messages[1]["content"]
        probs = label_distribution(model, tokenizer, messages, POLITE["labels"])
        assert sum(probs.values()) == pytest.approx(1.0)
        expected.append(probs["polite"] + probs["neutral"])
    assert got == pytest.approx(expected, abs=1e-5) and all(0 < r < 1 for r in got)
    every = {**spec, "passingLabels": POLITE["labels"]}
    assert rewards(every, answers, graded, f"file://{tmp_path}/cache", "spec.grpo.grader") == pytest.approx([1.0, 1.0])


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory) -> Path:
    from tests.tiny_model import make_tiny_reward_model

    return make_tiny_reward_model(tmp_path_factory.mktemp("tiny-reward-model"))


def test_a_reward_model_grader_scores_the_prompt_and_answer_with_its_own_template_and_needs_no_reference(
        tiny_model, tiny_reward_model, tmp_path):
    """operation rewardModel, as TRL's reward models: the sequence classifier's output for the
    conversation (prompt, then the answer as the assistant's turn) rendered with its chat template. A
    causal LM named as one is refused before it scores anything: its head would be random."""
    from transformers import AutoModelForSequenceClassification

    from llmfactory_runtime.chat import render

    spec = {"referenceField": "answer", "operation": "rewardModel", "rewardModel": {"uri": f"file://{tiny_reward_model}"}}
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]}]
    graded = [graded_of(rows[0], spec)] * 2  # no reference needed
    answers = ["Paris.", "Lyon, surely."]
    got = rewards(spec, answers, graded, f"file://{tmp_path}", "spec.grpo.grader")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_reward_model)
    with torch.no_grad():
        expected = [float(model(**tok(render(tok, [*rows[0]["messages"], {"role": "assistant", "content": a}]),
                                      add_special_tokens=False, return_tensors="pt")).logits[0, 0]) for a in answers]
    assert got == pytest.approx(expected, abs=1e-5) and got[0] != got[1]
    causal = {**spec, "rewardModel": {"uri": f"file://{tiny_model}"}}
    with pytest.raises(InvalidTask, match=r"spec.grpo.grader.rewardModel: .* is not a reward model: its weights lack "
                                          r"score.weight"):
        rewards(causal, answers, graded, f"file://{tmp_path}", "spec.grpo.grader")


def python_grader(source: str) -> dict:
    return {"referenceField": "answer", "operation": "python", "source": textwrap.dedent(source)}


def test_a_python_grader_scores_each_answer_with_its_whole_row_in_one_process_that_keeps_its_state():
    """OpenAI's python grader: grade(sample, item) with sample's output_text and the row; bools and
    NumPy numbers count; its prints go to the log, not into the scores; the module loads once."""
    spec = python_grader("""
        import numpy
        calls = []

        def grade(sample, item):
            calls.append(sample["output_text"])
            print("grading", sample["output_text"])  # the log's, not the channel the scores come back on
            if item.get("count"):
                return len(calls)
            passed = item["answer"] in sample["output_text"]
            return passed if not item.get("bonus") else numpy.float32(passed + 0.5 * ("because" in sample["output_text"]))
    """)
    rows = [{"prompt": "Capital of France?", "answer": "Paris"},
            {"prompt": "Capital of France?", "answer": "Paris", "bonus": True}]
    graded = [graded_of(r, spec) for r in rows]
    got = rewards(spec, ["Paris.", "Paris, because.", "Lyon because"], [graded[0], graded[1], graded[1]], "file:///unused",
                  "spec.grpo.grader")
    assert got == [1.0, 1.5, 0.5]
    counted = graded_of({"prompt": "?", "count": 1}, spec)
    assert rewards(spec, ["a", "b"], [counted] * 2, "file:///unused", "spec.grpo.grader") == [4.0, 5.0]
    # A SIGTERM to the process group is training's to handle (it checkpoints first): the grader goes on.
    os.kill(python_grader_module._running[spec["source"]].proc.pid, signal.SIGTERM)
    assert rewards(spec, ["c"], [counted], "file:///unused", "spec.grpo.grader") == [6.0]


@pytest.mark.parametrize("body, error", [
    ("return 1 / 0", r"grade\(\) failed on the answer 'b': Traceback \(most recent call last\):\n  File \"<grader "
                     r"source>\", line 4, in grade\n.*ZeroDivisionError: division by zero"),
    ("return '1'", r"grade\(\) failed on the answer 'b': it returned '1', not a finite number"),
    ("return float('nan')", r"grade\(\) failed on the answer 'b': it returned nan, not a finite number"),
    ("sys.exit(3)", r"grade\(\) failed on the answer 'b': Traceback.*line 4, in grade.*SystemExit: 3"),
    ("time.sleep(30)", r"grade\(\) failed on the answer 'b': .*TimeoutError: ran past the time limit of 0.5 s"),
])
def test_a_python_grader_that_fails_on_an_answer_stops_the_run_naming_the_answer_and_why(body, error, monkeypatch):
    monkeypatch.setattr(python_grader_module, "TIME_LIMIT_S", 0.5)
    spec = python_grader(f"""
        import sys, time
        def grade(sample, item):
            if sample["output_text"] == "b": {body}
            return 1
    """)
    graded = [graded_of({"prompt": "?"}, spec)] * 2
    with pytest.raises(InvalidTask, match=f"(?s)spec.grpo.grader.source: {error}"):
        rewards(spec, ["a", "b"], graded, "file:///unused", "spec.grpo.grader")
    # The grader's process goes on: the next batch's answers are graded.
    assert rewards(spec, ["a"], graded[:1], "file:///unused", "spec.grpo.grader") == [1.0]


def test_a_python_grader_runs_without_the_jobs_credentials(monkeypatch, tmp_path):
    """A grader may run code a model wrote: the store's keys, API keys and tokens the Job carries are
    not in its environment, nor can the AWS SDKs find a profile; the rest of the environment is."""
    secrets = {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "t", "LLMFACTORY_GRADER_API_KEY": "sk-1",
               "HF_TOKEN": "hf_1", "WANDB_API_KEY": "w", "AWS_PROFILE": "prod"}
    for name, value in {**secrets, "TEAM_SETTING": "kept"}.items():
        monkeypatch.setenv(name, value)
    spec = python_grader("""
        import os

        def grade(sample, item):
            return os.environ.get(item["var"], "") == item["value"]
    """)
    items = [{"var": name, "value": value} for name, value in secrets.items()]
    items += [{"var": "TEAM_SETTING", "value": "kept"}, {"var": "AWS_SHARED_CREDENTIALS_FILE", "value": os.devnull},
              {"var": "AWS_CONFIG_FILE", "value": os.devnull}]
    graded = [graded_of(item | {"prompt": "?"}, spec) for item in items]
    got = rewards(spec, ["-"] * len(items), graded, f"file://{tmp_path}", "spec.grpo.grader")
    assert got == [0.0] * len(secrets) + [1.0, 1.0, 1.0]


def test_the_examples_python_grader_rewards_the_right_answer_and_reasoning_in_think_tags():
    """examples/seed-llama3/11-grpo-python-grader.yaml's grader, as the runtime runs it on a row of
    09-grpo.yaml's DatasetBuild (format graded: the reference in field reference)."""
    example = Path(__file__).parents[2] / "examples/seed-llama3/11-grpo-python-grader.yaml"
    spec = yaml.safe_load(example.read_text())["spec"]["grpo"]["grader"] | {"referenceField": "reference"}
    graded = [graded_of({"messages": [{"role": "user", "content": "Natalia sold 48 clips..."}],
                         "reference": "1,250", "language": "en"}, spec)] * 5
    answers = ["<think>48 + 1202</think>\n#### 1,250", "#### $1250", "<think>48 / 2</think>\n#### 24",
               "The answer is 1250.", "#### 1250 <think>late</think>", "<think>48 + 1202, so #### 1250",
               "<think>\n\n</think>\n\n#### 1250"]
    assert rewards(spec, answers, graded[:1] * 7, "file:///unused", "spec.grpo.grader") == [1.2, 1.0, 0.2, 0.0, 1.0, 0.0,
                                                                                         1.0]


def test_python_source_that_cannot_load_or_ends_its_process_is_an_error_naming_the_field():
    graded = [graded_of({"prompt": "?"}, python_grader("def grade(s, i): return 1"))]
    for source, error in (("def grade(s, i) return 1", "SyntaxError"),
                          ("import nonexistent_module_xyz", "ModuleNotFoundError"),
                          ("grade = 3", "defines no function grade")):
        with pytest.raises(InvalidTask, match=f"(?s)spec.grpo.grader.source: .*{error}"):
            rewards(python_grader(source), ["a"], graded, "file:///unused", "spec.grpo.grader")
    spec = python_grader("import os\ndef grade(s, i): os._exit(9)")
    for _ in range(2):  # and so again, its process gone, for whatever asks it next
        with pytest.raises(RuntimeError, match=r"spec.grpo.grader.source: the grader's process ended \(exit code 9\)"):
            rewards(spec, ["a"], graded, "file:///unused", "spec.grpo.grader")


def test_a_sum_grader_adds_its_parts_rewards_each_times_its_weight_each_against_its_own_reference_field(tiny_model):
    """TRL's reward functions with weights, OpenAI's multi grader: a correctness check on one field, a
    format check on another, and a python length penalty."""
    spec = {"referenceField": "reference", "operation": "sum", "parts": [
        {"name": "correct", "operation": "number", "referenceField": "answer", "extract": "#### (.+)", "weight": 1.0},
        {"name": "format", "operation": "contains", "referenceField": "marker", "weight": 0.2},
        python_grader("def grade(sample, item): return len(sample['output_text'])") | {"name": "long", "weight": -0.01}]}
    row = {"prompt": "6 x 7?", "answer": "42", "marker": "####"}
    graded = [graded_of(row, spec)] * 3
    assert graded[0]["reference"] == "42"  # the first compared part's
    answers = ["#### 42", "It is 42.", "#### 41"]
    got = rewards(spec, answers, graded, "file:///unused", "spec.grpo.grader")
    assert got == pytest.approx([1 + 0.2 - 0.07, 0 + 0 - 0.09, 0 + 0.2 - 0.07])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    total, parts = score(tok, ids, graded, spec, "file:///unused")
    assert total.tolist() == pytest.approx(got) and parts["correct"].tolist() == [1.0, 0.0, 0.0]
    assert parts["format"].tolist() == [1.0, 0.0, 1.0] and parts["long"].tolist() == [7.0, 9.0, 7.0]
    with pytest.raises(ValueError, match="reference answer in field 'marker'"):  # every compared part's field
        graded_of({"prompt": "6 x 7?", "answer": "42"}, spec)


def test_a_row_gives_its_prompt_and_reference_or_an_error_naming_what_it_lacks(tiny_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "6 x 7?"}]
    row = {"messages": messages, "answer": 42}
    assert graded_of(row, grader()) == {"messages": messages, "tools": None, "question": "6 x 7?", "reference": "42",
                                        "item": row}
    assert graded_of({"prompt": "6 x 7?", "answer": "42"}, grader())["messages"] == [{"role": "user", "content": "6 x 7?"}]
    with pytest.raises(ValueError, match="reference answer in field 'answer'.*got None"):
        graded_of({"messages": messages}, grader())
    # A python grader reads what it needs of the row: no reference field is required.
    assert graded_of({"messages": messages, "tests": ["x"]}, grader("python"))["reference"] is None
    with pytest.raises(ValueError, match="needs messages"):
        graded_of({"question": "6 x 7?", "answer": "42"}, grader())
    with pytest.raises(ValueError, match="must end with a user message"):
        graded_of({"messages": messages + [{"role": "assistant", "content": "42"}], "answer": "42"}, grader())
    tok = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(InvalidTask, match="spec.objective grpo: train.jsonl row 2: needs its reference answer"):
        encode_prompts(tok, [{"prompt": "a", "answer": "b"}, {"prompt": "c", "solution": "d"}], 96, grader(),
                       "spec.objective grpo: train.jsonl")
    # A prompt that fills maxSeqLength leaves no room for an answer: left out, and counted (result.rowsLeftOut).
    from llmfactory_runtime.finetune import encoding

    spec = {"objective": "grpo", "grpo": {"grader": grader()}, "hyperparameters": {"maxSeqLength": 40}}
    split = encoding.encode(spec, tok, [{"prompt": "6 x 7?", "answer": "42"},
                                        {"prompt": " ".join(["why"] * 80), "answer": "42"}], "train")
    assert (split.units, split.truncated, split.unlearned) == (1, 0, 1)


def test_advantages_are_each_reward_against_its_groups_mean_divided_by_its_groups_or_the_steps_spread_or_not():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two groups of four
    spread = (4 * 0.25 / 3) ** 0.5  # unbiased standard deviation of 1, 0, 0, 1
    assert advantages(rewards, 4, "group").tolist() == pytest.approx(
        [0.5 / (spread + 1e-4), -0.5 / (spread + 1e-4), -0.5 / (spread + 1e-4), 0.5 / (spread + 1e-4), 0, 0, 0, 0])
    assert advantages(rewards, 4, "batch", batch_std=2.0).tolist() == pytest.approx(
        [0.5 / 2.0001, -0.5 / 2.0001, -0.5 / 2.0001, 0.5 / 2.0001, 0, 0, 0, 0])
    assert advantages(rewards, 4, "none").tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]  # Dr. GRPO


def test_scale_rewards_batch_divides_by_the_spread_of_every_reward_of_the_step_on_every_process(tiny_model):
    """A group of near-equal rewards keeps its small advantages (group would magnify them to ~1):
    the divisor is the standard deviation of the step's rewards, its micro-batches and the other
    processes' included (one reduction of count, sum and sum of squares)."""
    def reduced_here(rewards: list[torch.Tensor]) -> torch.Tensor:
        sent = []
        rewards_std(rewards, lambda t: sent.append(t) or t)
        return sent[0]

    mine, theirs = [torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0.5, 0.51, 0.5, 0.5])], [torch.tensor([3.0, 1, 2, 1])]
    everything = torch.cat(mine + theirs)
    assert rewards_std(mine, lambda t: t + reduced_here(theirs)) == pytest.approx(float(everything.std()))

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = tok("a question")["input_ids"]

    def groups_of(rewards: torch.Tensor) -> Groups:
        return Groups([{"prompt": prompt}], [[5, 6]] * 4, rewards, {}, [False] * 4)

    spec = {"scaleRewards": "batch", "beta": 0.0, "maskTruncated": False, "lossType": "dapo", "generations": 4,
            "maxNewTokens": 2}
    world = World(rank=0, size=1, local_rank=0, device=torch.device("cpu"))
    step = GrpoStep(None, tok, spec, world, [[{}], [{}]], [], lambda chunks: [groups_of(r) for r in mine], micro=1)
    spread = float(torch.cat(mine).std())
    assert step.sampled[0]["advantages"].tolist() == pytest.approx([0.5 / (spread + 1e-4), -0.5 / (spread + 1e-4),
                                                                   -0.5 / (spread + 1e-4), 0.5 / (spread + 1e-4)])
    near_equal = step.sampled[1]["advantages"]
    assert near_equal.tolist() == pytest.approx([-0.0025 / (spread + 1e-4), 0.0075 / (spread + 1e-4)] + [
        -0.0025 / (spread + 1e-4)] * 2, rel=1e-4)
    assert float(advantages(mine[1], 4, "group").abs().max()) > 1  # what group would have made of them


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_rows_that_cannot_move_the_loss_are_left_out_and_the_loss_and_gradients_stay_the_same(tiny_model, beta):
    """A uniform group's answers (all rewarded alike: no advantage) and masked answers (no labels)
    add nothing to the loss or its gradient; the batch leaves them out, and the step's loss and
    gradients are those of the whole batch. With beta the KL term keeps every labelled answer."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    rows = [{"prompt": q, "answer": a} for q, a in PAIRS[:3]]
    prompts = [p["prompt"] for p in encode_prompts(tok, rows, 40, grader(), "train.jsonl")]
    torch.manual_seed(0)
    answers = sample(model, tok, prompts, 8, 1.0, 12, 40, "cpu")
    # One group that says something, one all right, one all 0.1: eight 0.1s' float32 mean is not 0.1,
    # and divided by their spread (~1e-9) the difference would be an advantage of ~1e-4.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0] + [1.0] * 8 + [0.1] * 8)
    assert float((rewards[16:] - rewards[16:].mean()).abs().max()) > 0
    advantage = advantages(rewards, 8, "group")
    assert advantage[8:].tolist() == [0.0] * 16 and all(advantage[:8] != 0)
    masked = [False] * 24
    masked[1] = masked[9] = True  # as maskTruncated leaves out answers that never ended
    seqs = sequences(prompts, answers, 8, masked)
    kept = moving_rows(advantage, masked, kl=bool(beta))
    assert kept == ([k for k in range(24) if k not in (1, 9)] if beta else [0, 2, 3, 4, 5, 6, 7])
    spec = {"epsilon": 0.2, "importanceSamplingLevel": "token", "beta": beta, "lossType": "dapo"}
    n_tokens = sum(len(a) for a, out in zip(answers, masked) if not out)

    def loss_and_gradients(rows: list[int]) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        batch = collate_sequences(seqs, [[k] for k in rows], tok.pad_token_id, packed=True)
        reference = token_logps(model, batch).detach() - 0.1 if beta else None  # any reference will do
        loss = loss_terms(token_logps(model, batch), batch["labels"], advantage[rows], reference, spec)[0] / n_tokens
        loss.backward()
        return float(loss), [p.grad.clone() for p in model.parameters()]

    whole, whole_grads = loss_and_gradients(list(range(24)))
    part, part_grads = loss_and_gradients(kept)
    assert part == pytest.approx(whole, rel=1e-5, abs=1e-7)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(part_grads, whole_grads))
    assert any(g.abs().sum() > 0 for g in part_grads)  # a gradient there is, and kept rows carry it
    assert moving_rows(torch.zeros(4), [False] * 4, kl=False) == [0]  # one row stays for the collectives


def test_sampled_answers_stop_at_the_end_of_turn_fit_the_sequence_and_are_the_only_labels(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    rows = [{"prompt": q, "answer": a} for q, a in PAIRS[:3]]
    prompts = [p["prompt"] for p in encode_prompts(tok, rows, 40, grader(), "train.jsonl")]
    # The tiny model rarely ends a turn: make its end-of-turn token likely, so some answers do.
    stop = stop_token_ids(tok)
    with torch.no_grad():
        model.lm_head.weight[stop[-1]] *= 0
        model.lm_head.weight[stop[-1]] += model.lm_head.weight.mean(0) + 0.05
    torch.manual_seed(0)
    answers = sample(model, tok, prompts, 4, 1.0, 30, 40, "cpu")
    assert len(answers) == 12 and model.training is False  # the model was in eval mode before, and is again
    ended = [a for a in answers if a[-1] in stop]
    assert ended and len(ended) < len(answers)
    for k, answer in enumerate(answers):
        assert not set(answer[:-1]) & set(stop)  # nothing after the end of turn
        assert len(prompts[k // 4]) + len(answer) <= 40
    torch.manual_seed(0)
    assert sample(model, tok, prompts, 4, 1.0, 30, 40, "cpu") == answers  # torch's generator decides: resumable
    greedy = sample(model, tok, prompts, 1, 0.0, 30, 40, "cpu")
    assert greedy == sample(model, tok, prompts, 1, 0.0, 30, 40, "cpu")
    # grpo.topK, topP and minP narrow the draw: to the likeliest token alone, each is greedy at temperature 1.
    repeated = [a for a in greedy for _ in range(4)]
    assert sample(model, tok, prompts, 4, 1.0, 30, 40, "cpu", top_k=1) == repeated
    assert sample(model, tok, prompts, 4, 1.0, 30, 40, "cpu", top_p=1e-6) == repeated
    assert sample(model, tok, prompts, 4, 1.0, 30, 40, "cpu", min_p=0.999) == repeated
    assert sample(model, tok, prompts, 4, 1.0, 30, 40, "cpu", top_k=50) != repeated
    # The model's own generation_config.json (an instruct model's repetition penalty, min_p, ...) is
    # not what GRPO samples with: the spec's settings alone, as on vLLM.
    model.generation_config.update(repetition_penalty=3.0, no_repeat_ngram_size=1, min_p=0.5, top_k=2, top_p=0.5)
    torch.manual_seed(0)
    assert sample(model, tok, prompts, 4, 1.0, 30, 40, "cpu") == answers
    assert sample(model, tok, prompts, 1, 0.0, 30, 40, "cpu") == greedy
    seqs = sequences(prompts, answers, 4)
    assert seqs[5]["input_ids"] == prompts[1] + answers[5]
    assert seqs[5]["labels"] == [IGNORE] * len(prompts[1]) + answers[5]
    # The grader sees the answer's text without its end-of-turn token (and, cut inside a character,
    # without that character's first bytes: generate.to_generation).
    text = [tok.decode([t for t in a if t not in stop], skip_special_tokens=True).rstrip("\ufffd") for a in answers]
    prompts = [graded_of({"prompt": "?", "answer": t}, grader()) for t in text]
    assert score(tok, answers, prompts, grader(), "file:///unused")[0].tolist() == [1.0] * 12
    # maskTruncated: the same answers, those that never ended without labels, all of them rewarded.
    chunk = encode_prompts(tok, rows, 40, grader("contains"), "train.jsonl")
    spec = {"generations": 4, "temperature": 1.0, "maxNewTokens": 30, "scaleRewards": "group", "beta": 0.0,
            "grader": grader("contains"), "maskTruncated": True}
    torch.manual_seed(0)
    [groups] = draw(model, tok, [chunk], spec, 40, "cpu", "file:///unused")
    sampled = sampled_batch(model, tok, groups, spec, "cpu")
    # The loss is normalized by the answers that ended (what it is taken on), every answer is rewarded.
    assert groups.answers == answers and groups.truncated == [a[-1] not in stop for a in answers]
    assert sampled["labelled"] == sum(map(len, ended)) and len(groups.answers) == len(groups.rewards) == 12
    assert groups.uniform() == [g for g, group in enumerate(groups.rewards.view(3, 4).tolist()) if len(set(group)) == 1]
    assert sampled_batch(model, tok, groups, {**spec, "maskTruncated": False}, "cpu")["labelled"] == sum(map(len, answers))
    # overlongPenalty: answers of at most 14 tokens, each rewarded less as far as it ran into the last 4
    # (one cut at 14, by the whole 0.5); the penalty is also a part of its own.
    short = {**spec, "maxNewTokens": 14}
    torch.manual_seed(0)
    answers = sample(model, tok, [e["prompt"] for e in chunk], 4, 1.0, 14, 40, "cpu")
    torch.manual_seed(0)
    [plain] = draw(model, tok, [chunk], short, 40, "cpu", "file:///unused")
    torch.manual_seed(0)
    [penalized] = draw(model, tok, [chunk], {**short, "overlongPenalty": {"bufferTokens": 4, "penalty": 0.5}},
                       40, "cpu", "file:///unused")
    expected = [-0.5 * min(max(len(a) - 10, 0) / 4, 1) for a in answers]
    assert any(p == -0.5 for p in expected) and any(p == 0 for p in expected)
    assert penalized.parts["overlongPenalty"].tolist() == pytest.approx(expected)
    assert penalized.rewards.tolist() == pytest.approx((plain.rewards + torch.tensor(expected)).tolist())


def _groups(names: str, rewards: list[list[float]], logps: bool = True) -> Groups:
    """Groups of 2 answers to prompts named by letters: answer k of prompt x is [ord(x), k], cut when
    its reward is 0; each answer's part "p" its reward x 10, its vLLM log-probabilities -reward."""
    flat = [r for group in rewards for r in group]
    return Groups([{"prompt": [ord(x)], "name": x} for x in names], [[ord(x), k] for x in names for k in range(2)],
                  torch.tensor(flat), {"p": torch.tensor(flat) * 10}, [r == 0 for r in flat],
                  [[-r, -r] for r in flat] if logps else None)


def test_dynamic_sampling_replaces_each_uniform_group_with_a_fresh_prompts_round_after_round_until_none_is():
    first = [_groups("ab", [[1, 1], [0, 1]]), _groups("cd", [[0, 0], [1, 1]])]  # a, c and d teach nothing
    reserve = [{"prompt": [ord(x)], "name": x} for x in "efghi"]
    scripted = {"e": [1, 1], "f": [0, 1], "g": [1, 0], "h": [0.5, 1], "i": [0, 1]}  # e is uniform too
    asked = []

    def draw_more(fresh):
        asked.append("".join(e["name"] for e in fresh))
        return [_groups(asked[-1][:2], [scripted[x] for x in asked[-1][:2]]),
                *([_groups(asked[-1][2:], [scripted[x] for x in asked[-1][2:]])] if len(fresh) > 2 else [])]

    groups, later = dynamic_sampling(first, reserve, draw_more)
    # Round 1: a, c, d's places to e, f, g; round 2: e's (a's) place to h; i is never sampled.
    assert asked == ["efg", "h"] and [len(g.prompts) for g in later] == [2, 1, 1]
    assert [[e["name"] for e in g.prompts] for g in groups] == [["h", "b"], ["f", "g"]]
    assert [g.uniform() for g in groups] == [[], []]
    h, b, f, g = [0.5, 1], [0, 1], [0, 1], [1, 0]
    assert groups[0].rewards.tolist() == h + b and groups[1].rewards.tolist() == f + g
    assert groups[0].answers == [[ord("h"), 0], [ord("h"), 1], [ord("b"), 0], [ord("b"), 1]]
    assert groups[1].parts["p"].tolist() == [10 * r for r in f + g]
    assert groups[1].truncated == [r == 0 for r in f + g] and groups[1].sampler_logps == [[-r, -r] for r in f + g]
    assert first[0].rewards.tolist() == [1, 1, 0, 1]  # the first round's groups, as sampled: the step's figures
    # A reserve spent before every group teaches something: what is left uniform stays.
    groups, later = dynamic_sampling(first, reserve[:1], lambda fresh: [_groups("e", [[1, 1]])])
    assert [[e["name"] for e in g.prompts] for g in groups] == [["e", "b"], ["c", "d"]] and len(later) == 1
    assert [g.uniform() for g in groups] == [[0], [0, 1]]
    # Nothing uniform: nothing more is sampled.
    assert dynamic_sampling(groups[:0] + [_groups("b", [[0, 1]], logps=False)], reserve,
                            lambda fresh: pytest.fail("sampled"))[1] == []


def test_the_overlong_penalty_grows_over_the_buffer_before_max_new_tokens_as_dapos():
    answers = [[7] * n for n in (10, 12, 13, 16, 20)]
    assert overlong_penalties(answers, 20, {"bufferTokens": 8}).tolist() == pytest.approx([0, 0, -0.125, -0.5, -1])
    assert overlong_penalties(answers, 20, {"bufferTokens": 8, "penalty": 2}).tolist()[-1] == -2


def test_the_loss_is_minus_the_advantage_per_answer_token_plus_beta_times_the_kl_to_the_reference():
    """Value and gradient by hand: the ratio exp(logp - logp.detach()) is 1 with the gradient of logp,
    the KL the k3 estimator exp(ref - logp) - (ref - logp) - 1, over answer tokens only."""
    logps = torch.tensor([[-0.3, -1.0, -2.0], [-0.7, -0.5, -3.0]], requires_grad=True)
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6], [IGNORE, 4, IGNORE, 7]])  # predicted: labels[:, 1:]
    answer = [(0, 1), (0, 2), (1, 0), (1, 2)]
    reference = torch.tensor([[0.0, -1.5, -1.0], [0.0, -0.2, -3.0]])
    advantage = torch.tensor([1.0, -2.0])
    loss, kl, clipped, *_ = loss_terms(logps, labels, advantage, reference, {"beta": 0.1, "epsilon": 0.2, "importanceSamplingLevel": "token", "lossType": "dapo"})
    delta = {(r, t): float(reference[r, t] - logps.detach()[r, t]) for r, t in answer}
    expected_kl = sum(math.exp(d) - d - 1 for d in delta.values())
    assert float(kl) == pytest.approx(expected_kl)
    assert float(loss) == pytest.approx(-1.0 * 2 + 2.0 * 2 + 0.1 * expected_kl)
    loss.backward()
    expected = torch.zeros(2, 3)
    for r, t in answer:
        expected[r, t] = -float(advantage[r]) + 0.1 * (1 - math.exp(delta[r, t]))
    torch.testing.assert_close(logps.grad, expected)
    assert clipped == 0  # the ratio is 1 on a step's first update
    # Without a reference (beta 0): no KL, the same policy term.
    loss, kl, *_ = loss_terms(logps.detach(), labels, advantage, None, {"beta": 0.0, "epsilon": 0.2, "importanceSamplingLevel": "token", "lossType": "dapo"})
    assert float(loss) == pytest.approx(2.0) and float(kl) == 0.0


def test_answers_vllm_sampled_weigh_each_token_by_the_truncated_ratio_of_the_policys_probability_to_vllms():
    """grpo.engine vllm (TRL's vllm_importance_sampling_correction) by hand: tokens the training model
    finds 0.5, 1 and 5 times as likely as vLLM did weigh 0.5, 1 and the cap 2, in value and gradient;
    the KL term is not weighed; on a later update the ratio is the sampling policy's (old), not the
    current one's; with the correction off, vLLM's numbers change nothing."""
    logps = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    labels = torch.tensor([[IGNORE, 5, 6, 7]])
    vllm = torch.tensor([[-1.0 + math.log(2), -1.0, -1.0 - math.log(5)]])
    spec = {"beta": 0.0, "epsilon": 0.2, "importanceSamplingLevel": "token", "lossType": "dapo", "vllmImportanceSamplingCorrection": True,
            "vllmImportanceSamplingCap": 2.0, "vllmImportanceSamplingMode": "token_truncate"}
    loss, *_ = loss_terms(logps, labels, torch.tensor([1.0]), None, spec, sampler_logps=vllm)
    assert float(loss) == pytest.approx(-(0.5 + 1 + 2))
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.5, -1.0, -2.0]]))
    reference = torch.full((1, 3), -1.5)
    with_kl, kl, *_ = loss_terms(logps.detach(), labels, torch.tensor([1.0]), reference, {**spec, "beta": 0.1},
                                sampler_logps=vllm)
    assert float(with_kl) == pytest.approx(-3.5 + 0.1 * float(kl)) and float(kl) > 0
    later, *_ = loss_terms(logps.detach() + 0.1, labels, torch.tensor([1.0]), None, spec,
                             old=logps.detach(), sampler_logps=vllm)  # ratio exp(0.1), within the clip
    assert float(later) == pytest.approx(-math.exp(0.1) * 3.5)
    off, *_ = loss_terms(logps.detach(), labels, torch.tensor([1.0]), None,
                           {**spec, "vllmImportanceSamplingCorrection": False}, sampler_logps=vllm)
    assert float(off) == pytest.approx(-3.0)


@pytest.mark.parametrize("mode, weights, masked", [
    ("token_truncate", [[0.5, 1, 2], [0, 1, 1.5]], 0), ("token_mask", [[0.5, 1, 0], [0, 1, 1.5]], 1),
    ("sequence_truncate", [[2, 2, 2], [0, 1.5, 1.5]], 0), ("sequence_mask", [[0, 0, 0], [0, 1.5, 1.5]], 3)])
def test_the_importance_sampling_mode_weighs_tokens_or_whole_answers_and_truncates_or_masks_above_the_cap(
        mode, weights, masked):
    """TRL's vllm_importance_sampling_mode by hand, cap 2: the first answer's tokens are 0.5, 1 and 5 times
    as likely to the training model as to vLLM (the answer 2.5 times), the second's 1 and 1.5 (1.5), after
    a prompt token whose numbers differ wildly and count for nothing. Value and gradient are each token's
    weight; the masked tokens are counted."""
    logps = torch.full((2, 3), -1.0, requires_grad=True)
    labels = torch.tensor([[IGNORE, 5, 6, 7], [IGNORE, IGNORE, 6, 7]])
    vllm = torch.tensor([[-1.0 + math.log(2), -1.0, -1.0 - math.log(5)], [9.0, -1.0, -1.0 - math.log(1.5)]])
    spec = {"beta": 0.0, "epsilon": 0.2, "importanceSamplingLevel": "token", "lossType": "dapo", "vllmImportanceSamplingCorrection": True,
            "vllmImportanceSamplingCap": 2.0, "vllmImportanceSamplingMode": mode}
    terms = loss_terms(logps, labels, torch.tensor([1.0, 1.0]), None, spec, sampler_logps=vllm)
    assert float(terms.loss) == pytest.approx(-sum(map(sum, weights)))
    terms.loss.backward()
    torch.testing.assert_close(logps.grad, -torch.tensor(weights, dtype=torch.float32))
    difference = math.log(2) + math.log(5) + math.log(1.5)  # |log p_train - log p_vllm| over the answer tokens
    assert (terms.sampler_difference, terms.sampler_masked) == (pytest.approx(difference), masked)
    off = loss_terms(logps, labels, torch.tensor([1.0, 1.0]), None, {**spec, "vllmImportanceSamplingCorrection": False},
                     sampler_logps=vllm)
    assert (off.sampler_difference, off.sampler_masked) == (pytest.approx(difference), 0)


@pytest.mark.parametrize("loss_type, expected", [("dapo", (-1.0 * 3 + 2.0 * 1) / 4), ("grpo", (-1.0 + 2.0) / 2),
                                                  ("dr_grpo", (-1.0 * 3 + 2.0 * 1) / (2 * 8))])
def test_the_loss_type_decides_how_answers_of_different_lengths_weigh(loss_type, expected):
    """TRL's loss_type by hand: a 3-token answer with advantage 1 and a 1-token answer with advantage -2
    (ratio 1): dapo divides the summed loss by the step's 4 answer tokens, grpo averages each answer's
    tokens and then the 2 answers, dr_grpo divides by 2 answers x maxNewTokens 8."""
    labels = torch.tensor([[IGNORE, 5, 6, 7], [IGNORE, IGNORE, IGNORE, 7]])
    spec = {"beta": 0.0, "epsilon": 0.2, "importanceSamplingLevel": "token", "lossType": loss_type, "maxNewTokens": 8}
    loss, *_ = loss_terms(torch.zeros(2, 3), labels, torch.tensor([1.0, -2.0]), None, spec)
    assert float(loss) / normalizer(spec, answer_tokens=4, answers=2) == pytest.approx(expected)


@pytest.mark.parametrize("high", [None, 0.28])
def test_on_later_updates_the_ratio_to_the_sampling_policy_is_clipped_where_the_advantage_pushes_it(high):
    """grpo.iterations > 1: PPO's surrogate by hand. A token past 1 + epsilonHigh with a positive
    advantage, or below 1 - epsilon with a negative one, counts at the clip bound and gets no gradient;
    the others count ratio x advantage (DAPO's clip-higher: the upper bound apart)."""
    old = torch.tensor([[-0.3, -1.0, -2.0], [-0.7, -0.5, -3.0]])
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6], [IGNORE, 4, IGNORE, 7]])
    ratios = {(0, 1): 1.5, (0, 2): 0.9, (1, 0): 0.5, (1, 2): 1.5}  # rows' advantages +1 and -2
    logps = old.clone()
    for (r, t), ratio in ratios.items():
        logps[r, t] += math.log(ratio)
    logps.requires_grad_(True)
    advantage = torch.tensor([1.0, -2.0])
    upper = 1 + (high or 0.2)
    loss, _, clipped, *_ = loss_terms(logps, labels, advantage, None, {"beta": 0.0, "epsilon": 0.2, "importanceSamplingLevel": "token", "epsilonHigh": high, "lossType": "dapo"}, old)
    # (0,1): clipped at the upper bound; (0,2): 0.9 x 1 inside; (1,0): clipped at 0.8; (1,2): 1.5 x -2, the
    # pessimistic side of a negative advantage, not clipped.
    assert float(loss) == pytest.approx(-upper - 0.9 + 0.8 * 2 + 1.5 * 2) and int(clipped) == 2
    loss.backward()
    expected = torch.zeros(2, 3)
    expected[0, 2], expected[1, 2] = -1.0 * 0.9, 2.0 * 1.5  # d(-ratio x advantage)/d logp = -advantage x ratio
    torch.testing.assert_close(logps.grad, expected)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_gspos_sequence_level_ratio_is_each_answers_geometric_mean_clipped_as_one(loss_type):
    """grpo.importanceSamplingLevel sequence (GSPO) by hand, epsilon 0.2, epsilonHigh 0.28, advantages +1:
    an answer whose tokens' ratios are 1 and e^0.4 (token level: the second clipped) has the ratio
    e^0.2 for both, inside the clip, each token's gradient the answer's mean; one whose tokens are both
    e^0.3 is clipped whole (e^0.3 > 1.28): no gradient. On a first update (no old policy) sequence and
    token levels give the same loss and gradient."""
    labels = torch.tensor([[IGNORE, 5, 6], [IGNORE, 5, 6]])
    old = torch.tensor([[-1.0, -2.0], [-1.5, -0.5]])
    logps = (old + torch.tensor([[0.0, 0.4], [0.3, 0.3]])).requires_grad_(True)
    spec = {"beta": 0.0, "epsilon": 0.2, "epsilonHigh": 0.28, "lossType": loss_type,
            "importanceSamplingLevel": "sequence"}
    per_answer = 2 if loss_type == "dapo" else 1  # grpo: each answer's mean over its 2 tokens
    loss, _, clipped, *_ = loss_terms(logps, labels, torch.tensor([1.0, 1.0]), None, spec, old)
    assert float(loss) == pytest.approx(-per_answer * (math.exp(0.2) + 1.28)) and int(clipped) == 2
    loss.backward()
    # d(-exp(mean log-ratio))/d logp_t = -exp(0.2) / 2 per token, from each of the answer's 2 tokens' losses
    expected = torch.tensor([[-math.exp(0.2), -math.exp(0.2)], [0.0, 0.0]]) * per_answer / 2
    torch.testing.assert_close(logps.grad, expected)
    token = {**spec, "importanceSamplingLevel": "token"}
    assert int(loss_terms(logps.detach(), labels, torch.tensor([1.0, 1.0]), None, token, old)[2]) == 3
    on_policy = []
    for level in (spec, token):
        fresh = logps.detach().clone().requires_grad_(True)
        first, *_ = loss_terms(fresh, labels, torch.tensor([1.0, -0.5]), None, level)
        first.backward()
        on_policy.append((float(first), fresh.grad))
    assert on_policy[0][0] == pytest.approx(on_policy[1][0])
    torch.testing.assert_close(on_policy[0][1], on_policy[1][1])


def test_each_answer_tokens_entropy_is_that_of_the_models_next_token_distribution_where_it_is_predicted(
        tiny_model, monkeypatch):
    """token_logps' entropies (progress.json's entropy, topEntropyQuantile's ranking): the entropy of the
    softmax of the logits that predict each labelled token, taken in chunks (here 3 positions, so
    chunks end mid-row), 0 where there is no label; the log-probabilities are those without them."""
    monkeypatch.setattr(batching, "ENTROPY_CHUNK", 3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    seqs = [{"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE, IGNORE, 7, 8, 9]},
            {"input_ids": [10, 11, 12], "labels": [IGNORE, 11, 12]}]
    batch = collate_sequences(seqs, [[0], [1]], 0, packed=True)
    with torch.no_grad():
        logps, entropies = token_logps(model, batch, entropies=True)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[:, :-1]
        torch.testing.assert_close(logps, token_logps(model, batch))
    labelled = batch["labels"][:, 1:] != IGNORE
    expected = torch.distributions.Categorical(logits=logits.float()).entropy().masked_fill(~labelled, 0.0)
    torch.testing.assert_close(entropies, expected)
    assert int((entropies > 0).sum()) == 5 and float(entropies.max()) <= math.log(model.config.vocab_size)


def test_top_entropy_quantile_takes_the_policy_term_on_the_micro_batchs_highest_entropy_answer_tokens_only():
    """grpo.topEntropyQuantile by hand: the threshold is the (1 - quantile) quantile (linear, as
    torch.quantile) of the answer tokens' entropies on every process (here this one's four and another's
    two), prompt tokens not ranked; the surrogate's value and gradient are the kept tokens' only, the
    KL term every token's."""
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6], [IGNORE, 4, IGNORE, 7]])  # answer tokens: (0,1) (0,2) (1,0) (1,2)
    entropies = torch.tensor([[9.0, 0.1, 2.0], [0.9, 9.0, 1.4]])
    other_process = torch.tensor([0.5, 3.0])
    keep = high_entropy(entropies, labels, 0.5, lambda mine: torch.cat([mine, other_process]))
    threshold = float(torch.quantile(torch.tensor([0.1, 2.0, 0.9, 1.4, 0.5, 3.0]), 0.5))  # 1.15
    assert keep.tolist() == [[False, False, True], [False, False, True]]
    assert float(entropies[0, 2]) >= threshold > float(entropies[1, 0])
    # This process alone: 0.1, 0.9, 1.4, 2.0 ranked; at 0.25 the threshold interpolates to 1.55.
    assert high_entropy(entropies, labels, 0.25, lambda mine: mine).tolist() == [[False, False, True], [False] * 3]
    assert high_entropy(entropies, labels, 1.0, lambda mine: mine).tolist() == (labels[:, 1:] != IGNORE).tolist()
    logps = torch.tensor([[-0.3, -1.0, -2.0], [-0.7, -0.5, -3.0]], requires_grad=True)
    reference = torch.tensor([[0.0, -1.5, -1.0], [0.0, -0.2, -3.0]])
    spec = {"beta": 0.1, "epsilon": 0.2, "importanceSamplingLevel": "token", "lossType": "dapo"}
    terms = loss_terms(logps, labels, torch.tensor([1.0, -2.0]), reference, spec, keep=keep)
    full = loss_terms(logps.detach(), labels, torch.tensor([1.0, -2.0]), reference, spec)
    assert terms.kl == pytest.approx(full.kl) and terms.kl > 0
    assert float(terms.loss) == pytest.approx(-1.0 + 2.0 + 0.1 * terms.kl)  # kept: (0,2) advantage 1, (1,2) -2
    terms.loss.backward()
    delta = reference - logps.detach()
    expected = 0.1 * (1 - torch.exp(delta)) * (labels[:, 1:] != IGNORE)
    expected[0, 2] -= 1.0
    expected[1, 2] += 2.0
    torch.testing.assert_close(logps.grad, expected)


def test_off_policy_masking_leaves_out_wrong_answers_the_policy_has_moved_away_from_keeping_their_kl():
    """grpo.offPolicyMaskThreshold 0.5 (DeepSeek-V3.2's) by hand on a later update: answers whose mean
    log p_sampled - log p_current is 0.6, 0.15 and 0.9 with advantages -1, -1 and +1: only the first, a
    wrong answer the policy has moved away from, loses its surrogate (value and gradient); its KL
    term stays. vLLM's log-probabilities, where given, are the sampling policy's."""
    labels = torch.tensor([[IGNORE, 5, 6], [IGNORE, 5, 6], [IGNORE, 5, 6]])
    old = torch.full((3, 2), -1.0)
    logps = (old - torch.tensor([[0.4, 0.8], [0.15, 0.15], [0.9, 0.9]])).requires_grad_(True)
    reference = torch.full((3, 2), -1.2)
    spec = {"beta": 0.1, "epsilon": 0.2, "epsilonHigh": 10.0, "importanceSamplingLevel": "token", "lossType": "dapo",
            "offPolicyMaskThreshold": 0.5}
    advantage = torch.tensor([-1.0, -1.0, 1.0])
    terms = loss_terms(logps, labels, advantage, reference, spec, old)
    unmasked = loss_terms(logps.detach(), labels, advantage, reference, {**spec, "offPolicyMaskThreshold": None}, old)
    assert terms.off_policy_masked == 1 and unmasked.off_policy_masked == 0 and terms.kl == pytest.approx(unmasked.kl)
    ratio = torch.exp(logps.detach() - old)
    # The first answer's surrogate, -min(r x -1, clip(r, 0.8, 11) x -1) = max(r, 0.8) per token, is gone.
    assert float(unmasked.loss - terms.loss) == pytest.approx(float(ratio[0].clamp(min=0.8).sum()))
    terms.loss.backward()
    delta = reference - logps.detach()
    expected = 0.1 * (1 - torch.exp(delta))  # every token's KL gradient
    expected[1] += ratio[1]  # d(-r x -1)/d logp = r: inside the clip
    expected[2] -= ratio[2]
    torch.testing.assert_close(logps.grad, expected)
    # vLLM's numbers are the sampling policy's, not old's: both wrong answers are 0.7 off them.
    vllm = logps.detach() + torch.tensor([[0.7], [0.7], [0.0]])
    sampled = loss_terms(logps.detach(), labels, advantage, None, {**spec, "vllmImportanceSamplingCorrection": False},
                         old, sampler_logps=vllm)
    assert sampled.off_policy_masked == 2
    on_policy = loss_terms(logps.detach(), labels, advantage, None, spec)  # first update, transformers: nothing is off
    assert on_policy.off_policy_masked == 0


def test_with_beta_the_reference_is_the_base_model_the_adapter_switched_off(tiny_model):
    from peft import LoraConfig, get_peft_model

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).train()
    chunk = encode_prompts(tok, [{"prompt": q, "answer": a} for q, a in PAIRS[:2]], 64, grader(), "train.jsonl")
    spec = {"generations": 2, "temperature": 1.0, "maxNewTokens": 6, "scaleRewards": "group", "beta": 0.1, "maskTruncated": False, "lossType": "dapo",
            "grader": grader("contains")}
    [groups] = draw(model, tok, [chunk], spec, 64, "cpu", "file:///unused")
    sampled = sampled_batch(model, tok, groups, spec, "cpu")
    batch, answer = sampled["batch"], sampled["batch"]["labels"][:, 1:] != IGNORE
    with torch.no_grad():
        base = token_logps(AutoModelForCausalLM.from_pretrained(tiny_model), batch)
        tuned = token_logps(model.eval(), batch)
    torch.testing.assert_close(sampled["reference"][answer], base[answer])
    assert not torch.allclose(tuned[answer], base[answer], atol=1e-3)  # the adapter is on again, and it matters
    assert sampled_batch(model.train(), tok, groups, {**spec, "beta": 0.0}, "cpu")["reference"] is None


def _rows(n: int) -> list[dict]:
    """Prompts whose reference a tiny random model can learn to include: the letter a."""
    return [{"messages": [{"role": "user", "content": PAIRS[i % len(PAIRS)][0]}], "answer": "a"} for i in range(n)]


def test_easy_first_trains_each_epoch_from_the_prompts_solved_most_often_to_the_hardest(tiny_model, tmp_path):
    """grpo.promptOrder easyFirst: each epoch's prompts in the order of their pass_rate, highest first.
    A python grader that rewards every answer with its row's pass rate (plus 0.01 for an odd length, so
    that answers differ) makes each step's reward the mean pass rate of its prompts. A row without a pass
    rate is an invalid task when the prompts are read. grpo.logCompletions writes each step's first prompt
    with its answers, their rewards and advantages, and shows them as a table in each tracker."""
    from llmfactory_runtime.finetune import encoding

    rates = [0.3, 0.9, 0.1, 0.7, 0.5, 0.8, 0.2, 0.6]
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}], "answer": "a", "pass_rate": rate}
            for i, rate in enumerate(rates)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes(dumps_jsonl(rows))
    grpo = {"generations": 2, "maxNewTokens": 2, "promptOrder": "easyFirst", "logCompletions": 1,
            "grader": python_grader("def grade(sample, item):\n"
                                    "    return item['pass_rate'] + len(sample['output_text']) % 2 / 100\n")}
    mlruns = tmp_path / "mlruns"
    task = finetune_task(tiny_model, f"file://{data}", f"file://{tmp_path}/store", objective="grpo", grpo=grpo,
                         hyperparameters={"epochs": 2, "batchSize": 2}, tracking={
                             "tensorboard": True, "wandb": {"project": "t", "mode": "offline"},
                             "mlflow": {"trackingUri": f"file://{mlruns}", "experiment": "tests"}})
    proc = run_finetune(write_task(task, tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    curve = open_store(task["artifactUri"]).read_bytes("metrics/loss.csv").decode().splitlines()
    assert [float(line.split(",")[5]) for line in curve[1:]] == pytest.approx([0.85, 0.65, 0.4, 0.15] * 2, abs=0.01)
    result = open_store(task["artifactUri"]).read_json("result.json")
    completions = open_store(result["completionsUri"])
    assert sorted(completions.list("")) == [f"step-{n:06d}.jsonl" for n in range(1, 9)]
    firsts = [json.loads(completions.read_bytes(f"step-{n:06d}.jsonl")) for n in range(1, 9)]
    assert [row["prompt"][-1]["content"] for row in firsts] == ["Question 1?", "Question 3?", "Question 4?",
                                                                 "Question 6?"] * 2
    for row in firsts:  # each answer's reward as the grader gave it, its advantage against its group's
        rewards = [a["reward"] for a in row["answers"]]
        assert rewards == pytest.approx([float(rate) + len(a["text"]) % 2 / 100 for a in row["answers"]
                                         for rate in [rates[int(row["prompt"][-1]["content"].split()[1][:-1])]]])
        assert [a["advantage"] for a in row["answers"]] == pytest.approx(
            advantages(torch.tensor(rewards), 2, "group").tolist(), abs=1e-3)
        assert len(rewards) == 2 and all(isinstance(a["truncated"], bool) for a in row["answers"])
    assert any(row["answers"][0]["advantage"] for row in firsts)  # answers of both lengths somewhere
    # In the trackers: a TensorBoard text, an MLflow table and a W&B table each step, of the same answers.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracking = Path(task["artifactUri"][7:]) / "tracking"
    accumulator = EventAccumulator(str(next((tracking / "tensorboard").glob("events.out.tfevents.*"))))
    accumulator.Reload()
    texts = accumulator.Tensors("completions/text_summary")
    assert [t.step for t in texts] == list(range(1, 9))
    assert json.dumps(firsts[0]["answers"][0]["text"]) in texts[0].tensor_proto.string_val[0].decode()
    tables = sorted(mlruns.glob("*/*/artifacts/completions/step-*.json"))
    assert [p.name for p in tables] == [f"step-{n:06d}.json" for n in range(1, 9)]
    logged = json.loads(tables[0].read_text())
    assert [row[logged["columns"].index("reward")] for row in logged["data"]] == [
        a["reward"] for a in firsts[0]["answers"]]
    assert len(list((tracking / "wandb").glob("offline-run-*/files/media/table/completions_*.table.json"))) == 8

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(InvalidTask, match=r"spec.grpo.promptOrder: easyFirst orders the prompts by their pass_rate "
                                          r"\(0-1\), but spec.objective grpo: train.jsonl has a row with None for "
                                          r"prompt 'Question 2\?': build the prompts with a DatasetBuild's "
                                          "spec.difficulty"):
        encoding.encode(task["spec"], tokenizer, rows[:2] + [{**rows[2], "pass_rate": None}], "train")
    assert encoding.encode(task["spec"], tokenizer, rows[:2], "validation").ranks is None  # validation keeps its order


@pytest.mark.slow
def test_grpo_raises_the_graders_reward_and_a_resumed_run_ends_with_the_same_weights(tiny_model, tmp_path):
    """The reward of sampled answers rises over training; the saved model's greedy answers to the
    validation prompts pass where the base model's did not (both measured here on their own); a run
    resumed from a checkpoint samples what the uninterrupted run sampled and ends with its weights.
    Off-policy masking and the entropy figure are seen on the way."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes(dumps_jsonl([{**row, "solution": "a."} for row in _rows(16)]))
    (data / "validation.jsonl").write_bytes(dumps_jsonl([{**row, "solution": "a."} for row in _rows(4)]))
    (data / "test.jsonl").write_bytes(dumps_jsonl(_rows(2)))  # held out, without solutions
    task = finetune_task(tiny_model, f"file://{data}", f"file://{tmp_path}/store", objective="grpo", method="full",
                         grpo={"generations": 8, "maxNewTokens": 8, "grader": grader("contains"), "iterations": 2,
                               "epsilonHigh": 0.28, "offPolicyMaskThreshold": 0.05},
                         checkpointing={"everySteps": 4, "keepLast": 20}, tracking={"tensorboard": True},
                         hyperparameters={"epochs": 4, "batchSize": 4, "learningRate": 0.01, "evalEverySteps": 8})
    path = write_task(task, tmp_path)
    proc = run_finetune(path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = open_store(task["artifactUri"])
    result = run.read_json("result.json")
    assert result["steps"] == 16 and result["datasetFormat"] == "graded"
    # Where a Benchmark's reward grader may read references, whichever split it reads: not the test rows' absent solution.
    assert result["datasetReferenceFields"] == ["answer"]
    # iterations 2: two optimizer steps on each step's samples, the second one clipped to the sampling policy's.
    optimizer = torch.load(Path(task["artifactUri"][7:]) / "checkpoints/step-4/optimizer.pt", weights_only=False)
    assert {int(state["step"]) for state in optimizer["state"].values()} == {8}
    figures = run.read_json("progress.json")["figures"]
    assert 0 <= figures["clipped"] < 1 and 0 <= figures["offPolicyMasked"] < 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [k for k in run.list("tracking") if "events.out.tfevents" in k]
    accumulator = EventAccumulator(str(Path(task["artifactUri"][7:]) / "tracking" / events[0]))
    accumulator.Reload()
    # offPolicyMaskThreshold: on each step's second update, wrong answers the first moved the policy away
    # from are masked (the first update's answers are the policy's own: none), until no answer is wrong.
    masked = [e.value for e in accumulator.Scalars("train/off_policy_masked")]
    assert len(masked) == 16 and 0 < masked[0] <= 0.5 and all(0 <= m <= 0.5 for m in masked) and masked[-1] == 0
    # The policy's entropy per answer token falls as it settles on answers that pass.
    entropy = [e.value for e in accumulator.Scalars("train/entropy")]
    assert entropy[-1] < entropy[0] - 1
    lines = run.read_bytes("metrics/loss.csv").decode().splitlines()
    assert lines[0] == "step,epoch,loss,learning_rate,eval_loss,reward,eval_reward"
    assert lines[1] == f"0,,,,,,{result['baseReward']:.6f}"  # the model before training
    curve = [float(line.split(",")[5]) for line in lines[2:]]
    assert sum(curve[-4:]) / 4 > sum(curve[:4]) / 4 + 0.3
    assert [line.split(",")[6] != "" for line in lines[2:]] == [s in (8, 16) for s in range(1, 17)]
    assert result["baseReward"] == 0.0 and result["reward"] == 1.0
    assert headline("FineTune", result) == "reward 0.00 -> 1.00"
    card = (Path(result["modelUri"][7:]) / "README.md").read_text()
    assert "validation prompts (greedy answers): 0.0 before training -> 1.0" in card
    # Measured here on its own: the saved model's greedy answers contain the reference, the base's do not.
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [p["prompt"] for p in encode_prompts(tok, _rows(4), 96, grader(), "validation.jsonl")]
    for folder, expected in ((tiny_model, 0.0), (result["modelUri"][7:], 1.0)):
        answers = sample(AutoModelForCausalLM.from_pretrained(folder), tok, prompts, 1, 0.0, 8, 96, "cpu")
        graded = [graded_of({"prompt": "?", "answer": "a"}, grader())] * 4
        assert score(tok, answers, graded, grader("contains"), "file:///unused")[0].mean() == expected

    uninterrupted = load_file(Path(result["modelUri"][7:]) / "model.safetensors")
    run.delete("COMMITTED")
    for key in run.list("checkpoints"):
        if not key.startswith("step-4/"):
            run.delete(f"checkpoints/{key}")
    proc = run_finetune(path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = run.read_json("result.json")
    assert resumed["resumedFromStep"] == 4 and resumed["baseReward"] == 0.0
    assert run.read_bytes("metrics/loss.csv").decode().splitlines() == lines
    weights = load_file(Path(resumed["modelUri"][7:]) / "model.safetensors")
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(weights[name], weight, rtol=0, atol=1e-6)


def _replay_dynamic_sampling(log: list[tuple[int, float]], n: int, batch: int, reserve: int) -> list[dict]:
    """Each step's figures as dynamic sampling makes them, worked out again from the grader's log of
    (row id, reward) per answer, in the order graded: a step's first `batch` groups, then replacements
    for its uniform groups, `reserve` at most. Ends where the log does."""
    groups = [log[i:i + n] for i in range(0, len(log), n)]
    uniform = [len({r for _, r in g}) == 1 for g in groups]
    steps, at = [], 0
    while at < len(groups):
        trained, left, drawn = list(range(at, at + batch)), reserve, batch
        at += batch
        while left and (slots := [k for k, g in enumerate(trained) if uniform[g]]):
            take = min(len(slots), left)
            for k, g in zip(slots, range(at, at + take)):
                trained[k] = g
            at, left, drawn = at + take, left - take, drawn + take
        sampled = groups[at - drawn:at]
        steps.append({"promptsSampled": drawn, "uniformGroups": sum(uniform[g] for g in trained) / batch,
                      "reward": sum(r for g in sampled for _, r in g) / (n * drawn),
                      "ids": [g[0][0] for g in sampled]})
    return steps


@pytest.mark.slow
def test_dynamic_sampling_trains_each_step_on_groups_that_teach_and_a_resumed_run_samples_the_same(
        tiny_model, tmp_path, openai_server):
    """Two thirds of the prompts always pass or always fail (their groups teach nothing). With
    dynamicSampling each step reads 3 x 2 prompts and replaces its uniform groups with fresh prompts'
    round after round: what the grader saw, replayed, gives each step's prompts sampled, the share of
    uniform groups left in its batch, and its reward (over every answer sampled); a run resumed from
    its step-2 checkpoint samples the same prompts and answers, and counts on what its grader's
    embeddings part (weight 0) had paid for by then."""
    data = tmp_path / "data"
    data.mkdir()
    log = tmp_path / "graded.jsonl"
    kinds = ["easy", "hard", "mixed"] * 4
    (data / "train.jsonl").write_bytes(dumps_jsonl([{**row, "id": i, "kind": kinds[i], "log": str(log)}
                                                    for i, row in enumerate(_rows(12))]))
    source = """
        import json

        def grade(sample, item):
            got = {"easy": 1.0, "hard": 0.0}.get(item["kind"], len(sample["output_text"]) % 3 / 2)
            with open(item["log"], "a") as f:
                f.write(json.dumps([item["id"], got]) + "\\n")
            return got
    """
    task = finetune_task(tiny_model, f"file://{data}", f"file://{tmp_path}/store", objective="grpo",
                         grpo={"generations": 4, "maxNewTokens": 8, "dynamicSampling": {"oversampling": 3},
                               "grader": {"operation": "sum", "parts": [
                                   python_grader(source) | {"name": "kind"},
                                   {"operation": "similarity", "metric": "cosine", "referenceField": "answer",
                                    "name": "meaning", "weight": 0,
                                    "embeddings": {"baseUrl": openai_server.url, "model": "e"}}]}},
                         tracking={"tensorboard": True}, checkpointing={"everySteps": 2, "keepLast": 5},
                         hyperparameters={"epochs": 2, "batchSize": 2, "learningRate": 0.05})
    path = write_task(task, tmp_path)
    proc = run_finetune(path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = open_store(task["artifactUri"])
    assert run.read_json("result.json")["steps"] == 4  # 12 prompts, 6 read a step, 2 epochs
    graded = [tuple(json.loads(line)) for line in log.read_text().splitlines()]
    steps = _replay_dynamic_sampling(graded, 4, 2, 4)
    assert len(steps) == 4 and all(len(set(s["ids"])) == len(s["ids"]) for s in steps)  # no prompt twice in a step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [k for k in run.list("tracking") if "events.out.tfevents" in k]
    accumulator = EventAccumulator(str(Path(task["artifactUri"][7:]) / "tracking" / events[0]))
    accumulator.Reload()
    assert [e.value for e in accumulator.Scalars("train/prompts_sampled")] == [s["promptsSampled"] for s in steps]
    assert [e.value for e in accumulator.Scalars("train/frac_reward_zero_std")] == [s["uniformGroups"] for s in steps]
    lines = run.read_bytes("metrics/loss.csv").decode().splitlines()
    assert [float(line.split(",")[5]) for line in lines[1:]] == pytest.approx([s["reward"] for s in steps], abs=1e-5)
    # Replacements were sampled, and the batches trained hold fewer uniform groups than the first draws did.
    assert sum(s["promptsSampled"] for s in steps) > 8
    first_draws = sum(len({r for _, r in graded[4 * k:4 * k + 4]}) == 1
                      for k, s in zip(np.cumsum([0] + [s["promptsSampled"] for s in steps][:-1]), steps) for k in (k, k + 1))
    assert sum(s["uniformGroups"] for s in steps) * 2 < first_draws
    assert run.read_json("progress.json")["figures"]["promptsSampled"] == steps[-1]["promptsSampled"]

    run.delete("COMMITTED")
    for key in run.list("checkpoints"):
        if not key.startswith("step-2/"):
            run.delete(f"checkpoints/{key}")
    log.unlink()
    first = run.read_json("result.json")["graderUsage"]["meaning"]
    at_step_2 = run.read_json("checkpoints/step-2/state.json")["graderUsage"]["meaning"]
    assert 0 < at_step_2["requests"] < first["requests"] and first["promptTokens"] == openai_server.embedding_tokens
    proc = run_finetune(path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = run.read_json("result.json")
    assert resumed["resumedFromStep"] == 2
    after = 4 * sum(s["promptsSampled"] for s in steps[:2])
    assert [tuple(json.loads(line)) for line in log.read_text().splitlines()] == graded[after:]
    assert run.read_bytes("metrics/loss.csv").decode().splitlines() == lines
    # The resumed run paid for nothing (the later answers' scores were in the store): what it reports is
    # what was paid for by step 2, and the rest as cached.
    usage = resumed["graderUsage"]["meaning"]
    assert openai_server.embedding_tokens == first["promptTokens"]
    assert (usage["requests"], usage["promptTokens"]) == (at_step_2["requests"], at_step_2["promptTokens"])
    assert usage["requests"] + usage["cached"] == first["requests"] + first["cached"]


@pytest.mark.slow
def test_a_lora_grpo_run_with_beta_and_a_sum_grader_reports_its_kl_to_the_base_and_each_parts_rewards(
        tiny_model, tiny_reward_model, openai_server, tmp_path):
    """The adapter starts at zero, so the first step's KL is 0; it grows as the adapter trains (its policy
    term on the high-entropy half of the answer tokens: topEntropyQuantile, the KL on all). The
    rewards are a sum grader's: a python part, which reads a field of the row the other graders know
    nothing of (and logs what it saw), a check at half weight, and at weight 0 a local judge (the tiny
    model) and a reward model, both in the training process, chrF, METEOR, and cosine by an embeddings
    endpoint (the local server's letter counts); each part's mean is reported."""
    data = tmp_path / "data"
    data.mkdir()
    log = tmp_path / "graded.jsonl"
    (data / "train.jsonl").write_bytes(dumps_jsonl([{**row, "log": str(log)} for row in _rows(8)]))
    source = """
        import json

        def grade(sample, item):
            text = sample["output_text"]
            with open(item["log"], "a") as f:
                f.write(json.dumps([len(text) / 100, item["answer"] in text, text]) + "\\n")
            return len(text) / 100
    """
    summed = {"operation": "sum", "parts": [python_grader(source) | {"name": "length"},
                                            grader("contains") | {"name": "has_a", "weight": 0.5},
                                            {"operation": "judge", "judgeModel": {"uri": f"file://{tiny_model}"},
                                             "referenceField": "answer", "name": "judged", "weight": 0},
                                            {"operation": "rewardModel", "name": "preferred", "weight": 0,
                                             "rewardModel": {"uri": f"file://{tiny_reward_model}"}},
                                            {"operation": "similarity", "metric": "chrf", "referenceField": "answer",
                                             "name": "alike", "weight": 0},
                                            {"operation": "similarity", "metric": "meteor", "referenceField": "answer",
                                             "name": "alike_words", "weight": 0},
                                            {"operation": "similarity", "metric": "cosine", "referenceField": "answer",
                                             "name": "meaning", "weight": 0, "embeddings": {
                                                 "baseUrl": openai_server.url, "model": "text-embedding-3-small"}},
                                            {"operation": "similarity", "metric": "cosine", "referenceField": "answer",
                                             "name": "meaning_here", "weight": 0,
                                             "embeddingModel": {"uri": f"file://{tiny_model}"}}]}
    task = finetune_task(tiny_model, f"file://{data}", f"file://{tmp_path}/store", objective="grpo",
                         grpo={"generations": 4, "maxNewTokens": 6, "beta": 0.5, "grader": summed,
                               "overlongPenalty": {"bufferTokens": 3}, "topEntropyQuantile": 0.5},
                         tracking={"tensorboard": True},
                         hyperparameters={"epochs": 2, "batchSize": 2, "learningRate": 0.05})
    proc = run_finetune(write_task(task, tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = open_store(task["artifactUri"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [k for k in run.list("tracking") if "events.out.tfevents" in k]
    accumulator = EventAccumulator(str(Path(task["artifactUri"][7:]) / "tracking" / events[0]))
    accumulator.Reload()
    kl = [e.value for e in accumulator.Scalars("train/kl")]
    assert len(kl) == 8 and kl[0] == 0.0 and kl[-1] > 1e-4
    lengths = [e.value for e in accumulator.Scalars("train/completion_length")]  # answers of at most 6 tokens
    assert len(lengths) == 8 and all(0 < n <= 6 for n in lengths)
    assert len(accumulator.Scalars("train/truncated_ratio")) == 8
    # The policy's entropy per answer token: a random model's is near its vocabulary's uniform one.
    entropy = [e.value for e in accumulator.Scalars("train/entropy")]
    vocab = AutoModelForCausalLM.from_pretrained(tiny_model).config.vocab_size
    assert len(entropy) == 8 and all(0.5 * math.log(vocab) < h <= math.log(vocab) for h in entropy)
    figures = run.read_json("progress.json")["figures"]
    assert figures["kl"] == pytest.approx(kl[-1], rel=1e-3)
    # Each step's reward: the mean over its 2 prompts x 4 answers of length + 0.5 x has_a + the overlong
    # penalty (answers of 4 to 6 tokens lose up to 1); each part's mean apart.
    graded = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [float(line.split(",")[5]) for line in run.read_bytes("metrics/loss.csv").decode().splitlines()[1:]]
    assert len(graded) == 64 and len({g[0] for g in graded}) > 4
    means = [[sum(g[part] for g in graded[i:i + 8]) / 8 for i in range(0, 64, 8)] for part in (0, 1)]
    overlong = [e.value for e in accumulator.Scalars("train/rewards/overlongPenalty")]
    assert len(overlong) == 8 and all(-1 <= p <= 0 for p in overlong) and min(overlong) < 0
    assert steps == pytest.approx([length + 0.5 * has_a + p for length, has_a, p in zip(*means, overlong)], abs=1e-4)
    assert [e.value for e in accumulator.Scalars("train/rewards/length")] == pytest.approx(means[0], abs=1e-4)
    assert figures["reward.has_a"] == pytest.approx(means[1][-1], abs=1e-4)
    # The similarity part: each step's mean chrF of the answers the python part saw, against the reference.
    alike = [sum(similarity(text, "a", "chrf") for _, _, text in graded[i:i + 8]) / 8 for i in range(0, 64, 8)]
    assert [e.value for e in accumulator.Scalars("train/rewards/alike")] == pytest.approx(alike, abs=1e-4)
    assert max(alike) > 0
    # METEOR, by the WordNet the training process found in its virtualenv.
    words = [sum(similarity(text, "a", "meteor") for _, _, text in graded[i:i + 8]) / 8 for i in range(0, 64, 8)]
    assert [e.value for e in accumulator.Scalars("train/rewards/alike_words")] == pytest.approx(words, abs=1e-4)
    # The cosine part: the same, by the embeddings the server gave (the reference's asked for once).
    from llmfactory_runtime.embedding_similarity import cosine
    from tests.openai_server import letter_counts

    def meaning_of(text: str) -> float:
        return min(1.0, cosine(letter_counts(text.strip()), letter_counts("a"))) if text.strip() else 0.0
    meaning = [sum(meaning_of(text) for _, _, text in graded[i:i + 8]) / 8 for i in range(0, 64, 8)]
    assert [e.value for e in accumulator.Scalars("train/rewards/meaning")] == pytest.approx(meaning, abs=1e-4)
    assert max(meaning) > 0 and len({text.strip() for _, _, text in graded} - {""}) <= len(openai_server.embedded)
    # The local embedding model's part: scored in the training process (the tiny model's mean hidden states).
    here = [e.value for e in accumulator.Scalars("train/rewards/meaning_here")]
    assert len(here) == 8 and all(0 <= r <= 1 for r in here) and len(set(here)) > 1
    # What the run asked of the embeddings endpoint, in its result: each answer scored once (again: cached).
    usage = run.read_json("result.json")["graderUsage"]["meaning"]
    assert usage == {"requests": len({text for _, _, text in graded if text}), "cached": usage["cached"],
                     "promptTokens": openai_server.embedding_tokens, "completionTokens": 0}
    assert openai_server.embedding_tokens > 0
    judged = [e.value for e in accumulator.Scalars("train/rewards/judged")]
    assert len(judged) == 8 and all(0 < r < 1 for r in judged) and len(set(judged)) > 1
    assert figures["reward.judged"] == pytest.approx(judged[-1], abs=1e-4)
    preferred = [e.value for e in accumulator.Scalars("train/rewards/preferred")]
    assert len(preferred) == 8 and len(set(preferred)) > 1 and figures["reward.preferred"] == pytest.approx(preferred[-1])
    assert any("/judge/" in name for name in open_store(f"file://{tmp_path}/store").list(""))  # kept for a resume
    card = (Path(run.read_json("result.json")["adapterUri"][7:]) / "README.md").read_text()
    assert "grader: sum of 1 x length (python, its source in the task document), 0.5 x has_a (contains against " \
           f"field 'answer'), 0 x judged (judge against field 'answer' by the local judge file://{tiny_model}), " \
           f"0 x preferred (reward model file://{tiny_reward_model}), 0 x alike (similarity (chrf) against field " \
           "'answer'), 0 x alike_words (similarity (meteor) against field 'answer'), 0 x meaning (similarity (cosine) against field 'answer' by text-embedding-3-small's " \
           f"embeddings), 0 x meaning_here (similarity (cosine) against field 'answer' by file://{tiny_model}'s " \
           "embeddings (local))" in card


@pytest.mark.extended(reason=(
    "test_grpo_raises_the_graders_reward_and_a_resumed_run_ends_with_the_same_weights runs GRPO with iterations "
    "in one process and test_a_lora_grpo_run_with_beta_and_a_sum_grader_reports_its_kl_to_the_base_and_each_parts_"
    "rewards a sum grader with a local judge, and test_easy_first_trains_each_epoch_from_the_prompts_solved_most_"
    "often_to_the_hardest logs completions; this one runs them on two processes, under DDP and DeepSpeed ZeRO-2"))
@pytest.mark.slow
@pytest.mark.deepspeed("ShareMemCommBuilder")
def test_grpo_on_two_processes_trains_alike_under_ddp_and_deepspeed(tiny_model, tiny_reward_model, tmp_path,
                                                                    openai_server):
    """Each process samples and grades its own prompts (a python grader process, a local judge and a
    reward model each);
    the step's loss is normalized over both processes' answer tokens, so DDP and DeepSpeed ZeRO-2
    (which sums the gradients itself) follow the same curve, with grpo.iterations 2 stepping the
    schedule twice a step and answers cut at maxNewTokens left out of the loss; topEntropyQuantile ranks
    the entropies of both processes' answer tokens together, and scaleRewards batch divides by the spread
    of both processes' rewards; what they asked of an embeddings endpoint is summed in the result."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes(dumps_jsonl(_rows(8)))
    summed = {"operation": "sum", "parts": [
        grader("contains") | {"name": "has_a"},
        python_grader("def grade(sample, item):\n    return len(sample['output_text']) / 100\n") | {"name": "length",
                                                                                                   "weight": 0.5},
        {"operation": "judge", "judgeModel": {"uri": f"file://{tiny_model}"}, "referenceField": "answer",
         "name": "judged", "weight": 0.1},
        {"operation": "rewardModel", "rewardModel": {"uri": f"file://{tiny_reward_model}"}, "name": "preferred",
         "weight": 0.1},
        {"operation": "similarity", "metric": "cosine", "referenceField": "answer", "name": "meaning", "weight": 0,
         "embeddings": {"baseUrl": openai_server.url, "model": "e", "price": {"inputPerMillion": 50, "outputPerMillion": 0}}}]}
    tasks = [finetune_task(tiny_model, f"file://{data}", f"file://{tmp_path}/{strategy}", objective="grpo",
                           # 16 new tokens: enough that some answers end (a random model seldom does).
                           grpo={"generations": 4, "maxNewTokens": 16, "iterations": 2, "maskTruncated": True,
                                 "grader": summed, "topEntropyQuantile": 0.5, "scaleRewards": "batch",
                                 "logCompletions": 2},
                           distribution={"strategy": strategy}, resources={"gpusPerNode": 2},
                           hyperparameters={"epochs": 2, "batchSize": 1, "learningRate": 0.05})
             for strategy in ("ddp", "deepspeed")]
    for task in tasks:
        billed = openai_server.embedding_tokens
        proc = run_finetune(write_task(task, tmp_path), processes=2)
        assert proc.returncode == 0, proc.stderr[-4000:]
        # What both processes asked of the embeddings endpoint, summed, at its price
        usage = open_store(task["artifactUri"]).read_json("result.json")["graderUsage"]["meaning"]
        assert usage["promptTokens"] == openai_server.embedding_tokens - billed > 0
        assert usage["costUsd"] == round(usage["promptTokens"] * 5e-5, 6) and usage["requests"] > 0
        # logCompletions 2: each step's prompts of both processes, every prompt once in the epoch
        completions = open_store(open_store(task["artifactUri"]).read_json("result.json")["completionsUri"])
        logged = [[json.loads(line)["prompt"][-1]["content"] for line in
                   completions.read_bytes(f"step-{n:06d}.jsonl").decode().splitlines()] for n in range(1, 5)]
        assert all(len(prompts) == 2 for prompts in logged)  # one of each process
        assert sorted(p for prompts in logged for p in prompts) == sorted(r["messages"][0]["content"] for r in _rows(8))
    lines = [open_store(t["artifactUri"]).read_bytes("metrics/loss.csv").decode().splitlines()[1:] for t in tasks]
    assert len(lines[0]) == len(lines[1]) == 8  # 8 prompts, 2 a step (1 per process), 2 epochs
    for ddp, deepspeed in zip(*lines):
        (step, _, loss, lr, _, reward), other = ddp.split(",")[:6], deepspeed.split(",")
        assert step == other[0] and reward == other[5] and lr == other[3]
        assert float(loss) == pytest.approx(float(other[2]), abs=1e-4)
    # Steps whose every answer was cut train nothing (loss 0, not NaN); the others agree above.
    assert any(float(line.split(",")[2]) > 0.01 for line in lines[0])
    # The schedule counts optimizer steps, two a step: linear decay over 16 of them.
    assert [float(line.split(",")[3]) for line in lines[0]] == pytest.approx([0.05 * (16 - 2 * k) / 16
                                                                              for k in range(1, 9)])
    for task in tasks:
        figures = open_store(task["artifactUri"]).read_json("progress.json")["figures"]
        assert {"reward.has_a", "reward.length", "reward.judged", "reward.preferred", "clipped", "truncated",
                "uniformGroups", "entropy"} <= set(figures)
        assert 0 < figures["reward.judged"] < 1
