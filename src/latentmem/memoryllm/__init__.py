"""MemoryLLM (Wang et al., ICML 2024): a fixed-size memory pool of hidden states in every layer,
self-updated by injecting text.

    config.py      MemoryLLMConfig: the backbone's fields + N, K, positions, drop policy
    model.py       the decoder with memory: read (memory_prefix / forward), write (new_memory_tokens)
    state.py       one pool: tensor, drop generator, provenance; the drop rule; atomic save/load
    lm.py          MemoryLM, MemoryLLM behind the shared interface (latentmem.api.MemoryModel)
    checkpoint.py  local HF folders, the embedded default, the published MemoryLLM layouts
"""

from .config import MemoryLLMConfig
from .lm import MemoryLM, load, model_fingerprint
from .model import MemoryLLM, tile_to, update_pool
from .state import MemoryState, MemoryStateError

__all__ = ["MemoryLLM", "MemoryLLMConfig", "MemoryLM", "MemoryState", "MemoryStateError", "load", "model_fingerprint", "tile_to", "update_pool"]
