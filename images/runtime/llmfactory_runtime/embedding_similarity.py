"""Metric cosine of grader operation similarity (OpenAI's text_similarity grader's cosine): the cosine
similarity of an answer's and its reference's embeddings, by an OpenAI-compatible embeddings endpoint
(grader.embeddings) or a local embedding model (grader.embeddingModel: its last hidden states pooled as
its sentence-transformers configuration says).

What was paid for is kept in the store (answer_cache), in two folders per endpoint (or model): each
score by its answer and reference, and each reference's embedding (a dataset's references recur every
epoch; answers are sampled anew). A process reads them once, at its first call (AnswerCache.opened,
held), and adds what it asks for after: a resumed run pays for nothing it had, and a long run does not
reread its own history at every step.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import EMBEDDINGS_KEY_ENV, libraries
from .answer_cache import AnswerCache, digest
from .openai_client import ChatClient, api_key, endpoint_identity
from .finetune.estimate import EMBEDDING_BATCH
from .task import InvalidTask
from .usage import Usage

BATCH = 256  # texts a request embeds (OpenAI takes up to 2048)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norms if norms else 0.0


# What embeds texts: (its identity, which names its caches; texts -> their embeddings)
Embedder = tuple[dict[str, Any], Callable[[list[str]], list[list[float]]]]


def api_embedder(endpoint: dict[str, Any], field: str, usage: Usage) -> Embedder:
    """grader.embeddings (`field` names it in errors), its tokens counted in `usage`."""
    return endpoint_identity(endpoint), lambda texts: _embed(endpoint, texts, field, usage)


def local_embedder(source: dict[str, Any], loaded: Callable[[], Encoder], prompt: str | None = None) -> Embedder:
    """grader.embeddingModel: loaded() gives it (load_encoder's), at the first text not in the cache;
    each text after `prompt` (grader.embeddingPrompt; None: the model's default one)."""
    identity = {"local": source, **({"prompt": prompt} if prompt is not None else {})}
    return identity, lambda texts: loaded().embed(texts, prompt)


def cosines(embedder: Embedder, answers: list[str | None], references: list[str], cache_uri: str,
            usage: Usage | None = None) -> list[float]:
    """Each answer's cosine similarity to its reference, 0-1 (below 0 counts 0); an answer that is None
    (grader.extract found nothing) or empty scores 0 without a request. `usage`: where the scores
    computed and found in the cache are counted."""
    usage = usage or Usage()
    identity, embed = embedder
    scores, embedded = (AnswerCache.opened(cache_uri, purpose, identity, held=True)
                        for purpose in ("cosine", "embeddings"))
    keys = [digest([a, r]) if a and r else None for a, r in zip(answers, references)]
    todo = {k: (a, r) for k, a, r in zip(keys, answers, references) if k and scores.get(k) is None}
    usage.cached += sum(1 for k in set(keys) if k and k not in todo)
    if todo:
        texts = list(dict.fromkeys([a for a, _ in todo.values()]
                                   + [r for _, r in todo.values() if embedded.get(digest(r)) is None]))
        vectors = dict(zip(texts, embed(texts)))
        usage.requests += len(todo)
        new_references = {digest(r): {"embedding": vectors[r]} for _, r in todo.values() if r in vectors}
        if new_references:
            embedded.put_pack(new_references)

        def vector(text: str) -> list[float]:
            return vectors[text] if text in vectors else embedded.get(digest(text))["embedding"]

        scores.put_pack({k: {"cosine": cosine(vector(a), vector(r))} for k, (a, r) in todo.items()})
    return [min(1.0, max(0.0, scores.get(k)["cosine"])) if k else 0.0 for k in keys]  # rounding may pass 1


def _embed(endpoint: dict[str, Any], texts: list[str], field: str, usage: Usage) -> list[list[float]]:
    key = api_key(endpoint, EMBEDDINGS_KEY_ENV, field)

    async def embed_all() -> list[list[float]]:
        async with ChatClient(endpoint, key, field, usage=usage) as client:
            batches = await asyncio.gather(*(client.embed(texts[i:i + BATCH]) for i in range(0, len(texts), BATCH)))
        return [v for batch in batches for v in batch]

    return asyncio.run(embed_all())


@dataclass(frozen=True)
class Encoder:
    """A local embedding model: each text after a prompt (`prompt`, its default), cut at max_length
    tokens, its last hidden states pooled (mean over its tokens, the prompt's too with include_prompt;
    the first token's: cls; or the last one's: lasttoken), then through `dense`, as sentence-transformers
    encodes."""

    model: Any
    tokenizer: Any
    pooling: str
    max_length: int
    prompt: str = ""
    include_prompt: bool = True
    dense: tuple = ()  # sentence-transformers' Dense modules after the pooling, in order (torch modules)

    def embed(self, texts: list[str], prompt: str | None = None) -> list[list[float]]:
        """The texts' embeddings, each after `prompt` (None: the model's default one)."""
        import torch  # noqa: PLC0415 - only for a local model

        prompt = self.prompt if prompt is None else prompt
        # sentence-transformers' prompt_length: the prompt's tokens less its closing special token
        unpooled = len(self.tokenizer(prompt)["input_ids"]) - 1 if prompt and not self.include_prompt else 0
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), EMBEDDING_BATCH):
                batch = self.tokenizer([prompt + t for t in texts[i:i + EMBEDDING_BATCH]], padding=True,
                                       truncation=True, max_length=self.max_length, return_tensors="pt"
                                       ).to(self.model.device)
                hidden = self.model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"]
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                elif self.pooling == "lasttoken":  # padded on the right
                    pooled = hidden[torch.arange(len(hidden)), mask.sum(1) - 1]
                else:
                    mask = mask.clone()
                    mask[:, :unpooled] = 0
                    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
                for layer in self.dense:
                    pooled = layer(pooled)
                out += pooled.cpu().tolist()
        return out


def load_encoder(source: dict[str, Any]) -> Encoder:
    """The model at source (transformers' AutoModel, compute dtype, best device), as sentence-transformers
    would encode with it (its modules.json): pooled as its Pooling module's config says (mean without
    one), then through its Dense modules; each text after the prompt config_sentence_transformers.json
    names default_prompt_name (with include_prompt false, left out of the mean), cut at its
    sentence_bert_config.json's max_seq_length, else its tokenizer's or position embeddings' limit."""
    import torch  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415
    from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415
    from transformers.utils import cached_file  # noqa: PLC0415

    from .models import compute_dtype, device, locate  # noqa: PLC0415

    where, _, kwargs = locate(source)

    def found(name: str) -> str | None:
        return cached_file(where, name, _raise_exceptions_for_missing_entries=False, **kwargs)

    def settings(name: str) -> Any:
        path = found(name)
        return json.loads(open(path).read()) if path else {}

    def dense(folder: str) -> torch.nn.Module:
        config = settings(f"{folder}/config.json")
        activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
        name = activation.rsplit(".", 1)[-1]
        if not activation.startswith("torch.nn.") or not hasattr(torch.nn, name):
            raise InvalidTask(f"embeddingModel {where}: {folder}'s activation {activation} is not a torch.nn module")
        weights = found(f"{folder}/model.safetensors")
        state = load_file(weights) if weights else torch.load(found(f"{folder}/pytorch_model.bin"), weights_only=True)
        linear = torch.nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
        linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
        return torch.nn.Sequential(linear, getattr(torch.nn, name)()).to(device()).eval()

    modules = settings("modules.json") or []
    pooling = settings(next((f"{m['path']}/config.json" for m in modules if m["type"].endswith(".Pooling")),
                            "1_Pooling/config.json"))
    mode = ("cls" if pooling.get("pooling_mode_cls_token") else
            "lasttoken" if pooling.get("pooling_mode_lasttoken") else "mean")
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:  # a decoder's: any token will do under the attention mask
        tokenizer.pad_token = tokenizer.eos_token
    libraries.check_checkpoint(where, **kwargs)
    model = AutoModel.from_pretrained(where, dtype=compute_dtype(), **kwargs)
    if model.config.is_encoder_decoder:  # sentence-t5, GTR: the encoder's states alone (T5EncoderModel's)
        model = model.get_encoder()
    model = model.to(device()).eval()
    limit = (settings("sentence_bert_config.json").get("max_seq_length")
             or (tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None)
             or getattr(model.config, "max_position_embeddings", 512))
    prompts = settings("config_sentence_transformers.json")
    prompt = (prompts.get("prompts") or {}).get(prompts.get("default_prompt_name") or "", "")
    return Encoder(model, tokenizer, mode, int(limit), prompt, pooling.get("include_prompt", True),
                   tuple(dense(m["path"]) for m in modules if m["type"].endswith(".Dense")))
