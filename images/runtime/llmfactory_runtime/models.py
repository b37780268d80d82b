"""Finding and loading models and tokenizers, wherever a ModelSource says they are."""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from . import libraries
from .chat import TEMPLATES, set_template_kwargs, use_template
from .store import open_store
from .task import InvalidTask

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("LLMFACTORY_CACHE", Path.home() / ".cache" / "llmfactory"))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype() -> torch.dtype:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _package_path(uri: str) -> Path:
    parsed = urlparse(uri)
    spec = importlib.util.find_spec(parsed.netloc)  # find_spec does not import the package
    if spec is None or spec.origin is None:
        raise InvalidTask(f"{uri}: Python package {parsed.netloc!r} is not installed")
    return Path(spec.origin).parent / parsed.path.lstrip("/")


def locate(source: dict[str, Any], what: str = "model") -> tuple[str, str | None, dict[str, Any]]:
    """(directory or hub id, GGUF file name or None, from_pretrained kwargs) for a ModelSource (`what`:
    another folder a URI names, for the error that says it is missing)."""
    gguf = source.get("ggufFile")
    if source.get("huggingface"):
        return source["huggingface"], gguf, {"revision": source.get("revision")}
    uri = source.get("uri") or ""
    if uri.startswith("package://"):
        path = _package_path(uri)
    elif uri.startswith("file://"):
        path = Path(urlparse(uri).path)
    elif uri.startswith("s3://"):
        path = cache_root() / "downloads" / hashlib.sha256(uri.encode()).hexdigest()[:24]
        if not (path / ".complete").exists():
            open_store(uri).download_dir("", path, require_commit=False)
            if not path.is_dir():  # not one object under that prefix (and nothing cached as if it were)
                raise InvalidTask(f"{what} {uri}: there is nothing there")
            (path / ".complete").touch()
    else:
        raise InvalidTask(f"model source needs huggingface or uri (s3://, file://, package://), got {source}")
    if path.suffix == ".gguf":
        path, gguf = path.parent, path.name
    if not path.exists():
        raise InvalidTask(f"{what} {uri}: {path} does not exist")
    if what == "model":
        _refuse_unloadable(path, gguf, uri)
    return str(path), gguf, {}


def _refuse_unloadable(path: Path, gguf: str | None, uri: str) -> None:
    """A local folder that from_pretrained would search the hub for (no config.json, a ggufFile it
    lacks): named here, with the GGUF files it has, rather than in a hub error about a missing file."""
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    there = f"its GGUF files: {', '.join(ggufs)}" if ggufs else "it has no .gguf file"
    if gguf and not (path / gguf).is_file():
        raise InvalidTask(f"model {uri}: ggufFile {gguf} is not there ({there})")
    if not gguf and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        hint = "set ggufFile to one" if ggufs else "name a Hugging Face model folder"
        raise InvalidTask(f"model {uri}: no config.json there ({there}: {hint})")


def _gguf_cache(source: dict[str, Any], cache: bool) -> Path | None:
    """A GGUF file dequantizes slowly (~20 s for 135M params); keep a safetensors copy once loaded."""
    where, gguf, _ = locate(source)
    if not gguf or not cache:
        return None
    stat = (Path(where) / gguf).stat() if Path(where, gguf).exists() else None
    weights = {k: v for k, v in source.items() if k != "chatTemplateKwargs"}  # how it renders is not what it holds
    key = json.dumps([weights, stat.st_size if stat else None, stat.st_mtime if stat else None], sort_keys=True)
    return cache_root() / "gguf-as-safetensors" / hashlib.sha256(key.encode()).hexdigest()[:24]


def load_tokenizer(source: dict[str, Any], cache: bool = True) -> PreTrainedTokenizerBase:
    return tokenizer_for(source, cache)[0]


def tokenizer_for(source: dict[str, Any], cache: bool = True,
                  template: tuple[str, tuple[str, ...]] | None = None) -> tuple[PreTrainedTokenizerBase, list[int]]:
    """The source's tokenizer with chat `template` and its markers (chat.template_of; None: its own,
    ChatML where it has none), rendering with the source's chatTemplateKwargs, and the ids of the
    markers that gave it beyond the tokenizer as shipped: rows the checkpoint never trained even where
    it has them (a vocabulary padded to a multiple of 64)."""
    if source.get("adapterUri"):  # a FineTune keeps the tokenizer it trained with beside its adapter
        beside = {"uri": source["adapterUri"], "chatTemplateKwargs": source.get("chatTemplateKwargs")}
        return tokenizer_for(beside, cache, template)
    cached = _gguf_cache(source, cache)
    if cached and (cached / ".complete").exists():
        tok = AutoTokenizer.from_pretrained(cached)
    else:
        where, gguf, kwargs = locate(source)
        tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf, **kwargs)
    added = []
    if template or not tok.chat_template:
        added = use_template(tok, *(template or TEMPLATES["chatml"]))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if source.get("chatTemplateKwargs"):
        set_template_kwargs(tok, source["chatTemplateKwargs"])
    return tok, added


def load_config(source: dict[str, Any]):
    """The model's config alone (no weights): what the memory check needs."""
    cached = _gguf_cache(source, True)
    if cached and (cached / ".complete").exists():
        return AutoConfig.from_pretrained(cached)
    where, gguf, kwargs = locate(source)
    return AutoConfig.from_pretrained(where, gguf_file=gguf, **kwargs)


def load_model(source: dict[str, Any], dtype: torch.dtype | str | None = None, cache: bool = True,
               to: torch.device | None = None, auto_class=AutoModelForCausalLM,
               tokenizer: PreTrainedTokenizerBase | None = None, **kwargs):
    """A causal LM (or what `auto_class` loads: a reward model to train is a sequence-classification
    one) on the best device (or `to`), in the compute dtype unless told otherwise, with the
    LoRA adapter at source["adapterUri"] merged in when there is one. A GGUF
    source is kept as safetensors in the local cache unless cache=False (a file that is only checked once).
    A model loaded with a device_map (e.g. 4-bit) stays where it was placed. Its embeddings fit
    `tokenizer` (load_tokenizer's for the source unless the caller has it already)."""
    dtype = dtype or compute_dtype()
    cached = _gguf_cache(source, cache)
    if cached and not (cached / ".complete").exists() and ("quantization_config" in kwargs
                                                           or auto_class is not AutoModelForCausalLM):
        # transformers cannot quantize while reading GGUF, and the cache is of the causal LM: make the
        # safetensors copy first.
        load_model(source, dtype=dtype, cache=True, to=torch.device("cpu"))  # kept: only the cache
    if cached and (cached / ".complete").exists():
        model = auto_class.from_pretrained(cached, dtype=dtype, **kwargs)
    else:
        where, gguf, extra = locate(source)
        if gguf:
            log.info("dequantizing the GGUF base %s", gguf)
        else:
            libraries.check_checkpoint(where, **extra)
        model = auto_class.from_pretrained(where, gguf_file=gguf, dtype=dtype, **extra, **kwargs)
        if cached:
            _save_gguf_cache(model, AutoTokenizer.from_pretrained(where, gguf_file=gguf), cached)
    fit_embeddings(model, tokenizer or load_tokenizer(source, cache))  # before the adapter: it may train the new rows
    if source.get("adapterUri"):  # a FineTune that kept only its LoRA adapter: merged onto its base here
        from peft import PeftModel  # noqa: PLC0415

        folder, _, _ = locate({"uri": source["adapterUri"]})
        model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    if "device_map" in kwargs:
        return model
    return model.to(to or device())


def fit_embeddings(model, tokenizer) -> None:
    """Rows for the tokens the tokenizer has beyond the model's embeddings (the chat markers
    chat.use_template gives a base model), each new input and output row the mean of the trained ones,
    as TRL's setup_chat_format starts them, but with no random draw: every process of a run, and
    every later load of its adapter, grows the same model."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        start_rows(model, range(rows, len(tokenizer)))


def start_rows(model, rows: Sequence[int]) -> None:
    """Input and output rows `rows` (tokens the checkpoint never trained) set to the mean of the
    other rows, accumulated in fp32 without a copy of the matrix (1 GiB on Llama-3-8B)."""
    rows = sorted(set(rows))
    if not rows:
        return
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    with torch.no_grad():
        for weight in {id(layer.weight): layer.weight for layer in layers if layer is not None}.values():
            index = torch.tensor(rows, device=weight.device)
            rest = weight.sum(dim=0, dtype=torch.float32) - weight[index].sum(dim=0, dtype=torch.float32)
            weight[index] = (rest / (weight.shape[0] - len(rows))).to(weight.dtype)


def untrained_rows(model, ids: Sequence[int]) -> list[int]:
    """Of token ids `ids`, those whose input embedding is (near) zero: never trained. Llama-3 and
    Llama-3.1 base models have their chat markers (<|eot_id|>, <|start_header_id|>) so, about 1e-23,
    Unsloth's fix_untrained_tokens finds them the same way; a vocabulary's padding rows may be zeros.
    Near means under a thousandth of a typical row's norm (sampled: no fp32 copy of the matrix)."""
    weight = model.get_input_embeddings().weight
    ids = [i for i in ids if i < weight.shape[0]]
    if not ids:
        return []
    with torch.no_grad():
        typical = weight[:: max(1, weight.shape[0] // 4096)].float().norm(dim=1).median()
        norms = weight[torch.tensor(ids, device=weight.device)].float().norm(dim=1)
    return [i for i, norm in zip(ids, norms.tolist()) if norm <= 1e-3 * typical.item()]


class LazyModel:
    """A model (in eval mode) and its tokenizer, loaded the first time they are asked for, so that a
    restarted phase whose results are all saved loads nothing; release() lets them go before the
    next model loads."""

    def __init__(self, source: dict[str, Any], on_load: Callable[[], None] | None = None):
        self.source, self._on_load, self._held = source, on_load, None

    def __call__(self) -> tuple[Any, PreTrainedTokenizerBase]:
        if self._held is None:
            if self._on_load:
                self._on_load()
            tokenizer = load_tokenizer(self.source)
            model = load_model(self.source, tokenizer=tokenizer)
            model.eval()
            self._held = (model, tokenizer)
        return self._held

    def release(self) -> None:
        self._held = None
        gc.collect()
        if torch.cuda.is_available():  # back to the device, for another process (a vLLM server) to take
            torch.cuda.empty_cache()


def save_pretrained_here(model, folder: Path) -> None:
    """model.save_pretrained into `folder`, whichever process calls it: while a process group is up,
    transformers writes a model's weights on rank 0 alone (should_save_on_this_rank), so another rank's
    folder would hold its config and no weights. (peft writes an adapter on every rank.)"""
    own = torch.distributed.is_initialized() and hasattr(model, "should_save_on_this_rank")
    if own:
        model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        model.save_pretrained(folder)
    finally:
        if own:
            del model.should_save_on_this_rank


def _save_gguf_cache(model, tokenizer, path: Path) -> None:
    # A GGUF-loaded model refuses save_pretrained while it still names its quantizer.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_pretrained_here(model, tmp)  # each process of a run its own, the first whole one kept
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").touch()
    try:
        tmp.rename(path)  # atomic: a concurrent reader sees no cache or a whole one
        log.info("the GGUF base kept as safetensors in %s", path)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
