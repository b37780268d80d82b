"""A FineTune on two processes, where what each process writes must be whole: DeepSpeed's checkpoints
and a run resumed from them, a GGUF base's local safetensors copy, each process's weights for its vLLM. (Runs checked
against one process's are in test_finetune.py; this file runs beside the rest: scripts/test.sh.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmfactory_runtime.store import open_store

from llmfactory_runtime.models import save_pretrained_here
from llmfactory_runtime.quantize.gguf_export import export

from finetune_helpers import finetune_task, loss_curve, run_finetune, succeeded, unfinished, write_dataset, write_task

ADAPTER = {"r": 4, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}


@pytest.mark.slow
@pytest.mark.deepspeed("ShareMemCommBuilder")
def test_an_adapter_under_deepspeed_checkpoints_its_trained_weights_not_the_frozen_base_and_resumes_from_them(
        tmp_path):
    """LoRA under ZeRO-2 on two processes: a checkpoint holds the adapter's weights and their optimizer
    state, not the frozen base (which DeepSpeed saves whole at every checkpoint unless told; told, it
    still keeps an output head tied to the embeddings, as this Qwen2's); a run resumed from one ends with
    the uninterrupted run's adapter and loss curve. The last step's holds no optimizer state (nothing
    steps after it), and a run stopped after it resumes there to the same adapter."""
    from tiny_model import make_tiny_qwen2

    tiny_model = make_tiny_qwen2(tmp_path / "base")
    task = finetune_task(tiny_model, write_dataset(tmp_path / "data", train=24), f"file://{tmp_path}/store",
                         lora=ADAPTER, resources={"gpusPerNode": 2}, distribution={"strategy": "deepspeed", "zeroStage": 2},
                         hyperparameters={"epochs": 1}, checkpointing={"everySteps": 2, "keepLast": 10})
    path, run, folder = write_task(task, tmp_path), open_store(task["artifactUri"]), Path(task["artifactUri"][7:])
    succeeded(run_finetune(path, processes=2))
    steps, curve = run.read_json("result.json")["steps"], loss_curve(task)
    adapter = load_file(folder / "adapter" / "adapter_model.safetensors")
    assert steps > 2
    saved = torch.load(folder / "checkpoints/step-2/deepspeed/state/mp_rank_00_model_states.pt", weights_only=False)
    assert saved["module"] and all("lora_" in name for name in saved["module"])
    assert saved["frozen_param_fragments"] is None
    checkpoint_bytes = sum(f.stat().st_size for f in (folder / "checkpoints/step-2").rglob("*") if f.is_file())
    assert checkpoint_bytes < (tiny_model / "model.safetensors").stat().st_size / 2

    optimizer_shards = {step: sorted(p.name for p in (folder / f"checkpoints/step-{step}").rglob("*optim_states.pt"))
                        for step in (2, steps)}
    assert optimizer_shards == {2: [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)], steps: []}

    def resumed_from(step: int) -> None:
        unfinished(run, "adapter")
        succeeded(run_finetune(path, processes=2))
        assert run.read_json("result.json")["resumedFromStep"] == step
        assert loss_curve(task) == pytest.approx(curve, abs=1e-6)
        resumed = load_file(folder / "adapter" / "adapter_model.safetensors")
        assert all(torch.allclose(resumed[k], adapter[k], atol=1e-6) for k in adapter)

    resumed_from(steps)
    for later in range(3, steps + 1):
        shutil.rmtree(folder / f"checkpoints/step-{later}", ignore_errors=True)
    resumed_from(2)


def _load_in_turn(rank: int, rendezvous: str, source: dict, cache: str) -> None:
    """Rank 1 loads the GGUF base (and keeps its copy, or not) before rank 0 does."""
    import torch.distributed as dist  # noqa: PLC0415

    from llmfactory_runtime.models import load_model  # noqa: PLC0415

    os.environ["LLMFACTORY_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    for turn in (1, 0):
        if rank == turn:
            load_model(source, to=torch.device("cpu"))
        dist.barrier()
    dist.destroy_process_group()


def _gguf_of(model: Path, tmp_path: Path) -> dict:
    (tmp_path / "gguf").mkdir()
    export(model, tmp_path / "gguf" / "tiny.gguf", "f32", "tiny")
    return {"uri": f"file://{tmp_path / 'gguf'}", "ggufFile": "tiny.gguf"}


def test_a_gguf_base_loaded_by_two_processes_leaves_a_whole_safetensors_copy_in_the_cache(tiny_model, tmp_path):
    """A base given as a GGUF file is dequantized once and kept as safetensors in the node's cache, each
    process of a run writing its own copy, the first whole one kept. In a process group transformers'
    save_pretrained writes weights on rank 0 alone: another rank's copy (then a tokenizer alone), saved
    first, must not become the cache that every later load on the node reads (a FineTune's merge)."""
    source, cache = _gguf_of(tiny_model, tmp_path), tmp_path / "cache"
    torch.multiprocessing.spawn(_load_in_turn, args=(str(tmp_path / "rendezvous"), source, str(cache)), nprocs=2)
    copies = list((cache / "gguf-as-safetensors").iterdir())
    assert len(copies) == 1 and {".complete", "config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in copies[0].iterdir()}
    expected = load_file(tiny_model / "model.safetensors")
    got = load_file(copies[0] / "model.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def _load_for_training(rank: int, rendezvous: str, source: dict, cache: str) -> None:
    import logging  # noqa: PLC0415

    import torch.distributed as dist  # noqa: PLC0415

    from llmfactory_runtime.finetune.distributed import World  # noqa: PLC0415
    from llmfactory_runtime.finetune.model_setup import load_for_training  # noqa: PLC0415

    os.environ["LLMFACTORY_CACHE"] = cache
    logging.basicConfig(level=logging.INFO)  # to stderr, as the runtime's in a pod
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    load_for_training({"method": "full", "hyperparameters": {"gradientCheckpointing": False}}, source,
                      World(rank, 2, rank, torch.device("cpu")), torch.float32)
    dist.destroy_process_group()


def test_the_processes_of_a_run_on_a_gguf_base_dequantize_it_once_and_read_that_copy(tiny_model, tmp_path, capfd):
    """The processes of a FineTune on one node, loading a GGUF base to train at once: the first
    dequantizes it and keeps the safetensors copy in the node's cache, the others read that copy
    (each dequantizing its own would hold and write an 8B's 16 GB of bf16 per process)."""
    source, cache = _gguf_of(tiny_model, tmp_path), tmp_path / "cache"
    torch.multiprocessing.spawn(_load_for_training, args=(str(tmp_path / "rendezvous"), source, str(cache)), nprocs=2)
    log = capfd.readouterr().err
    assert log.count("dequantizing the GGUF base tiny.gguf") == 1
    assert log.count("the GGUF base kept as safetensors in") == 1
    assert [".tmp-" in p.name for p in (cache / "gguf-as-safetensors").iterdir()] == [False]  # one copy, whole


def _save_policies(rank: int, rendezvous: str, model: str, out: str) -> None:
    import torch.distributed as dist  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    save_pretrained_here(AutoModelForCausalLM.from_pretrained(model), Path(f"{out}-{rank}"))
    dist.destroy_process_group()


def test_each_process_of_a_full_grpo_fine_tune_saves_the_weights_its_own_vllm_reloads(tiny_model, tmp_path):
    """grpo.engine vllm with method full: before each step every process saves its weights for its own
    vLLM server to reload (on a node of several GPUs), though transformers' save_pretrained writes
    weights on rank 0 alone while a process group is up."""
    torch.multiprocessing.spawn(_save_policies, args=(str(tmp_path / "rendezvous"), str(tiny_model),
                                                      str(tmp_path / "policy")), nprocs=2)
    expected = load_file(tiny_model / "model.safetensors")
    for rank in (0, 1):
        got = load_file(tmp_path / f"policy-{rank}" / "model.safetensors")
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
