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
def test_a_fine_tune_learns_tool_calls_and_its_model_renders_the_tools_when_served(tmp_path):
    """The calls and answers are learned (the held-out loss falls); the tuned model's tokenizer keeps the
    template that writes tools, so a server given tools (vLLM's chat API with the hermes parser)
    prompts it as it was trained."""
    from tests.tiny_model import make_tiny_llama

    base = make_tiny_llama(tmp_path / "base", context=2048)  # the tools' signatures take a few hundred tokens
    data = tmp_path / "data"
    data.mkdir()
    cities = ["Paris", "Tokyo", "Lima", "Oslo"]
    (data / "train.jsonl").write_bytes(dumps_jsonl([_row(cities[i % 4]) for i in range(32)]))
    (data / "validation.jsonl").write_bytes(dumps_jsonl([_row("Rome"), _row("Cairo")]))
    task = finetune_task(base, f"file://{data}", f"file://{tmp_path}/store", lora={"r": 8, "alpha": 16, "dropout": 0.0},
                         hyperparameters={"maxSeqLength": 1024, "epochs": 3})
    done = run_finetune(write_task(task, tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = open_store(task["artifactUri"]).read_json("result.json")
    assert result["evalLoss"] < result["firstLoss"] - 0.3
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
