"""`llmfactory run` end to end on a tiny random-initialised Llama: all four phases, for real,
as the user runs them (the CLI in a subprocess, the runtime as its subprocesses)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from transformers import AutoModelForCausalLM

from llmfactory.local.runner import LocalRunner
from llmfactory.planner import benchmark_metric_names, parse
from llmfactory_runtime.store import PROGRESS, finished_result, open_store
from tests.promises import assert_promise_kept

PROMPTS = [("What is the capital of France?", "en"), ("Why is the sky blue?", "en"),
           ("Write a poem about the sea.", "en"), ("What is the capital of France?", "en"),
           ("Какая столица России?", "ru"), ("Почему небо голубое?", "ru"), ("Напиши стихотворение о море.", "ru"),
           ("中国的首都是哪里？", "zh"), ("为什么天空是蓝色的？", "zh"), ("写一首关于大海的诗。", "zh")]


def pipeline(model: Path) -> list[dict]:
    source = {"uri": f"file://{model}"}
    head = {"apiVersion": "llmfactory.dev/v1alpha1"}
    return [
        {**head, "kind": "DatasetBuild", "metadata": {"name": "data"}, "spec": {
            "sources": [{"inline": [{"text": t, "language": lang} for t, lang in PROMPTS]}],
            "teacher": {"model": source, "maxNewTokens": 12, "batchSize": 4},
            "filters": {"dropTruncated": False}, "split": {"validation": 0.2, "test": 0.2}}},
        {**head, "kind": "FineTune", "metadata": {"name": "ft"}, "spec": {
            "baseModel": source, "dataset": {"datasetBuildRef": {"name": "data"}},
            "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
            "hyperparameters": {"epochs": 5, "learningRate": 0.01, "batchSize": 2}}},
        {**head, "kind": "Benchmark", "metadata": {"name": "bench"}, "spec": {
            "model": {"fineTuneRef": {"name": "ft"}}, "perplexity": {},
            "judge": {"model": source, "maxQuestions": 1, "maxNewTokens": 8},
            "gates": [{"metric": "perplexity.changePercent", "op": "<", "value": 0}]}},
        {**head, "kind": "Quantization", "metadata": {"name": "gguf"}, "spec": {
            "model": {"fineTuneRef": {"name": "ft"}}, "types": ["f16", "q8_0"],
            "validation": {"maxPerplexityIncreasePercent": 5}}},
    ]


def llmfactory(folder: Path, manifests: list[dict], store: str, env: dict | None = None) -> subprocess.CompletedProcess:
    (folder / "manifests.yaml").write_text(yaml.safe_dump_all(manifests, allow_unicode=True))
    return subprocess.run([sys.executable, "-m", "llmfactory.cli", "run", "-f", "manifests.yaml", "--store", store],
                          cwd=folder, capture_output=True, text=True, env={**os.environ, **(env or {}), "COLUMNS": "200"},
                          timeout=600)


def results(store: str, manifests: list[dict]) -> dict[str, dict]:
    """Each resource's committed result, found the way the runner finds it (by its task digest)."""
    out = {}
    for name in [m["metadata"]["name"] for m in manifests]:
        kind = next(m["kind"] for m in manifests if m["metadata"]["name"] == name).lower()
        base = open_store(f"{store}/default/{kind}/{name}")
        runs = sorted({key.split("/")[0] for key in base.list()})
        committed = [finished_result(base.child(r)) for r in runs]
        out[name] = [r for r in committed if r is not None]
    return out


@pytest.mark.slow
def test_quickstart_pipeline_on_a_tiny_model_with_artifacts_in_s3(tiny_model, tmp_path, s3_bucket, seaweedfs):
    manifests = pipeline(tiny_model)
    manifests[1]["spec"]["resources"] = {"gpusPerNode": 2}  # two processes under torchrun, as the Job would
    store = f"s3://{s3_bucket}/llmfactory"
    first = llmfactory(tmp_path, manifests, store, env=seaweedfs)
    assert first.returncode == 0, first.stdout + first.stderr
    for name in ("DatasetBuild/data", "FineTune/ft", "Benchmark/bench", "Quantization/gguf"):
        assert name in first.stdout
    assert first.stdout.count("Succeeded") == 4

    found = results(store, manifests)
    data, ft, bench, quant = (found[n][0] for n in ("data", "ft", "bench", "gguf"))
    for name in ("data", "ft", "bench", "gguf"):  # what their dependents were checked against before they ran
        assert_promise_kept(manifests, name, found[name][0])
    # DatasetBuild: one duplicate prompt dropped, every language kept, splits add up.
    assert data["dropped"] == {"duplicate_prompt": 1}
    assert data["rowsPerLanguage"] == {"en": 3, "ru": 3, "zh": 3}
    assert sum(data["rows"].values()) == 9 and data["rows"]["test"] >= 1
    split_prompts = {}
    for split in ("train", "validation", "test"):
        lines = open_store(data["uri"]).read_bytes(f"{split}.jsonl").decode().splitlines()
        assert len(lines) == data["rows"][split]
        split_prompts[split] = {json.loads(line)["messages"][0]["content"] for line in lines}
    assert not (split_prompts["train"] & split_prompts["test"]) and not (split_prompts["train"] & split_prompts["validation"])
    # FineTune: the loss went down, and the model it saved is whole.
    assert ft["finalLoss"] < ft["firstLoss"]
    assert ft["datasetDigest"] == data["digest"] and ft["trainTokens"] > 0 and ft["processes"] == 2
    assert ft["modelUri"].startswith(f"{store}/default/finetune/ft/") and open_store(ft["modelUri"]).is_committed()
    AutoModelForCausalLM.from_pretrained(open_store(ft["modelUri"]).download_dir("", tmp_path / "ft-model"))
    # Benchmark: exactly the metrics the planner promised gates could use; the tuned model's
    # perplexity on held-out answers improved over its base.
    expected = benchmark_metric_names(parse(manifests[2]).spec, baseline=True)
    assert set(bench["metrics"]) == expected
    assert bench["metrics"]["perplexity.value"] < bench["metrics"]["perplexity.baseline"]
    assert bench["passed"] is True and bench["gates"][0]["passed"]
    assert open_store(bench["reportUri"]).exists("report.md")
    # Quantization: each GGUF exists, matches its digest, loads back, and is close to the original.
    assert [a["type"] for a in quant["artifacts"]] == ["f16", "q8_0"]
    for art in quant["artifacts"]:
        folder, name = art["uri"].rsplit("/", 1)
        path = tmp_path / "gguf" / name
        open_store(folder).download_file(name, path)
        assert path.stat().st_size == art["sizeBytes"]
        AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        assert abs(art["perplexityIncreasePercent"]) < 5 and art["topTokenAgreementPercent"] >= 90
    assert quant["passed"] is True

    # Unchanged manifests: nothing runs again, and the user is told so.
    again = llmfactory(tmp_path, manifests, store, env=seaweedfs)
    assert again.returncode == 0 and again.stdout.count("Reused") == 4 and "Succeeded" not in again.stdout
    assert "unchanged" in again.stdout

    # A changed FineTune runs again, not the dataset it reads (that its dependents' digests follow
    # its own is the planner's, tested there; they are left out of this run to save two phases). The
    # change: one process and one epoch, the cheapest run.
    manifests[1]["spec"]["hyperparameters"]["epochs"] = 1
    manifests[1]["spec"]["resources"] = {"gpusPerNode": 1}
    changed = llmfactory(tmp_path, manifests[:2], store, env=seaweedfs)
    assert changed.returncode == 0, changed.stdout
    lines = {line.split()[1]: line for line in changed.stdout.splitlines() if line.startswith("│ ")}
    assert "Reused" in lines["DatasetBuild/data"]
    assert "Succeeded" in lines["FineTune/ft"], changed.stdout
    assert len(results(store, manifests)["ft"]) == 2
    assert not (tmp_path / "artifacts" / "default").exists()  # nothing went to local disk


def test_failure_is_shown_and_dependents_are_skipped(tiny_model, tmp_path):
    manifests = pipeline(tmp_path / "no-such-model")
    run = llmfactory(tmp_path, manifests, f"file://{tmp_path}/artifacts")
    assert run.returncode == 1
    assert "Failed" in run.stdout and run.stdout.count("Skipped") == 3
    assert "no-such-model" in run.stdout and "does not exist" in run.stdout
    # What waits on it says why it will not run: the failure's last line; what waits on a skipped
    # one, the chain back to the failure, not reasons nested in one another.
    text = " ".join(run.stdout.split())
    assert "DatasetBuild data did not succeed (" in text
    assert "FineTune ft was skipped: DatasetBuild data did not succeed (" in text
    assert "did not succeed (DatasetBuild" not in text  # no reason nested in another


@pytest.mark.parametrize("index, change, errors", [
    (2, {"gates": [{"metric": "perplexity.change", "op": "<", "value": 0}]},
     ("Benchmark default/bench: spec.gates[0].metric: 'perplexity.change' is not reported", "'perplexity.changePercent'")),
    (1, {"mergeAdapter": False},  # wrong beside what references it: the Quantization reads a merged model
     ("Quantization default/gguf: spec.model.fineTuneRef: FineTune ft keeps only its adapter (spec.mergeAdapter: "
      "false); set mergeAdapter: true there to quantize it",)),
], ids=["a gate on a metric never reported", "a quantization of an adapter"])
def test_a_spec_wrong_by_itself_or_beside_what_it_references_is_refused_before_anything_runs(
        tiny_model, tmp_path, index, change, errors):
    """Refused before the DatasetBuild and FineTune run, not after them."""
    manifests = pipeline(tiny_model)
    manifests[index]["spec"] |= change
    run = llmfactory(tmp_path, manifests, f"file://{tmp_path}/artifacts")
    assert run.returncode == 2, run.stdout
    assert all(error in " ".join(run.stdout.split()) for error in errors), run.stdout
    assert not (tmp_path / "artifacts").exists()  # nothing ran


def test_a_benchmark_whose_gates_fail_fails_and_what_it_gates_is_skipped_saying_why(tiny_model, tmp_path):
    """As on the cluster: a Benchmark that finished with a failed gate is a failure, run or reused,
    and a Quantization gated on it (spec.benchmarkRef) does not start."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"Name a colour ({i})."},
                          {"role": "assistant", "content": "Blue."}]} for i in range(2)]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "Benchmark", "metadata": {"name": "bench"}, "spec": {
        "model": {"source": {"uri": f"file://{tiny_model}"}}, "perplexity": {"dataset": {"uri": f"file://{data}"}},
        "gates": [{"metric": "perplexity.value", "op": "<", "value": 1}]}}  # never: perplexity is at least 1
    gated = {**pipeline(tiny_model)[3], "spec": {"types": ["f16"], "benchmarkRef": {"name": "bench"},
                                                 "model": {"source": {"uri": f"file://{tiny_model}"}}}}
    store = f"file://{tmp_path}/artifacts"
    run = llmfactory(tmp_path, [bench, gated], store)
    assert run.returncode == 1, run.stdout + run.stderr
    lines = {line.split()[1]: line for line in run.stdout.splitlines() if line.startswith("│ ")}
    assert "Failed" in lines["Benchmark/bench"] and "Skipped" in lines["Quantization/gguf"], run.stdout
    text = " ".join(run.stdout.split())
    [measured] = results(store, [bench])["bench"]
    # The failed gate with the value it got, which the user compares with the threshold.
    got = measured["metrics"]["perplexity.value"]
    why = f"benchmark finished but gates failed: perplexity.value < 1.0 (got {got:.4g})"
    assert f"Benchmark bench did not succeed ({why})" in text
    assert not results(store, [gated])["gguf"]
    # Its finished result, reused, fails the same way.
    again = LocalRunner(store, tmp_path / "artifacts" / "logs", Console(file=io.StringIO())).run([bench, gated])
    assert [(o.status, o.message) for o in again] == [
        ("Failed", why), ("Skipped", f"Benchmark bench did not succeed ({why})")]


def test_bad_manifest_is_refused_before_anything_runs(tiny_model, tmp_path):
    manifests = pipeline(tiny_model)
    manifests[1]["spec"]["dataset"]["datasetBuildRef"]["name"] = "dataa"
    run = llmfactory(tmp_path, manifests, f"file://{tmp_path}/artifacts")
    assert run.returncode == 2
    assert "spec.dataset.datasetBuildRef.name" in run.stdout and "'dataa'" in run.stdout
    assert not (tmp_path / "artifacts" / "default").exists()


def test_restarted_dataset_build_reuses_every_paid_answer(tiny_model, tmp_path):
    """A build killed after the teacher answered redoes none of the answers (local teacher; the
    OpenAI-compatible one is covered in tests/runtime/test_dataset_build.py)."""
    from llmfactory.planner import plan

    task = plan(parse(pipeline(tiny_model)[0]), lambda *k: None, f"file://{tmp_path}/store")
    run = open_store(task["artifactUri"])
    run.write_json("task.json", task)
    cmd = [sys.executable, "-m", "llmfactory_runtime", "dataset", "--task", task["artifactUri"]]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    cache = open_store(task["cacheUri"])
    answers = {k: cache.read_bytes(k) for k in cache.list()}
    assert answers and run.read_json("result.json")["teacherUsage"]["requests"] == 9
    # Simulate the kill: the run's outputs and commit are gone, the saved answers are not.
    for key in ("COMMITTED", "result.json"):
        Path(run.root / key).unlink()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert run.read_json(PROGRESS)["figures"]["cached"] == 9
    usage = run.read_json("result.json")["teacherUsage"]
    assert (usage["requests"], usage["cached"]) == (0, 9)
    assert {k: cache.read_bytes(k) for k in cache.list()} == answers  # nothing new asked
    # A committed run is never redone.
    before = run.read_bytes("result.json")
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0 and "nothing to do" in done.stderr and run.read_bytes("result.json") == before


def test_local_run_reads_a_config_map_among_the_manifests_and_runs_shards_as_processes(tmp_path, openai_server):
    prompts = [{"prompt": f"Describe the shape number {i}.", "language": "en"} for i in range(6)]
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "prompts"},
                  "data": {"prompts.jsonl": "".join(json.dumps(p) + "\n" for p in prompts)}}
    data = {"apiVersion": "llmfactory.dev/v1alpha1", "kind": "DatasetBuild", "metadata": {"name": "data"},
            "spec": {"sources": [{"configMap": {"name": "prompts", "key": "prompts.jsonl"}}], "shards": 2,
                     "filters": {"nearDuplicateThreshold": 0},
                     "teacher": {"openai": {"baseUrl": openai_server.url, "model": "gpt-4o"}}}}
    store = f"file://{tmp_path}/artifacts"
    missing = llmfactory(tmp_path, [data], store)
    assert missing.returncode == 1 and "ConfigMap prompts is not among the manifests" in missing.stdout
    run = llmfactory(tmp_path, [config_map, data], store)
    assert run.returncode == 0, run.stdout + run.stderr
    [result] = results(store, [data])["data"]
    assert sum(result["rows"].values()) == 6 and result["teacherUsage"]["requests"] == 6
    assert sorted(r.last_user for r in openai_server.requests) == sorted(p["prompt"] for p in prompts)
    log = next((tmp_path / "artifacts" / "logs").glob("datasetbuild-data-*.log")).read_text()
    assert "every shard committed: merging" in log


def test_a_resources_env_is_what_its_phase_process_gets_as_far_as_this_machine_can_give_it(tiny_model):
    """Values as written; a ConfigMap's key from the ConfigMaps applied with it; a Secret's variable (and
    a ConfigMap's that was not applied) left as the caller's environment has it, as API keys are."""
    from llmfactory.local.runner import spec_env

    manifest = pipeline(tiny_model)[1]
    manifest["spec"]["env"] = [
        {"name": "PYTORCH_CUDA_ALLOC_CONF", "value": "expandable_segments:True"},
        {"name": "NCCL_DEBUG", "valueFrom": {"configMapKeyRef": {"name": "nccl", "key": "debug"}}},
        {"name": "NCCL_IB_HCA", "valueFrom": {"configMapKeyRef": {"name": "nccl", "key": "hca"}}},
        {"name": "PROXY_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "proxy", "key": "password"}}}]
    nccl = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "nccl", "namespace": "default"},
            "data": {"debug": "INFO"}}
    assert spec_env(parse(manifest), {("default", "nccl"): nccl}) == {
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "NCCL_DEBUG": "INFO"}
    assert spec_env(parse(manifest), {}) == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def test_runtime_rejects_a_task_for_another_phase(tiny_model, tmp_path):
    from llmfactory.planner import plan

    task = plan(parse(pipeline(tiny_model)[0]), lambda *k: None, f"file://{tmp_path}/store")
    (tmp_path / "task.json").write_text(json.dumps(task))
    run = subprocess.run([sys.executable, "-m", "llmfactory_runtime", "finetune", "--task", str(tmp_path / "task.json")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "not 'finetune'" in run.stderr


@pytest.mark.extended(reason=(
    "tests/unit/test_planner.py's test_a_model_trained_by_a_fine_tune_writes_rejected_answers_teaches_and_judges_"
    "by_reference plans the same chain and checks the rejected model's URI in the task; this one runs it"))
@pytest.mark.slow
def test_on_policy_pairs_are_written_by_the_sft_model_and_dpo_trains_on_them_in_one_run(tiny_model, tmp_path):
    """SFT, then a DatasetBuild whose rejected answers the SFT model writes (fineTuneRef), then DPO on
    those pairs from the SFT model: one `llmfactory run`, in dependency order."""
    data, sft = pipeline(tiny_model)[:2]
    sft["spec"]["hyperparameters"]["epochs"] = 1
    head = {"apiVersion": "llmfactory.dev/v1alpha1"}
    pairs = {**head, "kind": "DatasetBuild", "metadata": {"name": "pairs"}, "spec": {**data["spec"], "preferences": {
        "rejected": {"model": {"fineTuneRef": {"name": "ft"}}, "maxNewTokens": 12, "temperature": 1.0}}}}
    dpo = {**head, "kind": "FineTune", "metadata": {"name": "dpo"}, "spec": {
        "baseModel": {"fineTuneRef": {"name": "ft"}}, "dataset": {"datasetBuildRef": {"name": "pairs"}},
        "objective": "dpo", "hyperparameters": {"epochs": 1, "batchSize": 2, "learningRate": 0.01}}}
    store = f"file://{tmp_path}/artifacts"
    run = llmfactory(tmp_path, [dpo, pairs, sft, data], store)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("Succeeded") == 4
    found = results(store, [data, sft, pairs, dpo])
    built, trained = found["pairs"][0], found["ft"][0]
    assert built["format"] == "preference" and sum(built["rows"].values()) > 0
    written = json.loads(open_store(built["uri"]).read_bytes("train.jsonl").decode().splitlines()[0])
    assert written["rejected"] and written["chosen"] != written["rejected"]
    folder = open_store(f"{store}/default/datasetbuild/pairs")
    [task_key] = [k for k in folder.list() if k.endswith("/task.json")]
    planned = folder.read_json(task_key)
    assert planned["inputs"]["rejected"] == {"uri": trained["modelUri"]}
    assert found["dpo"][0]["rewardAccuracy"] is not None
