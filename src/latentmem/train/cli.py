"""``memoryllm train --config FILE [key=value ...]``: registered by ``add_parser(subparsers)``."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a memory design (default MemoryLLM: paper routines + QA; LoRA); runs under torchrun unchanged",
        description="Train a memory design (the config's `design`, default memoryllm). Keys of the config file may be overridden as key=value (e.g. steps=100 lr=1e-4).",
    )
    p.add_argument("--config", default=None, help="TOML or JSON config file (see configs/train_default.toml)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's choice; 1 or 2 on a shared machine)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config keys to override, e.g. steps=100 lr=1e-4")
    p.set_defaults(handler=run)
    return p


def run(args) -> int:
    from .config import ConfigError, TrainConfig

    try:
        cfg = TrainConfig.load(args.config, args.overrides)
    except ConfigError as e:
        print(f"memoryllm train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    import torch

    from .engine import train

    if args.threads:
        torch.set_num_threads(args.threads)
    res = train(cfg)
    if res["losses"] and os.environ.get("RANK", "0") == "0":  # one summary under torchrun
        print(json.dumps({"steps": res["end_step"], "final_loss": res["losses"][-1], "seconds": round(res["seconds"], 1), "checkpoint": str(res["checkpoint"]), "export": cfg.export}))
    return 0
