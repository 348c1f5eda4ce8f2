"""LoRA adapters with roles: separate weights for writing into memory and for reading it.

The 8B MemoryLLM release trains two LoRA adapters on one backbone (``add_decoder_lora``): one is
active while a context is written into memory, the other while the model reads memory and
predicts. ``AdapterRoles`` (mixed into a design's model) switches peft's LoRA layers by role and
can fold the read adapter into the weights so reading runs no LoRA branch at all;
``attach_adapters`` builds such layers from saved factors, ``unmerge_read`` undoes the fold for
saving. Kept out of the model files: it is plumbing around peft, not part of any paper's model.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
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
    """Mixin for an ``nn.Module`` whose LoRA layers (peft's, injected in place) serve roles."""

    # {"write": adapter name, "read": adapter name} when the model carries separate LoRA
    # adapters (peft layers, unmerged); None: one set of weights does both
    adapter_roles: dict[str, str | None] | None = None
    # set by merge_read_adapter: what was folded into the weights, so a save can undo it
    merged_read: dict | None = None

    def set_adapter_roles(self, write: str | None, read: str | None) -> None:
        """Name the LoRA adapters (already injected, e.g. by peft) that serve writing and reading;
        (None, None): one set of weights does both; a role named None runs with no adapter."""
        self.adapter_roles = None if write is None and read is None else {"write": write, "read": read}
        self.__dict__.pop("_lora_layers", None)

    def lora_layers(self) -> list[nn.Module]:
        """The LoRA-wrapped linear layers (peft's, duck-typed), found once per set of roles."""
        layers = self.__dict__.get("_lora_layers")
        if layers is None:
            layers = [m for m in self.modules() if hasattr(m, "lora_A") and hasattr(m, "_active_adapter")]
            self.__dict__["_lora_layers"] = layers
        return layers

    @contextlib.contextmanager
    def adapter_for(self, role: str):
        """Activate adapter_roles[role] on every LoRA layer for the duration of the block.
        Duck-typed on peft's LoRA layers; their ``_active_adapter`` is set directly because
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


def attach_adapters(model: nn.Module, loras: dict[str, dict[str, dict[str, Tensor]]], meta: dict, roles: dict, *, merge_read: bool) -> None:
    """Separate write/read LoRA adapters as peft layers (frozen), switched by role; with
    merge_read the reader is folded into the weights and only the writer stays a LoRA branch."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:  # the train extra
        raise CheckpointError("weights with separate write/read adapters need peft: pip install 'latentmem[train]'") from e
    targets = sorted({m.rsplit(".", 1)[-1] for m in next(iter(loras.values()))})
    for adapter, per in loras.items():
        for module, ab in per.items():
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"LoRA of {module!r} ({adapter}) has only lora_{''.join(ab)}; both A and B are needed")
    config = LoraConfig(r=int(meta["lora_r"]), lora_alpha=float(meta["lora_alpha"]), use_rslora=bool(meta.get("use_rslora")), target_modules=targets)
    with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for adapter in (roles["write"], roles["read"]):
            inject_adapter_in_model(config, model, adapter_name=adapter)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for adapter, per in loras.items():
            for module, ab in per.items():
                for f in ("A", "B"):
                    params[f"{module}.lora_{f}.{adapter}.weight"].copy_(ab[f])
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
