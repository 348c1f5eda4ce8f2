"""LongMem (Wang et al., NeurIPS 2023): a frozen backbone writes attention keys/values of one layer
into a chunked memory bank; a SideNet initialised from the backbone retrieves the top chunks for
every token and reads them with joint attention.

    config.py      LongMemConfig: the backbone's fields + memory layer, chunks, retrieval, SideNet shape
    model.py       backbone + SideNet, token-to-chunk retrieval, joint attention, bank entries (write)
    bank.py        one user's bank: chunks, owners, FIFO eviction, exact forget, search, atomic save/load
    lm.py          LongMemLM, LongMem behind the shared interface (latentmem.api.MemoryModel)
    checkpoint.py  a Llama-family folder or the embedded default as backbone, SideNet from its layers
"""

from .bank import LongMemState, read_banks, to_chunks
from .config import LongMemConfig
from .lm import LongMemLM, load, model_fingerprint
from .model import LongMem, chunk_means, joint_attention, memory_attention, top_chunks

__all__ = ["LongMem", "LongMemConfig", "LongMemLM", "LongMemState", "chunk_means", "joint_attention", "load", "memory_attention", "model_fingerprint", "read_banks", "to_chunks", "top_chunks"]
