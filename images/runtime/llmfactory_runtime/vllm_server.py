"""vLLM as the generation engine: `vllm serve` in a child process, asked through the same
OpenAI-compatible client as an API teacher or judge.

vLLM pins its own torch and transformers (0.33: torch 2.14, transformers < 5.21), which are not
ours, so it lives in a virtualenv of its own (the runtime image's /opt/vllm, WITH_VLLM=true) and
is reached over HTTP on the loopback. The server gets the tokenizer and chat template the
transformers engine would use, no generation_config defaults (plain temperature sampling, like
ours), the same dtype, and stops on the same end-of-turn tokens, so both engines answer the same
prompts alike (tested with vLLM's CPU build, which serves when a task asks for engine vllm).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from .chat import template_kwargs
from .generate import Generation, stop_token_ids
from .models import compute_dtype, load_config, load_tokenizer, locate
from .openai_client import ChatClient, Completion
from .task import InvalidTask

log = logging.getLogger(__name__)

SERVED_NAME = "model"
ADAPTER_NAME = "adapter"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what --max-lora-rank accepts
START_TIMEOUT = float(os.environ.get("LLMFACTORY_VLLM_START_TIMEOUT", 1800))  # weights download + compile
# GiB of KV cache for vLLM's CPU build unless VLLM_CPU_KVCACHE_SPACE says otherwise: its own default
# takes most of the machine's memory (21 of 23.5 GiB on the test machine, a minute to allocate).
CPU_KV_CACHE_GIB = 4


def vllm_executable() -> str | None:
    """The `vllm` command: LLMFACTORY_VLLM (the image sets /opt/vllm/bin/vllm), else PATH."""
    path = os.environ.get("LLMFACTORY_VLLM") or shutil.which("vllm")
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def vllm_build(executable: str) -> str:
    """'cpu' for a CPU build of vLLM, whose version says so ("0.32.0+cpu": what vLLM's own platform
    detection reads), else 'cuda'. Asked of the executable's Python without importing vLLM (seconds):
    the python3 beside it (a virtualenv's, or /usr/bin's), else its shebang's (pip writes a
    `#!/bin/sh` one that execs the interpreter where the path is too long for a shebang)."""
    beside = Path(executable).parent / "python3"
    if beside.is_file() and os.access(beside, os.X_OK):
        interpreter = str(beside)
    else:
        with open(executable, "rb") as f:
            first = f.readline().decode(errors="replace")
        interpreter = first[2:].strip().split(" ")[0] if first.startswith("#!") else ""
    if not Path(interpreter).name.startswith("python"):
        return "cuda"
    try:
        version = subprocess.run([interpreter, "-c", "import importlib.metadata as m; print(m.version('vllm'))"],
                                 capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "cuda"
    return "cpu" if "cpu" in version else "cuda"


def _cuda_devices() -> int:
    import torch  # noqa: PLC0415

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose_engine(engine: str, source: dict[str, Any], field: str) -> str:
    """'vllm' or 'transformers' for `engine` (auto, vllm, transformers) and this model; an explicit
    vllm that cannot run is an invalid task, said before any model is loaded."""
    if engine == "transformers":
        return "transformers"
    problem = None
    if source.get("ggufFile") or (source.get("uri") or "").endswith(".gguf"):
        problem = "vLLM does not load GGUF files; use engine transformers, or a compressed-tensors Quantization"
    elif (executable := vllm_executable()) is None:
        problem = ("no vLLM in this image: build the runtime image with --build-arg WITH_VLLM=true (or point "
                   "LLMFACTORY_VLLM at a vllm executable), or use engine transformers")
    elif (build := vllm_build(executable)) == "cuda" and _cuda_devices() == 0:
        problem = "vLLM needs a CUDA GPU and none is visible: give the pod a GPU, or use engine transformers"
    elif build == "cpu" and engine == "auto":
        # On a CPU, transformers answers a benchmark's few dozen prompts before vLLM has compiled.
        problem = "this image's vLLM is a CPU build, which serves only where a task asks for engine vllm"
    elif source.get("adapterUri") and (adapter := adapter_problem(_adapter_config(source["adapterUri"]))):
        problem = adapter
    elif len(load_tokenizer(source)) > load_config(source).get_text_config().vocab_size:
        problem = ("the model's checkpoint has no rows for the ChatML markers its tokenizer adds (a base model "
                   "without a chat template), which vLLM does not grow: use the FineTune's merged model "
                   "(mergeAdapter true), or engine transformers")
    if problem is None:
        return "vllm"
    if engine == "vllm":
        raise InvalidTask(f"{field} is vllm, but {problem}")
    log.info("%s auto: transformers (%s)", field, problem.split(";")[0].split(":")[0])
    return "transformers"


def _adapter_config(adapter_uri: str) -> dict[str, Any]:
    folder, _, _ = locate({"uri": adapter_uri})
    return json.loads(Path(folder, "adapter_config.json").read_text())


def adapter_problem(config: dict[str, Any]) -> str | None:
    """Why vLLM cannot serve this LoRA adapter beside its base (it would find out after loading the
    base, or not at all), or None."""
    merged = "use the FineTune's merged model (mergeAdapter true), or engine transformers"
    if config.get("use_dora"):
        return f"vLLM cannot serve a DoRA adapter (the FineTune's lora.dora) beside its base: {merged}"
    if int(config["r"]) > LORA_RANKS[-1]:
        return f"the adapter's LoRA rank {config['r']} is above vLLM's largest ({LORA_RANKS[-1]}): {merged}"
    if config.get("modules_to_save") and config.get("task_type") != "SEQ_CLS":
        return ("the adapter trains the embeddings and output layer whole (the FineTune's lora.trainEmbeddings), "
                f"which vLLM's LoRA does not apply: {merged}")
    if config.get("trainable_token_indices"):
        return ("the adapter trains rows of chat markers its base lacks or never trained (a base model's), "
                f"which vLLM's LoRA does not apply: {merged}")
    return None


def _lora_rank(config: dict[str, Any]) -> int:
    """The adapter's rank rounded up to one vLLM accepts (choose_engine has refused any above them)."""
    return next(r for r in LORA_RANKS if r >= int(config["r"]))


def tensor_parallel_size(gpus: int, attention_heads: int) -> int:
    """The most GPUs, of those visible, that split the attention heads evenly (vLLM requires it)."""
    return max(d for d in range(1, max(gpus, 1) + 1) if attention_heads % d == 0)


def base_of(source: dict[str, Any]) -> dict[str, Any]:
    """The ModelSource vLLM loads as its model: without the adapter it serves beside it."""
    return {k: v for k, v in source.items() if k not in ("adapterUri", "digest")}


def serve_command(executable: str, source: dict[str, Any], tokenizer_dir: str, port: int, gpus: int,
                  seed: int = 0, dtype: str = "auto", lora_rank: int | None = None,
                  max_model_len: int | None = None) -> list[str]:
    """`vllm serve` for a ModelSource: a directory or Hugging Face id, with a FineTune's LoRA adapter
    served beside its base (requests then name the adapter) rather than merged first. dtype: the
    transformers engine's (models.compute_dtype), not the checkpoint's, which vLLM would take.
    lora_rank: adapters of up to that rank loaded while it runs (load_adapter), one at a time.
    max_model_len: the longest prompt and answer served (unset: what fits its KV cache, up to the
    model's context)."""
    base = base_of(source)
    where, _, kwargs = locate(base)
    heads = load_config(base).num_attention_heads if gpus > 1 else 1
    command = [executable, "serve", where, "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", SERVED_NAME, "--tokenizer", tokenizer_dir,
               "--chat-template", str(Path(tokenizer_dir, "chat_template.jinja")), "--generation-config", "vllm",
               "--tensor-parallel-size", str(tensor_parallel_size(gpus, heads)), "--seed", str(seed),
               "--dtype", dtype]
    if kwargs.get("revision"):
        command += ["--revision", kwargs["revision"]]
    if source.get("adapterUri"):
        folder, _, _ = locate({"uri": source["adapterUri"]})
        command += ["--enable-lora", "--lora-modules", f"{ADAPTER_NAME}={folder}",
                    "--max-lora-rank", str(_lora_rank(_adapter_config(source["adapterUri"])))]
    elif lora_rank:
        command += ["--enable-lora", "--max-loras", "1", "--max-lora-rank", str(_lora_rank({"r": lora_rank}))]
    # Unset: vLLM's auto-fit, the model's whole context if its KV cache fits what vLLM is given, else the
    # longest that does: a 128k-context model on a share of a GPU (a teacher beside its judge) or on a
    # CPU build's KV space would otherwise refuse to start, for lengths no request here comes near.
    command += ["--max-model-len", str(max_model_len) if max_model_len else "auto"]
    return command


def answer_tokens(completion: Completion) -> int:
    """A vLLM answer's tokens as the transformers engine counts them: vLLM's completion_tokens also
    counts the end-of-turn token it stopped on."""
    return completion.completion_tokens - (1 if completion.finish_reason == "stop" else 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """A running `vllm serve` for one model, for the length of a `with` block.

    The rest is for GRPO's sampler (finetune/vllm_sampler.py): tokenizer, the one to save for vLLM
    (else the model's); dtype (else models.compute_dtype); lora_rank: adapters of up to that rank are
    loaded while it runs (load_adapter); reloads_weights: its weights are replaced while it runs
    (reload_weights); max_model_len; cuda_device: the one GPU it runs on (else all visible,
    tensor-parallel)."""

    def __init__(self, source: dict[str, Any], seed: int = 0, gpu_memory_utilization: float | None = None,
                 tokenizer=None, dtype: str | None = None, lora_rank: int | None = None,
                 max_model_len: int | None = None, cuda_device: str | None = None, reloads_weights: bool = False):
        self.source, self.seed, self.gpu_memory_utilization = source, seed, gpu_memory_utilization
        self.tokenizer = tokenizer or load_tokenizer(source)
        self.dtype, self.lora_rank, self.max_model_len, self.cuda_device = dtype, lora_rank, max_model_len, cuda_device
        self.reloads_weights = reloads_weights
        # Sent with every request: stop where the transformers engine stops, no special tokens in text,
        # the template rendered as transformers renders it.
        rendered_with = template_kwargs(self.tokenizer)
        self.request_params = {"stop_token_ids": stop_token_ids(self.tokenizer), "skip_special_tokens": True,
                               **({"chat_template_kwargs": rendered_with} if rendered_with else {})}
        self.process: subprocess.Popen | None = None
        self.log_tail: collections.deque[str] = collections.deque(maxlen=40)
        self.port = _free_port()
        self._workdir: tempfile.TemporaryDirectory | None = None

    @property
    def workdir(self) -> str:
        """A folder of its own for as long as it runs (its tokenizer; adapters to load)."""
        assert self._workdir is not None
        return self._workdir.name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def load_adapter(self, name: str, folder: Path) -> None:
        """Serve the LoRA adapter saved in `folder` as `name` (the server started with lora_rank)."""
        response = httpx.post(f"{self.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)},
                              timeout=600)
        if response.status_code != 200:
            raise RuntimeError(f"vLLM could not load the adapter {folder}: {response.text}")

    def unload_adapter(self, name: str) -> None:
        response = httpx.post(f"{self.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=600)
        if response.status_code != 200:
            raise RuntimeError(f"vLLM could not unload the adapter {name}: {response.text}")

    def reload_weights(self, folder: Path) -> None:
        """Serve the weights saved in `folder` (safetensors, the served model's names and shapes) from
        now on, in place of those it serves (the server started with reloads_weights). Prefixes cached
        with the old weights are dropped, so no prompt is answered from their keys and values."""
        for path, body in (("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}}),
                           ("/reset_prefix_cache", None)):
            response = httpx.post(f"{self.url}{path}", json=body, timeout=3600)
            if response.status_code != 200:
                raise RuntimeError(f"vLLM could not load the weights in {folder} ({path}): {response.text}\n"
                                   + "\n".join(self.log_tail))

    @property
    def endpoint(self) -> dict[str, Any]:
        """An OpenAIEndpoint (as in a task) for this server."""
        model = ADAPTER_NAME if self.source.get("adapterUri") else SERVED_NAME
        # vLLM batches whatever is in flight: send plenty, it schedules them.
        return {"baseUrl": f"{self.url}/v1", "model": model, "concurrency": 256,
                "timeoutSeconds": 3600, "maxRetries": 2}

    def __enter__(self) -> "VllmServer":
        executable = vllm_executable()
        if executable is None:
            raise InvalidTask("no vLLM executable (LLMFACTORY_VLLM or vllm on PATH)")
        self._workdir = tempfile.TemporaryDirectory(prefix="llmfactory-vllm-")
        started = time.monotonic()
        try:
            tokenizer_dir = Path(self._workdir.name, "tokenizer")
            self.tokenizer.save_pretrained(tokenizer_dir)
            (tokenizer_dir / "chat_template.jinja").write_text(self.tokenizer.chat_template)
            # vLLM reads a config beside the tokenizer too, and logs an error (after retrying) without one.
            load_config(base_of(self.source)).save_pretrained(tokenizer_dir)
            command = serve_command(executable, self.source, str(tokenizer_dir), self.port,
                                    1 if self.cuda_device else _cuda_devices(), self.seed,
                                    self.dtype or str(compute_dtype()).removeprefix("torch."), self.lora_rank,
                                    self.max_model_len)
            if self.gpu_memory_utilization:
                command += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
            env = dict(os.environ)
            if vllm_build(executable) == "cpu":
                env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
            if self.cuda_device:
                env["CUDA_VISIBLE_DEVICES"] = self.cuda_device
            if self.lora_rank:
                env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # the load_adapter endpoints
            if self.reloads_weights:  # reload_weights' endpoints, served on the loopback only (--host)
                env["VLLM_SERVER_DEV_MODE"] = "1"
            log.info("starting vLLM: %s", " ".join(command))
            # Its own process group: vLLM's engine and workers are its children, stopped with it.
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            start_new_session=True, env=env)
            threading.Thread(target=self._relay_log, daemon=True).start()
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        log.info("vLLM ready in %.0f s on port %d", time.monotonic() - started, self.port)
        return self

    def _relay_log(self) -> None:
        """vLLM's log goes to the pod log, and its last lines into the error when it dies."""
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.log_tail.append(line.rstrip())
            sys.stderr.write(f"[vllm] {line}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the relay read the last lines
                raise RuntimeError(f"vLLM exited with code {self.process.returncode} while starting:\n"
                                   + "\n".join(self.log_tail))
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"vLLM did not answer /health within {START_TIMEOUT:.0f} s "
                           "(LLMFACTORY_VLLM_START_TIMEOUT):\n" + "\n".join(self.log_tail))

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._workdir is not None:
            self._workdir.cleanup()

    def generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0, on_answer: Callable[[int, Generation], None] | None = None,
                 tools: list[list[dict] | None] | None = None) -> list[Generation]:
        """What generate.generate returns for these conversations, all sent at once (vLLM schedules them).
        Tools go with tool_choice none: the template writes them into the prompt as with transformers,
        and the answer comes back as the text the model wrote, its calls unparsed."""
        answers: list[Generation | None] = [None] * len(conversations)

        async def ask_all() -> list[Generation]:
            async with ChatClient(self.endpoint, None, "vLLM") as client:
                async def ask(i: int) -> None:
                    offered = {"tools": tools[i], "tool_choice": "none"} if tools and tools[i] else {}
                    c = await client.complete(conversations[i], max_new_tokens, temperature, seed=seed,
                                              **offered, **self.request_params)
                    answers[i] = Generation(c.text, answer_tokens(c), c.finished)
                    if on_answer:
                        on_answer(i, answers[i])

                await client.each(range(len(conversations)), ask)
            return answers

        return asyncio.run(ask_all())
