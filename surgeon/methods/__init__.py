"""Adapter methods: one module each, all registered in one registry.

Importing this package registers every built-in method: each module of this
folder that is not private and not a ``*_weights`` module is a method config
(``lora.py``, ``dora.py``, ...), so adding a method is adding its files. It
never imports torch at import time, so the language checker can read the
signatures.
"""

import importlib
import pkgutil

from surgeon.methods._registry import SITE_KINDS, get_method, method_names, register_method, signatures

__all__ = ["SITE_KINDS", "register_method", "get_method", "method_names", "signatures"]

_NOT_METHODS = {"adapter", "loftq", "peft_format"}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_") or _info.name.endswith("_weights") or _info.name in _NOT_METHODS:
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
