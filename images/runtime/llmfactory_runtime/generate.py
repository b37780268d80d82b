"""Batched chat generation with a local transformers model (teacher answers, benchmark answers);
vllm_server.VllmServer.generate is the same with vLLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Generation:
    text: str
    tokens: int
    finished: bool  # ended on end-of-turn rather than at max_new_tokens


def stop_token_ids(tokenizer) -> list[int]:
    """End of turn: the tokenizer's end-of-sequence and ChatML's <|im_end|>, where they exist."""
    return sorted(t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
                  if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id)


@torch.inference_mode()
def generate(model, tokenizer, conversations: list[list[dict[str, str]]], max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0) -> list[Generation]:
    """Answer the last user turn of each conversation. Left padding keeps every prompt's end
    aligned, so one batch decodes all of them together."""
    tokenizer.padding_side = "left"
    enc = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, return_tensors="pt",
                                        padding=True, return_dict=True).to(model.device)
    stop = stop_token_ids(tokenizer)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    if temperature > 0:
        torch.manual_seed(seed)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=stop,
                         pad_token_id=tokenizer.pad_token_id, top_p=None, top_k=None, **sampling)
    results = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        ended = next((i for i, t in enumerate(row) if t in stop), None)
        body = row if ended is None else row[:ended]
        results.append(Generation(tokenizer.decode(body, skip_special_tokens=True).strip(),
                                  len(body), ended is not None))
    return results
