"""Larimar's typed config: the decoder's Llama-family fields plus the episodic memory's shape,
the encoder and the write/read rules (Das et al., ICML 2024; facts of the release in
``docs`` / ``shared/design/larimar-reference.md``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..config import BackboneConfig

WriteMode = Literal["oneshot", "sequential"]
PinvMethod = Literal["iterative", "exact"]
EncoderKind = Literal["minilm", "decoder", "bert"]


@dataclass
class LarimarConfig(BackboneConfig):
    # ---- the episodic memory M [K, C] ----
    memory_slots: int = 512  # K (the release's 512)
    latent_size: int = 384  # C: the size of a latent z (MiniLM's 384 by default)
    # "oneshot": every write re-solves M = W0^+ Z' over all written rows (the release's
    # direct_writing); "sequential": the Kanerva-machine update, one row at a time.
    write_mode: WriteMode = "oneshot"
    write_noise_std: float = 1e-6  # xi in Z' = Z + xi (the release's sigma)
    observation_noise_std: float = 1e-2  # sigma of the sequential update (sigma_z = w U w^T + sigma^2)
    prior_variance: float = 1.0  # U0 = prior_variance * I (the release: exp(0) + 1e-6)
    pinv: PinvMethod = "iterative"  # Ben-Israel-Cohen iteration, or torch.linalg.pinv
    pinv_steps: int = 40  # iterations (the release: 15 in training; more converge further)
    pinv_alpha: float | None = None  # start X0 = alpha A^T; None: 1 / (||A||_1 ||A||_inf), always convergent
    max_rows: int = 4096  # written rows (facts / chunks) one memory holds
    # ---- reading: "flat" w = z M^+, z_r = w M; "recursive": the recursive search over groups
    # of at most recursive_group rows (memory.read_recursive; one-shot writing only), for
    # memories holding more rows than K; a read-time choice, not part of the memory's shape
    read_mode: Literal["flat", "recursive"] = "flat"
    recursive_group: int | None = None  # None: K
    # ---- the encoder: text -> sentence embedding e [D] -> latent z = head(e) [C] ----
    encoder: EncoderKind = "minilm"  # MiniLM; "decoder": the decoder's own mean-pooled states; "bert": a given BertModel
    encoder_size: int = 384  # D
    # ---- decoder conditioning: z_r -> P key/value prefix rows per layer (Optimus) ----
    prefix_tokens: int = 1
    # ---- scope detector: cosine distance of the query's embedding to the nearest written fact ----
    scope_threshold: float | None = 0.3  # None: every query reads memory
    # ---- writing text ----
    min_inject_tokens: int = 3
    max_inject_tokens: int = 64  # one row per chunk of at most this many decoder tokens (the release's 64)
    model_type: str = "larimar"

    model_type_name: ClassVar[str] = "larimar"
    architectures_name: ClassVar[tuple[str, ...]] = ("Larimar",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.memory_slots < 1 or self.latent_size < 1 or self.prefix_tokens < 1:
            raise ValueError("memory_slots, latent_size and prefix_tokens must be >= 1")
        if self.write_mode not in ("oneshot", "sequential"):
            raise ValueError(f"write_mode must be oneshot or sequential, got {self.write_mode!r}")
        if self.pinv not in ("iterative", "exact"):
            raise ValueError(f"pinv must be iterative or exact, got {self.pinv!r}")
        if self.encoder not in ("minilm", "decoder", "bert"):
            raise ValueError(f"encoder must be minilm, decoder or bert, got {self.encoder!r}")
        if self.read_mode not in ("flat", "recursive"):
            raise ValueError(f"read_mode must be flat or recursive, got {self.read_mode!r}")
        if self.read_mode == "recursive" and self.write_mode != "oneshot":
            raise ValueError("read_mode='recursive' rewrites groups of rows in one shot: it needs write_mode='oneshot'")
        if self.write_mode == "sequential" and self.memory_slots >= self.latent_size:
            # the prior M0 [K, C] then has full column rank, w = z M0^+ gives w M0 = z for every z,
            # and each Kanerva update's Delta = z - w M is 0: nothing would ever be written
            # (the release has K = 512 < C = 768)
            raise ValueError(f"sequential writing needs memory_slots < latent_size (got K={self.memory_slots}, C={self.latent_size}): with K >= C the prior reconstructs every latent and no update changes the memory")
        if self.max_inject_tokens < self.min_inject_tokens:
            raise ValueError("max_inject_tokens must be >= min_inject_tokens")

    def fingerprint(self) -> dict[str, Any]:
        """What a saved memory must agree with to be loaded into this model."""
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "memory_slots": self.memory_slots,
            "latent_size": self.latent_size,
            "encoder": self.encoder,
            "encoder_size": self.encoder_size,
            "write_mode": self.write_mode,
            "pinv": self.pinv,
            "pinv_steps": self.pinv_steps,
            "pinv_alpha": self.pinv_alpha,
            "write_noise_std": self.write_noise_std,
            "observation_noise_std": self.observation_noise_std,
            "prior_variance": self.prior_variance,
        }
