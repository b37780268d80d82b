"""DatasetBuild with an OpenAI-compatible teacher (a local test server): sources and field
shapes, language detection, near-duplicates, multi-turn answering, refusals, rate limits and
retries, the answer cache across a kill, and keys kept out of everything written."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmfactory.planner import PlanError, parse, plan
from llmfactory_runtime.data import messages_of
from llmfactory_runtime.dataset import build, splits
from llmfactory_runtime.dataset.sources import Drops, collect
from llmfactory_runtime.openai_client import ChatClient, TokenBucket, retry_after
from llmfactory_runtime.progress import Progress
from llmfactory_runtime.task import InvalidTask
from llmfactory_runtime.store import open_store, write_result

from finetune_helpers import TOOL_ROW, WEATHER
from tests.promises import assert_task_kept_promise

KEY = "sk-test-0123456789abcdef"
SHAREGPT_ROWS = [
    {"conversations": [{"from": "human", "value": "Explain how a hash map works, in short."},
                       {"from": "gpt", "value": "old answer, not used"},
                       {"from": "human", "value": "And what is a collision?"}]},
    {"conversations": [{"from": "human", "value": "Объясни, как работает хеш-таблица, кратко."}]},
    {"conversations": [{"from": "human", "value": "简单解释一下哈希表是如何工作的。"}]},
    {"conversations": [{"from": "human", "value": "Explain how a hash map works, in short!"}]},  # near duplicate
    {"conversations": [{"from": "human", "value": "Tell me how to pick a lock on my neighbour's door."},
                       {"from": "human", "value": "Please, it is urgent."}]},                  # refused
    {"conversations": [{"from": "human", "value": "Напиши очень длинный рассказ о зиме в деревне."}]},  # truncated
    {"conversations": [{"from": "human", "value": "Что такое рекурсия? Приведи пример на Python."}]},
    {"conversations": [{"from": "human", "value": "什么是递归？请用Python举一个例子。"}]},
    {"conversations": "not a list"},                                                         # malformed
    {"conversations": [{"from": "human", "value": "What is recursion? Give a Python example."}]},
]


def scripted(request) -> dict:
    text = request.last_user
    if "pick a lock" in text:
        return {"text": "I'm sorry, but I can't help with that."}
    if "Напиши очень длинный" in text:
        return {"text": "Была зима, и в деревне", "finish_reason": "length"}
    if "рекурсия" in text:
        return {"text": "Рекурсия — это когда функция вызывает саму себя: def f(n): return 1 if n < 2 else n * f(n - 1)"}
    if "递归" in text:
        return {"text": "递归是函数调用自身。例如：def f(n): return 1 if n < 2 else n * f(n - 1)"}
    return {"text": f"Here is a clear answer to: {text} It has several words so it is not empty."}


def manifest(url: str, source: dict, **spec) -> dict:
    teacher = {"openai": {"baseUrl": url, "model": "gpt-4o", "apiKeySecret": {"name": "openai", "key": "key"},
                          "concurrency": 4, "price": {"inputPerMillion": 2.5, "outputPerMillion": 10.0}},
               "maxNewTokens": 64}
    return {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "DatasetBuild", "metadata": {"name": "seed-data"},
            "spec": {"sources": [source], "teacher": teacher, "samplesPerLanguage": {"en": 10, "ru": 10, "zh": 10},
                     "languageDetection": {"minConfidence": 0.5}, "split": {"validation": 0.2, "test": 0.2},
                     **spec}}


def parquet_file(path: Path, rows: list[dict]) -> str:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"conversations": json.dumps(r["conversations"])} for r in rows]), buf)
    path.write_bytes(buf.getvalue())
    return f"file://{path}"


def jsonl_file(path: Path, rows: list) -> str:
    path.write_text("".join((json.dumps(r, ensure_ascii=False) if not isinstance(r, str) else r) + "\n"
                            for r in rows))
    return f"file://{path}"


def run_in_process(tmp_path: Path, doc: dict) -> tuple[dict, dict]:
    task = plan(parse(doc), lambda *k: None, f"file://{tmp_path}/store")
    store = open_store(task["artifactUri"])
    result = build.run(task, store, Progress(store))
    assert_task_kept_promise(task, result)
    return task, result


def _counts(usage: dict) -> dict[str, int]:
    """A usage's answers paid for and found in the cache (a local model's: it bills no tokens)."""
    return {"requests": usage["requests"], "cached": usage["cached"]}


def test_openai_teacher_builds_a_multilingual_multi_turn_dataset(tmp_path, openai_server, monkeypatch):
    from llmfactory.api.headline import headline

    openai_server.reply, openai_server.api_key = scripted, KEY
    monkeypatch.setenv("LLMFACTORY_TEACHER_API_KEY", KEY)
    source = {"uri": jsonl_file(tmp_path / "prompts.jsonl", SHAREGPT_ROWS), "fields": "sharegpt"}
    task, result = run_in_process(tmp_path, manifest(openai_server.url, source))

    # The second turn of a conversation is asked with the teacher's own first answer before it.
    [second] = openai_server.asked("And what is a collision?")
    assert [m["role"] for m in second.messages] == ["user", "assistant", "user"]
    assert second.messages[1]["content"].startswith("Here is a clear answer to: Explain how a hash map")
    # A refused first turn: its second turn is never paid for.
    assert openai_server.asked("Please, it is urgent.") == []
    assert all(r.authorization == f"Bearer {KEY}" for r in openai_server.requests)

    assert result["dropped"] == {"malformed": 1, "near_duplicate_prompt": 1, "refusal": 1, "truncated": 1}
    assert "pick a lock" in result["droppedExamples"]["refusal"][0]
    assert headline("DatasetBuild", result) == "6 rows (4/1/1), 1 malformed source row left out"
    assert result["rowsPerLanguage"] == {"en": 2, "ru": 2, "zh": 2}
    assert sum(result["rows"].values()) == 6
    usage = result["teacherUsage"]
    assert usage["requests"] == len(openai_server.requests) == 9 and usage["cached"] == 0  # 8 first turns + 1
    assert usage["costUsd"] == pytest.approx(usage["promptTokens"] * 2.5e-6 + usage["completionTokens"] * 1e-5, abs=1e-6)

    data = open_store(result["uri"])
    rows = [json.loads(line) for s in ("train", "validation", "test")
            for line in data.read_bytes(f"{s}.jsonl").decode().splitlines()]
    multi = next(r for r in rows if len(r["messages"]) == 4)
    assert multi["messages"][3]["content"].startswith("Here is a clear answer to: And what is a collision?")
    parquet = pq.read_table(io.BytesIO(data.read_bytes("train.parquet"))).to_pylist()
    assert len(parquet) == result["rows"]["train"] and parquet[0]["messages"][0]["role"] == "user"
    firsts = {s: {r["messages"][0]["content"] for r in
                  (json.loads(x) for x in data.read_bytes(f"{s}.jsonl").decode().splitlines())}
              for s in ("train", "validation", "test")}
    assert not (firsts["train"] & firsts["test"]) and not (firsts["train"] & firsts["validation"])
    card = data.read_bytes("README.md").decode()
    assert "| refusal | 1 |" in card and "$" in card

    # The key is referenced, never written: not in the task, the result, the card or progress.
    run = open_store(task["artifactUri"])
    for name in run.list():
        assert KEY not in run.read_bytes(name).decode(errors="replace"), name

    # Another build that only changes the split pays for nothing: every answer comes from the cache.
    openai_server.requests.clear()
    changed = manifest(openai_server.url, source, split={"validation": 0.3, "test": 0.1, "seed": 7})
    _, again = run_in_process(tmp_path, changed)
    assert openai_server.requests == [] and again["teacherUsage"]["requests"] == 0
    assert again["teacherUsage"]["cached"] == 9 and again["rowsPerLanguage"] == result["rowsPerLanguage"]


def test_a_reasoning_teachers_thoughts_are_kept_with_its_answers_and_never_sent_back(tmp_path, openai_server,
                                                                                    monkeypatch):
    """A reasoning model's API returns its chain of thought apart from the answer (DeepSeek's and vLLM's
    reasoning_content): the build writes it with each answer (chatml: the assistant message's
    reasoning_content; sharegpt: in <think> tags before the answer), never sends it back with a later turn
    (DeepSeek's API refuses that, and the fixture does too) and caches it with the answer: teacher.reasoning
    drop writes the answers alone and asks nothing again. A build without a teacher keeps its sources'
    reasoning (gpt-oss' thinking here) as it keeps their answers."""
    openai_server.reply = lambda r: {"text": f"Answer: {r.last_user}", "reasoning": f"Thinking of {r.last_user}"}
    monkeypatch.setenv("LLMFACTORY_TEACHER_API_KEY", KEY)
    turns = [{"from": "human", "value": "What is a hash map?"}, {"from": "gpt", "value": "old"},
             {"from": "human", "value": "And a collision?"}]
    source = {"uri": jsonl_file(tmp_path / "prompts.jsonl", [{"conversations": turns}]), "language": "en"}
    doc = manifest(openai_server.url, source, samplesPerLanguage=None, languageDetection=None,
                   split={"validation": 0.0, "test": 0.0})

    def written(spec: dict) -> dict:  # each build's own prefix; one answer cache
        _, result = run_in_process(tmp_path, {**doc, "spec": {**doc["spec"], **spec}})
        [row] = [json.loads(line) for line in open_store(result["uri"]).read_bytes("train.jsonl").decode().splitlines()]
        return row

    said = [{"role": "assistant", "content": f"Answer: {q}", "reasoning_content": f"Thinking of {q}"}
            for q in ("What is a hash map?", "And a collision?")]
    assert written({})["messages"] == [{"role": "user", "content": "What is a hash map?"}, said[0],
                                               {"role": "user", "content": "And a collision?"}, said[1]]
    assert [r.status for r in openai_server.requests] == [200, 200]
    assert openai_server.requests[1].messages[1] == {"role": "assistant", "content": "Answer: What is a hash map?"}
    assert written({"format": "sharegpt"})["conversations"][1]["value"] == \
        "<think>\nThinking of What is a hash map?\n</think>\n\nAnswer: What is a hash map?"
    teacher = {**doc["spec"]["teacher"], "reasoning": "drop"}
    assert written({"teacher": teacher})["messages"][1] == {"role": "assistant",
                                                                    "content": "Answer: What is a hash map?"}
    assert len(openai_server.requests) == 2  # the answers and their reasoning come from the cache
    given = {"messages": [{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4", "thinking": "Two and two make four."}]}
    source = {"uri": jsonl_file(tmp_path / "given.jsonl", [given]), "language": "en"}
    no_teacher = manifest("http://unused", source, samplesPerLanguage=None, languageDetection=None,
                          split={"validation": 0.0, "test": 0.0})
    del no_teacher["spec"]["teacher"]
    _, result = run_in_process(tmp_path / "given", no_teacher)
    [row] = [json.loads(line) for line in open_store(result["uri"]).read_bytes("train.jsonl").decode().splitlines()]
    assert row["messages"][1] == {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."}


def test_a_teachers_thoughts_written_before_its_answer_are_kept_apart_from_it(tmp_path, openai_server, monkeypatch):
    """A local teacher's answers are its text as generated, and so are a server's without a reasoning
    parser: Qwen3 writes its thoughts in <think> tags before the answer, DeepSeek-R1's distilled models
    end them with </think> alone (their prompt opens the tag). They are parted as vLLM's reasoning parsers
    part them: the filters and the next turn read the answer, the row keeps the thoughts apart; thoughts
    that never ended (cut at maxNewTokens) answer nothing."""
    replies = {"What is a hash map?": "<think>\nThinking of hash maps.\n</think>\n\nA table of keys.",
               "And a collision?": "Thinking of collisions.\n</think>\n\nTwo keys in one slot.",
               "Why is the sky blue?": "<think>\nThe sky... Rayleigh... so"}
    openai_server.reply = lambda r: {"text": replies[r.last_user]}
    monkeypatch.setenv("LLMFACTORY_TEACHER_API_KEY", KEY)
    rows = [{"conversations": [{"from": "human", "value": "What is a hash map?"}, {"from": "gpt", "value": "old"},
                               {"from": "human", "value": "And a collision?"}]}, {"prompt": "Why is the sky blue?"}]
    source = {"uri": jsonl_file(tmp_path / "prompts.jsonl", rows), "language": "en"}
    doc = manifest(openai_server.url, source, samplesPerLanguage=None, languageDetection=None,
                   split={"validation": 0.0, "test": 0.0})
    _, result = run_in_process(tmp_path, doc)
    [row] = [json.loads(line) for line in open_store(result["uri"]).read_bytes("train.jsonl").decode().splitlines()]
    assert row["messages"][1::2] == [
        {"role": "assistant", "content": "A table of keys.", "reasoning_content": "Thinking of hash maps."},
        {"role": "assistant", "content": "Two keys in one slot.", "reasoning_content": "Thinking of collisions."}]
    [second] = [r for r in openai_server.requests if r.last_user == "And a collision?"]
    assert second.messages[1] == {"role": "assistant", "content": "A table of keys."}
    assert result["dropped"] == {"empty": 1}


def test_max_answer_tokens_counts_the_reasoning_a_row_keeps_and_no_other(tmp_path, openai_server, monkeypatch):
    """filters.maxAnswerTokens keeps a conversation under the fine-tune's length: a reasoning teacher's
    thoughts count where the row keeps them, not where teacher.reasoning drops them or the API keeps them
    to itself (OpenAI's reasoning models, which bill and report reasoning tokens they never show). An API
    whose answer holds its thoughts inline reports none: all its tokens count."""
    long_thought = " ".join(["hmm"] * 20)
    replies = {"What is a hash map?": {"text": "A table of keys.", "reasoning": long_thought},
               "And a collision?": {"text": "Two keys in one slot.", "hiddenReasoning": 20},
               "Why is the sky blue?": {"text": f"<think>{long_thought}</think>Air scatters blue."}}
    openai_server.reply = lambda r: replies[r.last_user]
    monkeypatch.setenv("LLMFACTORY_TEACHER_API_KEY", KEY)
    source = {"uri": jsonl_file(tmp_path / "prompts.jsonl", [{"prompt": q} for q in replies]), "language": "en"}
    doc = manifest(openai_server.url, source, samplesPerLanguage=None, languageDetection=None,
                   split={"validation": 0.0, "test": 0.0}, filters={"maxAnswerTokens": 10})

    def built(reasoning: str) -> tuple[list[dict], dict]:
        teacher = {**doc["spec"]["teacher"], "reasoning": reasoning}
        _, result = run_in_process(tmp_path, {**doc, "spec": {**doc["spec"], "teacher": teacher}})  # one cache
        return [json.loads(line) for line in open_store(result["uri"]).read_bytes("train.jsonl").decode().splitlines()], \
            result

    rows, result = built("keep")
    assert [r["messages"][1] for r in rows] == [{"role": "assistant", "content": "Two keys in one slot."}]
    assert result["dropped"] == {"too_many_tokens": 2}  # 24 and 22 tokens with the thoughts they keep
    assert result["teacherUsage"]["completionTokens"] == 24 + 25 + 22  # every token is paid for
    rows, result = built("drop")
    assert sorted(r["messages"][1]["content"] for r in rows) == ["A table of keys.", "Two keys in one slot."]
    assert result["dropped"] == {"too_many_tokens": 1}  # the inline thoughts: no reasoning tokens said
    assert len(openai_server.requests) == 3  # the second build asked nothing again


def test_a_local_teachers_answer_without_its_reasoning_is_counted_in_its_own_tokens():
    """A local teacher's text holds its thoughts (parted after): with teacher.reasoning drop, what
    maxAnswerTokens counts is the answer's tokens in its tokenizer, which no API reports."""
    from llmfactory_runtime.dataset.teacher import _kept_tokens

    answer = {"text": "A table of keys.", "reasoning": " ".join(["hmm"] * 20), "tokens": 27, "finished": True}
    words = lambda texts: [len(t.split()) for t in texts]  # noqa: E731 - a tokenizer's count, in words
    assert _kept_tokens(answer, False, words)["tokens"] == 4
    assert _kept_tokens(answer, True, words)["tokens"] == 27
    assert _kept_tokens({**answer, "reasoning": None}, False, words)["tokens"] == 27  # nothing parted: as generated


def test_a_reasoning_model_teacher_is_asked_its_effort_with_max_completion_tokens(tmp_path, openai_server,
                                                                                monkeypatch):
    """OpenAI's reasoning models (o-series, gpt-5) refuse max_tokens and a temperature of their caller's:
    with openai.reasoningEffort the teacher is asked reasoning_effort and max_completion_tokens instead,
    and its answers are cached apart from the same model's at another effort."""
    monkeypatch.setenv("LLMFACTORY_TEACHER_API_KEY", KEY)
    source = {"uri": jsonl_file(tmp_path / "prompts.jsonl", [{"prompt": "What is a hash map?"}]), "language": "en"}
    doc = manifest(openai_server.url, source, samplesPerLanguage=None, languageDetection=None,
                   split={"validation": 0.0, "test": 0.0})
    doc["spec"]["teacher"]["openai"]["reasoningEffort"] = "low"
    run_in_process(tmp_path, doc)
    [asked] = openai_server.requests
    assert {k: asked.body.get(k) for k in ("max_completion_tokens", "reasoning_effort", "max_tokens", "temperature")} \
        == {"max_completion_tokens": 64, "reasoning_effort": "low", "max_tokens": None, "temperature": None}
    doc["spec"]["teacher"]["openai"]["reasoningEffort"] = "high"
    run_in_process(tmp_path, doc)
    assert len(openai_server.requests) == 2 and openai_server.requests[1].body["reasoning_effort"] == "high"
    doc["spec"]["split"]["seed"] = 7  # another build of the same answers: all cached
    _, result = run_in_process(tmp_path, doc)
    assert len(openai_server.requests) == 2 and result["teacherUsage"]["cached"] == 1


def test_a_teachers_chat_template_kwargs_are_sent_with_each_request_and_cache_its_answers_apart(
        tmp_path, openai_server, monkeypatch):
    """Qwen3 served by vLLM reasons before every answer unless its template is told otherwise:
    openai.chatTemplateKwargs {enable_thinking: false} is sent as vLLM's chat_template_kwargs, and the
    answers it gets are cached apart from those asked without it."""
    monkeypatch.setenv("LLMFACTORY_TEACHER_API_KEY", KEY)
    source = {"uri": jsonl_file(tmp_path / "prompts.jsonl", [{"prompt": "What is a hash map?"}]), "language": "en"}
    doc = manifest(openai_server.url, source, samplesPerLanguage=None, languageDetection=None,
                   split={"validation": 0.0, "test": 0.0})
    run_in_process(tmp_path, doc)
    doc["spec"]["teacher"]["openai"]["chatTemplateKwargs"] = {"enable_thinking": False}
    run_in_process(tmp_path, doc)
    first, second = openai_server.requests
    assert "chat_template_kwargs" not in first.body and second.body["chat_template_kwargs"] == {"enable_thinking": False}
    doc["spec"]["split"]["seed"] = 7  # another build of the same answers: all cached
    _, result = run_in_process(tmp_path, doc)
    assert len(openai_server.requests) == 2 and result["teacherUsage"]["cached"] == 1


@pytest.mark.parametrize("group_rows, group_bytes, groups", [(2, 2**20, 3), (1000, 1, 5)])
def test_a_splits_parquet_holds_every_rows_fields_whichever_row_group_they_first_appear_in(
        tmp_path, monkeypatch, group_rows, group_bytes, groups):
    """A split is written to Parquet a row group at a time (never held whole: a group ends at its
    PARQUET_ROWS-th row or its PARQUET_BYTES-th byte of JSON), its columns inferred from every row: a
    field that first appears in a later group or row (tools, a message's tool_calls and weight), or as
    a float after ints, is a column of the file; rows without it read it as null; tools (free-form JSON
    schemas) and a field no one type holds (a number here, text there) are JSON text, as Hugging Face
    datasets keep them; the digest is of the JSONL alone, as without Parquet."""
    monkeypatch.setattr(splits, "PARQUET_ROWS", group_rows)
    monkeypatch.setattr(splits, "PARQUET_BYTES", group_bytes)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    other = [{"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "enum": [1, 2]}}}}}]
    rows = [{"messages": chat, "language": "en", "score": 7, "note": 1},
            {"messages": chat, "language": "ru", "score": 8, "tools": other},
            {"messages": chat, "language": "en", "score": 6.5},
            {"messages": [chat[0], {"role": "assistant", "content": "", "tool_calls": [call], "weight": 0}],
             "language": "en", "tools": WEATHER, "note": "one"},
            {"messages": chat, "language": "zh"}]
    digests = {}
    for parquet in (True, False):
        data, digests[parquet] = open_store(f"file://{tmp_path}/{parquet}"), hashlib.sha256()
        assert splits.write_split(data, "train", iter(rows), digests[parquet], parquet) == len(rows)
    assert digests[True].hexdigest() == digests[False].hexdigest()
    table = pq.ParquetFile(tmp_path / "True" / "train.parquet")
    assert table.metadata.num_row_groups == groups
    assert table.schema_arrow.field("score").type == pa.float64()
    assert table.schema_arrow.field("tools").type == table.schema_arrow.field("note").type == pa.string()
    read = table.read().to_pylist()
    assert [r["note"] for r in read] == ["1", None, None, '"one"', None] and read[0]["tools"] is None
    assert [json.loads(r["tools"]) if r["tools"] else None for r in read] == [r.get("tools") for r in rows]
    assert [_without_nulls({**r, "tools": None, "note": None}) for r in read] == [
        _without_nulls({**r, "tools": None, "note": None}) for r in rows]
    empty = open_store(f"file://{tmp_path}/empty")
    assert splits.write_split(empty, "test", iter([]), hashlib.sha256(), True) == 0
    assert pq.read_table(tmp_path / "empty" / "test.parquet").num_rows == 0


def test_a_builds_parquet_split_read_back_as_a_source_gives_its_conversations_as_they_were(tmp_path):
    """Parquet (and a Hugging Face dataset) gives every message the fields any message of the file
    has, null where it had none (a user message's tool_calls, weight): read as a source, such a split
    gives back its conversations, a function-calling one whole, none of them malformed."""
    plain = {"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Look outside."}]}
    data = open_store(f"file://{tmp_path}/data")
    splits.write_split(data, "train", iter([plain, TOOL_ROW]), hashlib.sha256(), True)
    drops = Drops()
    read = list(collect([{"uri": f"file://{tmp_path}/data/train.parquet", "language": "en"}], drops,
                        with_answers=True, whole_tools=True))
    assert not drops.counts
    assert [p["turns"] for p in read] == [["Weather?"], ["Weather in Paris?"]]
    assert read[0]["answers"] == ["Look outside."]
    assert read[1]["whole"] == {"messages": messages_of(TOOL_ROW), "tools": TOOL_ROW["tools"]}


def _without_nulls(value):
    """A row as JSON gives it: Parquet's nulls for the fields a row lacks left out."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def test_a_clients_work_on_many_prompts_keeps_a_task_only_for_each_request_it_can_have_in_flight():
    """A million prompts are not a million waiting tasks (~5 KB each, benchmarks/teacher_memory.py):
    each prompt is worked on once, by at most twice the endpoint's concurrency tasks at once."""
    async def work_on(items: int) -> list[tuple[int, int]]:
        seen = []
        async with ChatClient({"model": "m", "concurrency": 3}, None, "spec.teacher.openai") as client:
            async def work(i: int) -> None:
                seen.append((i, len(asyncio.all_tasks())))
                await asyncio.sleep(0)
            await client.each(range(items), work)
        return seen

    seen = asyncio.run(work_on(1000))
    assert sorted(i for i, _ in seen) == list(range(1000))
    assert max(tasks for _, tasks in seen) == 2 * 3 + 1  # and the one that waits on them


def test_rate_limited_and_failing_endpoint_is_retried_as_it_asks(tmp_path, openai_server, monkeypatch):
    seen: dict[str, int] = {}

    def flaky(request):
        n = seen[request.last_user] = seen.get(request.last_user, 0) + 1
        if n == 1:
            return {"status": 429, "headers": {"Retry-After": "0.4"}, "error": "Rate limit reached for gpt-4o"}
        if n == 2:
            return {"status": 503, "error": "overloaded"}
        return scripted(request)

    openai_server.reply, openai_server.latency = flaky, 0.05
    monkeypatch.setenv("LLMFACTORY_TEACHER_API_KEY", KEY)
    prompts = [{"text": f"Question number {i}: what is {i} plus {i}?", "language": "en"} for i in range(6)]
    doc = manifest(openai_server.url, {"inline": prompts}, samplesPerLanguage=None, languageDetection=None)
    doc["spec"]["teacher"]["openai"].update(concurrency=2, maxRetries=3)
    _, result = run_in_process(tmp_path, doc)
    assert sum(result["rows"].values()) == 6 and result["teacherUsage"]["requests"] == 6
    assert openai_server.max_in_flight <= 2
    for p in prompts:
        first, second, third = openai_server.asked(p["text"])
        assert (first.status, second.status, third.status) == (429, 503, 200)
        assert second.at - first.at >= 0.4  # Retry-After honoured


def test_an_answer_slower_than_the_timeout_is_given_up_and_asked_again(tmp_path, openai_server):
    seen: dict[str, int] = {}

    def slow_first(request):
        n = seen[request.last_user] = seen.get(request.last_user, 0) + 1
        return {**scripted(request), "delay": 2.0} if n == 1 else scripted(request)

    openai_server.reply = slow_first
    prompts = [{"text": f"A question about the planet number {i}?", "language": "en"} for i in range(2)]
    doc = manifest(openai_server.url, {"inline": prompts}, samplesPerLanguage=None, languageDetection=None,
                   filters={"nearDuplicateThreshold": 0})
    doc["spec"]["teacher"]["openai"].update(timeoutSeconds=0.4, maxRetries=2)
    del doc["spec"]["teacher"]["openai"]["apiKeySecret"]
    _, result = run_in_process(tmp_path, doc)
    assert sum(result["rows"].values()) == 2 and result["teacherUsage"]["requests"] == 2
    for p in prompts:
        slow, retried = openai_server.asked(p["text"])
        assert 0.4 <= retried.at - slow.at < 2.0  # given up at timeoutSeconds, not when the answer came


def test_an_endpoint_that_keeps_failing_fails_the_build_and_a_wrong_key_is_named(tmp_path, openai_server,
                                                                                  monkeypatch):
    monkeypatch.setenv("LLMFACTORY_TEACHER_API_KEY", "sk-wrong")
    openai_server.api_key = KEY
    doc = manifest(openai_server.url, {"inline": [{"text": "Hello there, teacher", "language": "en"}]},
                   samplesPerLanguage=None, languageDetection=None)
    task = plan(parse(doc), lambda *k: None, f"file://{tmp_path}/store")
    store = open_store(task["artifactUri"])
    store.write_json("task.json", task)
    done = subprocess.run([sys.executable, "-m", "llmfactory_runtime", "dataset", "--task", task["artifactUri"]],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2  # invalid task: retrying the Job cannot help
    assert "HTTP 401" in done.stderr and "apiKeySecret" in done.stderr and "sk-wrong" not in done.stderr

    monkeypatch.delenv("LLMFACTORY_TEACHER_API_KEY")
    done = subprocess.run([sys.executable, "-m", "llmfactory_runtime", "dataset", "--task", task["artifactUri"]],
                          capture_output=True, text=True, timeout=120, env={**os.environ})
    assert done.returncode == 2 and "LLMFACTORY_TEACHER_API_KEY" in done.stderr and "openai" in done.stderr


@pytest.mark.slow
def test_a_killed_build_never_pays_twice_for_an_answer(tmp_path, openai_server):
    """SIGKILL while answers stream in; the restarted build asks only what was never delivered."""
    openai_server.reply, openai_server.latency = scripted, 0.3
    prompts = [{"text": f"Tell me one fact about the number {i}.", "language": "en"} for i in range(24)]
    doc = manifest(openai_server.url, {"inline": prompts}, samplesPerLanguage=None, languageDetection=None,
                   filters={"nearDuplicateThreshold": 0})  # these prompts are near-duplicates by design
    doc["spec"]["teacher"]["openai"].update(concurrency=3)
    del doc["spec"]["teacher"]["openai"]["apiKeySecret"]
    task = plan(parse(doc), lambda *k: None, f"file://{tmp_path}/store")
    open_store(task["artifactUri"]).write_json("task.json", task)
    cmd = [sys.executable, "-m", "llmfactory_runtime", "dataset", "--task", task["artifactUri"]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while sum(r.delivered_at is not None for r in openai_server.requests) < 9 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.15)  # delivered answers are saved; the next ones are still in flight
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    delivered = {r.last_user for r in openai_server.requests if r.delivered_at is not None}
    assert 9 <= len(delivered) < 24
    before = len(openai_server.requests)

    assert subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    asked_again = {r.last_user for r in openai_server.requests[before:]}
    assert not asked_again & delivered, "paid twice for answers already received"
    assert asked_again | delivered == {p["text"] for p in prompts}
    result = open_store(task["artifactUri"]).read_json("result.json")
    assert sum(result["rows"].values()) == 24 and result["teacherUsage"]["cached"] >= len(delivered)


def test_sharded_build_asks_each_prompt_once_within_the_limits_and_equals_one_process(tmp_path, openai_server):
    """Three shard processes (the Indexed Job's pods) split the teacher's work and its limits; the
    last to finish merges; the dataset is the one a single process builds."""
    openai_server.reply, openai_server.latency = scripted, 0.05
    prompts = [{"text": f"Name one use of the number {i} in everyday life.", "language": "en"} for i in range(12)]
    doc = manifest(openai_server.url, {"inline": prompts}, samplesPerLanguage=None, languageDetection=None,
                   filters={"nearDuplicateThreshold": 0}, shards=3)
    doc["spec"]["teacher"]["openai"].update(concurrency=3, requestsPerMinute=6000)
    del doc["spec"]["teacher"]["openai"]["apiKeySecret"]
    task = plan(parse(doc), lambda *k: None, f"file://{tmp_path}/sharded")
    single_doc = json.loads(json.dumps(doc))
    del single_doc["spec"]["shards"]
    assert plan(parse(single_doc), lambda *k: None, f"file://{tmp_path}/sharded")["digest"] == task["digest"]
    run = open_store(task["artifactUri"])
    run.write_json("task.json", task)
    cmd = [sys.executable, "-m", "llmfactory_runtime", "dataset", "--task", task["artifactUri"], "--shard"]
    procs = [subprocess.Popen(cmd + [str(i)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(3)]
    assert all(p.wait(timeout=300) == 0 for p in procs), [p.stderr.read().decode()[-2000:] for p in procs]

    assert sorted(r.last_user for r in openai_server.requests) == sorted(p["text"] for p in prompts)
    assert openai_server.max_in_flight <= 3  # the build's concurrency, not each shard's
    shards = [run.read_json(f"shards/{i}/result.json") for i in range(3)]
    assert [s["prompts"] for s in shards] == [4, 4, 4] and sum(s["usage"]["teacher"]["requests"] for s in shards) == 12
    result = run.read_json("result.json")  # the merge's: what the shards paid for, none of it twice
    assert _counts(result["teacherUsage"]) == {"requests": 12, "cached": 0}
    assert result["teacherUsage"]["promptTokens"] == openai_server.billed("gpt-4o")["promptTokens"]
    assert sum(result["rows"].values()) == 12
    assert subprocess.run(cmd + ["3"], capture_output=True).returncode == 0  # already committed: nothing to do

    openai_server.requests.clear()
    _, single = run_in_process(tmp_path / "single", single_doc)
    assert len(openai_server.requests) == 12  # its own store, its own cache
    assert single["digest"] == result["digest"] and single["rows"] == result["rows"]


def test_a_judge_drops_weak_answers_and_long_prompts_are_never_asked(tmp_path, openai_server, tiny_model):
    """filters.judge rates each answer (cached: a rebuild pays the judge nothing); maxPromptTokens,
    counted with the student's tokenizer, drops a prompt before the teacher is paid for it."""
    from llmfactory_runtime.benchmark.judge import JUDGE_SYSTEM

    def teacher_and_judge(request):
        if request.messages[0]["content"] == JUDGE_SYSTEM:
            body = request.messages[1]["content"]
            if "[Answer]\nWeak" in body or "Assistant: Weak" in body.rsplit("User:", 1)[-1]:
                return {"text": "Vague and unhelpful. [[3]]"}
            if "mumble" in body:
                return {"text": "I would rather not rate this."}  # no rating, even when asked again
            return {"text": "Clear and correct. Rating: [[8]]"}
        text = request.last_user
        if "weak" in text or text == "And briefly?":
            return {"text": f"Weak answer to: {text}"}
        if "mumble" in text:
            return {"text": "mumble mumble"}
        return {"text": f"A good answer to: {text}"}

    openai_server.reply = teacher_and_judge
    long_prompt = "Summarise this: " + " ".join(f"word{i}" for i in range(400))
    prompts = [{"turns": ["Tell me about the sea.", "And briefly?"]}, {"turns": ["Tell me about the sun."]},
               {"turns": ["A weak question about stars."]}, {"turns": ["Please mumble something."]},
               {"turns": [long_prompt]}]
    source = {"uri": jsonl_file(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": t}
                                                                    for t in p["turns"]]} for p in prompts]),
              "language": "en"}
    doc = manifest(openai_server.url, source, samplesPerLanguage=None, languageDetection=None, filters={
        "nearDuplicateThreshold": 0, "maxPromptTokens": 200, "tokenizer": {"uri": f"file://{tiny_model}"},
        "judge": {"openai": {"baseUrl": openai_server.url, "model": "judge-model",
                             "price": {"inputPerMillion": 1, "outputPerMillion": 2}}, "minScore": 6}})
    del doc["spec"]["teacher"]["openai"]["apiKeySecret"]
    _, result = run_in_process(tmp_path, doc)

    assert openai_server.asked(long_prompt) == []  # never paid for
    assert result["dropped"] == {"prompt_too_long": 1, "judge_low_score": 2, "judge_unrated": 1}
    assert result["droppedExamples"]["judge_low_score"][0].startswith("3.0: ")
    # The sea's first answer rated 8, its second turn 3: the conversation is dropped whole.
    assert sum(result["rows"].values()) == 1 and result["rowsPerLanguage"] == {"en": 1}
    judge_requests = [r for r in openai_server.requests if r.body["model"] == "judge-model"]
    # 4 first turns + the sea's second; the tokens of every request, the re-ask's too, at the judge's price
    usage = result["judgeUsage"]
    assert usage == {"requests": 5, "cached": 0, **openai_server.billed("judge-model"), "costUsd": usage["costUsd"]}
    assert usage["costUsd"] == pytest.approx((usage["promptTokens"] + 2 * usage["completionTokens"]) / 1e6, abs=1e-6)
    assert len(judge_requests) == 5 + 1  # the unrated one was asked once more
    # A rebuild with another split: the teacher and the judge are both paid nothing.
    openai_server.requests.clear()
    doc["spec"]["split"] = {"validation": 0.0, "test": 0.0, "seed": 1}
    _, again = run_in_process(tmp_path, doc)
    assert openai_server.requests == [] and again["judgeUsage"] == {"requests": 0, "cached": 5, "promptTokens": 0,
                                                                    "completionTokens": 0, "costUsd": 0}

    # With an API teacher, the tokenizer that counts must be named.
    del doc["spec"]["filters"]["tokenizer"]
    with pytest.raises(PlanError, match="spec.filters.tokenizer: is required with maxPromptTokens"):
        plan(parse(doc), lambda *k: None, f"file://{tmp_path}/store")


def test_preferences_pair_the_teachers_answer_with_the_students_own_and_a_dpo_fine_tune_reads_them(
        tmp_path, openai_server, tiny_model):
    """The teacher's answer is chosen, the local student's answer to the same turns is rejected (cached:
    a rebuild generates none); where the two agree there is nothing to prefer and the pair is dropped."""
    from llmfactory.api.headline import headline
    from llmfactory_runtime.data import preference_of
    from llmfactory_runtime.generate import generate
    from llmfactory_runtime.models import load_model, load_tokenizer

    student = {"uri": f"file://{tiny_model}"}
    tie = "Say what you would say."
    [students_own] = generate(load_model(student).eval(), load_tokenizer(student), [[{"role": "user", "content": tie}]], 8)
    openai_server.reply = lambda request: {"text": students_own.text if request.last_user == tie
                                           else f"A good answer to: {request.last_user}"}
    prompts = [["Tell me about the sea.", "And briefly?"], ["Tell me about the sun."], ["Tell me about rain."], [tie]]
    source = {"uri": jsonl_file(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": t} for t in turns]}
                                                       for turns in prompts]), "language": "en"}
    doc = manifest(openai_server.url, source, samplesPerLanguage=None, languageDetection=None,
                   filters={"nearDuplicateThreshold": 0},
                   preferences={"rejected": {"model": student, "maxNewTokens": 8}})
    del doc["spec"]["teacher"]["openai"]["apiKeySecret"]
    task, result = run_in_process(tmp_path, doc)

    assert result["format"] == "preference" and result["dropped"] == {"preference_tie": 1}
    assert headline("DatasetBuild", result).startswith("3 preference pairs (")
    assert _counts(result["rejectedUsage"]) == {"requests": 4, "cached": 0}
    rows = [json.loads(line) for split in ("train", "validation", "test")
            for line in open_store(result["uri"]).read_bytes(f"{split}.jsonl").decode().splitlines()]
    by_prompt = {row["prompt"][0]["content"]: row for row in rows}
    assert sorted(by_prompt) == ["Tell me about rain.", "Tell me about the sea.", "Tell me about the sun."]
    sea = preference_of(by_prompt["Tell me about the sea."])
    assert [m["content"] for m in sea[0]] == ["Tell me about the sea.", "A good answer to: Tell me about the sea.",
                                              "And briefly?"]  # the second turn, after the teacher's first answer
    assert sea[1] == [{"role": "assistant", "content": "A good answer to: And briefly?"}]
    for row in rows:
        _, chosen, rejected = preference_of(row)
        assert rejected[0]["content"] != chosen[0]["content"] and not rejected[0]["content"].startswith("A good")
    # A rebuild with another split generates nothing again.
    doc["spec"]["split"] = {"validation": 0.0, "test": 0.0, "seed": 1}
    _, again = run_in_process(tmp_path, doc)
    assert _counts(again["rejectedUsage"]) == {"requests": 0, "cached": 4}

    # A DPO FineTune reads them; one on a build of conversations is refused, naming the field.
    fine_tune = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": "dpo"},
                 "spec": {"baseModel": student, "dataset": {"datasetBuildRef": {"name": "seed-data"}},
                          "objective": "dpo", "resources": {"gpusPerNode": 0}}}
    planned = plan(parse(fine_tune), lambda *k: result, f"file://{tmp_path}/store")
    assert planned["inputs"]["dataset"] == {"uri": result["uri"], "format": "preference", "digest": result["digest"]}
    with pytest.raises(PlanError, match="spec.dataset.datasetBuildRef: DatasetBuild seed-data writes conversations"):
        plan(parse(fine_tune), lambda *k: {**result, "format": "chatml"}, f"file://{tmp_path}/store")
    # So does a KTO one (each pair a desirable and an undesirable answer); rows at a URI may be unpaired.
    fine_tune["spec"]["objective"] = "kto"
    planned = plan(parse(fine_tune), lambda *k: result, f"file://{tmp_path}/store")
    assert planned["inputs"]["dataset"]["format"] == "preference" and planned["spec"]["kto"]["beta"] == 0.1
    with pytest.raises(PlanError, match=r"but objective kto trains on answers labelled desirable or not: set "
                                        r"spec.preferences there \(or read pairs: sources with fields "
                                        r"preference\), or point dataset.uri at unpaired rows"):
        plan(parse(fine_tune), lambda *k: {**result, "format": "chatml"}, f"file://{tmp_path}/store")
    fine_tune["spec"]["dataset"] = {"uri": result["uri"]}
    assert plan(parse(fine_tune), lambda *k: None, f"file://{tmp_path}/store")["inputs"]["dataset"]["format"] == "unpaired"


def test_rejected_answers_from_an_api_model_with_its_own_key_and_pairs_without_one_dropped(
        tmp_path, openai_server, monkeypatch):
    """A weaker API model writes the rejected answers, with its own key; a prompt it refuses (400)
    and an empty answer leave no pair. Nothing local is loaded, and no key reaches the task."""
    def teacher_and_weak(request):
        if request.body["model"] != "weak":
            return {"text": f"A good answer to: {request.last_user}"}
        if "rain" in request.last_user:
            return {"status": 400, "error": "content policy"}
        return {"text": "" if "sun" in request.last_user else f"Meh: {request.last_user}"}

    openai_server.reply = teacher_and_weak
    monkeypatch.setenv("LLMFACTORY_TEACHER_API_KEY", "sk-teacher")
    monkeypatch.setenv("LLMFACTORY_REJECTED_API_KEY", "sk-weak")
    prompts = [["Tell me about the sea.", "And briefly?"], ["Tell me about the sun."], ["Tell me about rain."],
               ["Tell me about snow."]]
    source = {"uri": jsonl_file(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": t} for t in turns]}
                                                       for turns in prompts]), "language": "en"}
    doc = manifest(openai_server.url, source, samplesPerLanguage=None, languageDetection=None,
                   filters={"nearDuplicateThreshold": 0}, preferences={"rejected": {"openai": {
                       "baseUrl": openai_server.url, "model": "weak", "apiKeySecret": {"name": "weak", "key": "k"}}}})
    task, result = run_in_process(tmp_path, doc)

    assert "rejected" not in task["inputs"] and "sk-" not in json.dumps(task)
    assert result["dropped"] == {"rejected_refused": 1, "rejected_empty": 1}
    # The refusal is kept too (never asked again); the tokens are those of the answers
    assert result["rejectedUsage"] == {"requests": 4, "cached": 0, **openai_server.billed("weak")}
    weak = [r for r in openai_server.requests if r.body["model"] == "weak"]
    assert {r.authorization for r in weak} == {"Bearer sk-weak"}
    assert {r.authorization for r in openai_server.requests if r not in weak} == {"Bearer sk-teacher"}
    # The second turn's rejected answer was written after the teacher's first answer.
    [sea] = [r for r in weak if r.last_user == "And briefly?"]
    assert [m["content"] for m in sea.messages] == ["Tell me about the sea.", "A good answer to: Tell me about the sea.",
                                                    "And briefly?"]
    rows = [json.loads(line) for split in ("train", "validation", "test")
            for line in open_store(result["uri"]).read_bytes(f"{split}.jsonl").decode().splitlines()]
    assert sorted((r["prompt"][-1]["content"], r["rejected"][0]["content"]) for r in rows) == [
        ("And briefly?", "Meh: And briefly?"), ("Tell me about snow.", "Meh: Tell me about snow.")]
    doc["spec"]["split"] = {"validation": 0.0, "test": 0.0, "seed": 1}
    _, again = run_in_process(tmp_path, doc)
    assert _counts(again["rejectedUsage"]) == {"requests": 0, "cached": 4} and again["dropped"] == result["dropped"]


def test_shards_divide_every_apis_limits():
    from llmfactory_runtime.dataset.build import _shared_limits

    spec = {"teacher": {"openai": {"model": "t", "concurrency": 16, "requestsPerMinute": 1000}},
            "filters": {"judge": {"openai": {"model": "j", "tokensPerMinute": 90000}}},
            "preferences": {"rejected": {"openai": {"model": "w", "concurrency": 3}}}}
    shared = _shared_limits(spec, 4)
    assert shared["teacher"]["openai"] == {"model": "t", "concurrency": 4, "requestsPerMinute": 250}
    assert shared["filters"]["judge"]["openai"]["tokensPerMinute"] == 22500
    assert shared["preferences"]["rejected"]["openai"]["concurrency"] == 1  # never below one
    assert spec["teacher"]["openai"]["concurrency"] == 16  # the task itself is left as it was


def test_a_judged_pair_whose_rejected_answer_rates_as_high_as_the_chosen_one_is_dropped(
        tmp_path, openai_server, tiny_model):
    from llmfactory_runtime.benchmark.judge import JUDGE_SYSTEM

    def teacher_and_judge(request):
        if request.messages[0]["content"] == JUDGE_SYSTEM:
            body = request.messages[1]["content"]
            return {"text": "[[8]]" if "[Answer]\nA good answer" in body else
                    "[[2]]" if "[Answer]\nMeh." in body else "[[3]]"}  # the student's answers: 3
        return {"text": "Meh." if "rain" in request.last_user else f"A good answer to: {request.last_user}"}

    openai_server.reply = teacher_and_judge
    prompts = ["Tell me about the sea.", "Tell me about the sun.", "Tell me about rain."]
    source = {"uri": jsonl_file(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": p}]}
                                                       for p in prompts]), "language": "en"}
    doc = manifest(openai_server.url, source, samplesPerLanguage=None, languageDetection=None, filters={
        "nearDuplicateThreshold": 0, "judge": {"openai": {"baseUrl": openai_server.url, "model": "judge"}, "minScore": 1}},
        preferences={"rejected": {"model": {"uri": f"file://{tiny_model}"}, "maxNewTokens": 8}})
    del doc["spec"]["teacher"]["openai"]["apiKeySecret"]
    _, result = run_in_process(tmp_path, doc)

    assert result["dropped"] == {"preference_not_better": 1}  # rain: the teacher's "Meh." (2) below the student's (3)
    assert result["droppedExamples"]["preference_not_better"] == ["3.0 >= 2.0: Tell me about rain."]
    rows = [json.loads(line) for split in ("train", "validation", "test")
            for line in open_store(result["uri"]).read_bytes(f"{split}.jsonl").decode().splitlines()]
    assert sorted(r["prompt"][0]["content"] for r in rows) == prompts[:2]
    assert all((r["score_chosen"], r["score_rejected"]) == (8.0, 3.0) for r in rows)
    # the chosen answers' ratings came from the cache
    assert result["judgeUsage"] == {"requests": 6, "cached": 3, **openai_server.billed("judge")}


def test_a_reward_model_scores_each_pair_and_one_whose_rejected_answer_scores_as_high_is_dropped(
        tmp_path, openai_server, tiny_model):
    """preferences.rewardModel: both answers of each pair scored (into the rows), and a pair the
    reward model does not rank right dropped; scored as the reward model scores each conversation alone."""
    from llmfactory_runtime import reward_model
    from llmfactory_runtime.data import preference_of
    from test_reward_model import _reward_model

    def weak(prompt: str) -> str:  # answers unlike each other, which a random score layer orders either way
        return prompt[::-1]

    openai_server.reply = lambda request: {"text": weak(request.last_user) if request.body["model"] == "weak"
                                           else f"A good answer to: {request.last_user}"}
    prompts = [f"Tell me about {thing}." for thing in ("the sea", "the sun", "rain", "snow", "wind", "fog")]
    source = {"uri": jsonl_file(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": p}]} for p in prompts]),
              "language": "en"}
    rm = _reward_model(tiny_model, tmp_path / "rm", seed=6)  # one that ranks one pair of the six right
    doc = manifest(openai_server.url, source, samplesPerLanguage=None, languageDetection=None,
                   filters={"nearDuplicateThreshold": 0}, preferences={
                       "rejected": {"openai": {"baseUrl": openai_server.url, "model": "weak"}},
                       "rewardModel": {"uri": f"file://{rm}"}})
    del doc["spec"]["teacher"]["openai"]["apiKeySecret"]
    _, result = run_in_process(tmp_path, doc)

    model, tok = reward_model.load({"uri": f"file://{rm}"}, "test")
    conversation = {p: [{"role": "user", "content": p}] for p in prompts}
    chosen = reward_model.scores(model, tok, [conversation[p] + [{"role": "assistant", "content": f"A good answer to: {p}"}]
                                              for p in prompts], batch_size=1)
    rejected = reward_model.scores(model, tok, [conversation[p] + [{"role": "assistant", "content": weak(p)}]
                                                for p in prompts], batch_size=1)
    right = {p for p, c, r in zip(prompts, chosen, rejected) if c > r}
    assert 0 < len(right) < len(prompts)  # some kept, some dropped
    assert result["dropped"] == {"preference_not_better": len(prompts) - len(right)}
    rows = [json.loads(line) for split in ("train", "validation", "test")
            for line in open_store(result["uri"]).read_bytes(f"{split}.jsonl").decode().splitlines()]
    assert {preference_of(r)[0][-1]["content"] for r in rows} == right
    for row in rows:
        i = prompts.index(preference_of(row)[0][-1]["content"])
        assert (row["score_chosen"], row["score_rejected"]) == (pytest.approx(chosen[i], abs=1e-4),
                                                                 pytest.approx(rejected[i], abs=1e-4))
    # The scores are cached like a judge's ratings: a rebuild (another split) loads no reward model.
    assert _counts(result["rewardModelUsage"]) == {"requests": 12, "cached": 0}
    doc["spec"]["split"] = {"validation": 0.0, "test": 0.0, "seed": 1}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reward_model, "load", lambda *a: pytest.fail("the reward model was loaded again"))
        _, again = run_in_process(tmp_path, doc)
    assert _counts(again["rewardModelUsage"]) == {"requests": 0, "cached": 12} and again["dropped"] == result["dropped"]
    # Sharded: each shard scores its own share (its pod holds a GPU anyway); the merge, none.
    sharded = {**doc, "spec": {**doc["spec"], "shards": 2}}
    task = plan(parse(sharded), lambda *k: None, f"file://{tmp_path}/sharded")
    store = open_store(task["artifactUri"])
    for i in range(2):
        own = store.child(f"shards/{i}")
        write_result(own, build.run_shard(task, own, Progress(own), shard=i))  # committed, as the pod does
    assert [store.child(f"shards/{i}").read_json("result.json")["usage"]["rewardModel"]["requests"]
            for i in range(2)] == [6, 6]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reward_model, "load", lambda *a: pytest.fail("the merge loaded the reward model"))
        merged = build.run(task, store, Progress(store))
    assert _counts(merged["rewardModelUsage"]) == {"requests": 12, "cached": 0} and merged["dropped"] == result["dropped"]
    doc["spec"]["filters"]["judge"] = {"openai": {"baseUrl": openai_server.url, "model": "judge"}}
    with pytest.raises(PlanError, match="both filters.judge and preferences.rewardModel would score the pairs"):
        parse(doc)


def test_best_of_n_pairs_reject_the_lowest_rated_sample_and_choose_the_best_answer(tmp_path, openai_server):
    """preferences.rejected.samples: several sampled answers per prompt, each cached; the judge rates
    them all. chosen teacher: the teacher's answer against the lowest-rated sample; chosen best: the
    highest-rated of the teacher's answer and the samples against the lowest. A rebuild asks nothing."""
    from llmfactory_runtime.benchmark.judge import JUDGE_SYSTEM

    ratings = {"A good answer.": 7, "Meh.": 2, "Okay.": 4, "Brilliant.": 9}
    asked: dict[str, int] = {}

    def reply(request):
        if request.messages[0]["content"] == JUDGE_SYSTEM:
            answer = request.messages[1]["content"].split("[Answer]\n")[1].split("\n")[0]
            return {"text": f"[[{ratings[answer]}]]"}
        if request.body["model"] != "student":
            return {"text": "A good answer."}
        n = asked[request.last_user] = asked.get(request.last_user, 0) + 1
        if "rain" in request.last_user:  # samples all alike: one rival, rated below the teacher
            return {"text": "Okay."}
        if "snow" in request.last_user:  # a sample equal to the teacher's answer is no rival
            return {"text": ["A good answer.", "Meh."][n % 2]}
        return {"text": ["Meh.", "Okay.", "Brilliant."][n % 3]}

    openai_server.reply = reply
    prompts = ["Tell me about the sea.", "Tell me about the sun.", "Tell me about rain.", "Tell me about snow."]
    source = {"uri": jsonl_file(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": p}]}
                                                       for p in prompts]), "language": "en"}
    api = {"baseUrl": openai_server.url}
    doc = manifest(openai_server.url, source, samplesPerLanguage=None, languageDetection=None, filters={
        "nearDuplicateThreshold": 0, "judge": {"openai": {**api, "model": "judge"}, "minScore": 1}},
        split={"validation": 0.0, "test": 0.0}, preferences={
            "rejected": {"openai": {**api, "model": "student"}, "samples": 3, "temperature": 1.0}})
    del doc["spec"]["teacher"]["openai"]["apiKeySecret"]

    def pairs(result) -> dict[str, tuple]:
        rows = [json.loads(line) for line in open_store(result["uri"]).read_bytes("train.jsonl").decode().splitlines()]
        return {r["prompt"][-1]["content"]: (r["chosen"][0]["content"], r["rejected"][0]["content"],
                                             r["score_chosen"], r["score_rejected"]) for r in rows}

    _, result = run_in_process(tmp_path, doc)
    assert asked == dict.fromkeys(prompts, 3) and _counts(result["rejectedUsage"]) == {"requests": 12, "cached": 0}
    assert pairs(result) == {"Tell me about the sea.": ("A good answer.", "Meh.", 7, 2),
                             "Tell me about the sun.": ("A good answer.", "Meh.", 7, 2),
                             "Tell me about rain.": ("A good answer.", "Okay.", 7, 4),
                             "Tell me about snow.": ("A good answer.", "Meh.", 7, 2)}
    # Rated: the teacher's four answers, then the samples (three each, one of rain's alike ones and
    # of snow's one that is not the teacher's); the teacher's ratings came from the cache the second time.
    assert _counts(result["judgeUsage"]) == {"requests": 4 + (3 + 3 + 1 + 1), "cached": 4}

    doc["spec"]["preferences"]["chosen"] = "best"
    _, best = run_in_process(tmp_path, doc)
    assert _counts(best["rejectedUsage"]) == {"requests": 0, "cached": 12} and best["judgeUsage"]["requests"] == 0
    assert pairs(best) == {"Tell me about the sea.": ("Brilliant.", "Meh.", 9, 2),
                           "Tell me about the sun.": ("Brilliant.", "Meh.", 9, 2),
                           "Tell me about rain.": ("A good answer.", "Okay.", 7, 4),
                           "Tell me about snow.": ("A good answer.", "Meh.", 7, 2)}

    for wrong, message in (({"samples": 3, "temperature": 0.0}, "samples above 1 need temperature above 0"),
                           ({"samples": 17, "temperature": 1.0}, "samples")):
        doc["spec"]["preferences"]["rejected"] |= wrong
        with pytest.raises(PlanError, match=message):
            parse(doc)
    doc["spec"]["preferences"]["rejected"] |= {"samples": 3, "temperature": 1.0}
    del doc["spec"]["filters"]["judge"]
    with pytest.raises(PlanError, match="pick answers by their scores: set preferences.rewardModel or filters.judge"):
        parse(doc)


def test_teacher_samples_each_turn_several_times_and_goes_on_with_the_judges_best_answer(tmp_path, openai_server):
    """teacher.samples (rejection sampling): every answer to a turn rated, the best kept and the next
    turn asked after it; a conversation whose best answer rates below minScore dropped. A rebuild asks
    nothing; more than one sample needs a temperature and a judge."""
    from llmfactory_runtime.benchmark.judge import JUDGE_SYSTEM

    ratings = {"Meh.": 2, "Okay.": 4, "Brilliant.": 9}
    asked: dict[str, int] = {}

    def reply(request):
        if request.messages[0]["content"] == JUDGE_SYSTEM:
            answer = request.messages[1]["content"].replace("[Answer]\n", "Assistant: ").rsplit("Assistant: ", 1)[1]
            return {"text": f"[[{ratings[answer.strip()]}]]"}
        n = asked[request.last_user] = asked.get(request.last_user, 0) + 1
        return {"text": "Meh." if "rain" in request.last_user else ["Meh.", "Okay.", "Brilliant."][n % 3]}

    openai_server.reply = reply
    conversations = [["Tell me about the sea."], ["Tell me about rain."], ["Tell me about the sun.", "And briefly?"]]
    source = {"uri": jsonl_file(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": t} for t in turns]}
                                                       for turns in conversations]), "language": "en"}
    doc = manifest(openai_server.url, source, samplesPerLanguage=None, languageDetection=None, filters={
        "nearDuplicateThreshold": 0, "judge": {"openai": {"baseUrl": openai_server.url, "model": "judge"}, "minScore": 5}},
        split={"validation": 0.0, "test": 0.0})
    del doc["spec"]["teacher"]["openai"]["apiKeySecret"]
    doc["spec"]["teacher"] |= {"samples": 3, "temperature": 1.0}
    _, result = run_in_process(tmp_path, doc)

    assert asked == {"Tell me about the sea.": 3, "Tell me about rain.": 3, "Tell me about the sun.": 3, "And briefly?": 3}
    assert result["teacherUsage"]["requests"] == 12 and result["dropped"] == {"judge_low_score": 1}
    rows = [json.loads(line)["messages"] for line in open_store(result["uri"]).read_bytes("train.jsonl").decode().splitlines()]
    assert sorted([m["content"] for m in row] for row in rows) == [
        ["Tell me about the sea.", "Brilliant."], ["Tell me about the sun.", "Brilliant.", "And briefly?", "Brilliant."]]
    # The second turn was asked after the best first answer, each of its three times.
    second = [r for r in openai_server.requests if r.last_user == "And briefly?"]
    assert len(second) == 3 and all(r.messages[1]["content"] == "Brilliant." for r in second)
    assert _counts(result["judgeUsage"]) == {"requests": 3 + 1 + 3 + 3, "cached": 0}  # rain's three alike: one rating

    doc["spec"]["split"]["seed"] = 7
    openai_server.requests.clear()
    _, again = run_in_process(tmp_path, doc)
    assert not openai_server.requests and again["teacherUsage"]["cached"] == 12 and again["rows"] == result["rows"]
    doc["spec"]["teacher"]["temperature"] = 0.0
    with pytest.raises(PlanError, match="samples above 1 need temperature above 0"):
        parse(doc)
    doc["spec"]["teacher"]["temperature"] = 1.0
    del doc["spec"]["filters"]["judge"]
    with pytest.raises(PlanError, match="teacher.samples above 1 need filters.judge to pick the best answer"):
        parse(doc)


def test_local_samples_of_one_conversation_differ_and_are_cached(tmp_path, tiny_model):
    """A local model's samples (the transformers engine), several to a conversation, in one call."""
    from llmfactory_runtime.dataset.teacher import answer_again

    store = open_store(f"file://{tmp_path}/run")
    contexts = [[{"role": "user", "content": f"Name a colour ({i})."}] for i in range(2)]
    answerer = {"model": {"uri": f"file://{tiny_model}"}, "temperature": 1.0, "maxNewTokens": 8, "samples": 4}
    model_input = {"uri": f"file://{tiny_model}"}
    got, usage = answer_again(contexts, answerer, model_input, f"file://{tmp_path}/cache", "spec.preferences.rejected",
                              Progress(store))
    assert usage.requests == 8 and [len(answers) for answers in got] == [4, 4]
    assert all(len({a["text"] for a in answers}) > 1 for answers in got), got
    again, usage = answer_again(contexts, {**answerer, "samples": 5}, model_input, f"file://{tmp_path}/cache",
                                "spec.preferences.rejected", Progress(store))
    assert (usage.requests, usage.cached) == (2, 8) and [a[:4] for a in again] == got  # only the fifth samples are new


def test_a_local_judge_rates_by_log_probabilities(tmp_path, tiny_model):
    """A local teacher and a local judge (the tiny random model: its expected rating is somewhere
    in 1..10, never 10, so a bar of 10 drops every answer and a bar of 1 keeps every one). A build
    that keeps no rows fails saying what dropped them; the second build changes only the bar: the
    answers and their ratings, paid by the failed one, come from the cache."""
    model = {"uri": f"file://{tiny_model}"}
    prompts = [{"text": f"Question {i} about colours?", "language": "en"} for i in range(3)]
    for bar in (10, 1):
        doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "DatasetBuild", "metadata": {"name": "local"},
               "spec": {"sources": [{"inline": prompts}], "teacher": {"model": model, "maxNewTokens": 8},
                        "filters": {"nearDuplicateThreshold": 0, "dropTruncated": False, "refusals": False,
                                    "judge": {"model": model, "minScore": bar}}}}
        if bar == 10:
            with pytest.raises(InvalidTask, match=r"^the build kept no rows: dropped 3 as judge_low_score \(e\.g\. "
                                                  r"\d+(\.\d+)?: Question 0 about colours\?\)$"):
                run_in_process(tmp_path, doc)
            continue
        _, result = run_in_process(tmp_path, doc)
        assert sum(result["rows"].values()) == 3 and result["dropped"] == {}
        assert _counts(result["judgeUsage"]) == {"requests": 0, "cached": 3}


def test_a_source_none_of_whose_rows_can_be_read_fails_naming_the_reason_and_the_fields(tmp_path, monkeypatch):
    """A few malformed rows are dropped and counted; a source whose every row (or first thousand) is
    malformed has a mapping that does not fit its data (a misspelt promptField): the build fails,
    naming the source, the first row's trouble and its fields, not "Succeeded, 0 rows"."""
    from llmfactory_runtime.dataset import sources

    rows = [{"question": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(12)]
    uri = jsonl_file(tmp_path / "rows.jsonl", rows)
    good = {"uri": uri, "fields": "prompt", "promptField": "question", "answerField": "answer"}
    with pytest.raises(InvalidTask, match=r"^spec.sources\[1\]: none of its 12 rows could be read, the first: no "
                                          r"field 'questoin' \(its fields: question, answer\); check fields, "
                                          r"promptField and answerField$"):
        list(collect([good, {**good, "promptField": "questoin"}], Drops()))
    with pytest.raises(InvalidTask, match=r"^spec.sources\[0\]: none of its 12 rows could be read, the first: no "
                                          r"field 'body' \(its fields: question, answer\); check textField$"):
        list(collect([{"uri": uri, "textField": "body"}], Drops(), documents=True))
    monkeypatch.setattr(sources, "UNREADABLE", 5)  # a corpus's first rows: no need to read it all to know
    with pytest.raises(InvalidTask, match=r"^spec.sources\[0\]: none of its first 5 rows could be read"):
        list(collect([{**good, "answerField": "solution"}], Drops()))


def test_a_conversation_in_a_column_of_another_name_is_read_where_messages_field_says(tmp_path):
    """lmsys-chat-1m's and WildChat's conversation column ([{role, content}]; Axolotl's field_messages):
    read by fields auto, or where messagesField names it, in either message form, and Capybara's
    exchanges; fields openai alone looks for messages, and the refusal says which fields map the rows."""
    rows = [{"conversation_id": "a", "conversation": [{"role": "user", "content": "Hi there"},
                                                      {"role": "assistant", "content": "Hello!"}]},
            {"conversation_id": "b", "conversation": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}]
    uri = jsonl_file(tmp_path / "rows.jsonl", rows)
    expected = [(["Hi there"], ["Hello!"]), (["2+2?"], ["4"])]
    for source in ({"uri": uri}, {"uri": uri, "messagesField": "conversation"}):
        drops = Drops()
        assert [(p["turns"], p["answers"]) for p in collect([source], drops, with_answers=True)] == expected
        assert not drops.counts
    drops = Drops()
    kept = collect([{"uri": uri, "messagesField": "conversation", "fields": "openai"}], drops, with_answers=True)
    assert [(p["turns"], p["answers"]) for p in kept] == expected[:1] and drops.counts == {"malformed": 1}
    with pytest.raises(InvalidTask, match=r"no field 'messages' \(its fields: conversation_id, conversation\); "
                                          r"check fields and messagesField$"):
        list(collect([{"uri": uri, "fields": "openai"}], Drops()))
    with pytest.raises(InvalidTask, match=r"no field 'dialog' .*; check fields, messagesField, promptField and "
                                          r"answerField$"):
        list(collect([{"uri": uri, "messagesField": "dialog"}], Drops()))
    # Capybara's exchanges, each a user's input and the assistant's output; a refusal shows the row as read.
    capybara = [{"source": "x", "conversation": [{"input": "Hi there", "output": "Hello!"}, {"input": "2+2?", "output": "4"}]}]
    kept = collect([{"uri": jsonl_file(tmp_path / "capybara.jsonl", capybara)}], Drops(), with_answers=True)
    assert [(p["turns"], p["answers"]) for p in kept] == [(["Hi there", "2+2?"], ["Hello!", "4"])]
    broken = [{"source": "x", "conversation": [{"text": "Hi"}]}]
    with pytest.raises(InvalidTask, match=r"no field 'role' \(its fields: source, conversation\)"):
        list(collect([{"uri": jsonl_file(tmp_path / "broken.jsonl", broken)}], Drops()))


def test_a_rows_language_label_is_read_as_the_code_samples_per_language_counts(tmp_path):
    """samplesPerLanguage counts codes (pt, zh, ru), and datasets label rows otherwise: OpenAssistant with
    BCP 47 tags (pt-BR, zh-CN), Aya with ISO 639-3 codes (eng, arb), Tagengo and lmsys with names (Russian).
    Each is read as its language's code, in any case or separator; a label that names no language stays
    as written (and the counts' error names it)."""
    from llmfactory_runtime.dataset.splits import sample_per_language

    labels = {"pt-BR": "pt", "zh_Hans_CN": "zh", "EN": "en", "Russian": "ru", "Русский": "ru", "eng": "en",
              "arb": "ar", "Brazilian Portuguese": "pt", "unknown": "unknown", "": "es"}
    rows = [{"prompt": f"prompt {i}", "lang": label} for i, label in enumerate(labels)]
    kept = list(collect([{"uri": jsonl_file(tmp_path / "rows.jsonl", rows), "languageField": "lang", "language": "es"}],
                        Drops()))
    assert [p["language"] for p in kept] == list(labels.values())
    assert len(sample_per_language(kept, {"pt": 1, "zh": 1, "ru": 2}, 0, Drops())) == 4


def test_a_language_the_counts_ask_for_that_no_prompt_is_in_fails_naming_the_languages_there_are():
    """A source labels its Russian rows with what names no language ("unknown"): with samplesPerLanguage
    {ru, en} the build would keep English alone and succeed. It fails, saying which
    languages the prompts have; a count of 0 asks for none."""
    from llmfactory_runtime.dataset.splits import sample_per_language

    prompts = [{"turns": [f"q{i}"], "language": "unknown" if i % 3 else "en"} for i in range(9)]
    with pytest.raises(InvalidTask, match=r"^spec.samplesPerLanguage: no prompt in ru; the prompts' languages: "
                                          r"unknown \(6\), en \(3\)\. A source's language or languageField"):
        sample_per_language(prompts, {"en": 2, "ru": 2}, 0, Drops())
    kept = sample_per_language(prompts, {"en": 2, "ru": 0, "unknown": 1}, 0, Drops())
    assert sorted(p["language"] for p in kept) == ["en", "en", "unknown"]


def test_hugging_face_parquet_and_field_shapes(tmp_path, monkeypatch):
    """A Hugging Face dataset (datasets.load_dataset on a local folder: no hub here), Parquet,
    Alpaca and OpenAI-messages rows; malformed rows counted with examples."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = tmp_path / "tagengo-like" / "data"
    hub.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([
        {"conversations": [{"from": "human", "value": "Привет! Как дела?"}, {"from": "gpt", "value": "Хорошо"}],
         "language": "Russian"},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi!"}],
         "language": "English"}]), hub / "train-00000-of-00001.parquet")
    alpaca = jsonl_file(tmp_path / "alpaca.jsonl", [{"instruction": "Translate to French", "input": "cat"},
                                                     {"instruction": "Name a color", "input": ""}, "{broken json"])
    messages = tmp_path / "messages.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": "2+2?"}]}]), messages)
    drops = Drops()
    prompts = list(collect([{"huggingface": {"id": str(hub.parent), "split": "train"}, "languageField": "nope"},
                            {"uri": alpaca, "language": "en"}, {"uri": f"file://{messages}"}], drops))
    assert [p["turns"] for p in prompts] == [["Привет! Как дела?"], ["Hi!"], ["Translate to French\n\ncat"],
                                             ["Name a color"], ["2+2?"]]
    assert prompts[1]["system"] == "Be brief." and prompts[2]["language"] == "en"
    assert drops.counts == {"malformed": 1} and drops.examples["malformed"] == ["{broken json"]


def test_function_calling_conversations_are_kept_whole_without_a_teacher_and_dropped_where_rebuilt(tmp_path):
    """A build that writes the sources' own conversations (no teacher, chatml) keeps an OpenAI
    tool-calling row (or one offering tools it does not call) whole: its calls, the tools' results and its tools, after the answer filters
    (a refusal among its text answers drops it) and the duplicate filter (by its user turns), with a
    source's system prompt first. A build that rebuilds turns in plain text (a teacher's, sharegpt's)
    would lose the calls and drops such rows as tool_calls."""
    def calls(city: str, answer: str) -> dict:
        return {"tools": WEATHER, "messages": [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"city": city})}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "18 C"}, {"role": "assistant", "content": answer}]}

    plain = {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]}
    # Offered the tools, it answers without a call: that is what it teaches, with the tools in view.
    uncalled = {"tools": WEATHER, "messages": [{"role": "user", "content": "What is a weather front?"},
                                               {"role": "assistant", "content": "Where two air masses meet."}]}
    rows = [calls("Paris", "18 C in Paris."), calls("Oslo", "I'm sorry, but I can't help with that."),
            calls("Paris", "Sunny."), plain, uncalled]
    source = {"uri": jsonl_file(tmp_path / "rows.jsonl", rows), "language": "en", "systemPrompt": "Be brief."}
    # The published corpora's forms, read as such rows: xlam's {query, tools, answers}, Hermes' <tool_call>s.
    xlam = {"query": "Weather in Rome?", "answers": json.dumps([{"name": "get_weather", "arguments": {"city": "Rome"}}]),
            "tools": json.dumps([{"name": "get_weather", "description": "The weather in a city.",
                                  "parameters": {"city": {"type": "str"}}}])}
    hermes = {"conversations": [
        {"from": "system", "value": f"You call functions. <tools> {[t['function'] for t in WEATHER]!r} </tools>"},
        {"from": "human", "value": "Weather in Lima?"},
        {"from": "gpt", "value": "<tool_call>\n{'arguments': {'city': 'Lima'}, 'name': 'get_weather'}\n</tool_call>"}]}
    corpora = {"uri": jsonl_file(tmp_path / "corpora.jsonl", [xlam, hermes]), "language": "en"}
    doc = manifest("http://unused", source, samplesPerLanguage=None, languageDetection=None,
                   split={"validation": 0.0, "test": 0.0})
    doc["spec"]["sources"].append(corpora)
    del doc["spec"]["teacher"]
    _, result = run_in_process(tmp_path / "kept", doc)
    assert result["dropped"] == {"refusal": 1, "duplicate_prompt": 1} and result["rows"]["train"] == 5
    written = [json.loads(line) for line in open_store(result["uri"]).read_bytes("train.jsonl").decode().splitlines()]
    calls = {row["messages"][-2]["content"]: row for row in written if row["messages"][-1].get("tool_calls")}
    assert calls["Weather in Rome?"]["tools"] == calls["Weather in Lima?"]["tools"] == WEATHER
    assert [row["messages"][-1]["tool_calls"] for row in (calls["Weather in Rome?"], calls["Weather in Lima?"])] == [
        [{"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]
        for city in ("Rome", "Lima")]
    assert calls["Weather in Lima?"]["messages"][0] == {"role": "system", "content": "You call functions."}
    written = [row for row in written if row["messages"][-1].get("tool_calls") is None]
    [kept, offered] = sorted((row for row in written if "tools" in row), key=lambda row: len(row["messages"]), reverse=True)
    assert offered["messages"][1:] == uncalled["messages"] and offered["tools"] == WEATHER
    assert kept["tools"] == WEATHER and kept["language"] == "en"
    assert kept["messages"] == [{"role": "system", "content": "Be brief."}, rows[0]["messages"][0],
                                {**rows[0]["messages"][1], "content": ""}, *rows[0]["messages"][2:]]
    # Rebuilt in plain text (sharegpt here; a teacher's build alike): dropped as tool_calls.
    doc["spec"]["format"] = "sharegpt"
    _, result = run_in_process(tmp_path / "rebuilt", doc)
    assert result["dropped"] == {"tool_calls": 6} and result["rows"]["train"] == 1
    drops = Drops()
    assert [p["turns"] for p in collect([source], drops, with_answers=True)] == [["Hi!"]]
    assert drops.examples["tool_calls"][0].startswith('{"tools": [{"type": "function"')
    # A prompt column's row beside a tools column (Salesforce's xlam) is its prompt, as any prompt row.
    xlam = [{"query": "Weather in Oslo?", "tools": json.dumps(WEATHER), "answers": "[]"}]
    [asked] = collect([{"uri": jsonl_file(tmp_path / "xlam.jsonl", xlam), "fields": "prompt", "promptField": "query"}],
                      Drops())
    assert asked["turns"] == ["Weather in Oslo?"]


def test_a_hugging_face_source_with_max_rows_streams_its_first_rows_without_copying_the_split(tmp_path,
                                                                                               monkeypatch):
    """maxRows of a corpus (FineWeb, Wikipedia) reads those rows as the split streams, shard by shard:
    the same rows, in the same order, as reading the whole split, with no Arrow copy of it on disk."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    hub = tmp_path / "wiki-like" / "data"
    hub.mkdir(parents=True)
    for shard in range(2):
        pq.write_table(pa.Table.from_pylist([{"text": f"Document {shard}.{i} about the sea."} for i in range(3)]),
                       hub / f"train-0000{shard}-of-00002.parquet")
    source = {"huggingface": {"id": str(hub.parent)}}
    streamed = list(collect([{**source, "maxRows": 4}], Drops(), documents=True))
    assert not list((tmp_path / "cache").rglob("*.arrow"))
    whole = list(collect([source], Drops(), documents=True))
    assert list((tmp_path / "cache").rglob("*.arrow"))  # the whole split, copied as Arrow
    assert [p["turns"] for p in streamed] == [p["turns"] for p in whole[:4]]
    assert streamed[3]["turns"] == ["Document 1.0 about the sea."] and len(whole) == 6


def test_a_json_file_of_one_array_is_read_row_by_row_as_a_json_lines_file_is(tmp_path):
    """Alpaca's alpaca_data.json is one pretty-printed JSON array, which a line-by-line reader found
    malformed on every line; a file of one object is refused saying where its rows are."""
    rows = [{"instruction": "Translate to French", "input": "cat", "output": "chat"},
            {"instruction": "Say hi", "input": "", "output": "Hi!"}]
    (tmp_path / "alpaca_data.json").write_text("\n  " + json.dumps(rows, indent=4))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("alpaca_data.json", "lines.json"):
        drops = Drops()
        kept = list(collect([{"uri": f"file://{tmp_path}/{name}"}], drops, with_answers=True))
        assert [(p["turns"], p["answers"]) for p in kept] == [(["Translate to French\n\ncat"], ["chat"]),
                                                              (["Say hi"], ["Hi!"])] and not drops.counts
    (tmp_path / "broken.json").write_text(json.dumps(rows)[:-2])
    with pytest.raises(InvalidTask, match="broken.json: a JSON array that does not parse"):
        list(collect([{"uri": f"file://{tmp_path}/broken.json"}], Drops(), with_answers=True))
    # One object holding the rows under a key (SQuAD's form, Hugging Face's field=): its lines are not rows.
    (tmp_path / "squad.json").write_text(json.dumps({"version": "1.1", "data": rows}, indent=2))
    with pytest.raises(InvalidTask, match=r"squad.json is one JSON object \(keys: version, data\), not rows: .* "
                                          r"write the rows under data as JSON lines: jq -c '.data\[\]'"):
        list(collect([{"uri": f"file://{tmp_path}/squad.json"}], Drops(), with_answers=True))


def test_each_shape_gives_the_answers_its_rows_hold_to_the_turns_they_answer(tmp_path):
    """What a build without a teacher keeps: a conversation's answered turns (a last unanswered turn
    left out; turns first: the first), alpaca's output, a prompt column's answerField; a row that
    answers nothing, or not turn after turn, is dropped as no_answer. With a teacher every user turn
    stays, whatever the row answered."""
    def user(text):
        return {"role": "user", "content": text}

    def assistant(text):
        return {"role": "assistant", "content": text}

    rows = [{"messages": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant(" Hello! "),
                          user("Bye?"), assistant("Bye."), user("Unanswered?")]},
            {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
            {"instruction": "Translate to French", "input": "cat", "output": "chat"},
            {"messages": [user("One"), user("Two"), assistant("Both")]},  # not turn after turn
            {"messages": [user("Only a question")]},
            {"instruction": "No output here"},
            {"question": "Capital of France?", "response": "Paris"}]
    def collected(source_rows, with_answers, **source):
        drops = Drops()
        uri = jsonl_file(tmp_path / "rows.jsonl", source_rows)
        return list(collect([{"uri": uri, **source}], drops, with_answers=with_answers)), drops

    kept, drops = collected(rows[:6], True)
    assert [(p["system"], p["turns"], p["answers"]) for p in kept] == [
        ("Be brief.", ["Hi", "Bye?"], ["Hello!", "Bye."]), (None, ["2+2?"], ["4"]),
        (None, ["Translate to French\n\ncat"], ["chat"])]
    assert drops.counts == {"no_answer": 3}
    assert drops.examples["no_answer"] == ["One", "Only a question", "No output here"]
    kept, _ = collected(rows[:1], True, turns="first")
    assert [(p["turns"], p["answers"]) for p in kept] == [(["Hi"], ["Hello!"])]
    kept, drops = collected(rows[6:], True, fields="prompt", promptField="question", answerField="response")
    assert [(p["turns"], p["answers"]) for p in kept] == [(["Capital of France?"], ["Paris"])]
    kept, drops = collected(rows[6:], True, fields="prompt", promptField="question")
    assert kept == [] and drops.counts == {"no_answer": 1}
    # A number is an answer's text (a column of final answers); a boolean is none.
    kept, drops = collected([{"question": "9 - 1?", "response": 8}, {"question": "Half of 3?", "response": 1.5},
                             {"question": "Is it so?", "response": True}], True, fields="prompt",
                            promptField="question", answerField="response")
    assert [(p["turns"], p["answers"]) for p in kept] == [(["9 - 1?"], ["8"]), (["Half of 3?"], ["1.5"])]
    assert drops.counts == {"no_answer": 1}
    kept, drops = collected(rows, False, promptField="question")  # a teacher answers every user turn
    assert [p["turns"] for p in kept][:2] == [["Hi", "Bye?", "Unanswered?"], ["2+2?"]] and not drops.counts
    # TRL's prompt-completion rows (text or messages) answer their prompt; an unpaired row labelled false
    # (KTO's undesirable answer) is not an answer to keep, but its prompt is one for a teacher to answer.
    completions = [{"prompt": "3+3?", "completion": "6"},
                   {"prompt": [{"role": "system", "content": "Be brief."}, user("4+4?")], "completion": [assistant("8")]},
                   {"prompt": "5+5?", "completion": "11", "label": False}]
    kept, drops = collected(completions, True)
    assert [(p["system"], p["turns"], p["answers"]) for p in kept] == [(None, ["3+3?"], ["6"]),
                                                                       ("Be brief.", ["4+4?"], ["8"])]
    assert drops.counts == {"undesirable": 1}
    kept, drops = collected(completions, False)
    assert [p["turns"] for p in kept] == [["3+3?"], ["4+4?"], ["5+5?"]] and not drops.counts
    # A pair's scores: both finite numbers, or none (JSON's NaN, a boolean, a text or one alone).
    pairs = [{"prompt": "Q", "chosen": "A", "rejected": "B", "score_chosen": c, "score_rejected": r}
             for c, r in ((9, 2.5), (float("nan"), 1), (True, 0), ("9", 1), (9, None))]
    kept, _ = collected(pairs, True, fields="preference")
    assert [p.get("scores") for p in kept] == [(9.0, 2.5), None, None, None, None]
    # A system message from its own column (systemField): OpenOrca's prompt rows, Intel/orca_dpo_pairs'
    # pairs (their prompt in promptField); an empty one is none, one not text makes the row malformed.
    orca = [{"system_prompt": "You are an AI assistant.", "question": "Q?", "response": "A."},
            {"system_prompt": " ", "question": "Q2?", "response": "B."},
            {"system_prompt": 3, "question": "Q3?", "response": "C."}]
    kept, drops = collected(orca, True, fields="prompt", promptField="question", answerField="response",
                            systemField="system_prompt")
    assert [(p["system"], p["turns"], p["answers"]) for p in kept] == [
        ("You are an AI assistant.", ["Q?"], ["A."]), (None, ["Q2?"], ["B."])]
    assert drops.counts == {"malformed": 1}
    dpo_pairs = [{"system": "Be helpful.", "question": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}]
    kept, _ = collected(dpo_pairs, True, fields="preference", promptField="question", systemField="system")
    assert [(p["system"], p["turns"], p["answers"], p["rejected"]) for p in kept] == [
        ("Be helpful.", ["Capital of France?"], ["Paris."], "Rome.")]


def test_without_a_teacher_the_sources_own_conversations_are_filtered_judged_and_split(
        tmp_path, openai_server, tiny_model, monkeypatch):
    """A Hugging Face chat dataset (UltraChat's messages column; a local folder: no hub here) made
    a DatasetBuild's dataset with no teacher: its answers kept as written, turn after turn, each
    through the filters (a refusal, an answer over maxAnswerTokens in the student's tokens) and
    the judge (a weak second answer drops its conversation), near-duplicates and rows without
    answers dropped; only the judge is asked."""
    from llmfactory_runtime.benchmark.judge import JUDGE_SYSTEM

    def judge(request):
        assert request.messages[0]["content"] == JUDGE_SYSTEM  # nothing but the judge is asked
        body = request.messages[1]["content"]
        return {"text": "Vague. [[3]]" if "Weak" in body.rsplit("User:", 1)[-1] else "Clear. [[8]]"}

    openai_server.reply = judge
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def chat(*turns, system=None):
        roles = ["user", "assistant"] * len(turns)
        return {"prompt": turns[0], "messages": ([{"role": "system", "content": system}] if system else [])
                + [{"role": role, "content": text} for role, text in zip(roles, turns)]}

    long_answer = " ".join(f"word{i}" for i in range(300))
    rows = [chat("Tell me about the sea.", "The sea is vast and salty.", "And briefly?", "Big salty water."),
            chat("How do I pick my neighbour's lock?", "I'm sorry, but I can't help with that."),
            chat("Tell me about the moon.", "The moon orbits the Earth.", "And its phases?", "Weak answer."),
            chat("Describe every word you know.", long_answer),
            chat("What is recursion?", "A function that calls itself.", "An example?"),  # last turn unanswered
            {"prompt": "x", "messages": [{"role": "user", "content": "A question nobody answered."}]},
            chat("Name a prime.", "Seven.", system="Answer in one word."),
            chat("Tell me about the sea!", "A near duplicate."),
            chat("What is a hash map?", "A table of keys and values, found by their hashes.")]
    hub = tmp_path / "ultrachat-like" / "data"
    hub.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), hub / "train_sft-00000-of-00001.parquet")  # split train_sft
    judge_endpoint = {"baseUrl": openai_server.url, "model": "judge-model",
                      "price": {"inputPerMillion": 1, "outputPerMillion": 2}}
    source = {"huggingface": {"id": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"}, "language": "en"}
    doc = manifest(openai_server.url, source, samplesPerLanguage=None, languageDetection=None, filters={
        "maxAnswerTokens": 200, "tokenizer": {"uri": f"file://{tiny_model}"},
        "judge": {"openai": judge_endpoint, "minScore": 6}})
    del doc["spec"]["teacher"]
    task = plan(parse(doc), lambda *k: None, f"file://{tmp_path}/store")
    task["spec"]["sources"][0]["huggingface"]["id"] = str(hub.parent)  # the hub's dataset, here a local folder
    run = open_store(task["artifactUri"])
    result = build.run(task, run, Progress(run))

    assert "teacher" not in task["inputs"] and result["teacherTokens"] == 0 and "teacherUsage" not in result
    assert result["dropped"] == {"refusal": 1, "judge_low_score": 1, "too_many_tokens": 1, "no_answer": 1,
                                 "near_duplicate_prompt": 1}
    assert result["droppedExamples"]["no_answer"] == ["A question nobody answered."]
    store = open_store(result["uri"])
    written = [json.loads(line)["messages"] for split in ("train", "validation", "test")
               for line in store.read_bytes(f"{split}.jsonl").decode().splitlines()]
    expected = [rows[0]["messages"], rows[4]["messages"][:2], rows[6]["messages"], rows[8]["messages"]]
    assert sorted(written, key=json.dumps) == sorted(expected, key=json.dumps)  # as written, system included
    assert result["rows"] == {"train": 2, "validation": 1, "test": 1}
    # The judge rated each answer the filters kept, second turns with their first: 5 first turns, 2 second.
    assert result["judgeUsage"]["requests"] == 7 == len(openai_server.requests)
    assert "Answers: the sources' own (no teacher), kept by the filters." in store.read_bytes("README.md").decode()
    # maxAnswerTokens without a teacher counts in a tokenizer that must be named.
    del doc["spec"]["filters"]["tokenizer"]
    with pytest.raises(PlanError, match="spec.filters.tokenizer: is required with maxAnswerTokens and no teacher"):
        plan(parse(doc), lambda *k: None, f"file://{tmp_path}/store")


def test_without_a_teacher_preference_pairs_choose_the_sources_answer(tmp_path, openai_server):
    """preferences with no teacher: each conversation's own last answer chosen, an API model's
    rejected (UltraFeedback's way, on an existing chat dataset)."""
    openai_server.reply = lambda request: {"text": f"Meh: {request.last_user}"}
    rows = [{"messages": [{"role": "user", "content": f"Tell me about {thing}."},
                          {"role": "assistant", "content": f"All about {thing}."}]}
            for thing in ("the sea", "the sun", "snow")]
    doc = manifest(openai_server.url, {"uri": jsonl_file(tmp_path / "p.jsonl", rows), "language": "en"},
                   samplesPerLanguage=None, languageDetection=None, filters={"nearDuplicateThreshold": 0},
                   preferences={"rejected": {"openai": {"baseUrl": openai_server.url, "model": "weak"}}})
    del doc["spec"]["teacher"]
    _, result = run_in_process(tmp_path, doc)
    pairs = [json.loads(line) for split in ("train", "validation", "test")
             for line in open_store(result["uri"]).read_bytes(f"{split}.jsonl").decode().splitlines()]
    assert result["format"] == "preference" and "teacherUsage" not in result
    assert sorted((p["prompt"][-1]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"])
                  for p in pairs) == sorted((f"Tell me about {t}.", f"All about {t}.", f"Meh: Tell me about {t}.")
                                            for t in ("the sea", "the sun", "snow"))
    assert {r.body["model"] for r in openai_server.requests} == {"weak"}


def test_without_a_teacher_a_sources_preference_pairs_are_kept_filtered_and_split_for_dpo(tmp_path, tiny_model):
    """fields preference, no teacher: TRL's pairs in each of their forms (UltraFeedback's chosen and
    rejected conversations after an implicit prompt, an explicit prompt of messages with a system
    message and earlier turns, plain texts), Anthropic HH's transcripts (one and several turns) and
    OpenAI's pairs (the FineTune's reader's: dropped as malformed before)
    kept as the dataset, format preference; the chosen
    answers through the filters; a tie, a pair without a rejected answer and a malformed row
    dropped. A FineTune with objective dpo reads it."""
    def msg(role, text):
        return {"role": role, "content": text}

    rows = [{"prompt": "Tell me about the sea.", "chosen": [msg("user", "Tell me about the sea."),
                                                            msg("assistant", "The sea is vast and salty.")],
             "rejected": [msg("user", "Tell me about the sea."), msg("assistant", "Water.")],
             "score_chosen": 8.5, "score_rejected": 3},  # UltraFeedback's scores, carried
            {"prompt": [msg("system", "One word."), msg("user", "Name a prime.")],
             "chosen": [msg("assistant", "Seven.")], "rejected": [msg("assistant", "Nine.")]},
            {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "score_chosen": 9},  # one score: none
            {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.",
             "score_chosen": 5.0, "score_rejected": 5.0},  # rated alike: teaches nothing
            {"prompt": [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "How are you?")],
             "chosen": [msg("assistant", "Well, thanks.")], "rejected": [msg("assistant", "Go away.")]},
            {"prompt": "Same?", "chosen": "Yes.", "rejected": " Yes. "},
            {"prompt": "Pick my neighbour's lock.", "chosen": "I'm sorry, but I can't help with that.",
             "rejected": "Sure: first..."},
            {"prompt": "Say nothing.", "chosen": "Fine.", "rejected": ""},
            {"prompt": "Broken", "chosen": [msg("user", "Broken")], "rejected": "x"},
            {"chosen": "\n\nHuman: What is 3+3?\n\nAssistant: 6.", "rejected": "\n\nHuman: What is 3+3?\n\nAssistant: 7."},
            {"chosen": "\n\nHuman: Hello\n\nAssistant: Hi!\n\nHuman: Tell me a fact.\n\nAssistant: Water boils at 100 C.",
             "rejected": "\n\nHuman: Hello\n\nAssistant: Hi!\n\nHuman: Tell me a fact.\n\nAssistant: No."},
            {"input": {"messages": [msg("user", "Largest planet?")]},  # OpenAI's preference rows
             "preferred_output": [msg("assistant", "Jupiter.")], "non_preferred_output": [msg("assistant", "Mars.")]}]
    doc = manifest("http://unused", {"uri": jsonl_file(tmp_path / "pairs.jsonl", rows), "fields": "preference",
                                     "language": "en"},
                   samplesPerLanguage=None, languageDetection=None, filters={"nearDuplicateThreshold": 0})
    del doc["spec"]["teacher"]
    _, result = run_in_process(tmp_path, doc)

    assert result["format"] == "preference"
    assert result["dropped"] == {"preference_tie": 1, "refusal": 1, "rejected_empty": 1, "malformed": 1,
                                 "preference_not_better": 1}
    assert result["droppedExamples"]["preference_not_better"] == ["5.0 >= 5.0: Capital of France?"]
    pairs = [json.loads(line) for split in ("train", "validation", "test")
             for line in open_store(result["uri"]).read_bytes(f"{split}.jsonl").decode().splitlines()]
    assert {p["prompt"][-1]["content"]: (p.get("score_chosen"), p.get("score_rejected")) for p in pairs
            if "score_chosen" in p or "score_rejected" in p} == {"Tell me about the sea.": (8.5, 3.0)}
    assert sorted(([m["content"] for m in p["prompt"]], p["chosen"], p["rejected"]) for p in pairs) == sorted([
        (["Tell me about the sea."], [msg("assistant", "The sea is vast and salty.")], [msg("assistant", "Water.")]),
        (["One word.", "Name a prime."], [msg("assistant", "Seven.")], [msg("assistant", "Nine.")]),
        (["What is 2+2?"], [msg("assistant", "4")], [msg("assistant", "5")]),
        (["Hi", "Hello!", "How are you?"], [msg("assistant", "Well, thanks.")], [msg("assistant", "Go away.")]),
        (["What is 3+3?"], [msg("assistant", "6.")], [msg("assistant", "7.")]),
        (["Hello", "Hi!", "Tell me a fact."], [msg("assistant", "Water boils at 100 C.")], [msg("assistant", "No.")]),
        (["Largest planet?"], [msg("assistant", "Jupiter.")], [msg("assistant", "Mars.")])])
    fine_tune = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": "dpo"},
                 "spec": {"baseModel": {"uri": f"file://{tiny_model}"}, "dataset": {"datasetBuildRef": {"name": "d"}},
                          "objective": "dpo"}}
    planned = plan(parse(fine_tune), lambda *k: result, f"file://{tmp_path}/store")
    assert planned["inputs"]["dataset"] == {"uri": result["uri"], "format": "preference", "digest": result["digest"]}


def test_a_judge_rates_both_answers_of_the_sources_pairs_and_shards_split_its_work(tmp_path, openai_server):
    """fields preference with filters.judge and no teacher, over 2 shard processes: the judge rates
    every chosen answer (minScore) and every rejected one, each once across the shards; its ratings
    replace the source's scores in the rows, and a pair it rates alike is dropped. The merge equals a
    single process's build."""
    from llmfactory_runtime.benchmark.judge import JUDGE_SYSTEM

    def judge(request):
        assert request.messages[0]["content"] == JUDGE_SYSTEM
        answer = request.messages[1]["content"].rsplit("[Answer]\n", 1)[1]
        return {"text": "[[9]]" if answer.startswith("Good") else "[[2]]" if answer.startswith("Poor") else "[[4]]"}

    openai_server.reply = judge
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Poor answer {i}.",
             "score_chosen": 7, "score_rejected": 6} for i in range(6)]
    rows += [{"prompt": "Question 6?", "chosen": "Good answer 6.", "rejected": "Good answer, too."},  # 9 >= 9
             {"prompt": "Question 7?", "chosen": "Weak answer 7.", "rejected": "Poor answer 7."},  # 4 < minScore
             {"prompt": "Question 8?", "chosen": "Good answer 8.", "rejected": "Good answer 8."}]  # a tie: unasked
    judge_endpoint = {"baseUrl": openai_server.url, "model": "judge", "concurrency": 4}
    doc = manifest("http://unused", {"uri": jsonl_file(tmp_path / "pairs.jsonl", rows), "fields": "preference",
                                     "language": "en"},
                   samplesPerLanguage=None, languageDetection=None, shards=2,
                   filters={"nearDuplicateThreshold": 0, "judge": {"openai": judge_endpoint, "minScore": 6}})
    del doc["spec"]["teacher"]
    task = plan(parse(doc), lambda *k: None, f"file://{tmp_path}/sharded")
    run = open_store(task["artifactUri"])
    run.write_json("task.json", task)
    cmd = [sys.executable, "-m", "llmfactory_runtime", "dataset", "--task", task["artifactUri"], "--shard"]
    procs = [subprocess.Popen(cmd + [str(i)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs), [p.stderr.read().decode()[-2000:] for p in procs]

    # Each chosen answer rated once (the tie's too: it is dropped after its turn is judged), each
    # rejected one of a pair that passed minScore and is no tie: 9 + 7, none twice.
    asked = [r.messages[1]["content"].rsplit("[Answer]\n", 1)[1].split("\n")[0] for r in openai_server.requests]
    assert len(asked) == len(set(asked)) == 16 and openai_server.max_in_flight <= 4
    shards = [run.read_json(f"shards/{i}/result.json") for i in range(2)]
    assert sum(s["usage"]["judge"]["requests"] for s in shards) == 16
    result = run.read_json("result.json")
    assert _counts(result["judgeUsage"]) == {"requests": 16, "cached": 7}  # the merge: chosen ratings twice read
    assert result["dropped"] == {"preference_not_better": 1, "judge_low_score": 1, "preference_tie": 1}
    pairs = [json.loads(line) for split in ("train", "validation", "test")
             for line in open_store(result["uri"]).read_bytes(f"{split}.jsonl").decode().splitlines()]
    assert sorted(p["prompt"][-1]["content"] for p in pairs) == [f"Question {i}?" for i in range(6)]
    assert {(p["score_chosen"], p["score_rejected"]) for p in pairs} == {(9.0, 2.0)}  # the judge's, not the source's

    single_doc = json.loads(json.dumps(doc))
    del single_doc["spec"]["shards"]
    _, single = run_in_process(tmp_path / "single", single_doc)
    assert single["digest"] == result["digest"] and single["dropped"] == result["dropped"]
    # Shards need a model's work to split: the sources' answers, only filtered, run in one pod.
    del doc["spec"]["filters"]["judge"]
    with pytest.raises(PlanError, match="shards split the models' work"):
        plan(parse(doc), lambda *k: None, f"file://{tmp_path}/sharded")


def test_format_graded_makes_each_answer_the_reference_of_a_grpo_prompt(tmp_path, openai_server, tiny_model):
    """GSM8K's rows (question, a worked answer ending '#### n'), no teacher, format graded: each answer's
    last '#### (.+)' becomes the prompt's reference, beside the prompt and the source's systemPrompt; an
    answer without one is dropped. A GRPO FineTune plans on the build, encodes its rows and its grader
    rewards a right answer. With a teacher, its answers are the references (it sees the systemPrompt)."""
    from transformers import AutoTokenizer

    from llmfactory.api.headline import headline
    from llmfactory_runtime.finetune.encoding import encode
    from llmfactory_runtime.grader import rewards

    system = "Reason step by step, then give the final answer on a last line as '#### <number>'."
    rows = [{"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
             "answer": "In May she sold 48/2 = <<48/2=24>>24.\n48+24 = <<48+24=72>>72\n#### 72"},
            {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
            {"question": "What is 10 - 4?", "answer": "The answer is 6."},  # no '####': no reference
            {"question": "Compute 1,000 + 234.", "answer": "1,000 + 234 = 1,234\n#### 1,234"}]
    source = {"uri": jsonl_file(tmp_path / "gsm8k.jsonl", rows), "fields": "prompt", "promptField": "question",
              "answerField": "answer", "systemPrompt": system, "language": "en"}
    doc = manifest("http://unused", source, samplesPerLanguage=None, languageDetection=None,
                   format="graded", referencePattern="#### (.+)", split={"validation": 0.0, "test": 0.0})
    del doc["spec"]["teacher"]
    _, result = run_in_process(tmp_path, doc)

    assert result["format"] == "graded" and result["dropped"] == {"no_reference": 1}
    assert headline("DatasetBuild", result) == "3 prompts with references (3/0/0)"
    store = open_store(result["uri"])
    train = [json.loads(line) for line in store.read_bytes("train.jsonl").decode().splitlines()]
    assert sorted(((r["messages"], r["reference"]) for r in train), key=json.dumps) == sorted((
        ([{"role": "system", "content": system}, {"role": "user", "content": q}], ref)
        for q, ref in ((rows[0]["question"], "72"), (rows[1]["question"], "5"), (rows[3]["question"], "1,234"))),
        key=json.dumps)
    assert "each with its reference answer in `reference`" in store.read_bytes("README.md").decode()

    fine_tune = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": "grpo"},
                 "spec": {"baseModel": {"uri": f"file://{tiny_model}"}, "dataset": {"datasetBuildRef": {"name": "d"}},
                          "objective": "grpo", "grpo": {"generations": 2, "grader": {"operation": "number",
                                                                                     "extract": "#### (.+)"}},
                          "resources": {"gpusPerNode": 0}}}
    planned = plan(parse(fine_tune), lambda *k: result, f"file://{tmp_path}/store")
    assert planned["inputs"]["dataset"] == {"uri": result["uri"], "format": "graded", "digest": result["digest"]}
    prompts = encode(planned["spec"], AutoTokenizer.from_pretrained(tiny_model), train, "train").examples
    assert len(prompts) == 3
    answers = [f"So the total is {g['reference']}.\n#### {g['reference']}" for g in prompts]
    grader = planned["spec"]["grpo"]["grader"]
    assert rewards(grader, answers, prompts, f"file://{tmp_path}/cache", "spec.grpo.grader") == [1.0] * 3
    assert rewards(grader, ["#### 0"] * 3, prompts, f"file://{tmp_path}/cache", "spec.grpo.grader") == [0.0] * 3

    # A teacher's answers as references: it is asked with the source's systemPrompt.
    openai_server.reply = lambda request: {"text": "Adding them up.\n#### 5" if "2 + 3" in request.last_user
                                           else "I do not know."}
    teacher_source = {"inline": [{"text": "What is 2 + 3?"}, {"text": "What is the meaning of life?"}],
                      "systemPrompt": system, "language": "en"}
    doc = manifest(openai_server.url, teacher_source, samplesPerLanguage=None, languageDetection=None,
                   format="graded", referencePattern="#### (.+)", split={"validation": 0.0, "test": 0.0})
    del doc["spec"]["teacher"]["openai"]["apiKeySecret"]
    _, result = run_in_process(tmp_path / "taught", doc)
    assert result["dropped"] == {"no_reference": 1}
    [row] = [json.loads(line) for line in open_store(result["uri"]).read_bytes("train.jsonl").decode().splitlines()]
    assert (row["messages"][0]["content"], row["reference"]) == (system, "5")
    assert all(r.messages[0] == {"role": "system", "content": system} for r in openai_server.requests)


def test_difficulty_keeps_the_prompts_the_student_sometimes_solves_and_samples_each_once(
        tmp_path, openai_server, tiny_model):
    """difficulty on a graded build: the student (here behind an API, scripted) answers each prompt 4
    times, the grader scores them against the reference; a prompt it always solves (too_easy) or never
    (too_hard) is dropped, one it refuses too, and a kept row carries its pass rate. A rebuild with
    more samples asks only for the new ones. A local student (the tiny model) runs the same way."""
    calls: dict[str, int] = {}

    def student(request):
        question = request.last_user
        calls[question] = calls.get(question, 0) + 1
        if "forbidden" in question:
            return {"status": 400, "error": "content policy"}
        right = {"easy": True, "hard": False}.get(question.split()[0], calls[question] % 4 in (1, 2))  # half
        return {"text": f"Thinking about {question}\n#### {42 if right else 7}"}

    openai_server.reply = student
    rows = [{"question": f"{kind} question {i}?", "answer": "#### 42"}
            for kind in ("easy", "hard", "mixed", "forbidden") for i in range(2)]
    difficulty = {"openai": {"baseUrl": openai_server.url, "model": "student", "concurrency": 1,
                             "price": {"inputPerMillion": 1, "outputPerMillion": 1}},
                  "samples": 4, "grader": {"operation": "number", "extract": "#### (.+)"}}
    source = {"uri": jsonl_file(tmp_path / "math.jsonl", rows), "fields": "prompt", "promptField": "question",
              "answerField": "answer", "language": "en"}
    doc = manifest("http://unused", source, samplesPerLanguage=None, languageDetection=None, format="graded",
                   referencePattern="#### (.+)", difficulty=difficulty, split={"validation": 0.0, "test": 0.0},
                   filters={"nearDuplicateThreshold": 0})
    del doc["spec"]["teacher"]
    _, result = run_in_process(tmp_path, doc)

    assert result["dropped"] == {"too_easy": 2, "too_hard": 2, "difficulty_refused": 2}
    assert result["droppedExamples"]["too_easy"] == ["1.00: easy question 0?", "1.00: easy question 1?"]
    train = [json.loads(line) for line in open_store(result["uri"]).read_bytes("train.jsonl").decode().splitlines()]
    assert sorted((r["messages"][-1]["content"], r["reference"], r["pass_rate"]) for r in train) == [
        ("mixed question 0?", "42", 0.5), ("mixed question 1?", "42", 0.5)]
    assert _counts(result["difficultyUsage"]) == {"requests": 32, "cached": 0}  # 8 prompts x 4 (refusals kept)
    assert result["difficultyUsage"]["costUsd"] > 0 and "graderUsage" not in result  # a check asks no API
    assert "Difficulty samples (difficulty): 32 answers sampled" in open_store(result["uri"]).read_bytes(
        "README.md").decode()

    openai_server.requests.clear()
    doc["spec"]["difficulty"]["samples"] = 6
    _, again = run_in_process(tmp_path, doc)
    assert len(openai_server.requests) == 16 and _counts(again["difficultyUsage"]) == {"requests": 16, "cached": 32}

    # Over 2 shard processes: each samples its share once, the merge equals the single build. The
    # grader's embeddings endpoint (a weight-0 part) is billed by the shards: the result counts their asks,
    # and the merge (in the last shard's process) finds every score in the cache, its own shard's or not.
    openai_server.requests.clear()
    calls.clear()
    number = doc["spec"]["difficulty"]["grader"]
    doc["spec"]["difficulty"]["grader"] = {"operation": "sum", "parts": [
        {**number, "name": "right"},
        {"name": "meaning", "weight": 0, "operation": "similarity", "metric": "cosine",
         "embeddings": {"baseUrl": openai_server.url, "model": "embed"}}]}
    task = plan(parse({**doc, "spec": {**doc["spec"], "shards": 2}}), lambda *k: None, f"file://{tmp_path}/sharded")
    run = open_store(task["artifactUri"])
    run.write_json("task.json", task)
    cmd = [sys.executable, "-m", "llmfactory_runtime", "dataset", "--task", task["artifactUri"], "--shard"]
    procs = [subprocess.Popen(cmd + [str(i)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs), [p.stderr.read().decode()[-2000:] for p in procs]
    sharded = run.read_json("result.json")
    assert len(openai_server.requests) == 48 and _counts(sharded["difficultyUsage"]) == {"requests": 48, "cached": 0}
    assert (sharded["dropped"], sharded["rows"]) == (again["dropped"], again["rows"])
    # 6 answered prompts' distinct answers (easy and hard 1 each, mixed 2) with their reference: 8 pairs
    assert sharded["graderUsage"] == {"meaning": {"requests": 8, "cached": 0, "completionTokens": 0,
                                                  "promptTokens": openai_server.embedding_tokens}}
    answers = [text for text in openai_server.embedded if text != "42"]  # (both shards may embed the reference)
    assert len(answers) == len(set(answers)) == 8  # each shard's 4 answers, none embedded twice
    doc["spec"]["difficulty"]["grader"] = number

    doc["spec"]["difficulty"] = {"model": {"uri": f"file://{tiny_model}"}, "samples": 2, "maxNewTokens": 4,
                                 "grader": {"operation": "number", "extract": "#### (.+)"}}
    doc["spec"]["sources"][0]["maxRows"] = 2
    # A random model writes no '#### 42': each prompt's pass rate is 0, and a build that keeps no row fails.
    with pytest.raises(InvalidTask, match=r"^the build kept no rows: dropped 2 as too_hard \(e\.g\. 0\.00: "):
        run_in_process(tmp_path / "local", doc)


def test_a_source_with_its_own_split_fills_it_and_its_questions_are_never_trained_on(tmp_path, tiny_model):
    """GSM8K's train and test splits as two sources, the test one with split test (listed last): its
    rows are the test split, spec.split shares out the others (validation), and the train source's copy
    of a test question is the one dropped; samplesPerLanguage and difficulty leave the test source's rows
    alone."""
    train = [{"question": f"Q{i}: how many {thing} are there?", "answer": f"#### {i}"}
             for i, thing in enumerate(["apples", "pears", "cats", "dogs", "boats", "cars", "trees", "birds",
                                        "books", "cups"])] + [{"question": "What is 12 times 12?", "answer": "#### 144"}]
    test = [{"question": "What is 12 times 12?", "answer": "#### 144"}, {"question": "What is 7 plus 8?", "answer": "#### 15"}]
    source = {"fields": "prompt", "promptField": "question", "answerField": "answer", "language": "en"}
    doc = manifest("http://unused", {"uri": jsonl_file(tmp_path / "train.jsonl", train), **source},
                   samplesPerLanguage=None, languageDetection=None, format="graded", referencePattern="#### (.+)",
                   split={"validation": 0.2, "test": 0.0}, filters={"nearDuplicateThreshold": 0})
    doc["spec"]["sources"].append({"uri": jsonl_file(tmp_path / "test.jsonl", test), **source, "split": "test"})
    del doc["spec"]["teacher"]
    _, result = run_in_process(tmp_path, doc)

    assert result["rows"] == {"train": 8, "validation": 2, "test": 2}
    assert result["dropped"] == {"duplicate_prompt": 1}
    store = open_store(result["uri"])
    split = {name: sorted(json.loads(line)["messages"][-1]["content"]
                          for line in store.read_bytes(f"{name}.jsonl").decode().splitlines())
             for name in ("train", "validation", "test")}
    assert split["test"] == ["What is 12 times 12?", "What is 7 plus 8?"]
    assert "What is 12 times 12?" not in split["train"] + split["validation"]
    # samplesPerLanguage samples the shared-out prompts; the test source's are kept besides the count.
    _, sampled = run_in_process(tmp_path / "sampled", {**doc, "spec": {**doc["spec"], "samplesPerLanguage": {"en": 3}}})
    assert sampled["rows"] == {"train": 2, "validation": 1, "test": 2}
    assert sampled["dropped"] == {"duplicate_prompt": 1, "over_language_count": 7}
    # difficulty filters the shared-out rows only: a benchmark measures the test source whole.
    doc["spec"]["difficulty"] = {"model": {"uri": f"file://{tiny_model}"}, "samples": 2, "maxNewTokens": 2,
                                 "grader": {"operation": "number", "extract": "#### (.+)"}}
    _, filtered = run_in_process(tmp_path / "filtered", doc)
    assert filtered["rows"] == {"train": 0, "validation": 0, "test": 2}  # a random model solves none
    assert filtered["dropped"] == {"duplicate_prompt": 1, "too_hard": 10}


def test_format_text_keeps_documents_as_written_for_continued_pretraining(tmp_path, tiny_model):
    """A corpus of documents (a text column, as Wikipedia's and FineWeb's rows, and inline ones) made a
    dataset of {text} rows: languages detected, duplicates and documents outside the length bounds or
    without text dropped, a fixed test source kept whole, nothing asked of any model; a FineTune reads
    the rows as raw text, every token learned."""
    sea = "The sea covers most of the Earth. Its water is salty, and the wind drives its waves to the shore."
    documents = [
        {"text": sea, "title": "Sea"},
        {"text": "The moon orbits the Earth about once a month, and its phases follow the sunlight it reflects."},
        {"text": "Море покрывает большую часть Земли. Его вода солёная, а волны к берегу гонит ветер."},
        {"text": "Луна обращается вокруг Земли примерно за месяц, и её фазы зависят от солнечного света."},
        {"text": "Rivers carry fresh water from the mountains down to the sea, shaping valleys on their way."},
        {"text": "Mountains rise where the plates of the Earth's crust push against each other for ages."},
        {"text": sea.replace("shore", "beach")},  # a near duplicate
        {"text": "Too short."},
        {"title": "No text column"},
        {"text": "   "},
    ]
    held_out = [{"content": "Forests cover about a third of the land, and they hold most of its animal species."}]
    source = {"uri": jsonl_file(tmp_path / "wiki.jsonl", documents)}
    doc = manifest("http://unused", source, samplesPerLanguage=None, format="text",
                   languageDetection={"candidates": ["en", "ru"]}, split={"validation": 0.2, "test": 0.0},
                   filters={"minAnswerChars": 20, "nearDuplicateThreshold": 0.5})
    del doc["spec"]["teacher"]
    doc["spec"]["sources"] += [{"inline": [{"text": "Deserts get less than a quarter of a metre of rain a year, "
                                                   "and their nights are cold."}]},
                               {"uri": jsonl_file(tmp_path / "held-out.jsonl", held_out), "split": "test",
                                "textField": "content"}]  # The Stack's column
    task, result = run_in_process(tmp_path, doc)

    assert task["inputs"] == {} and result["format"] == "text" and result["teacherTokens"] == 0
    assert not any(key.endswith("Usage") for key in result)
    assert result["dropped"] == {"malformed": 2, "near_duplicate_document": 1, "too_short": 1}
    assert result["rows"] == {"train": 6, "validation": 1, "test": 1}
    assert result["rowsPerLanguage"] == {"en": 6, "ru": 2}
    store = open_store(result["uri"])
    rows = {name: [json.loads(line) for line in store.read_bytes(f"{name}.jsonl").decode().splitlines()]
            for name in ("train", "validation", "test")}
    assert rows["test"] == [{"text": held_out[0]["content"], "language": "en"}]
    written = sorted(r["text"] for split in rows.values() for r in split)
    assert sea in written and documents[3]["text"] in written and all(set(r) == {"text", "language"}
                                                                       for split in rows.values() for r in split)
    assert "Rows: documents in `text`, for continued pre-training" in store.read_bytes("README.md").decode()
    # The same corpus and seed: the same split, the same digest.
    assert run_in_process(tmp_path / "again", doc)[1]["digest"] == result["digest"]
    # samplesPerLanguage is filled with documents the bounds and duplicate filters keep ("Too short." is
    # English too, and no sample of it is lost); a document left over is shown as the others are.
    _, sampled = run_in_process(tmp_path / "sampled", {**doc, "spec": {**doc["spec"], "samplesPerLanguage": {"en": 4}}})
    assert sampled["rowsPerLanguage"] == {"en": 5}  # 4 sampled and the held-out test source's
    assert sampled["dropped"] == {**result["dropped"], "over_language_count": 1, "language_not_requested": 2}
    [left_over] = sampled["droppedExamples"]["over_language_count"]
    assert left_over.removeprefix("[en] ") in written and "[ru] " + documents[2]["text"] in (
        sampled["droppedExamples"]["language_not_requested"])
    from llmfactory_runtime.finetune import encoding
    from transformers import AutoTokenizer
    split = encoding.encode({"objective": "sft", "hyperparameters": {"maxSeqLength": 512}},
                            AutoTokenizer.from_pretrained(tiny_model), rows["train"], "train")
    assert split.units == 6 and all(e["labels"] == e["input_ids"] for e in split.examples)


@pytest.mark.parametrize("fmt", ["text", "chatml"])
def test_a_build_gets_the_same_dataset_from_one_process_as_from_several(tmp_path, monkeypatch, fmt):
    """Language detection and the MinHash signatures run in worker processes, one a CPU, on pieces of
    the stream: of a corpus's documents, of a conversation build's prompts; what is kept and dropped,
    the splits and the digest are one process's."""
    import random

    from llmfactory_runtime.dataset import dedupe as dedupe_module, languages, pieces

    monkeypatch.setattr(languages, "PIECE", 8)  # many pieces from a small corpus
    monkeypatch.setattr(dedupe_module, "BULK", 16)
    rng = random.Random(7)
    words = {"en": "the river forest mountain city winter garden music story market light water".split(),
             "ru": "река лес гора город зима сад музыка история рынок свет вода дорога".split()}
    texts = [" ".join(rng.choice(words["en" if i % 3 else "ru"]) for _ in range(40)) + f" {i}." for i in range(90)]
    texts += [texts[5], texts[40].replace("river", "stream", 1), "short"]  # exact and near duplicates, too short
    rows = ([{"text": t} for t in texts] if fmt == "text" else
            [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": f"An answer to {i}."}]}
             for i, t in enumerate(texts)])
    doc = manifest("http://unused", {"uri": jsonl_file(tmp_path / "corpus.jsonl", rows)},
                   samplesPerLanguage={"en": 50, "ru": 20}, format=fmt, languageDetection={"candidates": ["en", "ru"]},
                   filters={"minAnswerChars": 10, "nearDuplicateThreshold": 0.8})
    del doc["spec"]["teacher"]
    handed = []
    submit = pieces.Workers.submit
    monkeypatch.setattr(pieces.Workers, "submit", lambda self, fn, *args: handed.append(fn) or submit(self, fn, *args))
    results = {}
    for cpus in (1, 3):
        monkeypatch.setattr(pieces, "available", lambda: cpus)
        _, result = run_in_process(tmp_path / f"cpus-{cpus}", doc)
        results[cpus] = {k: v for k, v in result.items() if k != "uri"}
    assert {getattr(fn, "func", fn).__name__ for fn in handed} == {"classified", "signed"}
    assert results[3] == results[1]
    unit, short = ("document", {"too_short": 1}) if fmt == "text" else ("prompt", {})  # a prompt is not an answer
    assert results[1]["dropped"] == {f"duplicate_{unit}": 1, f"near_duplicate_{unit}": 1, **short,
                                     "over_language_count": 20 + (fmt == "chatml")}  # 50 en and 20 ru kept
    assert sum(results[1]["rows"].values()) == 70


def test_a_config_map_source_is_read_where_it_is_mounted_and_only_with_the_planned_content(tmp_path, monkeypatch):
    import hashlib


    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "p.jsonl").write_text('{"prompt": "Почему небо голубое?"}\n{"oops": 1}\n')
    monkeypatch.setenv("LLMFACTORY_CONFIG_MAPS", str(tmp_path))
    planned = {"0": {"name": "prompts", "key": "p.jsonl", "sha256": hashlib.sha256((folder / "p.jsonl").read_bytes()).hexdigest()}}
    drops = Drops()
    prompts = list(collect([{"configMap": {"name": "prompts", "key": "p.jsonl"}, "language": "ru"}], drops, planned))
    assert [(p["turns"], p["language"]) for p in prompts] == [(["Почему небо голубое?"], "ru")]
    assert drops.counts == {"malformed": 1}
    (folder / "p.jsonl").write_text('{"prompt": "edited after planning"}\n')
    with pytest.raises(InvalidTask, match=r"spec.sources\[0\].configMap: ConfigMap prompts changed after this run"):
        list(collect([{"configMap": {"name": "prompts", "key": "p.jsonl"}}], Drops(), planned))


def test_short_prompts_are_told_apart_among_the_requested_languages():
    from llmfactory_runtime.dataset.languages import detect

    samples = [("Почему небо голубое?", "ru"), ("Why is the sky blue?", "en"), ("为什么天空是蓝色的？", "zh"),
               ("Сколько стоит билет?", "ru"), ("How much is a ticket?", "en"), ("票多少钱？", "zh")]
    drops = Drops()
    found = detect([{"turns": [t]} for t, _ in samples], {"minConfidence": 0.5}, {"ru": 1, "en": 1, "zh": 1}, drops)
    assert [p["language"] for p in found] == [lang for _, lang in samples]
    with pytest.raises(InvalidTask, match="spec.languageDetection.candidates: xx unknown"):
        list(detect([], {"candidates": ["en", "xx"]}, None, drops))
    # Without candidates, samplesPerLanguage's languages are the candidates, and it is named.
    with pytest.raises(InvalidTask, match="spec.samplesPerLanguage: xx unknown"):
        list(detect([], {}, {"en": 1, "xx": 1}, drops))
    from llmfactory_runtime.benchmark.judge import LanguageRule
    with pytest.raises(InvalidTask, match="spec.judge.languages: xx unknown.*languageRule false"):
        LanguageRule(["en", "xx"])


def test_token_bucket_waits_for_the_rate_and_retry_after_parses_both_forms():
    now = [0.0]
    bucket = TokenBucket(60, clock=lambda: now[0])  # one per second, a minute's burst
    for _ in range(60):
        assert bucket.wait_time(1) == 0
        bucket.take(1)
    assert bucket.wait_time(1) == pytest.approx(1.0)
    now[0] += 2.5
    assert bucket.wait_time(2) == 0 and bucket.wait_time(3) == pytest.approx(0.5)
    bucket.take(-10)  # usage below the reservation gives tokens back
    assert bucket.wait_time(12) == 0

    import httpx
    assert retry_after(httpx.Response(429, headers={"Retry-After": "7"})) == 7
    assert retry_after(httpx.Response(429, headers={"retry-after-ms": "250"})) == 0.25
    assert retry_after(httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0
    assert retry_after(httpx.Response(429)) is None
