"""cebench: which cross-entropy implementation to use for this model shape on this GPU, and is it correct?

The public plugin contract is `cebench.register` (see cebench/registry.py).
"""

from cebench.registry import Impl, RegistryError, register

__all__ = ["Impl", "RegistryError", "register"]
__version__ = "0.1.0"
