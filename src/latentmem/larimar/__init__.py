"""Larimar (Das et al., ICML 2024): an episodic memory matrix written in one shot (no gradient
steps), read to condition the decoder, and able to forget one fact on request.

    config.py    LarimarConfig: the decoder's fields + K, C, write rule, pseudo-inverse, scope
    memory.py    the matrix algebra: pseudo-inverses, one-shot and sequential writes, the read
    model.py     Larimar: decoder with gated per-layer key/value rows of the readout; encoder head; prior
    state.py     one memory: M, U, rows (latent, embedding, addressing, provenance); atomic save/load
    lm.py        LarimarLM behind the shared interface (latentmem.api.MemoryModel)
    loading.py   decoder folders / the embedded default, all-MiniLM-L6-v2 from its package
"""

from .config import LarimarConfig
from .lm import LarimarLM, load, model_fingerprint
from .model import Larimar
from .state import LarimarState

__all__ = ["Larimar", "LarimarConfig", "LarimarLM", "LarimarState", "load", "model_fingerprint"]
