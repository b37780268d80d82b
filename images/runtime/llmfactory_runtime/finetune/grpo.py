"""Objective grpo: Group Relative Policy Optimization (Shao et al., 2024) as TRL's GRPOTrainer runs
it (grpo.iterations optimizer steps per batch of samples, DAPO's token-level loss, the KL term only
with beta).

Each prompt gets `generations` sampled answers; each answer is scored by the grader; its advantage
is its reward minus its group's mean (divided by the group's or the step's standard deviation, as
scaleRewards says).
Each answer token's loss is PPO's clipped surrogate  -min(ratio x advantage, clip(ratio, 1 - epsilon,
1 + epsilonHigh) x advantage) + beta x KL, summed over the step's answer tokens and divided by their
number (DAPO; grpo.lossType grpo and dr_grpo normalize as their papers do, see normalizer). On a step's first optimizer update the ratio is exp(logp - logp.detach()) (value 1,
gradient that of logp, as TRL writes it: the clip cannot bind); with grpo.iterations above 1 the
later updates divide by that first update's log-probabilities, the policy that sampled the answers.
The KL to the reference (the base: the adapter switched off) is the k3 estimator
exp(ref - logp) - (ref - logp) - 1. With grpo.topEntropyQuantile the surrogate counts on the
answer tokens of highest entropy only (high_entropy). With grpo.dynamicSampling (DAPO's) a step's
groups whose answers all scored alike are replaced by spare prompts' groups before it trains
(dynamic_sampling).
Sampling draws from torch's global generator, which every checkpoint saves: a resumed run samples
what the uninterrupted run sampled.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from transformers import GenerationConfig

from ..batching import collate_sequences, evaluating, token_logps
from ..chat import IGNORE
from ..generate import decode_together, prompt_ids, stop_token_ids, to_generation
from ..grader import api_usage, graded_rows, rewards_by_part
from ..task import InvalidTask
from ..usage import Usage


def encode_prompts(tokenizer, rows: list[dict], max_len: int, grader: dict, where: str,
                   tally: Counter | None = None) -> list[dict[str, Any]]:
    """{prompt: token ids, and the grader's view of the row (grader.graded_of)} of each row whose prompt
    leaves room for an answer within max_len; `tally` counts those left out ("unlearned")."""
    tally = Counter() if tally is None else tally
    prompts = []
    for graded in graded_rows(rows, grader, where):
        ids = prompt_ids(tokenizer, graded["messages"], graded["tools"])
        if len(ids) < max_len:
            prompts.append({"prompt": ids, **graded})
        else:
            tally["unlearned"] += 1
    return prompts


def pass_rates(prompts: list[dict[str, Any]], where: str) -> list[float]:
    """Each prompt's pass_rate (0-1: how often the student solved it, as a DatasetBuild's difficulty
    writes it), which grpo.promptOrder easyFirst orders the prompts by; a row without one is an invalid task."""
    rates = []
    for prompt in prompts:
        rate = prompt["item"].get("pass_rate")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise InvalidTask(f"spec.grpo.promptOrder: easyFirst orders the prompts by their pass_rate (0-1), but "
                              f"{where} has a row with {rate!r} for prompt {prompt['question'][:80]!r}: build the "
                              "prompts with a DatasetBuild's spec.difficulty, which writes every row's, or leave "
                              "promptOrder unset (shuffled)")
        rates.append(float(rate))
    return rates


@torch.no_grad()
def sample(model, tokenizer, prompts: list[list[int]], n: int, temperature: float, max_new_tokens: int,
           max_len: int, device, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> list[list[int]]:
    """n answers to each prompt (greedy when temperature is 0; top_p, top_k and min_p narrow what is
    drawn from, as grpo.topP, topK and minP say), in order: prompt 0's n, prompt 1's, ...
    Each answer's tokens run up to and with its first end-of-turn token (learning to stop is learned
    too), cut so that prompt and answer fit max_len. Dropout is off while sampling."""
    stop = stop_token_ids(tokenizer)
    # The spec's settings alone (decode_together takes nothing from the model's generation config).
    sampling = ({"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                 "min_p": min_p or None} if temperature > 0 else {"do_sample": False})
    config = GenerationConfig(num_return_sequences=n, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
                              max_new_tokens=max(1, min(max_new_tokens, max_len - min(len(p) for p in prompts))),
                              **sampling)
    with evaluating(model):
        out = decode_together(model, prompts, config, device)
    return [tokens[:answer_length(tokens, stop, max_len - len(prompts[k // n]))] for k, tokens in enumerate(out)]


def answer_length(tokens: list[int], stop: list[int], room: int) -> int:
    """How many of the generated tokens make the answer: up to and with its first end-of-turn token,
    at most room (what is left of maxSeqLength after its prompt)."""
    ended = next((i for i, t in enumerate(tokens) if t in stop), None)
    return min(len(tokens) if ended is None else ended + 1, room)


def score(tokenizer, answers: list[list[int]], prompts: list[dict[str, Any]], grader: dict,
          cache_uri: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The grader's reward of each answer (its text without the end-of-turn token) to its prompt (as
    encode_prompts gives them), and a sum grader's parts' rewards by name (else none)."""
    stop = stop_token_ids(tokenizer)
    texts = [to_generation(tokenizer, a, stop).text for a in answers]
    total, parts = rewards_by_part(grader, texts, prompts, cache_uri, "spec.grpo.grader")
    return torch.tensor(total), {name: torch.tensor(got) for name, got in parts.items()}


def overlong_penalties(answers: list[list[int]], max_new_tokens: int, spec: dict[str, Any]) -> torch.Tensor:
    """DAPO's soft overlong punishment of each answer (its tokens with its end-of-turn token, as TRL
    counts them): 0 up to max_new_tokens - bufferTokens, then falling linearly to -penalty at
    max_new_tokens, where an answer that never ended was cut."""
    lengths = torch.tensor([float(len(a)) for a in answers])
    start, buffer = max_new_tokens - spec["bufferTokens"], spec["bufferTokens"]
    return -spec.get("penalty", 1.0) * ((lengths - start) / buffer).clamp(0, 1)


def uniform_groups(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Whether each group of n rewards (in order) is all one value: a group that says nothing."""
    groups = rewards.view(-1, n)
    return (groups == groups[:, :1]).all(1)


def advantages(rewards: torch.Tensor, n: int, scale: str, batch_std: float | None = None) -> torch.Tensor:
    """Each reward minus its group's mean (groups of n in order), divided as grpo.scaleRewards says
    (plus 1e-4, as TRL's): by the group's standard deviation (unbiased) with group, by batch_std
    (the step's, all processes: rewards_std) with batch, not at all with none; exactly 0 in a uniform
    group, not its mean's rounding error (eight float32 rewards of 0.1: 7e-9, divided by their spread
    ~1e-4)."""
    groups = rewards.view(-1, n)
    centred = groups - groups.mean(1, keepdim=True)
    if scale == "group":
        centred = centred / (groups.std(1, keepdim=True) + 1e-4)
    elif scale == "batch":
        centred = centred / (batch_std + 1e-4)
    return centred.masked_fill(uniform_groups(rewards, n)[:, None], 0.0).flatten()


def rewards_std(rewards: list[torch.Tensor], world_sum_tensor: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """The unbiased standard deviation of every reward in `rewards` on all processes (grpo.scaleRewards
    batch's divisor, TRL's rewards.std() over its gathered batch), from one reduction of their count,
    sum and sum of squares (float64: a sum of squares of large rewards keeps its small spread)."""
    flat = torch.cat([r.double().flatten() for r in rewards])
    count, total, squares = world_sum_tensor(torch.stack([torch.tensor(float(len(flat)), dtype=torch.float64),
                                                          flat.sum(), (flat * flat).sum()])).tolist()
    return max((squares - total * total / count) / max(count - 1, 1), 0.0) ** 0.5


def sequences(prompts: list[list[int]], answers: list[list[int]], n: int,
              masked: list[bool] | None = None) -> list[dict[str, list[int]]]:
    """Training examples: each answer after its prompt (n answers per prompt), labels on the answer
    only, none on a masked answer's (it is in the batch, out of the loss)."""
    return [{"input_ids": prompts[k // n] + a,
             "labels": [IGNORE] * len(prompts[k // n]) + ([IGNORE] * len(a) if masked and masked[k] else a)}
            for k, a in enumerate(answers)]


def grader_usage(grader: dict[str, Any], world_sum_tensor: Callable[[torch.Tensor], torch.Tensor]) -> dict | None:
    """What the run's processes asked of the grader's API endpoints (grader.api_usage), summed, with
    the cost at each one's price (a collective); None when it asks none. A resumed run's main process
    counts on from its checkpoint's (resume_grader_usage)."""
    usages = api_usage(grader, "spec.grpo.grader")
    if not usages:
        return None
    names = sorted(usages)
    counts = world_sum_tensor(torch.tensor([[usages[n][0].requests, usages[n][0].cached, usages[n][0].prompt_tokens,
                                             usages[n][0].completion_tokens] for n in names], dtype=torch.float64))
    return {n: Usage(*map(int, row)).report(usages[n][1]) for n, row in zip(names, counts.tolist())}


def resume_grader_usage(grader: dict[str, Any], saved: dict[str, dict[str, Any]]) -> None:
    """This process counts on from a checkpoint's grader usage (grader_usage's, of all processes: the
    main process alone resumes it)."""
    for name, (usage, _) in api_usage(grader, "spec.grpo.grader").items():
        if name in saved:
            usage.requests += saved[name]["requests"]
            usage.cached += saved[name]["cached"]
            usage.billed(saved[name]["promptTokens"], saved[name]["completionTokens"])


def sampling(grpo: dict, max_len: int) -> dict[str, Any]:
    """The keyword arguments of sample (and of vllm_sampler.VllmSampler.sample) that grpo sets."""
    return {"temperature": grpo["temperature"], "max_new_tokens": grpo["maxNewTokens"], "max_len": max_len,
            "top_p": grpo.get("topP", 1.0), "top_k": grpo.get("topK", 0), "min_p": grpo.get("minP", 0.0)}


@dataclass(frozen=True)
class Groups:
    """Prompts (as encode_prompts gives them), each with its group of sampled answers (generations
    per prompt, in order), scored: a micro-batch before it becomes a batch (sampled_batch)."""

    prompts: list[dict[str, Any]]
    answers: list[list[int]]
    rewards: torch.Tensor  # the grader's, plus grpo.overlongPenalty's
    parts: dict[str, torch.Tensor]  # a sum grader's parts' rewards by name, and overlongPenalty
    truncated: list[bool]  # never ended: cut at maxNewTokens or maxSeqLength
    sampler_logps: list[list[float]] | None = None  # vLLM's log-probability of each answer token

    @property
    def generations(self) -> int:
        return len(self.answers) // len(self.prompts)

    def uniform(self) -> list[int]:
        """The groups whose answers all scored alike."""
        return uniform_groups(self.rewards, self.generations).nonzero().flatten().tolist()

    def with_group(self, g: int, other: Groups, h: int) -> Groups:
        """These groups with group g replaced by other's group h."""
        n = self.generations

        def spliced(mine, theirs):
            parts = (mine[:g * n], theirs[h * n:(h + 1) * n], mine[(g + 1) * n:])
            return torch.cat(parts) if isinstance(mine, torch.Tensor) else [x for part in parts for x in part]

        return Groups(self.prompts[:g] + [other.prompts[h]] + self.prompts[g + 1:], spliced(self.answers, other.answers),
                      spliced(self.rewards, other.rewards),
                      {name: spliced(got, other.parts[name]) for name, got in self.parts.items()},
                      spliced(self.truncated, other.truncated),
                      None if self.sampler_logps is None else spliced(self.sampler_logps, other.sampler_logps))


def draw(model, tokenizer, chunks: list[list[dict[str, Any]]], grpo: dict, max_len: int, device, cache_uri: str,
         sampler=None) -> list[Groups]:
    """Each chunk's prompts with grpo.generations answers sampled to each (by the model, chunk by chunk,
    or by vLLM's `sampler`, every chunk at once, with its log-probabilities), scored by the grader, with
    grpo.overlongPenalty added to each reward (and to the parts, as overlongPenalty)."""
    n, settings = grpo["generations"], sampling(grpo, max_len)
    prompts = [[e["prompt"] for e in chunk] for chunk in chunks]
    drawn = (sampler.sample_chunks(prompts, n, **settings) if sampler else
             [(sample(model, tokenizer, p, n, device=device, **settings), None) for p in prompts])
    stop = set(stop_token_ids(tokenizer))
    out = []
    for chunk, (answers, logps) in zip(chunks, drawn):
        got, parts = score(tokenizer, answers, [e for e in chunk for _ in range(n)], grpo["grader"], cache_uri)
        if grpo.get("overlongPenalty"):
            parts["overlongPenalty"] = overlong_penalties(answers, grpo["maxNewTokens"], grpo["overlongPenalty"])
            got = got + parts["overlongPenalty"]
        out.append(Groups(list(chunk), answers, got, parts, [not a or a[-1] not in stop for a in answers], logps))
    return out


def dynamic_sampling(groups: list[Groups], reserve: list[dict[str, Any]],
                     draw_more: Callable[[list[dict[str, Any]]], list[Groups]]) -> tuple[list[Groups], list[Groups]]:
    """DAPO's dynamic sampling: each uniform group of the micro-batches' `groups` replaced by a fresh
    prompt's, the fresh prompts taken in order from `reserve` and sampled together (draw_more), round
    after round until no group is uniform or the reserve is spent; a group still uniform stays. Returns
    the micro-batches' groups then, and every group the later rounds drew."""
    later: list[Groups] = []
    groups = list(groups)
    while reserve:
        slots = [(c, g) for c, chunk in enumerate(groups) for g in chunk.uniform()]
        if not slots:
            break
        fresh, reserve = reserve[:len(slots)], reserve[len(slots):]
        drawn = draw_more(fresh)
        later += drawn
        for (c, g), (new, h) in zip(slots, [(new, h) for new in drawn for h in range(len(new.prompts))]):
            groups[c] = groups[c].with_group(g, new, h)
    return groups, later


def sampled_batch(model, tokenizer, groups: Groups, grpo: dict, device,
                  batch_std: float | None = None) -> dict[str, Any]:
    """A micro-batch of the step from its sampled groups: a batch of one answer (after its prompt) per
    row, only those that can move the loss (moving_rows), with each row's advantage (batch_std: the
    step's, for grpo.scaleRewards batch), and with
    grpo.beta the rows' reference token log-probabilities (the model with its adapter switched off);
    with vLLM's log-probabilities (grpo.engine vllm), those of the rows' tokens as samplerLogps.
    With grpo.maskTruncated an answer that never ended has no labels: its reward still counts in its
    group's mean (the others' advantages), its tokens not in the loss."""
    n, answers = groups.generations, groups.answers
    prompts = [e["prompt"] for e in groups.prompts]
    masked = groups.truncated if grpo["maskTruncated"] else [False] * len(answers)
    seqs = sequences(prompts, answers, n, masked)
    advantage = advantages(groups.rewards, n, grpo["scaleRewards"], batch_std)
    rows = moving_rows(advantage, masked, bool(grpo["beta"]))
    batch = collate_sequences(seqs, [[k] for k in rows], tokenizer.pad_token_id, packed=True)
    reference = None
    if grpo["beta"]:
        with torch.no_grad(), model.disable_adapter(), evaluating(model):  # as in sampling: no dropout drawn
            reference = token_logps(model, {k: v.to(device) for k, v in batch.items()}).cpu()
    sampler_logps = None
    if groups.sampler_logps is not None:  # as token_logps lays them out: a row's answer tokens after its prompt
        sampler_logps = torch.zeros(len(rows), batch["input_ids"].shape[1] - 1)
        for r, k in enumerate(rows):
            start = len(prompts[k // n]) - 1
            sampler_logps[r, start:start + len(answers[k])] = torch.tensor(groups.sampler_logps[k])
    # Answer tokens in the loss, counted before rows are left out: the step's loss is normalized by all.
    labelled = sum(len(a) for a, out in zip(answers, masked) if not out)
    return {"batch": batch, "advantages": advantage[rows], "reference": reference, "samplerLogps": sampler_logps,
            "tokens": sum(len(s["input_ids"]) for s in seqs), "labelled": labelled}


def moving_rows(advantage: torch.Tensor, masked: list[bool], kl: bool) -> list[int]:
    """The answers (rows) that can move the loss: labelled ones with an advantage (a group whose
    rewards are all equal has none: its answers' surrogate is 0 with a 0 gradient), or with the KL
    term every labelled one. The others are left out of the forward and backward passes, which
    changes neither (TRL computes them). At least one row stays, so that every process runs its
    passes (DDP and DeepSpeed reduce gradients in them)."""
    rows = [k for k, a in enumerate(advantage.tolist()) if not masked[k] and (kl or a != 0)]
    return rows or [0]


class Terms(NamedTuple):
    """Sums over a batch's answer tokens (loss_terms)."""

    loss: torch.Tensor  # the summed loss, with its gradient
    kl: float  # KL to the reference (0 without grpo.beta)
    clipped: int  # tokens whose ratio was clipped
    sampler_difference: float  # |logp - vLLM's| (TRL's sampling_logp_difference; 0 without vLLM's)
    sampler_masked: int  # tokens the importance sampling correction weighed 0 (its *_mask modes)
    off_policy_masked: int  # answers grpo.offPolicyMaskThreshold left out of the policy term


def loss_terms(logps: torch.Tensor, labels: torch.Tensor, advantage: torch.Tensor, reference: torch.Tensor | None,
               grpo: dict, old: torch.Tensor | None = None, sampler_logps: torch.Tensor | None = None,
               keep: torch.Tensor | None = None) -> Terms:
    """The loss and its figures over the answer tokens of a batch of one answer per row (Terms).
    logps: the model's token log-probabilities (rows, width - 1), labels the batch's, advantage one per
    row; old: the sampling policy's log-probabilities (the first update's), None on the first update,
    where the ratio is exp(logp - logp.detach()); with grpo.importanceSamplingLevel sequence (GSPO) each
    token's ratio is its answer's, exp of the mean of its tokens' log-ratios. sampler_logps: vLLM's
    log-probabilities of the tokens it sampled (grpo.engine vllm); with
    grpo.vllmImportanceSamplingCorrection each token's surrogate is weighed by its importance weight
    (sampler_weights), as TRL's. keep: the answer tokens whose surrogate counts (high_entropy's, for
    grpo.topEntropyQuantile); the others keep their KL term, and the normalizer counts them still.
    With grpo.offPolicyMaskThreshold an answer with a negative advantage whose mean log-ratio of the
    sampling policy (vLLM's, else old) to the current one is above it has no surrogate either
    (DeepSeek-V3.2's off-policy sequence masking, as TRL's)."""
    answer = labels[:, 1:] != IGNORE
    policy = logps.detach() if old is None else old.to(logps)
    log_ratio = logps - policy
    if grpo["importanceSamplingLevel"] == "sequence":  # GSPO: each token the answer's mean log-ratio
        log_ratio = ((log_ratio * answer).sum(1, keepdim=True) / answer.sum(1, keepdim=True).clamp(min=1)
                     ).expand_as(log_ratio)
    ratio = torch.exp(log_ratio)
    low, high = grpo["epsilon"], grpo.get("epsilonHigh") or grpo["epsilon"]
    a = advantage.to(logps)[:, None]
    # PPO's pessimistic surrogate: past the clip range on the side the advantage pushes, no gradient.
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - low, 1 + high) * a)
    clipped = ((ratio < 1 - low) & (a < 0)) | ((ratio > 1 + high) & (a > 0))
    if keep is not None:
        per_token = per_token * keep
    off_policy = 0
    if grpo.get("offPolicyMaskThreshold") is not None:
        sampled_by = policy if sampler_logps is None else sampler_logps.to(logps)
        drift = ((sampled_by - logps.detach()) * answer).sum(1) / answer.sum(1).clamp(min=1)
        off = (advantage.to(logps) < 0) & (drift > grpo["offPolicyMaskThreshold"])
        per_token = per_token * ~off[:, None]
        off_policy = int(off.sum())
    difference, masked = 0.0, 0
    if sampler_logps is not None:
        sampler_logps = sampler_logps.to(logps)
        difference = float((policy - sampler_logps).abs()[answer].sum())
        if grpo["vllmImportanceSamplingCorrection"]:
            weights = sampler_weights(policy, sampler_logps, answer, grpo)
            per_token = per_token * weights
            masked = int((weights.expand_as(answer) == 0)[answer].sum())
    kl = torch.zeros_like(logps)
    if reference is not None:
        delta = reference.to(logps) - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + grpo["beta"] * kl
    if grpo["lossType"] == "grpo":  # each answer's mean over its own tokens (normalizer: the number of answers)
        per_token = per_token / answer.sum(1, keepdim=True).clamp(min=1)
    return Terms(per_token[answer].sum(), float(kl.detach()[answer].sum()), int(clipped[answer].sum()), difference,
                 masked, off_policy)


def sampler_weights(policy: torch.Tensor, sampler_logps: torch.Tensor, answer: torch.Tensor, grpo: dict) -> torch.Tensor:
    """Each answer token's importance weight (rows, width - 1; rows, 1 for the sequence modes): the
    sampling policy's probability over vLLM's, exp(policy - sampler_logps), of the token
    (grpo.vllmImportanceSamplingMode token_*) or of the whole answer (sequence_*: the product over its
    tokens), above grpo.vllmImportanceSamplingCap cut to it (*_truncate) or to 0 (*_mask)."""
    mode, cap = grpo["vllmImportanceSamplingMode"], grpo["vllmImportanceSamplingCap"]
    difference = (policy - sampler_logps) * answer
    if mode.startswith("sequence"):
        difference = difference.sum(1, keepdim=True)
    ratio = torch.exp(difference)
    return ratio.clamp(max=cap) if mode.endswith("truncate") else ratio.masked_fill(ratio > cap, 0.0)


def high_entropy(entropies: torch.Tensor, labels: torch.Tensor, quantile: float,
                 gather: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The answer tokens (rows, width - 1) whose entropy is at least the (1 - quantile) quantile of the
    entropies of the micro-batch's answer tokens on every process (gather concatenates theirs), as
    TRL's top_entropy_quantile: "Beyond the 80/20 rule" (Wang et al., 2025) found that the few
    high-entropy tokens, where an answer forks, carry what reinforcement learning teaches (0.2 its best)."""
    answer = labels[:, 1:] != IGNORE
    everyone = gather(entropies[answer].float()).sort().values
    if not len(everyone):
        return answer
    # torch.quantile's linear interpolation, which refuses more than 2^24 values
    at = (1 - quantile) * (len(everyone) - 1)
    below = int(at)
    threshold = everyone[below] + (at - below) * (everyone[min(below + 1, len(everyone) - 1)] - everyone[below])
    return answer & (entropies >= threshold.to(entropies))


def normalizer(grpo: dict, answer_tokens: int, answers: int) -> float:
    """What a step's summed loss (loss_terms, over all processes) is divided by, by grpo.lossType:
    dapo its answer tokens; grpo its answers (each answer's loss already a mean over its tokens);
    dr_grpo its answers x maxNewTokens, a constant, so no answer's tokens weigh by its length."""
    return {"dapo": answer_tokens, "grpo": answers, "dr_grpo": answers * grpo["maxNewTokens"]}[grpo["lossType"]]


def greedy_rewards(model, tokenizer, prompts: list[dict[str, Any]], batch_size: int, grpo: dict, max_len: int,
                   device, cache_uri: str) -> tuple[float, int]:
    """(summed reward, answer tokens) of the model's greedy answers to the prompts: its evaluation."""
    total, tokens = 0.0, 0
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        answers = sample(model, tokenizer, [e["prompt"] for e in chunk], 1, 0.0, grpo["maxNewTokens"], max_len, device)
        total += float(score(tokenizer, answers, chunk, grpo["grader"], cache_uri)[0].sum())
        tokens += sum(map(len, answers))
    return total, tokens
