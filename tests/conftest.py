"""Shared fixtures: tiny random Llama-family models and a small byte-level BPE tokenizer with a
chat template, so every fast test runs in milliseconds on a CPU without any download."""

from __future__ import annotations

import functools
import socket
import threading
import time

import pytest
import torch

from latentmem.memoryllm import MemoryLLM, MemoryLLMConfig

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
    from latentmem.memoryllm.lm import MemoryLM

    return MemoryLM(tiny_model(seed, **overrides), make_tokenizer(), name="tiny")


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Put torch's thread count back after every test: the CLI's --threads sets it for the whole
    process, and a later test would then write with other float summation orders (replays are
    bit-exact only at one thread count, issue 17) or fork workers with a live OpenMP pool."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def lm():
    return tiny_lm()


# --------------------------------------------------------------------------------------------
# A slow reference of MemoryLLM, written from the paper and docs/design.md rather than from
# model.py: one sequence at a time, float64, explicit matmul/softmax attention over the whole
# [bos, memory, input] sequence. The fast batched paths are tested against it.
# --------------------------------------------------------------------------------------------


def ref_position_factor(cfg) -> float:
    """The RoPE position multiplier as design.md states it (tests use configs where it is < 1)."""
    if cfg.position_scaling == "interpolate":  # 7B release
        return cfg.max_position_embeddings / ((cfg.num_blocks + 1) * cfg.num_tokens)
    if cfg.position_scaling == "linear":  # 8B release
        return 1 / ((cfg.num_memory_tokens + cfg.max_input_tokens) / cfg.max_position_embeddings)
    return 1.0


def _linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if module.bias is None else module.bias.double()
    return torch.nn.functional.linear(x, module.weight.double(), bias)


def _rms_norm(module, x: torch.Tensor) -> torch.Tensor:
    return module.weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.eps)


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [H, S, hd] rotated by positions [S] (HF's rotate-half convention)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = positions.double()[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def ref_layer(layer, x: torch.Tensor, positions: torch.Tensor, can_see: torch.Tensor, cfg) -> torch.Tensor:
    """One decoder layer on a single sequence x [S, d] (float64); can_see[i, j]: query i sees key j."""
    S = x.shape[0]
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    att = layer.self_attn
    xn = _rms_norm(layer.input_layernorm, x)
    q = _rope(_linear(att.q_proj, xn).view(S, H, hd).transpose(0, 1), positions, cfg.rope_theta)
    k = _rope(_linear(att.k_proj, xn).view(S, Hkv, hd).transpose(0, 1), positions, cfg.rope_theta)
    v = _linear(att.v_proj, xn).view(S, Hkv, hd).transpose(0, 1)
    k, v = k.repeat_interleave(H // Hkv, dim=0), v.repeat_interleave(H // Hkv, dim=0)  # GQA
    scores = (q @ k.transpose(1, 2)) / hd**0.5
    weights = scores.masked_fill(~can_see, float("-inf")).softmax(-1)
    h = x + _linear(att.o_proj, (weights @ v).transpose(0, 1).reshape(S, H * hd))
    mlp = layer.mlp
    hn = _rms_norm(layer.post_attention_layernorm, h)
    return h + _linear(mlp.down_proj, torch.nn.functional.silu(_linear(mlp.gate_proj, hn)) * _linear(mlp.up_proj, hn))


def _prefix_rows(model, layer: int, memory_rows: torch.Tensor) -> torch.Tensor:
    """[bos_l, memory rows] (bos only when the model has a learned bos_embedding)."""
    rows = memory_rows.double()
    if model.bos_embedding is None:
        return rows
    return torch.cat([model.bos_embedding[layer].double(), rows])


@torch.no_grad()
def ref_logits(model, ids, memory: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [T, V] (float64) of one sequence reading memory [L, N, d] in logical order (None:
    no memory). Per layer the sequence is [bos, memory, input] at RoPE positions 0, 1, ...
    (times the position factor); input queries see all of bos + memory and their causal past."""
    cfg = model.config
    ids = torch.as_tensor(ids)
    T = len(ids)
    h = model.model.embed_tokens.weight.double()[ids]
    for l, layer in enumerate(model.model.layers):
        prefix = _prefix_rows(model, l, memory[l]) if memory is not None else h[:0]
        P = prefix.shape[0]
        x = torch.cat([prefix, h])
        i, j = torch.arange(P + T)[:, None], torch.arange(P + T)[None, :]
        can_see = (j < P) | (j <= i)
        positions = torch.arange(P + T) * ref_position_factor(cfg)
        h = ref_layer(layer, x, positions, can_see, cfg)[P:]
    return _linear(model.lm_head, _rms_norm(model.model.norm, h))


@torch.no_grad()
def ref_new_memory(model, ids, memory: torch.Tensor | None = None) -> torch.Tensor:
    """The self-update's new memory tokens [L, k, d] (float64) for one context.

    Initialised pool (memory [L, N, d], logical order): per layer [bos, memory[-K:], context]
    with ordinary causal attention at positions 0..K+n, new_memory_positional_emb added to the
    last K rows of the layer input; the new tokens are the layer outputs at the last K rows and
    only the context rows go on. Empty pool (memory None): the context runs alone and the new
    tokens are its last min(n, K) outputs."""
    cfg = model.config
    K = cfg.num_tokens
    ids = torch.as_tensor(ids)
    n = len(ids)
    h = model.model.embed_tokens.weight.double()[ids]
    new = []
    for l, layer in enumerate(model.model.layers):
        if memory is None:
            x = h
        else:
            x = torch.cat([_prefix_rows(model, l, memory[l, -K:]), h])
            x = torch.cat([x[:-K], x[-K:] + model.new_memory_positional_emb[0].double()])
        S = x.shape[0]
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        out = ref_layer(layer, x, torch.arange(S) * ref_position_factor(cfg), causal, cfg)
        new.append(out[-K:])
        h = out[-n:]
    return torch.stack(new)


def ref_keep(generator: torch.Generator, num_layers: int, n: int, drop: int, per_layer: bool) -> torch.Tensor:
    """Survivor indices as the releases draw them: a random permutation of the n slots, the first
    n - drop kept, sorted; one row shared by all layers, or one per layer."""
    rows = [torch.randperm(n, generator=generator)[: n - drop].sort().values for _ in range(num_layers if per_layer else 1)]
    return torch.stack(rows)


def hf_twin(model, kind: str):
    """transformers' LlamaForCausalLM / Qwen2ForCausalLM holding the same weights."""
    import transformers

    cfg = model.config
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
    )
    if kind == "qwen2":
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert missing == []  # every HF weight comes from our model
    assert set(unexpected) <= {"memory", "initialized", "bos_embedding", "new_memory_positional_emb"}
    return hf.eval()


# --------------------------------------------------------------------------------------------
# Memory pools for the core tests
# --------------------------------------------------------------------------------------------


def filled_memory(lm, seed: int = 0, texts=tuple(CORPUS[:2])):
    """A pool of `lm` after injecting `texts` in order (each one or two chunks on tiny models)."""
    mem = lm.new_memory(seed=seed)
    for t in texts:
        lm.inject(mem, t)
    return mem


def pool_snapshot(state) -> dict:
    """Everything a MemoryState holds, its physical layout included, as independent copies."""
    return dict(
        memory=state.memory.clone(), provenance=state.provenance.clone(), order=state.order.clone(),
        generator=state.generator.get_state(),
        counters=(state.initialized, state.update_count, state.version, state.last_injection_id),
    )


def assert_same_snapshot(a: dict, b: dict) -> None:
    for key in ("memory", "provenance", "order", "generator"):
        assert torch.equal(a[key], b[key]), key
    assert a["counters"] == b["counters"]


class LoopbackServer:
    """uvicorn on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
