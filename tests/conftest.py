"""Shared fixtures: tiny random Llama-family models and a small byte-level BPE tokenizer with a
chat template, so every fast test runs in milliseconds on a CPU without any download."""

from __future__ import annotations

import functools

import pytest
import torch

from memoryllm import MemoryLLM, MemoryLLMConfig

CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France and Rome is the capital of Italy.",
    "Memory helps the model remember new facts without any gradient step.",
    "Alice lives in Zurich and works as an engineer at a bakery.",
    "The meeting was moved to Thursday at three in the afternoon.",
    "Numbers like 42, 1999 and 3.14 appear in many sentences.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@functools.lru_cache(maxsize=1)
def make_tokenizer():
    """Byte-level BPE (every string encodes; decode(encode(s)) == s) with ~300 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(**overrides) -> MemoryLLMConfig:
    tok = make_tokenizer()
    base = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_tokens=8,
        num_blocks=4,
        min_inject_tokens=4,
        max_inject_tokens=32,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    base.update(overrides)
    return MemoryLLMConfig(**base)


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm weights near 1, biases and learned memory embeddings
    non-zero), so a tensor used in the wrong place changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)


def tiny_model(seed: int = 0, **overrides) -> MemoryLLM:
    model = MemoryLLM(tiny_config(**overrides))
    randomize_(model, seed)
    return model.eval()


def tiny_lm(seed: int = 0, **overrides):
    from memoryllm.lm import MemoryLM

    return MemoryLM(tiny_model(seed, **overrides), make_tokenizer(), name="tiny")


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def lm():
    return tiny_lm()
