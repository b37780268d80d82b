"""A saved transformers Llama-family model -> one GGUF file, written with gguf-py (llama.cpp's own
Python package): architecture metadata, tensors under gguf's name mapping, and the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors import safe_open

from ..task import InvalidTask

# Architectures that llama.cpp runs as "llama" with the tensor layout written here.
LLAMA_FAMILY = {"llama", "mistral"}

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


def _tensor_type(name: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """Norms and other vectors stay F32; a matrix whose rows do not fill whole blocks falls back to F16."""
    if data.ndim < 2:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if data.shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return qtype


def _pre_tokenizer_name(pre: dict | None) -> str:
    """The llama.cpp pre-tokenizer id for a tokenizers pre_tokenizer (only those we can prove)."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    raise InvalidTask(f"unsupported tokenizer pre-tokenizer {json.dumps(pre)[:200]}: this converter knows "
                      "byte-level BPE with the GPT-2 split (e.g. SmolLM, GPT-2)")


def _add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise InvalidTask(f"{folder} has no tokenizer.json: only fast (tokenizers) BPE tokenizers convert")
    tok = json.loads(path.read_text())
    model = tok["model"]
    if model.get("type") != "BPE":
        raise InvalidTask(f"unsupported tokenizer model {model.get('type')!r}: only BPE converts")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, idx in model["vocab"].items():
        if idx < vocab_size:
            tokens[idx], types[idx] = text, gguf.TokenType.NORMAL
    for added in tok.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
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
    writer.add_add_bos_token(bool(config.get("add_bos_token", False)))
    template = config.get("chat_template")
    if not template and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    if template:
        writer.add_chat_template(template)


def export(folder: Path, out: Path, type_name: str, name: str) -> int:
    """Write `out`; returns the number of model parameters."""
    config = json.loads((folder / "config.json").read_text())
    arch = config.get("model_type")
    if arch not in LLAMA_FAMILY:
        raise InvalidTask(f"unsupported architecture {arch!r} for GGUF conversion; supported: {sorted(LLAMA_FAMILY)}")
    qtype, file_type = TYPES[type_name]
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise InvalidTask(f"unsupported RoPE scaling {rope or config.get('rope_scaling')}: only plain RoPE converts")

    writer = gguf.GGUFWriter(out, "llama")
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

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    params = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for hf_name in f.keys():
                if "rotary_emb.inv_freq" in hf_name:
                    continue
                data = f.get_tensor(hf_name).float().numpy()  # bf16 has no numpy dtype
                if hf_name.endswith("q_proj.weight"):
                    data = permute_qk(data, n_head)
                elif hf_name.endswith("k_proj.weight"):
                    data = permute_qk(data, n_kv)
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise InvalidTask(f"tensor {hf_name!r} has no GGUF name for architecture {arch}")
                params += data.size
                ttype = _tensor_type(gguf_name, data, qtype)
                writer.add_tensor(gguf_name, gguf.quantize(data, ttype), raw_dtype=ttype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return params

