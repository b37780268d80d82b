"""Chat generation with a local transformers model (teacher answers, benchmark answers), by
continuous batching (or one static batch where every conversation fits in it);
vllm_server.VllmServer.generate is the same with vLLM."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation import ContinuousBatchingConfig

from .chat import end_of_turn, refuse_unwritten, render, unwritten

# The most prompt tokens one forward pass takes in (longer prompts are prefilled in chunks).
MAX_BATCH_TOKENS = 2048


@dataclass
class Generation:
    text: str
    tokens: int
    finished: bool  # ended on end-of-turn rather than at max_new_tokens


def stop_token_ids(tokenizer) -> list[int]:
    """End of turn: the tokenizer's end-of-sequence and the token its chat template ends a turn with
    (chat.end_of_turn), where they exist."""
    return sorted(t for t in {tokenizer.eos_token_id, end_of_turn(tokenizer)}
                  if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id)


def prompt_ids(tokenizer, conversation: list[dict[str, Any]], tools: list[dict] | None = None) -> list[int]:
    """The conversation's tokens up to where the assistant answers, with the tools it may call
    (a template that leaves one out is an invalid task): the rendered text's tokens, as
    apply_chat_template gives them and as training tokenizes its conversations."""
    text = render(tokenizer, conversation, add_generation_prompt=True, tools=tools)
    refuse_unwritten(unwritten(text, tools))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def to_generation(tokenizer, tokens: list[int], stop: list[int]) -> Generation:
    """The answer up to (without) the first end-of-turn token. An answer cut at max_new_tokens inside
    a character (byte-level tokens: its first bytes written, not its last) ends before that character,
    as vLLM's answer does; decoded, its bytes would be a U+FFFD."""
    ended = next((i for i, t in enumerate(tokens) if t in stop), None)
    body = tokens if ended is None else tokens[:ended]
    text = tokenizer.decode(body, skip_special_tokens=True).rstrip("\ufffd")
    return Generation(text.strip(), len(body), ended is not None)


@torch.no_grad()  # not inference_mode: the KV cache made here is written by the generation thread
def generate(model, tokenizer, conversations: list[list[dict[str, str]]], max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0, concurrency: int = 8,
             on_answer: Callable[[int, Generation], None] | None = None,
             tools: list[list[dict] | None] | None = None) -> list[Generation]:
    """Answer the last user turn of each conversation (offered tools[i], when given), in order;
    on_answer(index, answer) as each one finishes. Up to `concurrency` conversations decode together,
    and one that ends hands its place to the next at once: a static batch would go on decoding until
    its longest answer ends. Conversations that all fit in one batch are one static batch: with none
    waiting for a place, continuous batching has nothing to hand on, and its packed attention costs more
    a step (a Benchmark's few questions of a temperature: benchmarks/generation_batching.py)."""
    if not conversations:
        return []
    prompts = [prompt_ids(tokenizer, c, tools[i] if tools else None) for i, c in enumerate(conversations)]
    config, stop = generation_config(tokenizer, max_new_tokens, temperature), stop_token_ids(tokenizer)
    decode = _one_batch if len(prompts) <= concurrency else partial(continuous, concurrency=concurrency)
    answers: list[Generation | None] = [None] * len(prompts)
    for i, tokens in decode(model, prompts, config, seed):
        answers[i] = to_generation(tokenizer, tokens, stop)
        if on_answer:
            on_answer(i, answers[i])
    return answers


def generation_config(tokenizer, max_new_tokens: int, temperature: float) -> GenerationConfig:
    """Greedy at temperature 0, else sampled from the whole distribution (no top-k, no top-p); ends on
    end-of-turn."""
    stop = stop_token_ids(tokenizer)
    sampling = ({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0
                else {"do_sample": False, "top_k": None, "top_p": None})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad, **sampling)


def continuous(model, prompts: list[list[int]], config: GenerationConfig, seed: int,
               concurrency: int) -> Iterator[tuple[int, list[int]]]:
    """(index, new tokens) of each prompt as it finishes, by transformers' continuous batching."""
    longest = max(len(p) for p in prompts) + config.max_new_tokens
    # A cache that holds every running conversation whole, sized from the work rather than from free
    # memory (the library's default takes most of it: a whole node's RAM on CPU, the share of a judge
    # loaded beside it on a GPU), so nothing is ever evicted and recomputed.
    batching = ContinuousBatchingConfig(max_requests_per_batch=concurrency, seed=seed,
                                        max_batch_tokens=max(MAX_BATCH_TOKENS, concurrency))
    batching.num_blocks = concurrency * math.ceil(longest / batching.page_size)
    with model.continuous_batching_context_manager(generation_config=config, continuous_batching_config=batching,
                                                   block=True, timeout=60) as manager:
        index = {rid: i for i, rid in enumerate(manager.add_requests(prompts, max_new_tokens=config.max_new_tokens))}
        waiting = len(prompts)
        while waiting:
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError(f"generation stopped with {waiting} answers to go: "
                                       f"{manager.background_thread_status.fatal_error}")
                continue
            if not result.is_finished():
                continue
            if result.error is not None:
                raise RuntimeError(f"generation failed: {result.error}")
            waiting -= 1
            yield index[result.request_id], result.generated_tokens


def _one_batch(model, prompts: list[list[int]], config: GenerationConfig, seed: int) -> Iterator[tuple[int, list[int]]]:
    """(index, new tokens) of each prompt, decoded together, with the seed's draws, without moving the
    process's own random state (a FineTune's, a test's)."""
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield from enumerate(decode_together(model, prompts, config))


def decode_together(model, prompts: list[list[int]], config: GenerationConfig, device=None) -> list[list[int]]:
    """Each prompt's new tokens, the prompts left-padded into one batch of transformers' generate, as
    `config` says and nothing else: generate fills what a config leaves unset from the model's
    generation_config.json (an instruct model's repetition penalty, top-k, top-p), here from neutral
    defaults, as continuous batching and vLLM (--generation-config vllm) answer. `model` may be a peft
    model: the generation config read is its base model's. The batch goes to `device`, else the model's."""
    width, device = max(len(p) for p in prompts), device or model.device
    ids = torch.tensor([[config.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    own, inner.generation_config = inner.generation_config, GenerationConfig()
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    finally:
        inner.generation_config = own
    return out[:, width:].tolist()
