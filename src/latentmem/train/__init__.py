"""Training MemoryLLM: the paper's routines (section 3.2, appendix B.1) plus a QA routine,
LoRA adapters, one engine for one process or many (torchrun / DDP).

    from latentmem.train import TrainConfig, train
    train(TrainConfig.load("configs/train_default.toml", ["steps=100"]))
"""

from .config import ConfigError, TrainConfig
from .engine import export_weights, train

__all__ = ["ConfigError", "TrainConfig", "export_weights", "train"]
