"""Training memory designs: one engine (``engine.py``: one process or many under torchrun / DDP)
and a recipe per design (``recipe.py``; ``TrainConfig.design`` picks it). MemoryLLM's recipe
(``memoryllm.py``) runs the paper's routines (section 3.2, appendix B.1) plus a QA routine
(``routines.py``) with LoRA adapters.

    from latentmem.train import TrainConfig, train
    train(TrainConfig.load("configs/train_default.toml", ["steps=100"]))
"""

from .config import ConfigError, TrainConfig
from .engine import export_weights, train
from .recipe import RECIPES, Recipe, recipe_for

__all__ = ["RECIPES", "ConfigError", "Recipe", "TrainConfig", "export_weights", "recipe_for", "train"]
