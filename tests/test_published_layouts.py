"""Checkpoints in each published MemoryLLM layout (config fields and state keys as the releases
write them), loaded with the behaviour of the release that produced them, and saved back in a
form the authors' modeling files load.

* 7B branch (memoryllm-7b): its configuration file has no add_decoder_lora / lora_config; the
  config says ``interpolate_position_ids: true``; LoRA merged into the weights; MHA.
* Main branch (memoryllm-8b, -8b-chat): add_decoder_lora and lora_config always present,
  ``rope_scaling {"type": "linear", "factor": f}``; LoRA as PEFT injects it in place
  (``<module>.base_layer.weight``, ``<module>.lora_A.<adapter>.weight``).

Expectations are computed by hand in float64 (conftest's ``ref_layer``: explicit attention),
with the interpolation factor and the 8B empty-pool rule written out here, not taken from
model.py or the loaded config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import _linear, _prefix_rows, _rms_norm, ref_layer
from safetensors.torch import load_file, save_file

import latentmem
from latentmem.memoryllm import MemoryLLM, MemoryLLMConfig
from latentmem.memoryllm.checkpoint import (
    CheckpointError,
    load,
    load_hf_folder,
    load_memoryllm_checkpoint,
    save_memoryllm_checkpoint,
)


REF_TOL = {"rtol": 1e-4, "atol": 1e-4}
TIGHT = {"rtol": 1e-5, "atol": 1e-5}
V, D, F, L, K, NB, MAXPOS = 61, 32, 64, 3, 4, 3, 8  # (NB + 1) * K = 16 > MAXPOS: interpolation halves positions
N = K * NB
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RELEASE_LORA = {"inference_mode": False, "r": 2, "lora_alpha": 4, "lora_dropout": 0.1, "target_modules": TARGETS}


def release_config(lineage: str, *, adapters: int = 0, **extra) -> dict:
    """config.json as each branch's configuration class (plus its training code) writes it."""
    heads = {"num_attention_heads": 4, "num_key_value_heads": 4 if lineage == "7b" else 2}
    config = {
        "model_type": "memoryllm", "architectures": ["MemoryLLM"], "vocab_size": V, "hidden_size": D, "intermediate_size": F,
        "num_hidden_layers": L, **heads, "max_position_embeddings": MAXPOS, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
        "pretraining_tp": 1, "initializer_range": 0.02, "use_cache": True,
        "num_tokens": K, "num_blocks": NB, "add_bos_embedding": True,
    }
    if lineage == "7b":
        config.update(interpolate_position_ids=True, rope_scaling=None, pad_token_id=0, num_memory_tokens=N, drop_memory_per_layer=True)
    else:
        config.update(
            num_memory_tokens=N, drop_memory_per_layer=True, add_decoder_lora=adapters == 2,
            lora_config=RELEASE_LORA if adapters else None, rope_scaling={"type": "linear", "factor": 2.0},
        )
    return {**config, **extra}


def release_tensors(config: dict, seed: int, adapters: tuple[str, ...] = (), initialized: int = 1) -> dict[str, torch.Tensor]:
    """The state dict a release's MemoryLLM saves: the pool, its parameters, the Llama weights
    (LoRA-wrapped ones under PEFT's in-place names when `adapters` are given)."""
    g = torch.Generator().manual_seed(seed)
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = D // H
    t = {
        "memory": torch.randn(L, N, D, generator=g), "initialized": torch.tensor(initialized, dtype=torch.uint8),
        "bos_embedding": torch.randn(L, 1, D, generator=g), "new_memory_positional_emb": 0.5 * torch.randn(1, 1, D, generator=g),
        "model.embed_tokens.weight": torch.randn(V, D, generator=g), "model.norm.weight": 1 + 0.1 * torch.randn(D, generator=g),
        "lm_head.weight": 0.2 * torch.randn(V, D, generator=g),
    }
    shapes = {"q_proj": (H * hd, D), "k_proj": (Hkv * hd, D), "v_proj": (Hkv * hd, D), "o_proj": (D, H * hd), "gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F)}
    r = RELEASE_LORA["r"]
    for l in range(L):
        for name, shape in shapes.items():
            module = f"model.layers.{l}.{'mlp' if name in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{name}"
            w = 0.2 * torch.randn(shape, generator=g)
            if not adapters:
                t[f"{module}.weight"] = w
                continue
            t[f"{module}.base_layer.weight"] = w
            for a in adapters:
                t[f"{module}.lora_A.{a}.weight"] = 0.3 * torch.randn(r, shape[1], generator=g)
                t[f"{module}.lora_B.{a}.weight"] = 0.3 * torch.randn(shape[0], r, generator=g)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t[f"model.layers.{l}.{norm}.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
    return t


def write_release(folder: Path, lineage: str, *, seed: int = 0, adapters: tuple[str, ...] = (), config_extra: dict | None = None, initialized: int = 1):
    folder.mkdir(parents=True)
    config = release_config(lineage, adapters=len(adapters), **(config_extra or {}))
    tensors = release_tensors(config, seed, adapters, initialized)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return config, tensors


def ids_of(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed))


# ---- hand-computed expectations (float64) --------------------------------------------------


def expected_logits(model: MemoryLLM, ids: torch.Tensor, memory: torch.Tensor | None, factor: float) -> torch.Tensor:
    """Per layer [bos, memory, input] at RoPE positions 0, 1, ... times `factor`; inputs see the
    whole prefix and their causal past (memory None: the input alone)."""
    h = model.model.embed_tokens.weight.double()[ids]
    T = len(ids)
    for l, layer in enumerate(model.model.layers):
        prefix = _prefix_rows(model, l, memory[l]) if memory is not None else h[:0]
        P = len(prefix)
        i, j = torch.arange(P + T)[:, None], torch.arange(P + T)[None, :]
        h = ref_layer(layer, torch.cat([prefix, h]), torch.arange(P + T) * factor, (j < P) | (j <= i), model.config)[P:]
    return _linear(model.lm_head, _rms_norm(model.model.norm, h))


def expected_first_write(model: MemoryLLM, ids: torch.Tensor, rule: str, factor: float = 1.0) -> torch.Tensor:
    """New memory tokens [L, min(n, K), d] written into an empty pool, the context alone:

    * "7b" (7B file): plain causal layers; the new tokens are each layer's last min(n, K) outputs.
    * "8b" (main-branch file): new_memory_positional_emb added to the last min(n, K) positions of
      every layer's input; since that file adds it in place to the previous layer's output,
      which is also what it kept as that layer's new tokens, those carry it once more (all
      layers but the last)."""
    emb = model.new_memory_positional_emb[0, 0].double()
    h = model.model.embed_tokens.weight.double()[ids]
    n, k = len(ids), min(len(ids), K)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    new = []
    for l, layer in enumerate(model.model.layers):
        x = h.clone()
        if rule == "8b":
            x[-k:] += emb
        h = ref_layer(layer, x, torch.arange(n) * factor, causal, model.config)
        new.append(h[-k:] + (emb if rule == "8b" and l < L - 1 else 0))
    return torch.stack(new)


def expected_later_write(model: MemoryLLM, ids: torch.Tensor, memory: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """An initialised pool (both releases): [bos, memory[-K:], context], the embedding on the
    last K rows of every layer's input; the new tokens are the outputs there."""
    emb = model.new_memory_positional_emb[0, 0].double()
    h = model.model.embed_tokens.weight.double()[ids]
    n = len(ids)
    new = []
    for l, layer in enumerate(model.model.layers):
        x = torch.cat([_prefix_rows(model, l, memory[l, -K:]), h])
        x[-K:] += emb
        S = len(x)
        out = ref_layer(layer, x, torch.arange(S) * factor, torch.ones(S, S, dtype=torch.bool).tril(), model.config)
        new.append(out[-K:])
        h = out[-n:]
    return torch.stack(new)


# ---- the 7B branch -------------------------------------------------------------------------


@torch.no_grad()
def test_7b_layout_interpolates_positions_and_writes_plainly(tmp_path):
    config, tensors = write_release(tmp_path / "7b", "7b")
    model, _ = load(tmp_path / "7b")
    cfg = model.config
    assert (cfg.position_scaling, cfg.empty_pool_write) == ("interpolate", "7b")
    assert cfg.drop_memory_per_layer is False  # the 7B file draws one drop for every layer, whatever the config says
    factor = config["max_position_embeddings"] / ((config["num_blocks"] + 1) * config["num_tokens"])  # 8 / 16
    assert factor == 0.5
    pool, initialized = model.checkpoint_pool
    assert initialized and torch.equal(pool, tensors["memory"])
    q = ids_of(7, 1)
    for memory in (pool, None):  # positions are interpolated with and without a pool
        got = model(q[None], memory=None if memory is None else memory[None])[0].double()
        torch.testing.assert_close(got, expected_logits(model, q, memory, factor), **REF_TOL)
        assert (got - expected_logits(model, q, memory, 1.0)).abs().max() > 1e-2  # the flag matters
    for n in (10, K, 3):
        ctx = ids_of(n, n)
        new, count = model.new_memory_tokens(pool[None], False, ctx[None])
        torch.testing.assert_close(new[0, :, K - int(count[0]):].double(), expected_first_write(model, ctx, "7b", factor), **REF_TOL)
        new, _ = model.new_memory_tokens(pool[None], True, ctx[None])
        torch.testing.assert_close(new[0].double(), expected_later_write(model, ctx, pool, factor), **REF_TOL)
    # explicit overrides win over what the lineage implies
    plain, _ = load(tmp_path / "7b", position_scaling="none", empty_pool_write="8b", drop_memory_per_layer=True)
    assert (plain.config.position_scaling, plain.config.empty_pool_write, plain.config.drop_memory_per_layer) == ("none", "8b", True)


def test_7b_layout_with_rope_scaling_does_not_interpolate(tmp_path):
    """The 7B file reads interpolate_position_ids only when rope_scaling is null."""
    write_release(tmp_path / "7b", "7b", config_extra={"rope_scaling": {"type": "linear", "factor": 2.0}})
    cfg = load(tmp_path / "7b")[0].config
    assert cfg.position_scaling == "none" and cfg.rope_scaling["factor"] == 2.0 and cfg.empty_pool_write == "7b"


@torch.no_grad()
def test_7b_style_save_round_trip_and_config(tmp_path):
    _, tensors = write_release(tmp_path / "7b", "7b")
    model, _ = load(tmp_path / "7b")
    out = save_memoryllm_checkpoint(model, tmp_path / "saved", memory=model.checkpoint_pool)
    config = json.loads((out / "config.json").read_text())
    assert config["interpolate_position_ids"] is True and config["rope_scaling"] is None
    assert "add_decoder_lora" not in config and "lora_config" not in config  # the 8B lineage's keys
    assert config["empty_pool_write"] == "7b" and config["position_scaling"] == "interpolate"
    assert set(load_file(str(out / "model.safetensors"))) == set(tensors)  # the release's keys, no others
    again, _ = load(out)
    assert (again.config.position_scaling, again.config.empty_pool_write) == ("interpolate", "7b")
    pool = again.checkpoint_pool[0]
    assert torch.equal(pool, tensors["memory"])
    q, ctx = ids_of(6, 2), ids_of(9, 3)
    torch.testing.assert_close(again(q[None], memory=pool[None]), model(q[None], memory=pool[None]), rtol=0, atol=0)
    for init in (True, False):
        torch.testing.assert_close(again.new_memory_tokens(pool[None], init, ctx[None])[0], model.new_memory_tokens(pool[None], init, ctx[None])[0], rtol=0, atol=0)
    # without the fix the flag went to config.extra and was lost: a 7B folder saved by an
    # interpolating model must say so even when its source config never did
    m = MemoryLLM(MemoryLLMConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=1, num_attention_heads=4, num_tokens=K, num_blocks=NB, position_scaling="interpolate"))
    cfg = json.loads((save_memoryllm_checkpoint(m, tmp_path / "m") / "config.json").read_text())
    assert cfg["interpolate_position_ids"] is True and "add_decoder_lora" not in cfg


# ---- the main branch (8B) --------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, K, 3], ids=["n>K", "n==K", "n<K"])
@torch.no_grad()
def test_8b_layout_empty_pool_rule(tmp_path, n):
    write_release(tmp_path / "8b", "8b")  # no adapter: the layers are the plain weights
    model, _ = load(tmp_path / "8b")
    cfg = model.config
    assert (cfg.empty_pool_write, cfg.position_scaling, cfg.drop_memory_per_layer) == ("8b", "none", True)
    assert cfg.rope_scaling["factor"] == 2.0  # the base model's own scaling (positions / 2)
    ctx = ids_of(n, 10 + n)
    pool = model.checkpoint_pool[0]
    new, count = model.new_memory_tokens(pool[None], False, ctx[None])
    assert int(count[0]) == min(n, K)
    got = new[0, :, K - int(count[0]):].double()
    torch.testing.assert_close(got, expected_first_write(model, ctx, "8b", factor=0.5), **REF_TOL)
    assert (got - expected_first_write(model, ctx, "7b", factor=0.5)).abs().max() > 1e-2  # the rules differ
    # an initialised pool is written alike by both releases
    new, _ = model.new_memory_tokens(pool[None], True, ctx[None])
    torch.testing.assert_close(new[0].double(), expected_later_write(model, ctx, pool, factor=0.5), **REF_TOL)
    seven, _ = load(tmp_path / "8b", empty_pool_write="7b")  # the override wins
    torch.testing.assert_close(seven.new_memory_tokens(pool[None], False, ctx[None])[0][0, :, K - min(n, K):].double(), expected_first_write(seven, ctx, "7b", factor=0.5), **REF_TOL)


@pytest.mark.parametrize("rule", ["7b", "8b"])
@torch.no_grad()
def test_batched_writes_mixed_pools_left_padding(tmp_path, rule):
    """Empty and initialised pools with different context lengths (left padding) in one forward
    pass: each row as written alone, and as the rule computed by hand."""
    write_release(tmp_path / "ck", "8b" if rule == "8b" else "7b")
    model, _ = load(tmp_path / "ck")
    assert model.config.empty_pool_write == rule
    factor = 0.5  # 8b: rope_scaling factor 2; 7b: interpolation 8 / 16
    g = torch.Generator().manual_seed(4)
    pools = torch.randn(5, L, N, D, generator=g)
    init = torch.tensor([False, True, False, True, False])
    rows = [ids_of(n, 40 + b) for b, n in enumerate([11, 9, 3, 2, K])]
    T = max(len(r) for r in rows)
    ids = torch.zeros(5, T, dtype=torch.long)
    mask = torch.zeros(5, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, True
    new, count = model.new_memory_tokens(pools, init, ids, mask)
    assert count.tolist() == [K, K, 3, K, K]
    for b, r in enumerate(rows):
        c = int(count[b])
        alone, _ = model.new_memory_tokens(pools[b:b + 1], bool(init[b]), r[None])
        torch.testing.assert_close(new[b, :, K - c:], alone[0, :, K - c:], **TIGHT)
        want = expected_later_write(model, r, pools[b], factor) if init[b] else expected_first_write(model, r, rule, factor)
        torch.testing.assert_close(new[b, :, K - c:].double(), want, **REF_TOL)
    # all rows empty (no prefix in the frame at all)
    new, count = model.new_memory_tokens(pools[[0, 2]], False, ids[[0, 2]], mask[[0, 2]])
    for i, b in enumerate((0, 2)):
        c = int(count[i])
        torch.testing.assert_close(new[i, :, K - c:].double(), expected_first_write(model, rows[b], rule, factor), **REF_TOL)


def _merge_by_hand(tensors: dict, adapter: str) -> dict:
    """The release's state with one adapter folded in by hand: W + B A * lora_alpha / r."""
    scale = RELEASE_LORA["lora_alpha"] / RELEASE_LORA["r"]
    out = {}
    for k, v in tensors.items():
        if ".lora_" in k or k in ("memory", "initialized"):
            continue
        if ".base_layer." in k:
            module = k.removesuffix(".base_layer.weight")
            a, b = tensors[f"{module}.lora_A.{adapter}.weight"], tensors[f"{module}.lora_B.{adapter}.weight"]
            out[f"{module}.weight"] = v + (b @ a) * scale
        else:
            out[k] = v
    return out


@torch.no_grad()
def test_8b_decoder_lora_layout_round_trip(tmp_path):
    """add_decoder_lora: the "default" adapter writes, "decoder_adapter" reads. Saved again, the
    folder has the release's keys exactly, its lora_config fields and rope_scaling format."""
    _, tensors = write_release(tmp_path / "8b", "8b", adapters=("default", "decoder_adapter"))
    model, _ = load(tmp_path / "8b")
    assert model.config.empty_pool_write == "8b"
    refs = {}
    for adapter in ("default", "decoder_adapter"):
        ref = MemoryLLM(model.config.replace(lora_config=None, add_decoder_lora=False))
        ref.load_state_dict(_merge_by_hand(tensors, adapter))
        refs[adapter] = ref.eval()
    pool = model.checkpoint_pool[0]
    q, ctx = ids_of(6, 5), ids_of(10, 6)
    torch.testing.assert_close(model(q[None], memory=pool[None])[0].double(), expected_logits(refs["decoder_adapter"], q, pool, 0.5), **REF_TOL)
    new, _ = model.new_memory_tokens(pool[None], False, ctx[None])
    torch.testing.assert_close(new[0].double(), expected_first_write(refs["default"], ctx, "8b", 0.5), **REF_TOL)
    new, _ = model.new_memory_tokens(pool[None], True, ctx[None])
    torch.testing.assert_close(new[0].double(), expected_later_write(refs["default"], ctx, pool, 0.5), **REF_TOL)

    for merge_read in (True, False):
        m, _ = load_memoryllm_checkpoint(tmp_path / "8b", merge_read=merge_read)
        out = save_memoryllm_checkpoint(m, tmp_path / f"saved-{merge_read}", memory=m.checkpoint_pool)
        saved = json.loads((out / "config.json").read_text())
        assert saved["rope_scaling"] == {"type": "linear", "factor": 2.0}  # exactly these two keys
        assert saved["add_decoder_lora"] is True and saved["empty_pool_write"] == "8b"
        lora = saved["lora_config"]
        assert {"inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules"} <= set(lora)
        assert lora["lora_alpha"] / lora["r"] == RELEASE_LORA["lora_alpha"] / RELEASE_LORA["r"] and sorted(lora["target_modules"]) == sorted(TARGETS)
        assert (lora["inference_mode"], lora["lora_dropout"]) == (False, 0.1)  # the source's own values kept
        stored = load_file(str(out / "model.safetensors"))
        assert set(stored) == set(tensors)  # base_layer and lora names as the release has them
        for k, v in tensors.items():
            torch.testing.assert_close(stored[k], v, rtol=1e-5, atol=1e-5)
        again, _ = load(out)
        torch.testing.assert_close(again(q[None], memory=pool[None]), model(q[None], memory=pool[None]), **TIGHT)
        for init in (True, False):
            torch.testing.assert_close(again.new_memory_tokens(pool[None], init, ctx[None])[0], model.new_memory_tokens(pool[None], init, ctx[None])[0], **TIGHT)


@torch.no_grad()
def test_single_adapter_saved_merged_without_lora_config(tmp_path):
    """The main-branch file with lora_config and add_decoder_lora false wraps one adapter
    ("default"); loading merges it, and the save must not keep a lora_config (their file would
    wrap the merged weights in a fresh LoRA and look for base_layer names)."""
    _, tensors = write_release(tmp_path / "one", "8b", adapters=("default",))
    model, _ = load(tmp_path / "one")
    assert model.adapter_roles is None and model.config.empty_pool_write == "8b"
    ref = MemoryLLM(model.config.replace(lora_config=None))
    ref.load_state_dict(_merge_by_hand(tensors, "default"))
    pool = model.checkpoint_pool[0]
    q, ctx = ids_of(6, 7), ids_of(5, 8)
    torch.testing.assert_close(model(q[None], memory=pool[None])[0].double(), expected_logits(ref.eval(), q, pool, 0.5), **REF_TOL)
    out = save_memoryllm_checkpoint(model, tmp_path / "merged", memory=model.checkpoint_pool)
    saved = json.loads((out / "config.json").read_text())
    assert saved["lora_config"] is None and saved["add_decoder_lora"] is False  # still the 8B lineage's keys
    stored = load_file(str(out / "model.safetensors"))
    assert not [k for k in stored if "lora_" in k or "base_layer" in k]
    again, _ = load(out)
    assert again.config.empty_pool_write == "8b" and again.config.lora_config is None
    new, count = again.new_memory_tokens(pool[None], False, ctx[None])
    torch.testing.assert_close(new[0, :, K - int(count[0]):].double(), expected_first_write(ref, ctx, "8b", 0.5), **REF_TOL)


# ---- which rule, when nothing says -------------------------------------------------------------


def test_plain_folders_and_own_saves_keep_the_default_rule(tmp_path):
    from test_loading import save_hf_folder, tiny_hf_model

    folder = save_hf_folder(tiny_hf_model("llama"), tmp_path / "hf")
    assert load_hf_folder(folder, num_tokens=4, num_blocks=2)[0].config.empty_pool_write == "7b"
    # a save of this project from before the field: its own fields, the 8B keys, no empty_pool_write
    m = MemoryLLM(MemoryLLMConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=1, num_attention_heads=4, num_tokens=K, num_blocks=NB))
    out = save_memoryllm_checkpoint(m, tmp_path / "old")
    config = json.loads((out / "config.json").read_text())
    config.pop("empty_pool_write")
    config.update(add_decoder_lora=False, lora_config=None)
    (out / "config.json").write_text(json.dumps(config))
    assert load(out)[0].config.empty_pool_write == "7b"
    # a plain model under the 8B rule is saved in the main branch's form and keeps it
    m8 = MemoryLLM(m.config.replace(empty_pool_write="8b"))
    out = save_memoryllm_checkpoint(m8, tmp_path / "new8")
    config = json.loads((out / "config.json").read_text())
    assert config["add_decoder_lora"] is False and config["lora_config"] is None and "interpolate_position_ids" not in config
    assert load(out)[0].config.empty_pool_write == "8b"


# ---- what the loader cannot honour ---------------------------------------------------------------


def _entry_points(path):
    return {
        "load": lambda: load(path),
        "load_hf_folder": lambda: load_hf_folder(path),
        "load_memoryllm_checkpoint": lambda: load_memoryllm_checkpoint(path),
        "latentmem.load": lambda: latentmem.load(path),
    }


def test_unsupported_checkpoints_raise_checkpoint_error(tmp_path):
    write_release(tmp_path / "two", "8b", adapters=("default", "other"), config_extra={"add_decoder_lora": False})
    for call in _entry_points(tmp_path / "two").values():
        with pytest.raises(CheckpointError, match=r"unsupported adapter layout: 2 LoRA adapters \['default', 'other'\] without add_decoder_lora"):
            call()
    write_release(tmp_path / "mplus", "8b", config_extra={"architectures": ["MPlus"], "num_ltm_blocks": 1, "ltm_initial_size": 8})
    for call in _entry_points(tmp_path / "mplus").values():
        with pytest.raises(CheckpointError, match="unsupported: an M\\+ checkpoint.*long-term memory"):
            call()
    write_release(tmp_path / "mplus2", "8b", config_extra={"model_type": "mplus", "architectures": ["MPlus"]})
    for call in _entry_points(tmp_path / "mplus2").values():
        with pytest.raises(CheckpointError, match="unsupported: an M\\+ checkpoint"):
            call()
    write_release(tmp_path / "dyn", "8b", config_extra={"rope_scaling": {"type": "dynamic", "factor": 2.0}})
    for call in _entry_points(tmp_path / "dyn").values():
        with pytest.raises(CheckpointError, match="unsupported rope_scaling type 'dynamic'"):
            call()
    write_release(tmp_path / "bad", "8b", config_extra={"empty_pool_write": "9b"})
    with pytest.raises(CheckpointError, match="empty_pool_write must be '7b' or '8b'"):
        load(tmp_path / "bad")
