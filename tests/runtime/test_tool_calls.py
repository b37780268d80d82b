"""Fine-tuning for function calling on OpenAI's tool-calling rows: {messages} with the assistant's
tool_calls and the tools' results, beside {tools}, as OpenAI's fine-tuning API takes them."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from llmfactory_runtime.chat import TEMPLATES, render
from llmfactory_runtime.data import dumps_jsonl
from llmfactory_runtime.models import load_tokenizer
from llmfactory_runtime.store import open_store

from finetune_helpers import TOOL_ROW, WEATHER, finetune_task, run_finetune, write_task


def _row(city: str) -> dict:
    return {"tools": WEATHER, "messages": [
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
        {"role": "assistant", "content": f"18 C in {city}."}]}


@pytest.mark.slow
def test_a_fine_tune_learns_tool_calls_its_benchmark_grades_the_calls_and_its_model_renders_the_tools(tmp_path):
    """The calls and answers are learned (the held-out loss falls); a Benchmark of the FineTune with
    grader toolCalls answers its conversations' calling turns, offered the tools: the tuned model writes
    well-formed calls, each rewarded 1 where it names the row's city, the base writes none; the tuned
    model's tokenizer keeps the template that writes tools, so a server given tools (vLLM's chat API
    with the hermes parser) prompts it as it was trained."""
    from llmfactory.planner import parse, plan
    from llmfactory_runtime.benchmark import run as benchmark
    from llmfactory_runtime.progress import Progress
    from llmfactory_runtime.tool_calls import answered_calls
    from tests.tiny_model import make_tiny_llama

    base = make_tiny_llama(tmp_path / "base", context=2048)  # the tools' signatures take a few hundred tokens
    data = tmp_path / "data"
    data.mkdir()
    cities = ["Paris", "Tokyo", "Lima", "Oslo"]
    (data / "train.jsonl").write_bytes(dumps_jsonl([_row(cities[i % 4]) for i in range(32)]))
    (data / "validation.jsonl").write_bytes(dumps_jsonl([_row("Rome"), _row("Cairo")]))
    (data / "test.jsonl").write_bytes(dumps_jsonl([_row(city) for city in cities]))
    task = finetune_task(base, f"file://{data}", f"file://{tmp_path}/store", method="full",
                         hyperparameters={"maxSeqLength": 1024, "epochs": 10, "learningRate": 0.003})
    done = run_finetune(write_task(task, tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = open_store(task["artifactUri"]).read_json("result.json")
    assert result["evalLoss"] < result["firstLoss"] - 0.3
    # The Benchmark reads the FineTune's own conversations (its test split) when the grader is toolCalls.
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Benchmark", "metadata": {"name": "calls"},
           "spec": {"model": {"fineTuneRef": {"name": "ft"}},
                    "reward": {"grader": {"operation": "toolCalls"}, "maxNewTokens": 100},
                    "gates": [{"metric": "reward.value", "op": ">", "value": 0}]}}
    bench = plan(parse(doc), lambda *key: result, f"file://{tmp_path}/bench")
    store = open_store(bench["artifactUri"])
    outcome = benchmark.run(bench, store, Progress(store))
    rewarded = store.read_json("report/report.json")["rewarded"]
    calls = [answered_calls(a) for a in rewarded["model"]["answers"]]
    assert all(c and [call["name"] for call in c] == ["get_weather"] for c in calls), rewarded["model"]["answers"]
    assert rewarded["model"]["rewards"] == [float(c == [{"name": "get_weather", "arguments": {"city": city}}])
                                            for c, city in zip(calls, cities)]
    assert rewarded["baseline"]["rewards"] == [0.0] * 4 and outcome["metrics"]["reward.baseline"] == 0
    assert outcome["metrics"]["reward.value"] == sum(rewarded["model"]["rewards"]) / 4 > 0 and outcome["passed"]
    assert '| "Weather in Paris?" | "get_weather({\\"city\\": \\"Paris\\"})" |' in \
        store.read_bytes("report/report.md").decode()
    tokenizer = load_tokenizer({"uri": result["modelUri"]})
    assert tokenizer.chat_template == TEMPLATES["chatml"][0]
    prompt = render(tokenizer, [{"role": "user", "content": "Weather in Rome?"}], add_generation_prompt=True,
                    tools=WEATHER)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in prompt
    assert prompt.endswith("<|im_start|>user\nWeather in Rome?<|im_end|>\n<|im_start|>assistant\n")


VLLM_HERMES = """
import json, sys
from transformers import AutoTokenizer
from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
info = Hermes2ProToolParser(AutoTokenizer.from_pretrained(sys.argv[1])).extract_tool_calls(sys.argv[2], None)
print(json.dumps([{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in info.tool_calls]))
"""


def test_vllms_hermes_tool_parser_reads_back_the_calls_chatml_teaches(tiny_model, cpu_vllm):
    """What a served model writes when it has learned a call (its assistant turn up to <|im_end|>,
    where generation stops), read by the parser `vllm serve --tool-call-parser hermes` uses."""
    from transformers import AutoTokenizer

    from llmfactory_runtime.chat import assistant_spans
    from llmfactory_runtime.data import messages_of, tools_of

    tok = AutoTokenizer.from_pretrained(tiny_model)
    messages = messages_of(TOOL_ROW)[:3]  # through the assistant's call
    text, [(start, end)] = assistant_spans(tok, messages, tools=tools_of(TOOL_ROW))
    written = text[start:end].removesuffix("<|im_end|>\n")
    python = Path(os.environ["LLMFACTORY_VLLM"]).parent / "python"  # the vLLM build's own environment
    done = subprocess.run([str(python), "-c", VLLM_HERMES, str(tiny_model), written], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [{"name": "get_weather", "arguments": {"city": "Paris"}}]


def _call(name: str, **arguments) -> dict:
    """A tool call as OpenAI's API and fine-tuning rows write one (its arguments JSON text)."""
    return {"id": "c", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def _written(name: str, **arguments) -> str:
    """A call as the chatml template teaches a model to write it."""
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def test_a_tool_calls_grader_passes_exactly_the_expected_calls_in_any_order_however_the_model_writes_them():
    """1 for the same functions with equal arguments (as JSON values, keys in any order), none missing
    or extra; a call the answer cuts off or writes as no JSON scores 0; [] expects an answer in words."""
    from llmfactory_runtime.grader import graded_of, rewards

    grader = {"operation": "toolCalls", "referenceField": "calls"}
    two = [_call("get_weather", city="Paris"), _call("get_time", zone="CET", hour24=True)]
    cases = [  # (expected calls, answer, reward)
        (two[:1], _written("get_weather", city="Paris"), 1.0),
        (two[:1], "Let me check.\n" + _written("get_weather", city="Paris"), 1.0),  # words beside a call
        (two[:1], '{"name": "get_weather", "parameters": {"city": "Paris"}}', 1.0),  # Llama 3.1's JSON form
        (two[:1], _written("get_weather", city="Lima"), 0.0),
        (two[:1], _written("get_forecast", city="Paris"), 0.0),
        (two[:1], _written("get_weather", city="Paris", unit="C"), 0.0),  # an argument too many
        (two[:1], _written("get_weather", city="Paris")[:-20], 0.0),  # cut at maxNewTokens
        (two[:1], "<tool_call>\nget_weather(city='Paris')\n</tool_call>", 0.0),  # not JSON
        (two[:1], "It is sunny in Paris.", 0.0),
        (two, _written("get_time", hour24=True, zone="CET") + "\n" + _written("get_weather", city="Paris"), 1.0),
        (two, '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'  # tags dropped as special tokens
              '{"name": "get_time", "arguments": {"zone": "CET", "hour24": true}}', 1.0),
        (two, _written("get_weather", city="Paris"), 0.0),  # one missing
        (two, _written("get_weather", city="Paris") + _written("get_time", zone="CET", hour24=1), 0.0),  # 1 is no true
        ([_call("add", a=1, b=2.5)], _written("add", b=2.5, a=1.0), 1.0),  # 1 and 1.0 are the same number
        ([], "It is sunny in Paris.", 1.0),
        ([], _written("get_weather", city="Paris"), 0.0),
    ]
    rows = [{"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": WEATHER, "calls": calls}
            for calls, _, _ in cases]
    graded = [graded_of(row, grader) for row in rows]
    assert rewards(grader, [answer for _, answer, _ in cases], graded, "file:///unused", "spec.reward.grader") == \
        [expected for _, _, expected in cases]
    assert graded[0]["reference"] == 'get_weather({"city": "Paris"})' and graded[-1]["reference"] == "no call"
    assert graded[0]["tools"] == WEATHER


def test_a_conversation_is_graded_on_its_last_turn_that_calls_tools_and_a_prompt_row_names_its_calls():
    """A fine-tuning row (ending with the assistant's turn): the prompt is everything before its last
    calling turn, which holds the calls expected; without one, its last turn, which expects none.
    A prompt may end with a tool's result. What is missing or malformed is named."""
    from llmfactory_runtime.grader import graded_of, graded_rows
    from llmfactory_runtime.task import InvalidTask

    grader = {"operation": "toolCalls", "referenceField": "calls"}
    graded = graded_of(TOOL_ROW, grader)
    assert [m["role"] for m in graded["messages"]] == ["system", "user"] and graded["question"] == "Weather in Paris?"
    assert graded["calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}] and graded["tools"] == WEATHER
    # Two calling turns: the last is graded, after the first call and its result.
    row = {**TOOL_ROW, "messages": [*TOOL_ROW["messages"], {"role": "user", "content": "And in Oslo?"},
                                    {"role": "assistant", "content": None,
                                     "tool_calls": [_call("get_weather", city="Oslo")]},
                                    {"role": "tool", "tool_call_id": "c", "content": "9 C"},
                                    {"role": "assistant", "content": "9 C."}]}
    graded = graded_of(row, grader)
    assert len(graded["messages"]) == 6 and graded["messages"][2]["tool_calls"] == TOOL_ROW["messages"][2]["tool_calls"]
    assert graded["reference"] == 'get_weather({"city": "Oslo"})' and graded["question"] == "And in Oslo?"
    words = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    assert graded_of(words, grader)["calls"] == [] and graded_of(words, grader)["tools"] is None
    # A prompt row: its calls in referenceField; it may end with a tool's result.
    prompt = {"tools": WEATHER, "messages": TOOL_ROW["messages"][:4], "calls": []}
    assert graded_of(prompt, grader)["messages"][-1]["role"] == "tool"
    with pytest.raises(ValueError, match=r"needs the tool calls it expects in field 'calls' \(grader.referenceField\)"):
        graded_of({"messages": [{"role": "user", "content": "Hi"}]}, grader)
    with pytest.raises(ValueError, match="expected tool calls are a list of"):
        graded_of({"messages": [{"role": "user", "content": "Hi"}], "calls": "get_weather"}, grader)
    # Rows of which none calls a tool (a DatasetBuild's conversations) would only check for no calls.
    with pytest.raises(InvalidTask, match=r"spec.reward.dataset: test.jsonl: no row expects a tool call"):
        graded_rows([words, prompt], grader, "spec.reward.dataset: test.jsonl")
    assert len(graded_rows([words, TOOL_ROW], grader, "spec.reward.dataset: test.jsonl")) == 2
    # Other graders still need a prompt row.
    with pytest.raises(ValueError, match="must end with a user message or a tool's result"):
        graded_of(TOOL_ROW, {"operation": "equals", "referenceField": "calls"})


def test_prompts_offer_their_tools_to_the_model_and_a_template_that_leaves_them_out_is_refused(tiny_model, tmp_path):
    """GRPO's prompts and a Benchmark's reward prompts are rendered with their row's tools; a model
    whose template drops them is refused, naming the tool; a python grader sees the calls as OpenAI's."""
    from transformers import AutoTokenizer

    from llmfactory_runtime.chat import use_template
    from llmfactory_runtime.finetune.grpo import encode_prompts
    from llmfactory_runtime.generate import prompt_ids
    from llmfactory_runtime.python_grader import grade
    from llmfactory_runtime.task import InvalidTask

    tok = AutoTokenizer.from_pretrained(tiny_model)
    grader = {"operation": "toolCalls", "referenceField": "calls"}
    [encoded] = encode_prompts(tok, [TOOL_ROW], 4096, grader, "spec.dataset: train.jsonl")
    text = tok.decode(encoded["prompt"])
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert text.endswith("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    assert encoded["prompt"] == prompt_ids(tok, encoded["messages"], WEATHER) != prompt_ids(tok, encoded["messages"])
    use_template(tok, *TEMPLATES["llama3"])
    with pytest.raises(InvalidTask, match=r"does not write the tools or tool calls the data holds \(get_weather"):
        prompt_ids(tok, encoded["messages"], WEATHER)
    source = ("import json\ndef grade(sample, item):\n    calls = sample['output_tools']\n"
              "    return 10 * len(calls) + sum(json.loads(c['function']['arguments'])['city'] == 'Oslo'\n"
              "                                 for c in calls)\n")
    answer = _written("get_weather", city="Paris") + _written("get_weather", city="Oslo")
    assert grade(source, [("", a) for a in (answer, "Sunny.", "<tool_call>{oops")], [{}, {}, {}],
                 "spec.grpo.grader") == [21, 0, 0]


def test_the_importance_matrix_reads_a_tool_conversations_signatures_and_calls_too():
    """llama-imatrix calibrates on plain text: a tool-calling row gives its tools and calls as JSON
    beside its messages' words, not the words alone (its calls' contents are empty), and an answer's
    reasoning before it (the model writes both)."""
    from llmfactory_runtime.quantize.run import _plain_text

    system, user, call, result, answer = TOOL_ROW["messages"]
    text = _plain_text({**TOOL_ROW, "messages": [system, user, call, result, {**answer, "reasoning_content": "Mild."}]})
    assert text.splitlines() == [json.dumps(WEATHER[0]), "Be brief.", "Weather in Paris?",
                                 '{"name": "get_weather", "arguments": {"city": "Paris"}}', "18 C, sunny",
                                 "Mild.", "18 C and sunny."]


@pytest.mark.slow
def test_grpo_samples_answers_to_a_tool_conversations_calling_turn_and_rewards_their_calls(tmp_path):
    """A GRPO FineTune on tool-calling conversations with grader toolCalls (its prompts offered their
    tools: see encode_prompts above): each prompt is the conversation up to its calling turn, and the
    logged completions name the calls expected."""
    from tests.tiny_model import make_tiny_llama

    base = make_tiny_llama(tmp_path / "base", context=2048)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes(dumps_jsonl([_row(city) for city in ["Paris", "Tokyo", "Lima", "Oslo"]]))
    grader = {"operation": "toolCalls"}
    task = finetune_task(base, f"file://{data}", f"file://{tmp_path}/store", objective="grpo", method="full",
                         grpo={"generations": 2, "maxNewTokens": 16, "grader": grader, "logCompletions": 4},
                         hyperparameters={"epochs": 1, "batchSize": 2, "maxSeqLength": 1024})
    done = run_finetune(write_task(task, tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    run = open_store(task["artifactUri"])
    assert run.read_json("result.json")["steps"] == 2
    logged = [json.loads(line) for step in (1, 2)
              for line in run.read_bytes(f"completions/step-{step:06d}.jsonl").decode().splitlines()]
    assert sorted(row["reference"] for row in logged) == sorted(f'get_weather({{"city": "{city}"}})'
                                                              for city in ["Paris", "Tokyo", "Lima", "Oslo"])
    for row in logged:  # the prompt is the conversation before the calling turn; two answers sampled to it
        city = row["reference"].split('"')[3]
        assert row["prompt"] == [{"role": "user", "content": f"Weather in {city}?"}] and len(row["answers"]) == 2
