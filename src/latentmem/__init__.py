"""memoryllm: self-updatable language models with a latent memory pool (MemoryLLM, ICML 2024)."""

from .config import MemoryLLMConfig
from .model import KV, KVCache, MemoryLLM, update_pool
from .state import MemoryState, MemoryStateError

__all__ = ["MemoryLLM", "MemoryLLMConfig", "MemoryState", "MemoryStateError", "KV", "KVCache", "update_pool"]
__version__ = "0.1.0"
