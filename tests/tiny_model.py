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


def make_tokenizer(folder: Path, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmfactory_runtime.chat import CHATML_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def make_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """Save a 2-layer Llama (hidden 64, GQA 4/2 heads) and its tokenizer to folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = make_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
