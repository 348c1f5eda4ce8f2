"""The training run's one typed config: a TOML or JSON file plus ``key=value`` overrides.

    cfg = TrainConfig.load("configs/train_default.toml", ["steps=100", "lr=1e-4"])

Every key is a field below; an unknown key (in the file or an override) is an error that names
the closest valid key, so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROUTINES = ("new_knowledge", "continuous", "forgetting", "qa")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A training config that cannot be used (unknown key, wrong type, inconsistent values)."""


@dataclass
class TrainConfig:
    # ---- model ----
    design: str = "memoryllm"  # which memory design's recipe trains (latentmem.train.recipe.RECIPES)
    model: str | None = None  # local HF / MemoryLLM folder; None = the embedded SmolLM2-135M default
    num_tokens: int = 128  # K: new memory tokens per injection
    # N = num_blocks * K = 512: the embedded default's one documented memory shape (its shipped
    # weights were trained with it)
    num_blocks: int = 4
    trained_start: bool = False  # start the default model from its shipped trained weights (merged; new adapters on top)
    init_from: str | None = None  # continue training an export ("default" = the shipped file): its LoRA factors and embeddings seed the new adapters
    # ---- what is trained ----
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # > 0 draws from the global RNG: runs are then no longer bit-reproducible
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    separate_adapters: bool = False  # one LoRA adapter for writing (self-update), another for reading (the 8B release)
    train_embeddings: bool = True  # bos_embedding and new_memory_positional_emb
    full_finetune: bool = False  # every weight trained (no LoRA); checkpoints hold the whole model
    # ---- data ----
    text_data: list[str] = field(default_factory=lambda: ["wikipedia_articles", "news_articles"])
    qa_data: list[str] = field(default_factory=lambda: ["counterfactual_qa"])
    segment_min: int = 64  # tokens per context segment (x1, x2, ...): uniform in [min, max]
    segment_max: int = 128
    qa_max_context_tokens: int = 256  # longer QA contexts are skipped (one injection per context)
    qa_max_answer_tokens: int = 16
    # ---- routine mix (relative weights; normalised) ----
    ratio_new_knowledge: float = 1.0
    ratio_continuous: float = 0.0
    ratio_forgetting: float = 0.0
    ratio_qa: float = 0.0
    process_a_prob: float = 0.5  # routine 1: share of process A (gradient through the injection)
    continuous_min_segments: int = 3  # n: inject x1..x(n-1), predict xn
    continuous_max_segments: int = 6  # reached after continuous_ramp_steps (the growing schedule)
    continuous_ramp_steps: int = 200
    forgetting_max_gap: int = 4  # unrelated documents injected between the target's x1 and x2 (across steps: steps back)
    # Algorithm 1 as the paper runs it: predict the continuation of a context the integrity rule
    # wrote into the training pool 1..forgetting_max_gap steps earlier, reading the pool as it is
    # (no injection in the batch); false: cache and inject unrelated documents within the step
    forgetting_across_steps: bool = False
    qa_grad_through_injection: bool = True
    qa_fresh_pool: bool = True  # inject the QA context into an empty pool (as the evaluation does)
    # share of QA batches (with qa_fresh_pool) whose context goes into the evolving training pool
    # instead: a question about the latest context in a pool full of older ones (the integrity
    # evaluation's case, and a long-lived user's memory)
    qa_training_pool_prob: float = 0.0
    # share of new-knowledge and continuous batches injected into an empty pool instead of the
    # evolving training pool: a new user's memory starts empty (the first context is tiled over
    # it), a case the training pool never shows once it is initialised
    lm_fresh_pool_prob: float = 0.0
    integrity_contexts: int = 1  # contexts per micro-batch written into the training pool after each step
    pool_warmup_contexts: int = 4  # injections that initialise the training pool before step 1
    # ---- optimisation ----
    steps: int = 500
    batch_size: int = 4  # rows per micro-batch per process
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    max_grad_norm: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 only on CUDA, with loss scaling)
    seed: int = 0
    # ---- validation (held-out rows, is_heldout) ----
    eval_every: int = 0  # every this many steps (and at the start and the end) score fixed held-out batches; 0 = off
    eval_batches: int = 4  # micro-batches per validation set (pairs, continuous, qa: those the mix trains)
    # ---- engine ----
    out_dir: str = "runs/train"
    device: str = "auto"  # auto: cuda:<local rank> when available, else cpu
    threads: int | None = None  # torch CPU threads per process
    log_every: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest checkpoint in out_dir when there is one
    max_seconds: float | None = None  # stop (after a checkpoint) when this much wall time has passed
    stop_at: int | None = None  # end this invocation after this step (checkpointed), as if interrupted; the schedule still follows `steps`
    export: str | None = None  # also write the compact trained weights here at the end
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        from .recipe import RECIPES  # here, not at the top: recipe.py imports this module

        checks = [
            (self.design in RECIPES, f"unknown design {self.design!r}; available: {', '.join(sorted(RECIPES))}"),
            (self.segment_min >= 1 and self.segment_max >= self.segment_min, "need 1 <= segment_min <= segment_max"),
            (self.steps >= 0 and self.batch_size >= 1 and self.grad_accum >= 1, "steps >= 0, batch_size >= 1, grad_accum >= 1"),
            (min(self.ratios().values()) >= 0 and sum(self.ratios().values()) > 0, "routine ratios must be >= 0 and not all 0"),
            (0.0 <= self.process_a_prob <= 1.0, "process_a_prob must be in [0, 1]"),
            (0.0 <= self.lm_fresh_pool_prob <= 1.0, "lm_fresh_pool_prob must be in [0, 1]"),
            (0.0 <= self.qa_training_pool_prob <= 1.0, "qa_training_pool_prob must be in [0, 1]"),
            (2 <= self.continuous_min_segments <= self.continuous_max_segments, "need 2 <= continuous_min_segments <= continuous_max_segments"),
            (self.forgetting_max_gap >= 1, "forgetting_max_gap must be >= 1"),
            (not self.forgetting_across_steps or self.ratio_forgetting == 0 or (self.integrity_contexts >= 1 and self.ratio_new_knowledge + self.ratio_continuous > 0),
             "forgetting_across_steps predicts contexts that new_knowledge / continuous batches wrote into the pool: it needs integrity_contexts >= 1 and ratio_new_knowledge or ratio_continuous > 0"),
            (self.precision in ("fp32", "bf16", "fp16"), f"precision must be fp32, bf16 or fp16, got {self.precision!r}"),
            (self.full_finetune or self.lora_r >= 1, "lora_r must be >= 1 (or full_finetune = true)"),
            (set(self.lora_targets) <= set(LORA_TARGETS), f"lora_targets must be among {LORA_TARGETS}"),
            (self.pool_warmup_contexts >= 1, "pool_warmup_contexts must be >= 1"),
            (self.eval_every >= 0 and self.eval_batches >= 1, "eval_every must be >= 0 and eval_batches >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    def ratios(self) -> dict[str, float]:
        return {r: float(getattr(self, f"ratio_{r}")) for r in ROUTINES}

    # ---- loading ----
    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "TrainConfig":
        values: dict[str, Any] = read_config_file(path) if path else {}
        for item in overrides or []:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} is not key=value")
            values[key.strip()] = parse_value(cls, key.strip(), raw.strip())
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                raise ConfigError(f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "") + f"; valid keys: {', '.join(names)}")
        typed = {k: check_type(cls, k, v) for k, v in values.items()}
        try:
            return cls(**typed)
        except TypeError as e:  # pragma: no cover - check_type catches the usual cases
            raise ConfigError(str(e)) from e

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise ConfigError(f"{path}: config files are .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of keys")
    return data


def _field_type(cls, key: str):
    hints = typing.get_type_hints(cls)
    if key not in hints:
        close = difflib.get_close_matches(key, list(hints), n=1)
        raise ConfigError(f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return hints[key]


def parse_value(cls, key: str, raw: str) -> Any:
    """A command-line value for ``key``: JSON when it parses (numbers, true/false, lists, null),
    else the raw string; a list field also accepts ``a,b,c``."""
    hint = _field_type(cls, key)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if typing.get_origin(_strip_none(hint)) is list and isinstance(value, str):
        value = [v for v in value.split(",") if v]
    if isinstance(value, str) and value.lower() in ("none", "null") and _allows_none(hint):
        value = None  # export=None must not become a file named "None"
    return value


def _allows_none(hint) -> bool:
    return type(None) in typing.get_args(hint)


def _strip_none(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def check_type(cls, key: str, value: Any) -> Any:
    hint = _field_type(cls, key)
    if value is None:
        if _allows_none(hint):
            return None
        raise ConfigError(f"{key} cannot be null")
    base = _strip_none(hint)
    origin = typing.get_origin(base)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [check_type_scalar(key, typing.get_args(base)[0], v) for v in value]
    return check_type_scalar(key, base, value)


def check_type_scalar(key: str, typ, value: Any) -> Any:
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is bool and isinstance(value, bool):
        return value
    if typ is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key} must be {typ.__name__}, got {value!r}")
