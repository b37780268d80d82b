"""vLLM as the generation engine of a Benchmark and a DatasetBuild teacher: which engine runs,
what `vllm serve` is given, and how a vLLM that cannot run is reported. The answers themselves
come from a real `vllm serve`: vLLM's CPU build (make test installs it), against transformers'."""

import json
import os
import stat
import textwrap

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmfactory.planner import parse, plan
from llmfactory_runtime.benchmark import run as benchmark
from llmfactory_runtime.dataset import build as dataset_build
from llmfactory_runtime.progress import Progress
from llmfactory_runtime.store import open_store
from llmfactory_runtime.task import InvalidTask
from llmfactory_runtime.vllm_server import VllmServer, choose_engine, serve_command, vllm_build, vllm_executable

from tests.tiny_model import end_turn_early
from vllm_helpers import serve_flags

HAS_VLLM_AND_GPU = vllm_executable() is not None and torch.cuda.is_available()


def _executable(path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _benchmark_task(tiny_model, tmp_path, engine: str, source=None, reward=None, **judge) -> dict:
    """A Benchmark of the tiny model (and a reward section, when given); `source` replaces its model as
    the planner resolves a FineTune's (its adapter beside its base)."""
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Benchmark", "metadata": {"name": f"b-{engine}"},
           "spec": {"model": {"source": {"uri": f"file://{tiny_model}"}}, "baseline": False,
                    "judge": {"model": {"uri": f"file://{tiny_model}"}, "languages": ["en"], "maxQuestions": 2,
                              "maxNewTokens": 8, "engine": engine, **judge},
                    **({"reward": {**reward, "engine": engine}} if reward else {})}}
    task = plan(parse(doc), lambda *k: None, f"file://{tmp_path}/store")
    task["inputs"]["model"] = source or task["inputs"]["model"]
    return task


@pytest.mark.skipif(HAS_VLLM_AND_GPU, reason="this machine runs vLLM")
def test_auto_is_transformers_without_vllm_or_without_a_gpu(tiny_model, tmp_path, monkeypatch):
    source = {"uri": f"file://{tiny_model}"}
    monkeypatch.delenv("LLMFACTORY_VLLM", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert choose_engine("auto", source, "spec.judge.engine") == "transformers"
    monkeypatch.setenv("LLMFACTORY_VLLM", _executable(tmp_path / "vllm", "exit 0\n"))  # vLLM, but no GPU
    assert choose_engine("auto", source, "spec.judge.engine") == "transformers"
    assert choose_engine("auto", {"uri": "file:///m", "ggufFile": "m.gguf"}, "spec.judge.engine") == "transformers"
    # The answers are the transformers engine's, and the report says which engine made them.
    task = _benchmark_task(tiny_model, tmp_path, "auto")
    store = open_store(task["artifactUri"])
    benchmark.run(task, store, Progress(store))
    report = store.read_json("report/report.json")
    assert report["generation"]["model"]["engine"] == "transformers"
    assert report["generation"]["model"]["answered"] == 4 and report["generation"]["model"]["answersPerSecond"] > 0
    assert "| model | transformers | 4 |" in store.read_bytes("report/report.md").decode()


@pytest.mark.skipif(HAS_VLLM_AND_GPU, reason="this machine runs vLLM")
def test_an_explicit_vllm_that_cannot_run_fails_the_task_before_any_model_is_loaded(tiny_model, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.delenv("LLMFACTORY_VLLM", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    task = _benchmark_task(tiny_model, tmp_path, "vllm")
    store = open_store(task["artifactUri"])
    with pytest.raises(InvalidTask, match="spec.judge.engine is vllm, but no vLLM in this image: build the runtime "
                                          "image with --build-arg WITH_VLLM=true"):
        benchmark.run(task, store, Progress(store))
    monkeypatch.setenv("LLMFACTORY_VLLM", _executable(tmp_path / "vllm", "exit 0\n"))
    with pytest.raises(InvalidTask, match="vLLM needs a CUDA GPU and none is visible: give the pod a GPU, or "
                                          "use engine transformers"):
        benchmark.run(task, store, Progress(store))
    assert store.read_json_or_none("answers/model.json") is None
    # A DatasetBuild's local teacher says the same, naming its own field.
    doc = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "DatasetBuild", "metadata": {"name": "d"},
           "spec": {"sources": [{"inline": [{"text": "Why is the sky blue?", "language": "en"}]}],
                    "teacher": {"model": {"uri": f"file://{tiny_model}"}, "engine": "vllm", "maxNewTokens": 4}}}
    build = plan(parse(doc), lambda *k: None, f"file://{tmp_path}/store")
    build_store = open_store(build["artifactUri"])
    with pytest.raises(InvalidTask, match="spec.teacher.engine is vllm, but vLLM needs a CUDA GPU"):
        dataset_build.run(build, build_store, Progress(build_store))


def test_a_cpu_build_of_vllm_is_told_by_its_version_asked_of_the_python_beside_it(tmp_path, monkeypatch):
    """As vLLM itself tells its CPU build ("+cpu" in its version); the python3 beside the executable
    is asked, as pip's long-path scripts start with #!/bin/sh; a CPU build serves only when asked."""
    bin_dir = tmp_path / "a-virtualenv-whose-path-is-long" / "bin"
    bin_dir.mkdir(parents=True)
    vllm = _executable(bin_dir / "vllm", "exec \"$(dirname \"$0\")/python3\" \"$0\" \"$@\"\n")
    for version, build in (("0.32.0+cpu", "cpu"), ("0.33.0", "cuda")):
        _executable(bin_dir / "python3", f"echo {version}\n")
        assert vllm_build(vllm) == build
    assert vllm_build(_executable(tmp_path / "vllm", "exit 0\n")) == "cuda"  # no Python to ask: the image's own
    monkeypatch.setenv("LLMFACTORY_VLLM", vllm)
    monkeypatch.setattr("llmfactory_runtime.vllm_server._cuda_devices", lambda: 0)
    source = {"uri": "file:///unused"}
    _executable(bin_dir / "python3", "echo 0.32.0+cpu\n")
    assert choose_engine("auto", source, "spec.judge.engine") == "transformers"  # a CPU build only when asked
    _executable(bin_dir / "python3", "echo 0.33.0\n")
    with pytest.raises(InvalidTask, match="spec.judge.engine is vllm, but vLLM needs a CUDA GPU"):
        choose_engine("vllm", source, "spec.judge.engine")


def test_a_base_model_whose_tokenizer_outgrows_it_is_not_given_to_vllm(tiny_model, tmp_path, monkeypatch):
    """A base model without a chat template gets ChatML's markers as new tokens (chat.use_template);
    vLLM serves the checkpoint as it is, with no rows for them, and would fail on the first prompt."""
    from tests.tiny_model import make_tiny_llama

    import llmfactory_runtime.vllm_server as vllm_server
    monkeypatch.setenv("LLMFACTORY_VLLM", _executable(tmp_path / "vllm", "exit 0\n"))
    monkeypatch.setattr(vllm_server, "_cuda_devices", lambda: 1)  # as on a GPU node
    assert choose_engine("auto", {"uri": f"file://{tiny_model}"}, "spec.judge.engine") == "vllm"
    base = {"uri": f"file://{make_tiny_llama(tmp_path / 'base', tokenizer='sentencepiece', chat_template=False)}"}
    assert choose_engine("auto", base, "spec.judge.engine") == "transformers"
    with pytest.raises(InvalidTask, match="spec.judge.engine is vllm, but the model's checkpoint has no rows for "
                                          "the ChatML markers .* use the FineTune's merged model"):
        choose_engine("vllm", base, "spec.judge.engine")


@pytest.mark.parametrize("unservable, reason", [
    ({"use_dora": True}, "vLLM cannot serve a DoRA adapter"),
    ({"r": 1024}, r"the adapter's LoRA rank 1024 is above vLLM's largest \(512\)"),
    # Rows of chat markers (a base whose markers were never trained, e.g. Llama-3.1-8B base's
    # <|eot_id|>) beside the LoRA weights: vLLM applies only the latter, and would never end a turn.
    ({"trainable_token_indices": {"embed_tokens": [2], "lm_head": [2]}}, "the adapter trains rows of chat markers"),
])
def test_an_adapter_vllm_cannot_serve_is_answered_by_transformers_under_auto(tiny_model, tmp_path, monkeypatch,
                                                                             unservable, reason):
    """engine auto picks transformers for it (it used to pick vLLM and then fail the task); engine vllm
    is an invalid task, said before any model is loaded."""
    from peft import LoraConfig, get_peft_model

    import llmfactory_runtime.vllm_server as vllm_server
    monkeypatch.setenv("LLMFACTORY_VLLM", _executable(tmp_path / "vllm", "exit 0\n"))
    monkeypatch.setattr(vllm_server, "_cuda_devices", lambda: 1)  # as on a GPU node
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                   LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "adapter")
    source = {"uri": f"file://{tiny_model}", "adapterUri": f"file://{tmp_path / 'adapter'}"}
    assert choose_engine("auto", source, "spec.model.engine") == "vllm"
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **unservable}))
    assert choose_engine("auto", source, "spec.model.engine") == "transformers"
    with pytest.raises(InvalidTask, match=f"spec.model.engine is vllm, but {reason}.* use the FineTune's merged model"):
        choose_engine("vllm", source, "spec.model.engine")


def test_vllm_is_served_the_tokenizer_of_the_transformers_engine_and_the_adapter_beside_its_base(tiny_model,
                                                                                                  tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "adapter")
    source = {"uri": f"file://{tiny_model}", "adapterUri": f"file://{tmp_path / 'adapter'}", "digest": "x"}
    command = serve_command("/opt/vllm/bin/vllm", source, "/tmp/tok", 8123, gpus=3, dtype="bfloat16")
    assert command[:3] == ["/opt/vllm/bin/vllm", "serve", str(tiny_model)]
    flags = serve_flags(command)
    assert flags["--enable-lora"] is True
    assert flags["--tokenizer"] == "/tmp/tok" and flags["--chat-template"] == "/tmp/tok/chat_template.jinja"
    assert flags["--generation-config"] == "vllm"  # plain temperature sampling, as the transformers engine does
    assert flags["--dtype"] == "bfloat16"  # the transformers engine's, not the checkpoint's
    # Three GPUs visible, four attention heads: two GPUs split them evenly.
    assert flags["--tensor-parallel-size"] == "2" and flags["--host"] == "127.0.0.1" and flags["--port"] == "8123"
    assert flags["--lora-modules"] == f"adapter={tmp_path / 'adapter'}"
    assert flags["--max-lora-rank"] == "8"  # r=4 rounded up to a rank vLLM accepts
    hub = serve_command("vllm", {"huggingface": "meta-llama/Meta-Llama-3-8B-Instruct", "revision": "abc123"},
                        "/tmp/tok", 8123, gpus=1)
    assert hub[2] == "meta-llama/Meta-Llama-3-8B-Instruct" and serve_flags(hub)["--revision"] == "abc123"
    assert serve_flags(hub)["--tensor-parallel-size"] == "1" and "--enable-lora" not in hub
    # The context vLLM fits in its KV cache, unless told (GRPO's sampler: maxSeqLength).
    assert flags["--max-model-len"] == "auto" and serve_flags(hub)["--max-model-len"] == "auto"


def test_a_vllm_that_dies_while_starting_fails_with_its_last_log_lines(tiny_model, tmp_path, monkeypatch):
    seen = tmp_path / "argv"
    monkeypatch.setenv("LLMFACTORY_VLLM", _executable(tmp_path / "vllm", f"""\
        echo "$@" > {seen}
        echo "INFO loading weights"
        echo "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" >&2
        exit 1
        """))
    with pytest.raises(RuntimeError, match=r"(?s)vLLM exited with code 1 while starting:.*CUDA out of memory"):
        with VllmServer({"uri": f"file://{tiny_model}"}):
            pass
    argv = seen.read_text().split()
    tokenizer_dir = argv[argv.index("--tokenizer") + 1]
    assert not os.path.exists(tokenizer_dir)  # its scratch folder is gone with it


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    """A tiny Llama vLLM's CPU attention takes (head size 64; the suite's tiny model has 16), and a
    LoRA adapter of it whose B is not zero, so that it changes the answers. Its 512k context's KV
    cache (2 layers x 4 key-value heads x 64: 2 GiB in float32) outgrows the 1 GiB vLLM's CPU build
    is given in the tests, as a 128k-context model's can a GPU share: vLLM fits its context to it."""
    from peft import LoraConfig, get_peft_model

    from tests.tiny_model import make_tiny_llama

    folder = tmp_path_factory.mktemp("served")
    base = make_tiny_llama(folder / "base", seed=1, hidden_size=256, heads=4, kv_heads=4, context=524288)
    end_turn_early(base, TEACHER_PROMPTS[0])
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(folder / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(folder / "adapter")
    return {"uri": f"file://{base}"}, {"uri": f"file://{base}", "adapterUri": f"file://{folder / 'adapter'}"}


TEACHER_PROMPTS = ["Why is the sky blue?", "Какая столица России?", "中国的首都是哪里？"]


def _text(answer: str) -> str:
    """The answer without U+FFFD: the tiny random model writes byte tokens that are no UTF-8 of their
    own; transformers decodes each as U+FFFD, vLLM's incremental detokenizer leaves them out."""
    return answer.replace("\ufffd", "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM's CPU build serves where no GPU is visible")
def test_vllm_answers_every_turn_as_the_transformers_engine_does_with_the_adapter_beside_its_base(
        served_model, tmp_path, cpu_vllm, capfd, monkeypatch):
    """A Benchmark of a FineTune's adapter, answered by `vllm serve` (its CPU build) and by
    transformers: the same greedy answers to both turns of each question, the second turn after the
    first answer, and to the reward prompts, offered their tools, one after an earlier call and its
    result; one server answers both. The adapter changes them, so vLLM served it, not its base alone.
    vLLM served the model at the length its KV cache holds (without --max-model-len auto it refused to start)."""
    from llmfactory_runtime.data import dumps_jsonl
    from llmfactory_runtime.generate import generate, prompt_ids

    from finetune_helpers import TOOL_ROW, WEATHER

    base, tuned = served_model
    assert choose_engine("auto", tuned, "spec.judge.engine") == "transformers"  # a CPU build only when asked
    assert choose_engine("vllm", tuned, "spec.judge.engine") == "vllm"
    # A first call written compactly, as OpenAI's API writes arguments: both engines render it as vLLM does.
    earlier = [*TOOL_ROW["messages"][:2], {**TOOL_ROW["messages"][2], "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
               TOOL_ROW["messages"][3], {"role": "user", "content": "And in Oslo?"}]
    prompts = [[{"role": "user", "content": "Weather in Lima?"}], earlier]
    (tmp_path / "calls").mkdir()
    (tmp_path / "calls" / "test.jsonl").write_bytes(dumps_jsonl(
        [{"tools": WEATHER, "messages": m, "calls": calls}
         for m, calls in zip(prompts, [[], TOOL_ROW["messages"][2]["tool_calls"]])]))
    reward = {"grader": {"operation": "toolCalls", "referenceField": "calls"}, "maxNewTokens": 8,
              "dataset": {"uri": f"file://{tmp_path / 'calls'}"}}
    starts, rendered = [], []

    class CountedServer(VllmServer):
        """Counts its starts, and asks vLLM how it renders the reward prompts with their tools."""

        def __enter__(self):
            started = super().__enter__()
            starts.append(self.source)
            rendered.extend(httpx.post(f"{self.url}/tokenize", json={"model": self.endpoint["model"], "messages": m,
                                                                     "tools": WEATHER}).json()["tokens"]
                            for m in prompts)
            return started

    monkeypatch.setattr(benchmark, "VllmServer", CountedServer)
    runs, reports = {}, {}
    for engine, source in (("vllm", tuned), ("transformers", tuned), ("base", base)):
        # Greedy in every category (writing's default 0.7 samples, each engine with its own generator).
        task = _benchmark_task(base["uri"].removeprefix("file://"), tmp_path / engine,
                               "transformers" if engine == "base" else engine, source, reward, temperatures={})
        store = open_store(task["artifactUri"])
        benchmark.run(task, store, Progress(store))
        runs[engine], reports[engine] = store.read_json("report/report.json"), store.read_bytes("report/report.md")
    assert starts == [tuned]
    tokenizer = AutoTokenizer.from_pretrained(base["uri"].removeprefix("file://"))
    assert rendered == [prompt_ids(tokenizer, m, WEATHER) for m in prompts]  # as transformers renders them
    generation = runs["vllm"]["generation"]["model"]
    assert generation["engine"] == "vllm" and generation["answered"] == 4 and generation["answersPerSecond"] > 0
    answers = {engine: {q: [_text(a) for a in turns] for q, turns in run["answers"]["model"].items()}
               for engine, run in runs.items()}
    assert all(len(turns) == 2 and all(turns) for turns in answers["vllm"].values()), answers["vllm"]
    assert answers["vllm"] == answers["transformers"]
    assert answers["transformers"] != answers["base"]
    rewarded = {engine: [_text(a) for a in run["rewarded"]["model"]["answers"]] for engine, run in runs.items()}
    assert rewarded["vllm"] == rewarded["transformers"] and all(rewarded["vllm"])
    # The tools were in the prompts: without them the same model answers otherwise.
    model = AutoModelForCausalLM.from_pretrained(base["uri"].removeprefix("file://"))
    plain = [_text(g.text) for g in generate(model, tokenizer, prompts, 8)]
    assert [_text(g.text) for g in generate(model, tokenizer, prompts, 8, tools=[WEATHER, WEATHER])] == \
        rewarded["base"] != plain
    assert "| model | vllm | 4 |" in reports["vllm"].decode()
    assert "Auto-fit max_model_len: reduced from 524288 to" in capfd.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM's CPU build serves where no GPU is visible")
def test_a_local_teacher_on_vllm_answers_as_on_transformers(served_model, tmp_path, cpu_vllm):
    """A DatasetBuild's local answerer (the teacher's backend, here preferences.rejected's) on
    `vllm serve`, asked through the OpenAI client with the end-of-turn tokens the transformers engine
    stops on: the same greedy answers, token counts and finish flags, one answer ending its turn."""
    from llmfactory_runtime.dataset.teacher import answer_again

    base, _ = served_model
    store = open_store(f"file://{tmp_path}/run")
    contexts = [[{"role": "user", "content": q}] for q in TEACHER_PROMPTS]
    got = {}
    for engine in ("vllm", "transformers"):
        answerer = {"model": base, "engine": engine, "maxNewTokens": 8}
        answers, usage = answer_again(contexts, answerer, base, f"file://{tmp_path}/{engine}", "spec.preferences.rejected",
                                      Progress(store))
        assert usage.requests == 3 and all(len(a) == 1 for a in answers)
        got[engine] = [(_text(a[0]["text"]), a[0]["tokens"], a[0]["finished"]) for a in answers]
    assert got["vllm"] == got["transformers"]
    # The first ends on <|im_end|> (not counted, as transformers counts), the others at maxNewTokens.
    assert [(tokens < 8, finished) for _, tokens, finished in got["vllm"]] == [(True, True), (False, False),
                                                                            (False, False)]
    assert got["vllm"][0][1] > 0 and any(text for text, _, _ in got["vllm"])


def test_each_sample_of_a_conversation_asks_vllm_with_a_seed_of_its_own(tmp_path, openai_server):
    """On vLLM a request's seed fixes its sampling: were the rejected answers' samples of one
    conversation asked with the teacher's one seed, they would all be the same answer."""
    from llmfactory_runtime.answer_cache import AnswerCache
    from llmfactory_runtime.dataset.teacher import Usage, _openai_backend

    cache = AnswerCache(f"file://{tmp_path}/cache", "teacher", {"model": "served"})
    messages = [{"role": "user", "content": "Name a colour."}]
    ask = _openai_backend({"temperature": 1.0}, cache, Usage(), lambda: None,
                          endpoint={"baseUrl": openai_server.url, "model": "served"}, extra={"seed": 5})
    ask([(AnswerCache.key(messages, k), messages, k) for k in range(3)])
    assert sorted(r.body["seed"] for r in openai_server.requests) == [5, 6, 7]
    assert len({AnswerCache.key(messages, k) for k in range(3)} & cache.answers.keys()) == 3
