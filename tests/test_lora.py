"""The library's own LoRA layer for loaded adapters (``lora.RoleLoRALinear``) against peft's, the
meta-device builder (``backbone.build_empty``) and the tokenizer shortcut, which together keep
torch._dynamo, sympy, peft and AutoConfig out of a model load (issue 14: load time)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import CORPUS, assert_same_snapshot, filled_memory, pool_snapshot, tiny_lm, tiny_model
from torch import nn

from latentmem.backbone import build_empty
from latentmem.lora import RoleLoRALinear, attach_adapters
from latentmem.memoryllm import MemoryLLM
from latentmem.memoryllm.lm import MemoryLM

peft = pytest.importorskip("peft")

TARGETS = ("q_proj", "v_proj", "down_proj")


def random_factors(model: nn.Module, rank: int, seed: int) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    mods = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    return {
        role: {n: {"A": torch.randn(rank, m.in_features, generator=g) * 0.3, "B": torch.randn(m.out_features, rank, generator=g) * 0.3} for n, m in mods}
        for role in ("write", "read")
    }


def attach_with_peft(model: MemoryLLM, loras, rank: int, alpha: float) -> None:
    """The way loading worked before RoleLoRALinear: peft's layers, factors copied in."""
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGETS))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for adapter in ("write", "read"):
            peft.inject_adapter_in_model(config, model, adapter_name=adapter)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for adapter, per in loras.items():
            for module, ab in per.items():
                for f in ("A", "B"):
                    params[f"{module}.lora_{f}.{adapter}.weight"].copy_(ab[f])
    for p in model.parameters():
        p.requires_grad_(False)
    model.set_adapter_roles("write", "read")


@pytest.mark.parametrize("rslora", [False, True])
def test_layer_matches_peft_bit_for_bit(rslora):
    torch.manual_seed(0)
    base = nn.Linear(12, 20, bias=False)
    ours = RoleLoRALinear(nn.Linear(12, 20, bias=False))
    ours.base_layer.load_state_dict(base.state_dict())
    holder = nn.Module()
    holder.proj = nn.Linear(12, 20, bias=False)
    holder.proj.load_state_dict(base.state_dict())
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, target_modules=["proj"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name in ("w", "r"):
            peft.inject_adapter_in_model(config, holder, adapter_name=name)
    theirs = holder.proj
    for name in ("w", "r"):
        ours.add_adapter(name, 4, 8.0, use_rslora=rslora)
        with torch.no_grad():
            for ab in ("A", "B"):
                t = torch.randn_like(getattr(ours, f"lora_{ab}")[name].weight)
                getattr(ours, f"lora_{ab}")[name].weight.copy_(t)
                getattr(theirs, f"lora_{ab}")[name].weight.copy_(t)
        assert ours.scaling[name] == pytest.approx(theirs.scaling[name])
    assert set(ours.state_dict()) == set(theirs.state_dict())  # same names, so the same files
    x = torch.randn(3, 5, 12)
    for active in (["w"], ["r"], [], ["w", "r"]):
        ours._active_adapter = list(active)
        theirs._active_adapter = list(active)
        assert torch.equal(ours(x), theirs(x)), active
    # by hand: W x + s B A x
    ours._active_adapter = ["w"]
    s = 8 / (4**0.5 if rslora else 4)
    expect = x @ base.weight.T + s * (x @ ours.lora_A["w"].weight.T) @ ours.lora_B["w"].weight.T
    torch.testing.assert_close(ours(x), expect, rtol=1e-5, atol=1e-5)
    ours.delete_adapter("w")
    assert "w" not in ours.lora_A and ours._active_adapter == [] and "w" not in ours.scaling


@pytest.mark.parametrize("merge_read", [False, True])
def test_attached_adapters_write_and_read_like_peft(merge_read):
    """A pool written and read through RoleLoRALinear equals one written through peft's layers,
    bit for bit (so memories saved by earlier versions replay exactly)."""
    ours_model, peft_model = tiny_model(seed=3), tiny_model(seed=3)
    loras = random_factors(ours_model, rank=4, seed=1)
    attach_adapters(ours_model, loras, {"lora_r": "4", "lora_alpha": "8"}, {"write": "write", "read": "read"}, merge_read=merge_read)
    attach_with_peft(peft_model, loras, 4, 8)
    if merge_read:
        peft_model.merge_read_adapter()
    assert sum(isinstance(m, RoleLoRALinear) for m in ours_model.modules()) == len(loras["write"])
    assert set(ours_model.state_dict()) == set(peft_model.state_dict())
    lms = [MemoryLM(m, tiny_lm().tokenizer, name="tiny") for m in (ours_model, peft_model)]
    assert lms[0].model_id == lms[1].model_id
    mems = [filled_memory(lm, texts=tuple(CORPUS[:3])) for lm in lms]
    assert_same_snapshot(pool_snapshot(mems[0]), pool_snapshot(mems[1]))
    a, b = (lm.score([mem], ["The meeting was"], [" moved to Thursday"]) for lm, mem in zip(lms, mems))
    assert a == b
    ga, gb = (lm.generate(mem, "The meeting", max_new_tokens=6).text for lm, mem in zip(lms, mems))
    assert ga == gb


def test_attach_refuses_bad_factors_and_leaves_the_model_alone():
    model = tiny_model(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loras = random_factors(model, rank=4, seed=0)
    module = next(iter(loras["read"]))
    loras["read"][module]["A"] = loras["read"][module]["A"][:, :-1]  # wrong in_features
    with pytest.raises(Exception, match="rank 4"):
        attach_adapters(model, loras, {"lora_r": "4", "lora_alpha": "8"}, {"write": "write", "read": "read"}, merge_read=True)
    assert not any(isinstance(m, RoleLoRALinear) for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_build_empty_allocates_every_tensor_and_keeps_ties(dtype):
    from conftest import tiny_config

    cfg = tiny_config(tie_word_embeddings=True)
    model = build_empty(lambda: MemoryLLM(cfg), dtype, "cpu")
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and not any(t.is_meta for t in tensors)
    assert all(t.dtype == dtype for t in tensors if t.is_floating_point())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.requires_grad for p in model.parameters())  # as nn.Module builds them
    ref = MemoryLLM(cfg)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert model._inv_freq.dtype == torch.float32 and not model._inv_freq.is_meta
    assert torch.equal(model._inv_freq, ref._inv_freq)


def test_tokenizer_by_name_equals_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    from latentmem.loading import _named_tokenizer_class, load_tokenizer

    tiny_lm().tokenizer.save_pretrained(str(tmp_path))
    cls = _named_tokenizer_class(tmp_path)
    assert cls is not None
    ours, auto = load_tokenizer(tmp_path, required=True), AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(ours) is type(auto)
    for text in CORPUS + ["<|im_start|>user\nhi €<|im_end|>"]:
        assert ours(text)["input_ids"] == auto(text)["input_ids"]
    assert ours.chat_template == auto.chat_template
    # a class name that is not a transformers class: AutoTokenizer decides, as before
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "NoSuchTokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert _named_tokenizer_class(tmp_path) is None


@pytest.mark.default_model
def test_default_load_imports_none_of_the_slow_stacks():
    """peft (2-3 s), torch._dynamo and sympy (~1.7 s, pulled in by meta-device arithmetic) and
    transformers' model configs (~1 s, by AutoConfig) are not needed to load the default model."""
    code = (
        "import sys, latentmem; lm = latentmem.load(); "
        "print(sorted(m for m in ('peft', 'torch._dynamo', 'sympy', 'transformers.models.llama.configuration_llama') if m in sys.modules)); "
        "print(type(lm.model.model.layers[0].self_attn.q_proj).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "RoleLoRALinear"  # the shipped weights carry separate write/read adapters


def test_training_refuses_to_stack_peft_on_attached_adapters():
    from latentmem.memoryllm.bench import with_random_adapters
    from latentmem.train.config import ConfigError, TrainConfig
    from latentmem.train.memoryllm import prepare_trainable

    lm = with_random_adapters(tiny_lm(), merge_read=True, seed=0)
    with pytest.raises(ConfigError, match="init_from"):
        prepare_trainable(lm.model, TrainConfig(lora_r=4, lora_alpha=8))
