"""The one interface every memory design implements, and the types it speaks in.

A *design* (MemoryLLM, LongMem, Larimar) is a language model whose memory lives in its latent
space: a pool of hidden states, a bank of cached keys/values, an episodic matrix. Whatever the
memory is, users, the store, the HTTP service, the CLI, the evaluations and the benchmarks meet
it only through ``MemoryModel`` below; nothing outside a design's own package touches its
tensors. A design is one subpackage (``latentmem.memoryllm``, ...) whose ``load()`` returns an
object satisfying ``MemoryModel``; ``latentmem.load(design=...)`` picks it.

The contract (``tests/test_conformance.py`` checks it for every design):

* ``new_memory(seed)`` gives an empty memory; everything that makes a memory's future
  behaviour (its random generator included) lives in the memory object, so the same
  injections into equal memories give bit-identical memories, on any machine.
* ``inject`` writes text without back-propagation, one memory or a batch (memory i receives
  text i; a batch equals the same injections one by one). Inputs are validated first and a
  failure part-way leaves every memory exactly as it was.
* ``generate`` / ``stream`` / ``generate_batch`` answer from memory (``None``: no memory). The
  prompt default (``chat=None``) is the plain form the shipped weights were trained on: a bare
  question is asked as ``Question: ... Answer:`` and the answer ends at a newline
  (``latentmem.text.plain_prompt``); ``chat=False`` reads the string exactly as given and
  ``chat=True`` applies the tokenizer's chat template. Sampling options are
  ``latentmem.generate.SamplingParams`` (its repetition guard ends degenerate loops).
* ``score`` is the teacher-forced log-probability of an answer given memory and prompt.
* ``forget`` removes what the design can remove of one injection in place, and says whether
  that is *exact* (the memory now equals one that never received it) or leaves traces, in
  which case exactness needs a replay of the other injections (what ``MemoryStore`` does).
  ``forget_exact`` declares which of the two a design's ``forget`` gives.
* ``memory.save(path)`` (atomic) and ``load_memory(path)`` round-trip bit-exactly and refuse a
  memory made for another model.
* ``owners(memory)``: which injection wrote each storage unit (a slot, a chunk, a written
  row), for attribution and diffs; ``info(memory)`` describes capacity and sizes.
* For evaluations and benchmarks: ``health(memory, previous)`` (numeric diagnostics of a memory
  under long runs of writes) and, for baselines that edit the backbone instead of writing memory
  (FT-L), ``editable_weight(layer)`` with the differentiable ``backbone_logits(ids)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: `import latentmem` (and `memoryllm --help`) must not import torch
    from torch import Tensor


# --------------------------------------------------------------------------------------------
# Errors shared by every design
# --------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A model folder or weights file whose contents cannot be loaded (bad config, missing or
    unexpected tensors, an adapter layout the loader cannot honour)."""


class MemoryFormatError(ValueError):
    """A memory file or object that cannot be used with this model (wrong shape or model,
    corrupted, unknown format)."""


class InjectionError(ValueError):
    """Text that cannot be written into memory (empty, too short, not text)."""


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class InjectResult:
    injection_id: int
    num_tokens: int
    num_chunks: int  # writes the text took (chunks of at most the design's write length)
    seconds: float


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    prefill_seconds: float  # includes reading memory when not cached
    decode_seconds: float
    finish_reason: str  # "stop" (EOS or stop string), "length" (max_new_tokens) or "repetition" (the loop guard)

    @property
    def tokens_per_second(self) -> float:
        n = max(len(self.token_ids) - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def __str__(self) -> str:
        return self.text


@dataclass
class ForgetResult:
    injection_id: int
    exact: bool  # the memory now equals one that never received the injection
    removed_units: int  # storage units cleared (memory slots, bank chunks, written rows)
    note: str = ""  # what may remain when not exact


@dataclass
class MemoryInfo:
    """Capacity and sizes of a model's memory, and of one memory when given.

    ``details`` holds design facts (MemoryLLM: N, K, ...) plus these keys, which every design
    provides and which the evaluations and benchmarks read instead of the design's internals:

    * ``layers``, ``parameters``, ``dtype``: the backbone's decoder layers, parameter count, dtype;
    * ``weights_bytes``: in-process size of the model's parameters and buffers;
    * ``min_inject_tokens``: the shortest text ``inject`` takes without ``allow_short``;
      ``max_inject_tokens``: the most tokens one write takes (a longer text takes several);
    * ``capacity_updates``: about how many of the latest updates (writes; a long text takes
      several) the memory holds before older ones fade (MemoryLLM: N/K);
      ``capacity_tokens``: the text tokens those updates can carry (capacity_updates *
      max_inject_tokens): what a user can expect the memory to hold at once;
    * ``context_window``: the prompt positions the backbone was trained for;
    * ``kv_bytes_per_token``: the keys/values one prompt or generated token adds to a decode cache;
    * ``read_cache_bytes``: the keys/values a read computes from this memory and keeps (memory
      slots, bank chunks or rows, as the design reads them); 0 without a memory or for an empty one;
    * ``read_state_bytes``: what a read of this memory holds besides the prompt's own cache, the
      memory's vectors plus ``read_cache_bytes``; 0 without a memory or for an empty one;
    * ``applied_weights``: only where the design ships trained weights for its default model:
      what was applied at load (a JSON-able record), or None for the untrained base.
    """

    design: str
    model: str
    model_id: str
    unit: str  # what one storage unit is ("memory slot", "bank chunk", "memory row")
    capacity_units: int  # units the memory holds at most (per layer where the design has layers)
    used_units: int  # units holding something written
    memory_bytes: int  # in-process size of the memory's tensors
    update_count: int  # writes applied
    last_injection_id: int
    details: dict[str, Any] = field(default_factory=dict)  # design-specific facts (shapes, limits)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Memory(Protocol):
    """One user's memory: a design's state object (pool, bank, matrix), self-contained."""

    seed: int
    model_id: str  # the model (and memory shape) it belongs to
    version: int  # bumped on every change
    update_count: int
    last_injection_id: int  # injection ids handed out so far

    def clone(self, deep: bool = True) -> "Memory": ...

    def equal(self, other: "Memory") -> bool: ...

    def save(self, path) -> None: ...


@runtime_checkable
class MemoryModel(Protocol):
    """What every memory design offers; see the module docstring for the contract."""

    design: ClassVar[str]  # "memoryllm", "longmem", "larimar"
    forget_exact: ClassVar[bool]  # whether forget() alone removes an injection exactly
    name: str  # human-readable model name
    model_id: str  # fingerprint of the weights and memory shape
    tokenizer: Any

    def encode(self, text: str) -> list[int]: ...

    def chat_prompt(self, prompt: str | list[dict], chat: bool | None) -> str:
        """The prompt text ``generate`` reads for ``prompt`` and ``chat`` (None: the plain trained
        form, a bare question as ``Question: ... Answer:``; False: the string as given; True: the
        tokenizer's chat template), so callers can format prompts beforehand."""
        ...

    # ---- memories ----
    def new_memory(self, seed: int = 0) -> Memory: ...

    def load_memory(self, path) -> Memory: ...

    def info(self, memory: Memory | None = None) -> MemoryInfo: ...

    # ---- writing ----
    def inject(
        self,
        memory: Memory | Sequence[Memory],
        text: str | Sequence[str],
        *,
        allow_short: bool = False,
        progress: bool | None = None,
        injection_id: int | Sequence[int] | None = None,
    ) -> InjectResult | list[InjectResult]: ...

    def forget(self, memory: Memory, injection_id: int) -> ForgetResult: ...

    def owners(self, memory: Memory) -> Tensor: ...

    def differences(self, a: Memory, b: Memory) -> list[str]: ...

    def diff(self, a: Memory, b: Memory) -> dict: ...

    # ---- reading ----
    def generate(self, memory: Memory | None, prompt: str | list[dict], *, chat: bool | None = None, **sampling) -> Generation: ...

    def stream(self, memory: Memory | None, prompt: str | list[dict], *, chat: bool | None = None, **sampling) -> Iterator[str]:
        """The answer's text piece by piece; exhausted, the generator returns its ``Generation``
        (``StopIteration.value``), as ``generate`` would have answered."""
        ...

    def generate_batch(self, memories: Sequence[Memory | None], prompts: Sequence[str | list[dict]], *, chat: bool | None = None, **sampling) -> list[Generation]: ...

    def score(self, memories: Sequence[Memory | None], prompts: Sequence[str], answers: Sequence[str]) -> list[tuple[float, int]]: ...

    # ---- diagnostics and baselines (for evaluations and benchmarks) ----
    def health(self, memory: Memory, previous: Any = None, *, since_injection: int = 0) -> tuple[dict, Any]:
        """Numeric health of a memory under long runs of writes (the integrity evaluation).
        Returns a JSON-able dict and an opaque snapshot to pass as ``previous`` to the next call.
        The dict holds at least ``nonfinite`` (NaN/Inf values in the memory), ``mean_norm`` (mean
        norm of a storage unit's vector), ``max_abs``, ``drift`` (relative change of the memory's
        values since ``previous``; None without it or from an empty memory),
        ``rewritten_since_last_check`` (share of storage units rewritten since ``previous``; None
        without it) and ``replaced_since_start`` (share of units written by injections with ids
        above ``since_injection``); a design adds its own (MemoryLLM: ``layer_norm`` per layer)."""
        ...

    def editable_weight(self, layer: int) -> Tensor:
        """For baselines that edit the backbone (FT-L, ROME-style): the live weight of decoder layer
        ``layer``'s MLP output projection. Changes to it affect every later call (the caller
        restores it); it takes part in ``backbone_logits``' autograd graph when it requires grad."""
        ...

    def backbone_logits(self, ids: Sequence[int]) -> Tensor:
        """For baselines that edit the backbone: the next-token logits [T, V] of one token sequence
        read with no memory (the base model), under autograd (differentiable)."""
        ...
