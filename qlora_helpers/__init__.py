"""Helpers shared by the QLoRA course notebooks.

Every module is small and named by what it does (``assets``, ``models``, ``runner`` ...).
Nothing happens at import time: heavy libraries (torch, transformers, bitsandbytes) are
imported inside the functions that need them, so ``import qlora_helpers`` is instant and
safe before ``accelerate.notebook_launcher``.
"""

__version__ = "0.1.0"
