"""LoRA adapters with roles: separate weights for writing into memory and for reading it.

The 8B MemoryLLM release trains two LoRA adapters on one backbone (``add_decoder_lora``): one is
active while a context is written into memory, the other while the model reads memory and
predicts. ``AdapterRoles`` (mixed into a design's model) switches LoRA layers (peft's while
training, ``RoleLoRALinear`` once trained weights are loaded) by role and
can fold the read adapter into the weights so reading runs no LoRA branch at all;
``attach_adapters`` builds such layers from saved factors, ``unmerge_read`` undoes the fold for
saving. Kept out of the model files: it is adapter plumbing, not part of any paper's model.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .api import CheckpointError

# PEFT's names: "<module>.lora_A.weight" in saved adapters, "<module>.lora_A.<adapter>.weight" in
# full state dicts of a wrapped model (whose base weights become "<module>.base_layer.weight").
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def adapter_role(role: str) -> Callable:
    """Run the method with the LoRA adapter serving `role` active (a no-op without roles)."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(self: "AdapterRoles", *args, **kwargs):
            if self.adapter_roles is None:
                return fn(self, *args, **kwargs)
            with self.adapter_for(role):
                return fn(self, *args, **kwargs)

        return run

    return wrap


class AdapterRoles:
    """Mixin for an ``nn.Module`` whose LoRA layers (injected in place) serve roles."""

    # {"write": adapter name, "read": adapter name} when the model carries separate LoRA
    # adapters (LoRA layers, unmerged); None: one set of weights does both
    adapter_roles: dict[str, str | None] | None = None
    # set by merge_read_adapter: what was folded into the weights, so a save can undo it
    merged_read: dict | None = None

    def set_adapter_roles(self, write: str | None, read: str | None) -> None:
        """Name the LoRA adapters (already injected, e.g. by peft) that serve writing and reading;
        (None, None): one set of weights does both; a role named None runs with no adapter."""
        self.adapter_roles = None if write is None and read is None else {"write": write, "read": read}
        self.__dict__.pop("_lora_layers", None)

    def lora_layers(self) -> list[nn.Module]:
        """The LoRA-wrapped linear layers (peft's or RoleLoRALinear, duck-typed), found once per set of roles."""
        layers = self.__dict__.get("_lora_layers")
        if layers is None:
            layers = [m for m in self.modules() if hasattr(m, "lora_A") and hasattr(m, "_active_adapter")]
            self.__dict__["_lora_layers"] = layers
        return layers

    @contextlib.contextmanager
    def adapter_for(self, role: str):
        """Activate adapter_roles[role] on every LoRA layer for the duration of the block.
        Duck-typed on LoRA layers; their ``_active_adapter`` is set directly because
        peft's ``set_adapter`` also flips ``requires_grad``, which would freeze the other
        adapter in the middle of a training step whose graph uses both."""
        if self.adapter_roles is None:
            yield
            return
        name = self.adapter_roles[role]
        layers = self.lora_layers()
        before = [m._active_adapter for m in layers]
        for m in layers:
            m._active_adapter = [name] if name is not None else []
        try:
            yield
        finally:
            for m, b in zip(layers, before):
                m._active_adapter = b

    @torch.no_grad()
    def merge_read_adapter(self) -> None:
        """Fold the read adapter into the base weights, W' = W + s_r B_r A_r, and turn the write
        adapter into the difference: A = [A_w; A_r], B = [s_w B_w, -s_r B_r], scale 1, so a
        self-update still computes W + s_w B_w A_w. Reads (every generated token) then run with
        no LoRA branch at all; only writes pay for one, of rank r_w + r_r. The sums are in fp32."""
        roles = self.adapter_roles
        if roles is None or roles["read"] is None or roles["write"] is None:
            raise ValueError(f"merge_read_adapter needs separate write and read adapters, the roles are {roles}")
        write, read = roles["write"], roles["read"]
        layers = self.lora_layers()
        if any(write not in m.lora_A or read not in m.lora_A for m in layers):
            raise ValueError("merge_read_adapter needs both adapters on every LoRA layer")
        ranks = {(m.r[write], m.r[read], float(m.scaling[write]), float(m.scaling[read])) for m in layers}
        if len(ranks) != 1:  # checked before the first write: a refusal leaves the model as it was
            raise ValueError(f"merge_read_adapter needs one rank and scale per adapter across layers, found {sorted(ranks)[:4]}")
        (r_w, r_r, s_w, s_r), = ranks
        for m in layers:
            base = m.get_base_layer().weight
            a_w, b_w = m.lora_A[write].weight.float(), m.lora_B[write].weight.float()
            a_r, b_r = m.lora_A[read].weight.float(), m.lora_B[read].weight.float()
            base.copy_((base.float() + s_r * (b_r @ a_r)).to(base.dtype))
            a, b = torch.cat([a_w, a_r], 0), torch.cat([s_w * b_w, -s_r * b_r], 1)
            dtype, device = m.lora_A[write].weight.dtype, base.device
            m.lora_A[write] = nn.Linear(a.shape[1], a.shape[0], bias=False, dtype=dtype, device=device).requires_grad_(False)
            m.lora_B[write] = nn.Linear(b.shape[1], b.shape[0], bias=False, dtype=dtype, device=device).requires_grad_(False)
            m.lora_A[write].weight.copy_(a)
            m.lora_B[write].weight.copy_(b)
            m.r[write], m.lora_alpha[write], m.scaling[write] = r_w + r_r, r_w + r_r, 1.0
            m._active_adapter = [write]  # deleting an inactive adapter: peft picks no new one
            m.delete_adapter(read)
        self.merged_read = {"write": write, "read": read, "r_write": r_w, "r_read": r_r, "scale_write": s_w, "scale_read": s_r}
        self.set_adapter_roles(write, None)


class RoleLoRALinear(nn.Module):
    """A frozen linear layer with named LoRA adapters, the active ones added to its output:
    ``y = W x + sum_a s_a B_a (A_a x)``, ``s_a = alpha_a / r_a`` (``/ sqrt(r_a)`` with rsLoRA).

    The same state-dict names (``base_layer``, ``lora_A.<adapter>``, ``lora_B.<adapter>``),
    attributes (``r``, ``lora_alpha``, ``scaling``, ``_active_adapter``, ``lora_dropout``) and
    arithmetic, operation for operation, as peft's ``lora.Linear`` in inference, so a memory written
    under either replays bit-exactly under the other (tests/test_lora.py compares them). Written here
    rather than taken from peft because loading trained weights needs only this forward, and
    importing peft costs 2-3 s of every model load (more than reading the weights); training still
    injects peft's layers (``latentmem.train``)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self._active_adapter: list[str] = []

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def get_base_layer(self) -> nn.Linear:
        return self.base_layer

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    def add_adapter(self, name: str, r: int, alpha: float, *, use_rslora: bool = False) -> None:
        base = self.base_layer.weight
        kw = {"bias": False, "dtype": base.dtype, "device": base.device}
        self.lora_A[name] = nn.Linear(self.base_layer.in_features, r, **kw).requires_grad_(False)
        self.lora_B[name] = nn.Linear(r, self.base_layer.out_features, **kw).requires_grad_(False)
        self.lora_dropout[name] = nn.Identity()
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r

    def delete_adapter(self, name: str) -> None:
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        for d in (self.r, self.lora_alpha, self.scaling):
            del d[name]
        self._active_adapter = [a for a in self._active_adapter if a != name]

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        if not self._active_adapter:
            return result  # reading under a merged reader: no LoRA work at all
        dtype = result.dtype
        for name in self._active_adapter:
            if name not in self.lora_A:
                continue
            a = self.lora_A[name]
            result = result + self.lora_B[name](a(x.to(a.weight.dtype))) * self.scaling[name]
        return result.to(dtype)


def attach_adapters(model: nn.Module, loras: dict[str, dict[str, dict[str, Tensor]]], meta: dict, roles: dict, *, merge_read: bool) -> None:
    """Separate write/read LoRA adapters as ``RoleLoRALinear`` layers (frozen) on the modules the
    factors name, switched by role; with merge_read the reader is folded into the weights and only
    the writer stays a LoRA branch. Every factor is checked before the model is touched."""
    r, alpha, rslora = int(meta["lora_r"]), float(meta["lora_alpha"]), bool(meta.get("use_rslora"))
    modules = dict(model.named_modules())
    for adapter, per in loras.items():
        for module, ab in per.items():
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"LoRA of {module!r} ({adapter}) has only lora_{''.join(ab)}; both A and B are needed")
            target = modules.get(module)
            if not isinstance(target, (nn.Linear, RoleLoRALinear)):
                raise CheckpointError(f"LoRA factors for {module!r}, which is not a linear layer of this model")
            w = target.weight
            if tuple(ab["A"].shape) != (r, w.shape[1]) or tuple(ab["B"].shape) != (w.shape[0], r):
                raise CheckpointError(f"LoRA of {module!r} ({adapter}): A {tuple(ab['A'].shape)}, B {tuple(ab['B'].shape)}; rank {r} on a {tuple(w.shape)} weight needs A {(r, w.shape[1])}, B {(w.shape[0], r)}")
    with torch.no_grad():
        for module in sorted({m for per in loras.values() for m in per}):
            layer = modules[module]
            if not isinstance(layer, RoleLoRALinear):
                layer = RoleLoRALinear(layer)
                model.set_submodule(module, layer)
            for adapter in (roles["write"], roles["read"]):
                layer.add_adapter(adapter, r, alpha, use_rslora=rslora)
        for adapter, per in loras.items():
            for module, ab in per.items():
                layer = model.get_submodule(module)
                layer.lora_A[adapter].weight.copy_(ab["A"])
                layer.lora_B[adapter].weight.copy_(ab["B"])
    for p in model.parameters():
        p.requires_grad_(False)
    model.set_adapter_roles(roles["write"], roles["read"])
    if merge_read:
        model.merge_read_adapter()


def unmerge_read(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state dict of a model before merge_read_adapter: W = W' - s_r B_r A_r and both
    adapters split out of the stacked difference (each B divided by its scale again)."""
    info = model.merged_read
    write, read, r_w = info["write"], info["read"], info["r_write"]
    if (info["scale_write"], r_w) != (info["scale_read"], info["r_read"]):
        raise CheckpointError("the release layout has one lora_config for both adapters; these differ in rank or scale")
    wrapped = {id(m) for m in model.lora_layers()}
    out = dict(tensors)
    for module, m in model.named_modules():
        if id(m) not in wrapped:
            continue
        a, b = out.pop(f"{module}.lora_A.{write}.weight"), out.pop(f"{module}.lora_B.{write}.weight")
        a_w, a_r = a[:r_w], a[r_w:]
        b_w, b_r = b[:, :r_w] / info["scale_write"], -b[:, r_w:] / info["scale_read"]
        base = f"{module}.base_layer.weight"
        out[base] = (out[base].float() - info["scale_read"] * (b_r.float() @ a_r.float())).to(out[base].dtype)
        for ab, t in (("A", a_w), ("B", b_w)):
            out[f"{module}.lora_{ab}.{write}.weight"] = t.contiguous()
        for ab, t in (("A", a_r), ("B", b_r)):
            out[f"{module}.lora_{ab}.{read}.weight"] = t.contiguous()
    return out
