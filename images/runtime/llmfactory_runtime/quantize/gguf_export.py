"""A saved transformers Llama-family model -> one GGUF file, written with gguf-py (llama.cpp's own
Python package): architecture metadata, tensors under gguf's name mapping, and the tokenizer.

Architectures: Llama (2, 3), Mistral and SmolLM as llama.cpp's "llama" (q/k rows permuted to its
rotary layout), Qwen2 as "qwen2" (attention biases, rotary halves as they are). Tokenizers, from
tokenizer.json: byte-level BPE with the GPT-2, Llama 3 or Qwen2 split (tokenizer model "gpt2",
pre-tokenizer gpt-2 / llama-bpe / qwen2) and SentencePiece-style BPE with byte fallback
(Llama 2, Mistral: tokenizer model "llama", scores in merge order, <0xNN> byte tokens).
Anything else fails naming what it found."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import gguf
import numpy as np
from safetensors import safe_open
from transformers import AutoTokenizer

from ..chat import end_of_turn
from ..task import InvalidTask

# model_type -> (llama.cpp architecture, whether q/k rows are permuted to llama's rotary layout)
ARCHITECTURES = {"llama": (gguf.MODEL_ARCH.LLAMA, True), "mistral": (gguf.MODEL_ARCH.LLAMA, True),
                 "qwen2": (gguf.MODEL_ARCH.QWEN2, False)}
# The split a byte-level BPE applies before its merges -> llama.cpp's pre-tokenizer name.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
KNOWN_TOKENIZERS = ("byte-level BPE with the GPT-2 (SmolLM), Llama 3 or Qwen2 split, and SentencePiece-style BPE "
                    "with byte fallback (Llama 2, Mistral)")

TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (gguf.GGMLQuantizationType.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (gguf.GGMLQuantizationType.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout interleaves the two halves of each head (convert_hf_to_gguf's permute)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensor_type(name: str, shape: list[int], qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """Norms and other vectors stay F32; a matrix whose rows do not fill whole blocks falls back to F16."""
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return qtype


def _stored(shape: list[int], ttype: gguf.GGMLQuantizationType) -> tuple[list[int], np.dtype, int]:
    """(shape, dtype, bytes) of a tensor of `shape` as gguf.quantize returns it in `ttype`: F32 and F16
    as such, the others as rows of bytes."""
    if ttype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        dtype = np.dtype(np.float32 if ttype == gguf.GGMLQuantizationType.F32 else np.float16)
        return list(shape), dtype, math.prod(shape) * dtype.itemsize
    stored = list(gguf.quant_shape_to_byte_shape(shape, ttype))
    return stored, np.dtype(np.uint8), math.prod(stored)


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE's pre_tokenizer (only splits we can prove)."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = (pre or {}).get("pretokenizers") or []
    if (pre or {}).get("type") == "Sequence" and len(parts) == 2 and parts[0].get("type") == "Split" \
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex in SPLITS:
            return SPLITS[regex]
    raise InvalidTask(f"unsupported tokenizer pre-tokenizer {json.dumps(pre)[:200]}: this converter knows "
                      f"{KNOWN_TOKENIZERS}")


def _is_sentencepiece_style(tok: dict) -> bool:
    """Llama 2 / Mistral tokenizer.json: BPE with byte fallback over words joined by U+2581."""
    if not tok["model"].get("byte_fallback"):
        return False
    normalizers = json.dumps(tok.get("normalizer"), ensure_ascii=False)
    pre = tok.get("pre_tokenizer") or {}
    if ('"Prepend"' in normalizers and "\u2581" in normalizers) or pre.get("type") == "Metaspace":
        return True
    raise InvalidTask(f"unsupported byte-fallback BPE (normalizer {normalizers[:120]}, pre-tokenizer "
                      f"{json.dumps(pre)[:120]}): this converter knows {KNOWN_TOKENIZERS}")


def _adds_bos(tok: dict, config: dict) -> bool:
    if "add_bos_token" in config:
        return bool(config["add_bos_token"])
    single = ((tok.get("post_processor") or {}).get("single") or [{}])[0]
    return "SpecialToken" in single


def _add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise InvalidTask(f"{folder} has no tokenizer.json: only fast (tokenizers) BPE tokenizers convert")
    tok = json.loads(path.read_text())
    model = tok["model"]
    if model.get("type") != "BPE":
        raise InvalidTask(f"unsupported tokenizer model {model.get('type')!r}: this converter knows {KNOWN_TOKENIZERS}")
    sentencepiece = _is_sentencepiece_style(tok)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, idx in model["vocab"].items():
        if idx < vocab_size:
            tokens[idx], types[idx] = text, gguf.TokenType.NORMAL
            if sentencepiece and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types[idx] = gguf.TokenType.BYTE
    for added in tok.get("added_tokens", []):
        if added["id"] < vocab_size and types[added["id"]] != gguf.TokenType.BYTE:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if sentencepiece:
        # llama.cpp's SentencePiece tokenizer merges by score: a BPE vocabulary's ids are in merge order.
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores([-float(i) if t == gguf.TokenType.NORMAL else 0.0 for i, t in enumerate(types)])
        writer.add_add_space_prefix(True)
        if model.get("unk_token") in model["vocab"]:
            types[model["vocab"][model["unk_token"]]] = gguf.TokenType.UNKNOWN
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(tok.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)

    config = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").exists() else {}
    ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])} | model["vocab"]
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value in ids:
            add(ids[value])
    writer.add_add_bos_token(_adds_bos(tok, config))
    # The token a turn ends with (ChatML's <|im_end|>, a template of one's own's): llama.cpp stops on
    # it, where otherwise it guesses from a list of known texts and a new marker runs on.
    eot = end_of_turn(AutoTokenizer.from_pretrained(folder))
    if eot is not None and eot < vocab_size:
        writer.add_eot_token_id(eot)
    template = config.get("chat_template")
    if not template and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    if template:
        writer.add_chat_template(template)


def export(folder: Path, out: Path, type_name: str, name: str) -> int:
    """Write `out`; returns the number of model parameters."""
    config = json.loads((folder / "config.json").read_text())
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise InvalidTask(f"unsupported architecture {arch!r} for GGUF conversion; supported: {sorted(ARCHITECTURES)}")
    gguf_arch, permute = ARCHITECTURES[arch]
    qtype, file_type = TYPES[type_name]
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise InvalidTask(f"unsupported RoPE scaling {rope or config.get('rope_scaling')}: only plain RoPE converts")

    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf_arch])
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    _add_tokenizer(writer, folder, config["vocab_size"])

    # Two passes over the weights: what each tensor will be (from the safetensors headers), written as
    # the file's tensor infos; then each tensor converted and written in turn, so that one is held at a
    # time, not the whole model (an 8B in f16: 16 GB of memory otherwise).
    names = gguf.get_tensor_name_map(gguf_arch, n_layers)
    planned = []  # (shard, HF name, GGUF name, GGUF type)
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for hf_name in f.keys():
                if "rotary_emb.inv_freq" in hf_name:
                    continue
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise InvalidTask(f"tensor {hf_name!r} has no GGUF name for architecture {arch}")
                shape = f.get_slice(hf_name).get_shape()
                ttype = _tensor_type(gguf_name, shape, qtype)
                writer.add_tensor_info(gguf_name, *_stored(shape, ttype), raw_dtype=ttype)
                planned.append((shard, hf_name, gguf_name, ttype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    params = 0
    for shard, tensors in itertools.groupby(planned, key=lambda t: t[0]):
        with safe_open(shard, framework="pt") as f:
            for _, hf_name, gguf_name, ttype in tensors:
                data = f.get_tensor(hf_name).float().numpy()  # bf16 has no numpy dtype
                if permute and hf_name.endswith("q_proj.weight"):
                    data = permute_qk(data, n_head)
                elif permute and hf_name.endswith("k_proj.weight"):
                    data = permute_qk(data, n_kv)
                params += data.size
                writer.write_tensor_data(gguf.quantize(data, ttype))
    writer.close()
    return params

