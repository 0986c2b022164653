"""Helpers for the book "Beyond [cls]": data, backbones, attention statistics, pooling heads, probes."""
from .checks import SelaggError

__version__ = "0.1.0"
__all__ = ["SelaggError", "__version__"]
