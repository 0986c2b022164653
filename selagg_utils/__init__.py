"""Helpers for the book "Beyond [cls]": data, backbones, attention statistics, pooling heads, probes."""
import torch

from .errors import SelaggError

# Denormal floats (below about 1e-38) count as zero on the CPU. Probe heads trained at large
# learning rates push softmax weights and optimizer moments into that range, where the CPU is tens
# of times slower; flushed, they are exact zeros. Set at import, before torch starts its worker
# threads, which inherit it (a pool started earlier keeps its threads' setting).
torch.set_flush_denormal(True)

__version__ = "0.1.0"
__all__ = ["SelaggError", "__version__"]
