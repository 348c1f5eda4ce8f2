"""LongMem's training recipe (``design = "longmem"``): only the SideNet trains (LoRA on its layers,
or all of it with ``full_finetune``) plus the memory gates, on long documents fed segment by
segment so that each row's bank holds its document's past (the release's segment-level causality).

One micro-batch: per row, ``continuous_min_segments`` consecutive segments of one training
document (lengths uniform in [segment_min, segment_max]). Every row starts from an empty bank;
segment k is read with the bank holding segments 1..k-1 (next-token loss on segments 2..n, those
that read memory), then written into it without gradient (the frozen backbone's keys/values), as
the release reads memory first and adds the segment's keys after.

The export (``longmem-trained/1``) holds the SideNet's trained tensors (LoRA factors in PEFT's
saved naming, the gates): about 5 MB at r = 8 on SmolLM2-135M, against ~200 MB for a full fp32
SideNet copy (the 25 MB artifact limit). Applying an export at load is not written yet.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files import atomic_write
from ..longmem.bank import read_banks
from ..longmem.lm import write_segments
from ..text import left_pad, pad_token_id
from .config import ConfigError, TrainConfig
from .data import TrainData
from .recipe import Recipe, trained_tensors

EXPORT_FORMAT = "longmem-trained/1"
SIDENET_TARGETS = r"sidenet\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
_PEFT_ADAPTER = re.compile(r"\.lora_([AB])\.default\.weight$")


@dataclass
class DocBatch:
    """Rows of consecutive segments of one document each: segments[k][row]."""

    segments: list[list[list[int]]]
    routine: str = "document"

    def num_tokens(self) -> int:
        return sum(len(s) for rnd in self.segments for s in rnd)


def document_batch(cfg: TrainConfig, data: TrainData, index: int) -> DocBatch:
    """Micro-batch ``index``: a function of the config and the index alone."""
    rng = random.Random(f"{cfg.seed}:longmem:{index}")
    n = max(cfg.continuous_min_segments, 2)
    rows = [data.segments(rng, [rng.randint(cfg.segment_min, cfg.segment_max) for _ in range(n)])[1] for _ in range(cfg.batch_size)]
    return DocBatch([[row[k] for row in rows] for k in range(n)])


def document_loss(model, batch: DocBatch, pad: int, per_row: bool = False) -> tuple[Tensor, Tensor]:
    """Segment-by-segment next-token loss with each row's bank holding its document's past.
    Returns (mean loss, tokens), or per row (summed loss [B], tokens [B])."""
    from ..longmem.bank import LongMemState

    c = model.config
    B = len(batch.segments[0])
    banks = [LongMemState.empty(c.num_key_value_heads, c.chunk_size, c.head_dim, dtype=model.dtype, device=model.device) for _ in range(B)]
    sums = torch.zeros(B, device=model.device)
    counts = torch.zeros(B, device=model.device)
    for k, segs in enumerate(batch.segments):
        if k > 0:  # segments that read memory
            ids, mask = left_pad(segs, pad, model.device)
            logits = model(ids, mask, read=read_banks(banks, c.chunk_size, c.memory_chunks, c.retrieval, c.faiss_min_chunks))
            tgt = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
            loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tgt, ignore_index=-100, reduction="none")
            sums = sums + loss.sum(1)
            counts = counts + (tgt != -100).sum(1)
        write_segments(model, banks, segs, [k + 1] * B, pad)
    if per_row:
        return sums, counts
    return sums.sum() / counts.sum().clamp(min=1), counts.sum()


class DocumentLoss(nn.Module):
    def __init__(self, model, pad: int):
        super().__init__()
        self.model, self.pad = model, pad

    def forward(self, batch: DocBatch) -> tuple[Tensor, Tensor]:
        return document_loss(self.model, batch, self.pad)


class LongMemRecipe(Recipe):
    design = "longmem"
    structural = ("model", "lora_r", "lora_alpha", "full_finetune")

    def load_model(self):
        from ..longmem import checkpoint

        return checkpoint.load(self.cfg.model)

    def prepare_trainable(self, model: nn.Module) -> list[str]:
        torch.manual_seed(self.cfg.seed)
        for p in model.parameters():
            p.requires_grad_(False)
        if self.cfg.full_finetune:
            for p in model.sidenet.parameters():
                p.requires_grad_(True)
        elif self.cfg.lora_r:
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout, target_modules=SIDENET_TARGETS), model)
            for name, p in model.named_parameters():
                p.requires_grad_(".lora_" in name)
        for name, p in model.named_parameters():
            if name.endswith("memory_bias"):
                p.requires_grad_(True)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not names:
            raise ConfigError("nothing to train")
        return names

    def setup(self, model: nn.Module, tokenizer, data: TrainData) -> None:
        if not data.docs:
            raise ConfigError("LongMem trains on long documents: text_data gave none")
        self.model, self.data, self.pad = model, data, pad_token_id(tokenizer)

    def batch(self, index: int, step: int, per_step: int) -> DocBatch:
        return document_batch(self.cfg, self.data, index)

    def loss_module(self) -> nn.Module:
        return DocumentLoss(self.model, self.pad)

    def validation_sets(self, eval_data: TrainData) -> dict[str, list[DocBatch]]:
        if not eval_data.docs:
            return {}
        return {"documents": [document_batch(self.cfg, eval_data, -1 - i) for i in range(self.cfg.eval_batches)]}

    def validation_loss(self, batch: DocBatch) -> tuple[Tensor, Tensor]:
        return document_loss(self.model, batch, self.pad, per_row=True)

    def export(self, model: nn.Module, path: str | Path, extra_meta: dict | None = None) -> Path:
        from safetensors.torch import save_file

        tensors = {_PEFT_ADAPTER.sub(r".lora_\1.weight", n): t.float().contiguous() for n, t in trained_tensors(model).items()}
        meta = {"format": EXPORT_FORMAT, "lora_r": str(self.cfg.lora_r), "lora_alpha": str(self.cfg.lora_alpha),
                "train_config": json.dumps(self.cfg.to_dict(), sort_keys=True), **{k: str(v) for k, v in (extra_meta or {}).items()}}
        path = Path(path)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), mode=0o644)
        return path
