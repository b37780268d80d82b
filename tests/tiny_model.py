"""A tiny random-initialised Llama and a byte-level BPE tokenizer trained on the fly: a real
model, small enough that all four phases run in seconds on CPU."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Explain why the sky is blue. Sunlight is scattered by the air, blue light the most.",
    "Какая столица России? Столица России — Москва.",
    "Почему небо голубое? Воздух рассеивает синий свет сильнее всего.",
    "中国的首都是哪里？中国的首都是北京。",
    "为什么天空是蓝色的？空气散射蓝光最多。",
    "Write a short poem about the sea. The sea is wide and the waves are blue.",
    "Напиши стихотворение о море. Море широкое, волны синие.",
    "写一首关于大海的诗。大海辽阔，波浪是蓝色的。",
] * 4

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# The splits Llama 3 and Qwen2 apply before byte-level BPE (their tokenizer.json pre_tokenizer).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(split: str | None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if split is None:  # GPT-2's own split (SmolLM)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok, trainers.BpeTrainer(special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())


def _sentencepiece_style():
    """Llama 2 / Mistral: BPE over "▁"-joined words with byte fallback (<0x00>..<0xFF>)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    return tok, trainers.BpeTrainer(special_tokens=specials)


def make_tokenizer(folder: Path, vocab_size: int = 400, style: str = "gpt2", chat_template: bool = True):
    """style: gpt2 (SmolLM), llama3, qwen2 (byte-level BPE with their splits) or sentencepiece
    (Llama 2, Mistral). chat_template False: none, as a base model's tokenizer ships (sentencepiece's
    has no ChatML markers either, as Mistral-7B-v0.1's has none)."""
    from transformers import PreTrainedTokenizerFast

    from llmfactory_runtime.chat import CHATML_TEMPLATE

    if style == "sentencepiece":
        tok, trainer = _sentencepiece_style()
        vocab_size += 256
    else:
        tok, trainer = _byte_level({"gpt2": None, "llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[style])
    trainer.vocab_size = vocab_size
    # Numbers, so that a split's digit rule (Llama 3 groups up to three, Qwen2 one) shows in the merges.
    numbers = [] if style == "gpt2" else ["In 2024 there were 366 days, 8784 hours and 527040 minutes."] * 4
    tok.train_from_iterator(CORPUS + numbers, trainer)
    if style == "sentencepiece":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                       pad_token="</s>")
        fast.add_bos_token = True
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", eos_token="<|im_end|>",
                                       pad_token="<|im_end|>", bos_token="<|im_start|>")
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def make_tiny_llama(folder: Path, seed: int = 0, tokenizer: str = "gpt2", chat_template: bool = True,
                    hidden_size: int = 64, heads: int = 4, kv_heads: int | None = None, layers: int = 2,
                    context: int = 512) -> Path:
    """Save a 2-layer Llama (hidden 64, GQA 4/2 heads unless told otherwise: heads/2 key-value heads;
    a context of 512) and its tokenizer to folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tok = make_tokenizer(folder, style=tokenizer, chat_template=chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads // 2,
                         max_position_embeddings=context, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def make_tiny_reward_model(folder: Path, seed: int = 1, tokenizer: str = "gpt2", chat_template: bool = True) -> Path:
    """A tiny Llama with a one-label classification head (a reward model, as TRL's RewardTrainer saves
    one) and the same tokenizer as make_tiny_llama's."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    folder = Path(folder)
    tok = make_tokenizer(folder, style=tokenizer, chat_template=chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    return folder


def make_tiny_qwen2(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen2 (attention biases, tied embeddings) with a Qwen2-split tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    tok = make_tokenizer(folder, style="qwen2")
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # random, not zero, biases: a converter that dropped them would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.02)
    model.save_pretrained(folder)
    return folder


def end_turn_early(folder, prompt: str) -> None:
    """Make the model end its greedy answer to `prompt` after a few tokens: <|im_end|>'s output row
    becomes a copy (scaled up) of the token it would write there, which it then writes instead
    (a random model would hardly ever end a turn)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmfactory_runtime.generate import prompt_ids

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    ids = prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
    answer = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    at = next((i for i in range(2, len(answer)) if answer[i] not in answer[:i]), 0)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.lm_head.weight[end] = model.lm_head.weight[answer[at]] * 1.05
    model.save_pretrained(folder)
