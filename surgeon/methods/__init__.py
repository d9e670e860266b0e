"""Adapter methods: one module each, all registered in one registry.

Importing this package registers every built-in method. It never imports
torch at import time, so the language checker can read the signatures.
"""

from ._registry import SITE_KINDS, get_method, method_names, register_method, signatures
from .dora import DoraConfig
from .ia3 import Ia3Config
from .loha import LohaConfig
from .lokr import LokrConfig
from .lora import LoraConfig

__all__ = ["SITE_KINDS", "register_method", "get_method", "method_names", "signatures", "LoraConfig", "DoraConfig", "Ia3Config", "LohaConfig", "LokrConfig"]
