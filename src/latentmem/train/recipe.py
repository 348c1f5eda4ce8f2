"""What the training engine asks of a memory design: its *recipe*.

The engine (``engine.py``) owns what every run has, whatever the design: the optimiser and LR
schedule, gradient accumulation, autocast, DistributedDataParallel, checkpoints and resume,
metrics and the validation cadence. A recipe owns what differs between designs: the model, what
is trained, the micro-batches and their loss, what happens after an optimizer step (MemoryLLM:
the integrity write into its training pool), validation, the state a checkpoint must carry
beyond the weights and optimiser, and the exported weights. ``TrainConfig.design`` picks it.

One run, as the engine drives it:

    recipe = recipe_for(cfg)
    model, tokenizer = recipe.load_model()            # unless the caller passed them
    data = recipe.load_data(tokenizer, "train")       # "heldout": the validation rows
    names = recipe.prepare_trainable(model); model.to(device)
    recipe.setup(model, tokenizer, data)
    recipe.load_state_dict(checkpoint["recipe"])      # on resume; else recipe.begin()
    module = recipe.loss_module()                     # wrapped in DDP with many processes
    every step: batch = recipe.batch(index, step, per_step); loss, tokens = module(batch)
                record = recipe.step_record(batch)    # gathered from every process
                ... optimizer step ...
                recipe.after_step(records)            # all processes' records, in index order
    recipe.validation_sets(eval_data); recipe.validation_loss(batch)
    recipe.export(model, path, extra_meta)

A new design adds a module here with a ``Recipe`` subclass and one line in ``RECIPES``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from .config import ConfigError, TrainConfig
from .data import TrainData, load_train_data

# design -> "module:class" of its recipe, imported only when chosen (a design's training code
# never loads another's)
RECIPES: dict[str, str] = {
    "memoryllm": "latentmem.train.memoryllm:MemoryLLMRecipe",
    "longmem": "latentmem.train.longmem:LongMemRecipe",
    "larimar": "latentmem.train.larimar:LarimarRecipe",
}


class MicroBatch(Protocol):
    """What the engine reads of a recipe's micro-batch (for the metrics)."""

    routine: str  # the kind of batch, logged per step

    def num_tokens(self) -> int: ...


class Recipe(ABC):
    """A memory design's part of a training run; see the module docstring for the order of calls."""

    design: ClassVar[str]
    # config fields that change the shape of what is trained: a resume with other values is refused
    structural: ClassVar[tuple[str, ...]] = ()
    # extra metrics.csv columns, filled by step_metrics() after every step
    metric_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    # ---- model and data ----
    @abstractmethod
    def load_model(self) -> tuple[nn.Module, Any]:
        """(model, tokenizer) named by the config."""

    def load_data(self, tokenizer, split: str) -> TrainData:
        """Training rows (split "train") or the held-out rows (split "heldout")."""
        return load_train_data(self.cfg, tokenizer, split)

    @abstractmethod
    def prepare_trainable(self, model: nn.Module) -> list[str]:
        """Freeze, add adapters, unfreeze; the names of the trained parameters. Must draw
        randomness only from seeds in the config, so every process starts alike."""

    @abstractmethod
    def setup(self, model: nn.Module, tokenizer, data: TrainData) -> None:
        """Bind the (trainable, placed) model and the training data; make the run's state."""

    def begin(self) -> None:
        """Called once before step 1 of a run that does not resume from a checkpoint."""

    # ---- steps ----
    @abstractmethod
    def batch(self, index: int, step: int, per_step: int) -> MicroBatch:
        """The micro-batch with global index ``index``, a function of the config and the index
        alone (``per_step`` micro-batches per optimizer step over all processes), so a run is
        the same on any number of processes and after a resume."""

    @abstractmethod
    def loss_module(self) -> nn.Module:
        """The module whose ``forward(batch) -> (mean loss, scored tokens)`` DDP wraps: one
        forward call per micro-batch, so DDP's gradient hooks see all of it."""

    def step_record(self, batch: MicroBatch) -> Any:
        """What ``after_step`` needs of this micro-batch (picklable: gathered across processes)."""
        return None

    def after_step(self, records: Sequence[Any]) -> None:
        """After each optimizer step, with every process's records in global index order (so
        every process does the same)."""

    def step_metrics(self) -> dict[str, Any]:
        """Values for ``metric_fields`` after a step."""
        return {}

    # ---- validation ----
    @abstractmethod
    def validation_sets(self, eval_data: TrainData) -> dict[str, list[MicroBatch]]:
        """Fixed held-out micro-batches per set name, the same at every validation."""

    @abstractmethod
    def validation_loss(self, batch: MicroBatch) -> tuple[Tensor, Tensor]:
        """(summed loss, scored tokens) of a held-out batch (per row or in total); the engine
        runs it without gradient, in eval mode, under autocast, and sums over batches."""

    # ---- checkpoints and results ----
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must carry besides weights, optimiser, schedule and RNG states."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output (after ``setup``). A checkpoint written before
        recipes existed has no "recipe" entry: it is passed whole, to read what it saved there."""

    @abstractmethod
    def export(self, model: nn.Module, path: str | Path, extra_meta: dict | None = None) -> Path:
        """Write the compact trained weights that the design's loader applies."""

    def results(self) -> dict[str, Any]:
        """Design-specific entries of ``train()``'s summary."""
        return {}


def recipe_for(cfg: TrainConfig) -> Recipe:
    """The recipe of ``cfg.design``."""
    if cfg.design not in RECIPES:
        raise ConfigError(f"unknown design {cfg.design!r}; available: {', '.join(sorted(RECIPES))}")
    module, name = RECIPES[cfg.design].split(":")
    return getattr(importlib.import_module(module), name)(cfg)


def trained_tensors(model: nn.Module) -> dict[str, Tensor]:
    """CPU copies of the trained parameters, by name (what checkpoints and exports hold)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
