"""Larimar's training objective (the release's, section "Training" of the reference notes), as
one differentiable function over an episode of E text chunks, for a training recipe to call.

    e = encoder(x_i), z_i = head(e_i)                      (gradient into encoder and head)
    M = W0^+ Z', W0 = Z' M0^+                              (one-shot write; gradient into M0)
    w_i ~ N(z_i M^+, exp(w_logvar)),  z_r,i = w_i M         (read)
    loss = a_mem   * CE(x_i | z_r,i)      reconstruction through memory
         + a_enc   * CE(x_i | z_i)        reconstruction from the encoding itself
         + beta    * KL(q(w) || N(0, I))  of the addressing weights (beta 0.5 in the release, with a schedule)
         + a_empty * CE(x_i | no memory)  keeps the decoder usable without memory

The pseudo-inverses run a fixed number of Ben-Israel-Cohen steps (the release: 15), which is
differentiable; no early stop in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import memory as mm
from .model import Larimar


@dataclass
class LossWeights:
    memory: float = 1.0
    encoding: float = 1.0
    kl: float = 0.5  # beta
    empty: float = 1.0
    pinv_steps: int = 15
    pinv_alpha: float | None = None  # None: the always-convergent scale (see memory.pinv_iterative)


def _ce(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """Next-token cross-entropy over the valid positions of every row."""
    tgt = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100)


def episode_loss(model: Larimar, enc_ids: Tensor, enc_mask: Tensor, dec_ids: Tensor, dec_mask: Tensor, weights: LossWeights = LossWeights(), generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
    """(loss, its parts) for one episode: row i of enc_ids/dec_ids is chunk i, tokenised for the
    encoder and the decoder (decoder rows left-padded as ``text.left_pad`` does)."""
    cfg = model.config
    pinv = lambda A: mm.pinv_iterative(A, weights.pinv_steps, weights.pinv_alpha, tol=0)  # noqa: E731
    e = model.embed(enc_ids, enc_mask)
    z = model.latent(e).float()
    noise = torch.randn(z.shape, generator=generator, device="cpu").to(z.device) * cfg.write_noise_std
    zn = z + noise
    M = mm.write_oneshot(model.memory_mean.float(), zn, pinv)
    w_mean = mm.address(z, pinv(M))
    std = torch.exp(0.5 * model.w_logvar)
    w = w_mean + std * torch.randn(w_mean.shape, generator=generator, device="cpu").to(z.device)
    z_r = w @ M
    valid = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    ce_mem = _ce(model(dec_ids, dec_mask, memory=model.memory_prefix(z_r, valid)), dec_ids, dec_mask)
    ce_enc = _ce(model(dec_ids, dec_mask, memory=model.memory_prefix(z, valid)), dec_ids, dec_mask)
    kl = (0.5 * (torch.exp(model.w_logvar) + w_mean**2 - 1 - model.w_logvar)).sum(-1).mean()
    ce_empty = _ce(model(dec_ids, dec_mask), dec_ids, dec_mask) if weights.empty else torch.zeros((), device=z.device)
    loss = weights.memory * ce_mem + weights.encoding * ce_enc + weights.kl * kl + weights.empty * ce_empty
    parts = {k: float(v.detach()) for k, v in (("ce_memory", ce_mem), ("ce_encoding", ce_enc), ("kl_w", kl), ("ce_empty", ce_empty))}
    return loss, parts
