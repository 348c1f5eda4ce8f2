"""Int8 weight-only linear layers: a low-precision CPU path, chosen at load
(``latentmem.load(..., quantize="int8")``), for every design.

Each linear layer of the backbone (its decoder layers and the output head) keeps its weight as
int8 with one scale per output row (symmetric, ``scale = max |W_row| / 127``) and runs through
torch's own int8 weight-only kernel (``torch._weight_int8pack_mm``, the kernel torchao's int8
weight-only layout uses on CPU), fed bf16 activations (its fp32-activation path is many times
slower on the CPUs measured) whose output is cast back to the model's dtype. Everything else —
attention, norms, the memory — stays in the model's dtype (fp32): bf16 attention over thousands
of memory slots is slower on a CPU than fp32 (``benchmarks/bench_decode.py``, part b). Written here rather
than taken from torchao because torchao is a heavy optional dependency whose CPU path is this
one kernel, and its builds lag torch's.

What is not quantised: the token embedding (a lookup reads one row per token; it stays float and
is no longer tied to the head), LoRA factors and the designs' own trained parts (small), and
everything outside the backbone (LongMem's SideNet, Larimar's encoder and projection). Memories
keep their model id and dtype: a pool written under fp32 reads under int8 and back, while a
replay is exact only under the weights that wrote it (docs/design.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

COMPUTE_DTYPE = torch.bfloat16


class Int8WeightOnlyLinear(nn.Module):
    """``y = x W^T + b`` with W stored as int8 rows times a per-row scale."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = COMPUTE_DTYPE):
        # dtype: the activations the kernel is fed (scales and bias kept in it)
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    @property
    def weight(self) -> Tensor:
        raise TypeError("this layer holds int8 weights (loaded with quantize='int8'); float weights to read or edit need a model loaded without quantize")

    def dequantized(self) -> Tensor:
        """The float weight the kernel computes with: int8 rows times their scales."""
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(self.scales.dtype), self.weight_int8, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, {self.scales.dtype} activations"


def quantize_int8(model: nn.Module) -> int:
    """Replace the backbone's linear layers (``model.layers.*`` and ``lm_head``) of ``model`` in
    place, scales taken from the float weights as loaded; everything else keeps its dtype. Returns
    how many layers were replaced. CPU only."""
    norm = model.model.norm.weight
    if norm.device.type != "cpu":
        raise ValueError(f"quantize='int8' is a CPU path (torch's int8 weight-only kernel); on {norm.device.type} load with dtype=torch.bfloat16 instead")
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".lora_" not in name and (name == "lm_head" or name.startswith("model.layers."))]
    for name in targets:
        model.set_submodule(name, Int8WeightOnlyLinear(model.get_submodule(name)))
    return len(targets)
