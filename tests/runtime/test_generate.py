"""Local generation by continuous batching, or one static batch where every conversation fits in
it: the answers a conversation gets do not depend on the conversations decoding beside it, nor on
the way they decode, and each answer is handed over as soon as it is finished."""

from __future__ import annotations

import copy

import pytest
import torch

from llmfactory_runtime.generate import generate, prompt_ids, stop_token_ids, to_generation
from llmfactory_runtime.models import load_model, load_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Почему небо голубое?"}],
    [{"role": "user", "content": "中国的首都是哪里？"}],
    [{"role": "user", "content": "Write a short poem about the sea."},
     {"role": "assistant", "content": "The sea is wide and the waves are blue."},
     {"role": "user", "content": "Напиши стихотворение о море."}],
    [{"role": "user", "content": "Explain why the sky is blue."}],
    [{"role": "user", "content": "为什么天空是蓝色的？"}],
    [{"role": "user", "content": "Какая столица России?"}],
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    source = {"uri": f"file://{tiny_model}"}
    model, tokenizer = load_model(source, dtype=torch.float32, to=torch.device("cpu")), load_tokenizer(source)
    return model.eval(), tokenizer


def test_each_answer_is_the_one_the_conversation_gets_decoded_alone(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    stop = stop_token_ids(tokenizer)
    alone = []
    for conversation in CONVERSATIONS:  # transformers' own generate, one conversation, no padding
        ids = torch.tensor([prompt_ids(tokenizer, conversation)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, top_p=None, top_k=None)
        alone.append(to_generation(tokenizer, out[0, ids.shape[1]:].tolist(), stop))
    # Three at a time for seven conversations: places are handed on while others still decode. Eight
    # at a time: one static batch, left-padded to the longest prompt.
    for concurrency in (3, 8):
        handed = []
        answers = generate(model, tokenizer, CONVERSATIONS, 12, concurrency=concurrency,
                           on_answer=lambda i, g: handed.append((i, g)))
        assert answers == alone, concurrency
        assert sorted(i for i, _ in handed) == list(range(len(CONVERSATIONS)))
        assert all(answers[i] is g for i, g in handed)
    assert all(0 < a.tokens <= 12 for a in answers) and any(a.text for a in answers)


def test_the_models_own_generation_defaults_change_no_answer(model_and_tokenizer):
    """An instruct model's generation_config.json (Qwen2.5's repetition_penalty, top_k and top_p, say)
    is not what the runtime samples with: greedy is greedy and sampling is plain temperature sampling,
    on either path, as on vLLM (--generation-config vllm)."""
    model, tokenizer = model_and_tokenizer
    plain = {concurrency: [generate(model, tokenizer, CONVERSATIONS, 10, temperature=t, seed=3, concurrency=concurrency)
                           for t in (0.0, 1.5)] for concurrency in (3, 8)}
    own = model.generation_config
    model.generation_config = copy.deepcopy(own)
    model.generation_config.update(do_sample=True, temperature=0.3, top_k=2, top_p=0.5, repetition_penalty=3.0,
                                   no_repeat_ngram_size=1)
    try:
        for concurrency in (3, 8):
            answers = [generate(model, tokenizer, CONVERSATIONS, 10, temperature=t, seed=3, concurrency=concurrency)
                       for t in (0.0, 1.5)]
            assert answers == plain[concurrency], concurrency
    finally:
        model.generation_config = own


def test_sampling_draws_from_the_whole_distribution_on_either_path(model_and_tokenizer):
    """Not from the 50 likeliest tokens (transformers' default top_k where a config leaves it unset)."""
    model, tokenizer = model_and_tokenizer
    conversation = CONVERSATIONS[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids(tokenizer, conversation)])).logits[0, -1]
    top_50 = {tokenizer.decode([t]).strip() for t in logits.topk(50).indices.tolist()}
    for concurrency in (16, 64):  # continuous, and one static batch
        drawn = {a.text for a in generate(model, tokenizer, [conversation] * 64, 1, temperature=3.0, seed=1,
                                          concurrency=concurrency)} - {""}  # "": end of turn, or a space
        assert drawn - top_50, concurrency


def test_sampling_is_reproducible_by_seed(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    for concurrency in (4, 8):  # continuous, and one static batch
        first, again = (generate(model, tokenizer, CONVERSATIONS, 10, temperature=1.5, seed=5, concurrency=concurrency)
                        for _ in range(2))
        other = generate(model, tokenizer, CONVERSATIONS, 10, temperature=1.5, seed=6, concurrency=concurrency)
        assert first == again
        assert first != other
    # The seed's draws leave the process's own random state where it was (a FineTune's, say).
    state = torch.get_rng_state()
    generate(model, tokenizer, CONVERSATIONS, 10, temperature=1.5, seed=5, concurrency=8)
    assert torch.equal(torch.get_rng_state(), state)


def test_an_answer_ends_at_the_first_end_of_turn_token(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    body = tokenizer.encode("Paris.")
    ended = to_generation(tokenizer, [*body, end, *tokenizer.encode("more")], stop_token_ids(tokenizer))
    assert (ended.text, ended.tokens, ended.finished) == ("Paris.", len(body), True)
    cut = to_generation(tokenizer, body, stop_token_ids(tokenizer))
    assert (cut.text, cut.tokens, cut.finished) == ("Paris.", len(body), False)
    # Cut after the first byte of "М" (D0 9C; byte-level BPE writes the byte D0 as "Ð"): the answer
    # ends before it, as vLLM's does, not with a U+FFFD.
    half = to_generation(tokenizer, [*body, tokenizer.convert_tokens_to_ids("Ð")], stop_token_ids(tokenizer))
    assert tokenizer.decode([tokenizer.convert_tokens_to_ids("Ð")]) == "\ufffd"
    assert (half.text, half.tokens, half.finished) == ("Paris.", len(body) + 1, False)
    assert generate(None, tokenizer, [], 8) == []
