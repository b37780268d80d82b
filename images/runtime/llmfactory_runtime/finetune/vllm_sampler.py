"""GRPO's answers sampled by vLLM (spec.grpo.engine vllm), as TRL's use_vllm.

Each training process has a `vllm serve` of its own (on its GPU, or a CPU build), started before the
model loads so that it gets its share of an empty GPU. It serves the base model; before each step's
sampling the adapter, as the optimizer left it, is saved and loaded under a new name (and path:
vLLM's prefix cache keys on both, so no prompt's cached keys and values from older weights are
reused), the old one unloaded. A full fine-tune's whole weights are saved instead and reloaded in
place (vLLM's reload_weights), its prefix cache dropped. Prompts go as token ids and answers come
back as token ids, so nothing is tokenized twice, with vLLM's log-probability of each answer token
(its raw one, before temperature, as the loss's own are taken): where the engines' numbers differ,
the loss weighs each token by their ratio (grpo.vllmImportanceSamplingCorrection). Each prompt's
request carries a seed drawn from torch's generator (vLLM gives the n answers seed, seed + 1, ...):
a resumed run, which restores the generator, sends the seeds the uninterrupted run sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from ..generate import stop_token_ids
from ..models import save_pretrained_here
from ..task import InvalidTask
from ..vllm_server import SERVED_NAME, VllmServer, adapter_problem, base_of, choose_engine
from .estimate import Estimate, gpu_memory_utilization
from .grpo import answer_length

log = logging.getLogger(__name__)


def cuda_device(local_rank: int) -> str:
    """The GPU a process of local_rank trains on, as the vLLM child's CUDA_VISIBLE_DEVICES names it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[local_rank].strip() if visible else str(local_rank)


def start(base: dict[str, Any], tokenizer, added_tokens: list[int], spec: dict[str, Any], est: Estimate,
          gpu_gib: tuple[float, float] | None, local_rank: int, dtype: torch.dtype) -> "VllmSampler":
    """The sampler of a FineTune with grpo.engine vllm, for one process; an invalid task where vLLM
    cannot serve what it trains, said before the model loads."""
    if added_tokens:
        markers = ", ".join(tokenizer.convert_ids_to_tokens(added_tokens))
        raise InvalidTask(f"spec.grpo.engine is vllm, but the chat template's markers ({markers}) are new to the base "
                          "model's vocabulary (a base model): training adds their rows, which the base vLLM serves "
                          "lacks (and its LoRA does not apply); use a model whose vocabulary has them (an instruct "
                          "model), a chatTemplate jinja of markers it has, or engine transformers")
    choose_engine("vllm", base_of(base), "spec.grpo.engine")
    hp = spec["hyperparameters"]
    lora_rank = None if spec["method"] == "full" else spec["lora"]["r"]
    return VllmSampler(base, tokenizer, lora_rank, hp["maxSeqLength"], hp["seed"],
                       str(dtype).removeprefix("torch."), gpu_memory_utilization(est, gpu_gib[0]) if gpu_gib else None,
                       cuda_device(local_rank) if gpu_gib else None)


class VllmSampler:
    """A `vllm serve` of the base model that samples as the training model is now (sync): with its
    adapter of lora_rank, or (lora_rank None) with a full fine-tune's weights."""

    def __init__(self, base: dict[str, Any], tokenizer, lora_rank: int | None, max_len: int, seed: int, dtype: str,
                 gpu_memory_utilization: float | None = None, device: str | None = None):
        self.server = VllmServer(base_of(base), seed, gpu_memory_utilization, tokenizer=tokenizer, dtype=dtype,
                                 lora_rank=lora_rank, max_model_len=max_len, cuda_device=device,
                                 reloads_weights=lora_rank is None)
        self.stop = stop_token_ids(tokenizer)
        self.policy: tuple[str, Path] | None = None  # what requests name (the adapter, or the model) and its folder

    def __enter__(self) -> "VllmSampler":
        self.server.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.server.__exit__(*exc)

    def sync(self, model, step: int) -> None:
        """Serve the policy as `model` has it now, before sampling step `step`: a PeftModel's adapter
        (loaded beside the one before, which is then unloaded), or a full fine-tune's weights."""
        began = time.perf_counter()
        folder = Path(self.server.workdir, f"policy-{step}")
        save_pretrained_here(model, folder)  # each process serves its own vLLM from its own folder
        if self.server.reloads_weights:
            self.server.reload_weights(folder)
            name = SERVED_NAME
        else:
            if self.policy is None:  # model_setup's adapter, as vLLM will see it: what it cannot serve is said once
                problem = adapter_problem(model.peft_config["default"].to_dict())
                if problem:
                    raise InvalidTask(f"spec.grpo.engine is vllm, but {problem.split(':')[0]}: use engine transformers")
            name = f"policy-{step}"
            self.server.load_adapter(name, folder)
            if self.policy is not None:
                self.server.unload_adapter(self.policy[0])
        if self.policy is not None:
            shutil.rmtree(self.policy[1], ignore_errors=True)
        self.policy = (name, folder)
        log.debug("policy of step %d loaded into vLLM in %.2f s", step, time.perf_counter() - began)

    def sample(self, prompts: list[list[int]], n: int, temperature: float, max_new_tokens: int, max_len: int,
               top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> tuple[list[list[int]], list[list[float]]]:
        """What grpo.sample returns for these prompts, sampled by vLLM with the policy last synced, and
        vLLM's log-probability of each answer token."""
        assert self.policy is not None, "sync before sampling"
        seeds = torch.randint(0, 2 ** 31 - 1, (len(prompts),)).tolist()
        params = {"model": self.policy[0], "n": n, "temperature": temperature, "top_p": top_p,
                  "stop_token_ids": self.stop, "return_token_ids": True, "skip_special_tokens": False, "logprobs": 0,
                  "repetition_penalty": 1.0} | ({"top_k": top_k} if top_k else {}) | ({"min_p": min_p} if min_p else {})

        async def ask_all() -> list[list[tuple[list[int], list[float]]]]:
            limits = httpx.Limits(max_connections=len(prompts))
            async with httpx.AsyncClient(base_url=self.server.url, timeout=3600, limits=limits) as client:
                async def ask(prompt: list[int], seed: int) -> list[tuple[list[int], list[float]]]:
                    room = max_len - len(prompt)
                    response = await client.post("/v1/completions", json=params | {
                        "prompt": prompt, "seed": seed, "max_tokens": max(1, min(max_new_tokens, room))})
                    if response.status_code != 200:
                        raise RuntimeError(f"vLLM refused a sampling request: {response.text}\n"
                                           + "\n".join(self.server.log_tail))
                    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
                    return [self._answer(c["token_ids"], c["logprobs"]["token_logprobs"], room) for c in choices]

                return await asyncio.gather(*(ask(p, s) for p, s in zip(prompts, seeds)))

        drawn = [answer for group in asyncio.run(ask_all()) for answer in group]
        return [tokens for tokens, _ in drawn], [logps for _, logps in drawn]

    def sample_chunks(self, chunks: list[list[list[int]]], n: int,
                      **settings) -> list[tuple[list[list[int]], list[list[float]]]]:
        """sample's answers to each chunk of prompts (a step's micro-batches), all sampled at once."""
        answers, logps = self.sample([p for chunk in chunks for p in chunk], n, **settings)
        bounds = [0]
        for chunk in chunks:
            bounds.append(bounds[-1] + n * len(chunk))
        return [(answers[a:b], logps[a:b]) for a, b in zip(bounds, bounds[1:])]

    def _answer(self, tokens: list[int], logps: list[float], room: int) -> tuple[list[int], list[float]]:
        """An answer as grpo.sample cuts it, with its tokens' log-probabilities."""
        keep = answer_length(tokens, self.stop, room)
        return tokens[:keep], [float(x) for x in logps[:keep]]
