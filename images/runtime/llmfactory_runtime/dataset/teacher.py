"""The teacher answers every user turn of every conversation, turn by turn (turn 2 sees the
teacher's own answer to turn 1). Answers come from the cache when they were ever paid for;
a conversation whose answer is dropped by the filters is not asked its later turns. A build
without a teacher keeps its sources' own answers the same way (keep_given).

Two backends, one contract: an OpenAI-compatible API (asynchronous, at the provider's rate
limit) or a local model, continuously batched with transformers or served by vLLM (then asked
like an API).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable

from .. import usage as usage_module
from ..answer_cache import AnswerCache
from ..chat import REASONING_KEY, reasoning_apart
from ..data import without_reasoning
from ..openai_client import (REJECTED_KEY_ENV, TEACHER_KEY_ENV, ChatClient, Completion, EndpointError, api_key,
                             endpoint_identity)
from ..progress import Progress
from .answer_judge import AnswerJudge
from .filters import AnswerFilter, token_counter
from .sources import Drops

# A request the endpoint refuses for this prompt only (content policy, too long): that row is
# dropped. A bad key or unknown model fails the build in the client (an invalid task).
PER_ROW_STATUSES = {400, 413, 422}
# What a prompt carries past its conversation into its row (sources.collect): a source pair's rejected
# answer and scores, a source's fixed split.
CARRIED = ("rejected", "scores", "split")


@dataclass
class Usage(usage_module.Usage):
    """The teacher's (or the rejected answers' answerer's), counted by the answers it gave, whatever
    its backend."""

    used_tokens: int = 0  # completion tokens of every answer this build used, cached ones included

    def add(self, answer: dict[str, Any]) -> None:
        self.paid(answer.get("promptTokens", 0), answer["tokens"])


def cache_identity(teacher: dict[str, Any], model_input: dict[str, Any] | None) -> dict[str, Any]:
    """What, besides the conversation, decides an answer."""
    params = {"temperature": teacher.get("temperature", 0.0), "maxNewTokens": teacher.get("maxNewTokens", 256)}
    if "openai" in teacher:
        return {"openai": endpoint_identity(teacher["openai"]), **params}
    return {"model": model_input, "seed": teacher.get("seed", 0), **params}


# What a backend is asked: (cache key, conversation, sample), sample counting the answers to the
# same conversation (preferences.rejected.samples).
Todo = list[tuple[str, list[dict], int]]


def _openai_backend(teacher: dict[str, Any], cache: AnswerCache, usage: Usage, on_answer: Callable[[], None],
                    transport=None, endpoint: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                    key_env: str = TEACHER_KEY_ENV, field: str = "spec.teacher.openai",
                    tokens: Callable[[Completion], int] = lambda c: c.completion_tokens) -> Callable[[Todo], None]:
    """teacher.openai (its key in key_env; `field` names it in errors), or `endpoint` (a local vLLM
    server) with `extra` request parameters (a seed: each sample its own, or vLLM would repeat one)
    and `tokens`, how its answers' tokens are counted."""
    key = api_key(teacher["openai"], key_env, field) if endpoint is None else None
    endpoint = endpoint or teacher["openai"]

    async def ask_all(todo: Todo) -> None:
        async with ChatClient(endpoint, key, field, transport=transport) as client:
            async def ask(item: tuple[str, list[dict], int]) -> None:
                cache_key, messages, sample = item
                params = {**(extra or {})}
                if "seed" in params:
                    params["seed"] += sample
                try:
                    c = await client.complete(messages, teacher.get("maxNewTokens", 256),
                                              teacher.get("temperature", 0.0), **params)
                    answer = {"text": c.text, "tokens": tokens(c), "promptTokens": c.prompt_tokens,
                              "finished": c.finished, **({"reasoning": c.reasoning} if c.reasoning else {}),
                              **({"reasoningTokens": c.reasoning_tokens} if c.reasoning_tokens else {})}
                except EndpointError as exc:
                    if exc.status not in PER_ROW_STATUSES:
                        raise
                    # Kept like an answer: a restart or a shard's merge does not ask again.
                    answer = {"text": "", "tokens": 0, "finished": False, "rejected": str(exc)}
                await asyncio.to_thread(cache.put, cache_key, answer)  # saved before anything else
                usage.add(answer)
                on_answer()

            await client.each(todo, ask)

    return lambda todo: asyncio.run(ask_all(todo))


def _vllm_backend(teacher: dict[str, Any], model_input: dict[str, Any], cache: AnswerCache, usage: Usage,
                  on_answer: Callable[[], None], stack: contextlib.ExitStack,
                  share_gpu: bool) -> Callable[[Todo], None]:
    """The local teacher served by vLLM (started at the first question, stopped with the build)."""
    asking: list[Callable] = []

    def ask_all(todo: Todo) -> None:
        if not asking:
            from ..vllm_server import VllmServer, answer_tokens  # noqa: PLC0415

            # A local answer judge loads beside it with transformers: vLLM leaves it half the GPU.
            server = stack.enter_context(VllmServer(model_input, teacher.get("seed", 0),
                                                    gpu_memory_utilization=0.45 if share_gpu else None))
            extra = {**server.request_params, "seed": teacher.get("seed", 0)}
            asking.append(_openai_backend(teacher, cache, usage, on_answer, endpoint=server.endpoint, extra=extra,
                                          tokens=answer_tokens))
        asking[0](todo)

    return ask_all


def _local_backend(teacher: dict[str, Any], model_input: dict[str, Any], cache: AnswerCache, usage: Usage,
                   on_answer: Callable[[], None]) -> Callable[[Todo], None]:
    from ..generate import generate  # noqa: PLC0415 - torch only for a local teacher
    from ..models import LazyModel  # noqa: PLC0415

    loaded = LazyModel(model_input)  # not loaded when every answer is cached

    def ask_all(todo: Todo) -> None:
        model, tokenizer = loaded()

        def save(i: int, o) -> None:  # each answer cached as it finishes: a restart asks only the rest
            answer = {"text": o.text, "tokens": o.tokens, "finished": o.finished}
            cache.put(todo[i][0], answer)
            usage.add(answer)
            on_answer()

        # Samples of one conversation decode in one call: they differ as the sampler's draws go on.
        generate(model, tokenizer, [m for _, m, _ in todo], teacher.get("maxNewTokens", 256),
                 teacher.get("temperature", 0.0), teacher.get("seed", 0), concurrency=teacher.get("batchSize", 8),
                 on_answer=save)

    return ask_all


def _engine(teacher: dict[str, Any], model_input: dict[str, Any], field: str = "spec.teacher.engine") -> str:
    from ..vllm_server import choose_engine  # noqa: PLC0415 - loads tokenizers: only for a local teacher

    return choose_engine(teacher.get("engine", "auto"), model_input, field)


def answer(prompts: list[dict[str, Any]], teacher: dict[str, Any], model_input: dict[str, Any] | None,
           cache_uri: str, keep: AnswerFilter, drops: Drops, progress: Progress,
           transport=None, judge: AnswerJudge | None = None) -> tuple[list[dict[str, Any]], Usage]:
    """Conversations [{language, messages}] with every user turn answered and kept by the filters
    (and rated at least judge.min_score by the judge, turn by turn). With teacher.samples above 1,
    each turn is answered that many times and the judge's best-rated answer that the filters keep
    is the one the conversation goes on with (rejection sampling, as Llama 3's SFT data)."""
    cache = AnswerCache.opened(cache_uri, "teacher", cache_identity(teacher, model_input))
    usage = Usage()
    samples = teacher.get("samples", 1)
    total = sum(len(p["turns"]) for p in prompts) * samples
    progress.stage("asking the teacher", total=total, unit="turns" if samples == 1 else "answers")
    done = [0]

    def report() -> None:
        progress.update(done[0], figure=f"{usage.requests} asked, {usage.cached} cached",
                        requests=usage.requests, cached=usage.cached, completionTokens=usage.completion_tokens)

    def on_answer() -> None:
        done[0] += 1
        report()

    keep_reasoning = teacher.get("reasoning", "keep") == "keep"
    # A local teacher's answers without their reasoning are counted in its tokens, for maxAnswerTokens
    # (its tokenizer loaded at the first such answer).
    counter = functools.cache(lambda: token_counter(model_input))
    count = (lambda texts: counter()(texts)) if keep.spec.get("maxAnswerTokens") and model_input else None
    stack = contextlib.ExitStack()
    if "openai" in teacher:
        ask = _openai_backend(teacher, cache, usage, on_answer, transport)
    elif _engine(teacher, model_input) == "vllm":
        ask = _vllm_backend(teacher, model_input, cache, usage, on_answer, stack,
                            share_gpu=judge is not None and judge.model_input is not None)
    else:
        ask = _local_backend(teacher, model_input, cache, usage, on_answer)

    def answers_to(asking: list[dict[str, Any]], turn: int) -> list[list[dict[str, Any]]]:
        asked = [without_reasoning(c["messages"]) for c in asking]
        keys = [[AnswerCache.key(messages, k) for k in range(samples)] for messages in asked]
        todo = [(key, messages, k) for messages, row in zip(asked, keys) for k, key in enumerate(row)
                if cache.get(key) is None]
        usage.cached += len(asking) * samples - len(todo)
        done[0] += len(asking) * samples - len(todo)
        if todo:
            ask(todo)
        got = [[_parted(cache.get(key)) for key in row] for row in keys]
        usage.used_tokens += sum(g["tokens"] for row in got for g in row)
        return [[_kept_tokens(g, keep_reasoning, count) for g in row] for row in got]

    try:
        kept = converse(prompts, teacher.get("systemPrompt"), answers_to, keep, drops, progress, judge, samples,
                        report, keep_reasoning)
    finally:
        stack.close()
        cache.compact()
    return kept, usage


def _parted(answer: dict[str, Any]) -> dict[str, Any]:
    """A teacher's answer with the reasoning its text holds apart (chat.reasoning_apart), as an API that
    parts them gives it: a local teacher's text as generated, and a server's without a reasoning parser."""
    if answer.get("rejected") or answer.get("reasoning"):
        return answer
    thought, text = reasoning_apart(answer["text"])
    return {**answer, "text": text, **({"reasoning": thought} if thought else {})}


def _kept_tokens(answer: dict[str, Any], keep_reasoning: bool, count: Callable[[list[str]], list[int]] | None
                 ) -> dict[str, Any]:
    """An answer whose `tokens` (what maxAnswerTokens counts) are those of what its row keeps: its
    reasoning's too where the row keeps it; else the answer's alone, a local teacher's counted by its
    tokenizer (`count`), an API's completion tokens less the reasoning tokens it reports (OpenAI's
    reasoning models report thoughts they never show). An API that reports none: all of them."""
    if answer.get("rejected") or (keep_reasoning and answer.get("reasoning")):
        return answer
    if count is not None and answer.get("reasoning"):
        return {**answer, "tokens": count([answer["text"]])[0]}
    if answer.get("reasoningTokens"):
        return {**answer, "tokens": max(answer["tokens"] - answer["reasoningTokens"], 0)}
    return answer


def keep_given(prompts: list[dict[str, Any]], keep: AnswerFilter, drops: Drops, progress: Progress,
               judge: AnswerJudge | None = None,
               count_tokens: Callable[[list[str]], list[int]] | None = None) -> list[dict[str, Any]]:
    """Without a teacher: conversations [{language, messages}] of the sources' own answers (each
    prompt's `answers`, sources.answered), kept turn by turn as a teacher's are, by the filters (an
    answer is never truncated; its tokens, for maxAnswerTokens, counted by count_tokens) and the
    judge; a function-calling conversation kept whole (sources._whole) by the filters alone, each of its
    text answers through them ([{language, messages, tools}])."""
    whole = [p for p in prompts if "whole" in p]
    prompts = [p for p in prompts if "whole" not in p]
    kept_whole = []
    for p in whole:
        tokens = count_tokens(p["answers"]) if count_tokens and p["answers"] else [0] * len(p["answers"])
        reason = next((r for text, n in zip(p["answers"], tokens) if (r := keep.reason_to_drop(text, True, n))), None)
        if reason:
            drops.add(reason, p["turns"][0])
        else:
            kept_whole.append({"language": p["language"], **p["whole"], **{k: p[k] for k in CARRIED if k in p}})
    progress.stage("keeping the sources' answers", total=sum(len(p["turns"]) for p in prompts), unit="turns")
    done = [0]

    def answers_to(asking: list[dict[str, Any]], turn: int) -> list[list[dict[str, Any]]]:
        texts = [c["prompt"]["answers"][turn] for c in asking]
        tokens = count_tokens(texts) if count_tokens else [0] * len(texts)
        done[0] += len(asking)
        thoughts = [c["prompt"]["reasoning"][turn] if c["prompt"].get("reasoning") else None for c in asking]
        return [[{"text": text, "tokens": n, "finished": True, **({"reasoning": r} if r else {})}]
                for text, n, r in zip(texts, tokens, thoughts)]

    return converse(prompts, None, answers_to, keep, drops, progress, judge, 1,
                    lambda: progress.update(done[0])) + kept_whole


def converse(prompts: list[dict[str, Any]], system_default: str | None,
             answers_to: Callable[[list[dict[str, Any]], int], list[list[dict[str, Any]]]], keep: AnswerFilter,
             drops: Drops, progress: Progress, judge: AnswerJudge | None, samples: int,
             report: Callable[[], None], keep_reasoning: bool = True) -> list[dict[str, Any]]:
    """The conversations [{language, messages}], turn by turn: each conversation still going gets its
    user message, then `answers_to(those, turn)` gives each its answers ({text, tokens, finished, and a
    reasoning model's reasoning}, or {rejected}: the endpoint refused it); the filters keep some, the
    judge (if any) the best-rated, and the conversation goes on with it, its reasoning (unless not
    `keep_reasoning`) in the message's REASONING_KEY. One that keeps none ends there and is dropped, its
    later turns never answered (a row keeps what its prompt CARRIED). `report` after each turn."""
    conversations = []
    for p in prompts:
        system = p.get("system") or system_default
        conversations.append({"prompt": p, "alive": True,
                              "messages": [{"role": "system", "content": system}] if system else []})
    for turn in range(max((len(p["turns"]) for p in prompts), default=0)):
        asking = [c for c in conversations if c["alive"] and turn < len(c["prompt"]["turns"])]
        for c in asking:
            c["messages"].append({"role": "user", "content": c["prompt"]["turns"][turn]})
        for c, got in zip(asking, answers_to(asking, turn)):
            reasons = ["teacher_rejected" if g.get("rejected") else keep.reason_to_drop(
                g["text"], g["finished"], g["tokens"]) for g in got]
            c["answers"] = distinct([g["text"] for g, reason in zip(got, reasons) if not reason])
            c["reasoning"] = {g["text"]: g["reasoning"] for g in got if keep_reasoning and g.get("reasoning")}
            if not c["answers"]:  # none kept: dropped for the first sample's reason
                c["alive"] = False
                drops.add(reasons[0], got[0].get("rejected") or c["prompt"]["turns"][turn])
        if judge is not None:
            _judge_turn(judge, [c for c in asking if c["alive"]], drops, progress)
        for c in asking:
            if c["alive"]:
                thought = c["reasoning"].get(c["answers"][0])
                c["messages"].append({"role": "assistant", "content": c["answers"][0],
                                      **({REASONING_KEY: thought} if thought else {})})
        # Conversations cut short lose their later turns from the progress total.
        skipped = sum(len(c["prompt"]["turns"]) - turn - 1 for c in asking if not c["alive"]) * samples
        if skipped:
            progress.state["total"] = progress.state["total"] - skipped
        report()
    return [{"language": c["prompt"]["language"], "messages": c["messages"],
             **{k: c["prompt"][k] for k in CARRIED if k in c["prompt"]}}
            for c in conversations if c["alive"]]


def distinct(texts: list[str], besides: str | None = None) -> list[str]:
    """The texts in order, each once (whitespace around it aside), and none equal to `besides`: the
    samples of one turn worth rating apart."""
    seen = {besides.strip()} if besides is not None else set()
    out = []
    for text in texts:
        if text.strip() not in seen:
            seen.add(text.strip())
            out.append(text)
    return out


def _judge_turn(judge: AnswerJudge, answering: list[dict[str, Any]], drops: Drops, progress: Progress) -> None:
    """Rate this turn's kept answers (c["answers"]) and leave each conversation its best-rated one
    (the first of equals); a conversation whose best rates below the bar, or is unrated, ends here."""
    if not answering:
        return
    sides = {f"{i}.{k}": c["messages"] + [{"role": "assistant", "content": text}]
             for i, c in enumerate(answering) for k, text in enumerate(c["answers"])}
    progress.update(progress.state.get("done", 0), figure=f"judging {len(sides)} answers")
    ratings = judge.ratings(sides)
    for i, c in enumerate(answering):
        rated = [(ratings[f"{i}.{k}"], text) for k, text in enumerate(c["answers"]) if ratings.get(f"{i}.{k}") is not None]
        best = max(rated, key=lambda r: r[0], default=None)
        if best is None or best[0] < judge.min_score:
            c["alive"] = False
            reason = "judge_unrated" if best is None else "judge_low_score"
            drops.add(reason, f"{best[0]:.1f}: {c['messages'][-1]['content']}" if best is not None
                      else c["messages"][-1]["content"])
        else:
            c["answers"] = [best[1]]


def answer_again(contexts: list[list[dict[str, str]]], answerer: dict[str, Any], model_input: dict[str, Any] | None,
                 cache_uri: str, field: str, progress: Progress, share_gpu: bool = False,
                 transport=None, key_env: str = REJECTED_KEY_ENV,
                 what: str = "the rejected answers") -> tuple[list[list[dict[str, Any]]], Usage]:
    """Another model's answers to each conversation as it stands (ending with a user turn),
    answerer.samples of them (`what` they are, for the progress): a preference pair's rejected answer
    and its rivals, or difficulty's samples, from answerer.openai (its key in key_env) or the local
    model_input. Cached like the teacher's, so a rerun asks only what is new. `field`: where the
    answerer is in the spec; share_gpu: a local answer judge stays loaded beside it."""
    cache = AnswerCache.opened(cache_uri, "teacher", cache_identity(answerer, model_input))
    usage = Usage()
    samples = answerer.get("samples", 1)
    contexts = [without_reasoning(messages) for messages in contexts]
    progress.stage(f"answering again ({what})" if samples == 1 else
                   f"sampling {samples} answers to each conversation ({what})",
                   total=len(contexts) * samples, unit="answers")
    keys = [[AnswerCache.key(messages, k) for k in range(samples)] for messages in contexts]
    todo = list({key: (key, messages, k) for messages, row in zip(contexts, keys)
                 for k, key in enumerate(row) if cache.get(key) is None}.values())
    usage.cached = len(contexts) * samples - len(todo)

    def on_answer() -> None:
        progress.update(usage.cached + usage.requests, figure=f"{usage.requests} generated, {usage.cached} cached")

    stack = contextlib.ExitStack()
    try:
        if todo and "openai" in answerer:
            _openai_backend(answerer, cache, usage, on_answer, transport, key_env=key_env,
                            field=f"{field}.openai")(todo)
        elif todo and _engine(answerer, model_input, f"{field}.engine") == "vllm":
            _vllm_backend(answerer, model_input, cache, usage, on_answer, stack, share_gpu=share_gpu)(todo)
        elif todo:
            _local_backend(answerer, model_input, cache, usage, on_answer)(todo)
    finally:
        stack.close()
        cache.compact()
    return [[cache.get(key) for key in row] for row in keys], usage
