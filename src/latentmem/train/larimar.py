"""Larimar's training recipe (``design = "larimar"``): the release's objective
(``latentmem.larimar.objective.episode_loss``: reconstruction through memory + from the encoding
+ beta KL of the addressing weights + with an empty memory) on episodes of text chunks.

One micro-batch is one episode: ``batch_size`` (at least 2) chunks of ``segment_min`` tokens
(64 by default, as the release), each drawn from a random training document. Trained: the
readout projection and its gates, the encoder head, the memory prior M0, w_logvar, and LoRA on
the decoder's attention projections when ``lora_r`` > 0; the decoder and encoder stay frozen.
The export (``larimar-trained/1``) holds those tensors: about 18 MB fp32 on SmolLM2-135M
(the projection dominates: 384 x 30 layers x 2 x 3 heads x 64), under the 25 MB limit.
Applying an export at load is not written yet.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..files import atomic_write
from ..text import left_pad, pad_token_id
from .config import ConfigError
from .data import TrainData
from .recipe import Recipe, trained_tensors

EXPORT_FORMAT = "larimar-trained/1"
TRAINED = ("prefix_proj.", "prefix_gate", "encoder_head.", "memory_mean", "w_logvar")
DECODER_LORA = r"model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"


@dataclass
class Episode:
    chunks: list[list[int]]  # decoder token ids of each chunk
    routine: str = "episode"

    def num_tokens(self) -> int:
        return sum(map(len, self.chunks))


def episode_batch(cfg, data: TrainData, index: int) -> Episode:
    """Episode ``index``: a function of the config and the index alone."""
    rng = random.Random(f"{cfg.seed}:larimar:{index}")
    return Episode([data.segments(rng, [cfg.segment_min])[1][0] for _ in range(max(cfg.batch_size, 2))])


class EpisodeLoss(nn.Module):
    def __init__(self, model, tokenizer, encoder_tokenizer, seed: int):
        super().__init__()
        self.model, self.tokenizer, self.encoder_tokenizer, self.seed = model, tokenizer, encoder_tokenizer, seed
        self.calls = 0

    def inputs(self, batch: Episode):
        dev = self.model.device
        texts = [self.tokenizer.decode(c) for c in batch.chunks]
        enc = self.encoder_tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)
        dec_ids, dec_mask = left_pad(batch.chunks, pad_token_id(self.tokenizer), dev)
        return enc["input_ids"].to(dev), enc["attention_mask"].bool().to(dev), dec_ids, dec_mask

    def forward(self, batch: Episode, weights=None) -> tuple[Tensor, Tensor]:
        from ..larimar.objective import LossWeights, episode_loss

        self.calls += 1
        g = torch.Generator().manual_seed(hash((self.seed, self.calls)) & 0x7FFFFFFF)
        loss, self.parts = episode_loss(self.model, *self.inputs(batch), weights or LossWeights(), generator=g)
        return loss, torch.tensor(batch.num_tokens(), device=loss.device)


class LarimarRecipe(Recipe):
    design = "larimar"
    structural = ("model", "lora_r", "lora_alpha")
    metric_fields = ("ce_memory", "ce_encoding", "kl_w", "ce_empty")

    def load_model(self):
        from .. import larimar

        lm = larimar.load(self.cfg.model)
        return lm.model, lm.tokenizer

    def prepare_trainable(self, model: nn.Module) -> list[str]:
        torch.manual_seed(self.cfg.seed)
        for p in model.parameters():
            p.requires_grad_(False)
        if self.cfg.lora_r:
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout, target_modules=DECODER_LORA), model)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(TRAINED) or ".lora_" in name)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not names:
            raise ConfigError("nothing to train")
        return names

    def setup(self, model: nn.Module, tokenizer, data: TrainData) -> None:
        if not data.docs:
            raise ConfigError("Larimar trains on episodes of text chunks: text_data gave none")
        enc_tok = getattr(model, "encoder_tokenizer", None) or tokenizer
        self.model, self.data, self.module = model, data, EpisodeLoss(model, tokenizer, enc_tok, self.cfg.seed)

    def batch(self, index: int, step: int, per_step: int) -> Episode:
        return episode_batch(self.cfg, self.data, index)

    def loss_module(self) -> nn.Module:
        return self.module

    def step_metrics(self) -> dict:
        return {k: round(v, 5) for k, v in getattr(self.module, "parts", {}).items()}

    def validation_sets(self, eval_data: TrainData) -> dict[str, list[Episode]]:
        if not eval_data.docs:
            return {}
        return {"episodes": [episode_batch(self.cfg, eval_data, -1 - i) for i in range(self.cfg.eval_batches)]}

    def validation_loss(self, batch: Episode) -> tuple[Tensor, Tensor]:
        """Summed next-token loss through memory (the readout of each chunk), and its tokens."""
        from ..larimar.objective import LossWeights

        self.module(batch, LossWeights(encoding=0.0, kl=0.0, empty=0.0))
        n = sum(len(c) - 1 for c in batch.chunks)
        return torch.tensor(self.module.parts["ce_memory"] * n), torch.tensor(n)

    def export(self, model: nn.Module, path: str | Path, extra_meta: dict | None = None) -> Path:
        from safetensors.torch import save_file

        tensors = {n: t.float().contiguous() for n, t in trained_tensors(model).items()}
        meta = {"format": EXPORT_FORMAT, "lora_r": str(self.cfg.lora_r), "lora_alpha": str(self.cfg.lora_alpha),
                "train_config": json.dumps(self.cfg.to_dict(), sort_keys=True), **{k: str(v) for k, v in (extra_meta or {}).items()}}
        path = Path(path)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), mode=0o644)
        return path
