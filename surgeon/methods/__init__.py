"""Adapter methods: one folder each, all registered in one registry.

Importing this package registers every built-in method: each folder of this package that is not
private (``lora/``, ``dora/``, ...) is a method, whose ``__init__`` imports its torch-free config, which
registers it (surgeon/methods/_registry.py); so adding a method is adding its folder. It never imports
torch at import time, so the language checker can read the signatures. The torch side of each method
(its SiteAdapter, its lowering patterns) is imported on first use, through the registry.

Shared by the methods: adapter.py (the SiteAdapter base and what the rest of surgeon asks of a site's
adapter), peft_format.py (PEFT's format), node_roles.py (the roles of the graph nodes branches add),
lowering.py (the lowering pattern record), _lycoris.py (LoHa's and LoKr's dropouts).
"""

import importlib
import pkgutil

from surgeon.methods._registry import (
    SITE_KINDS,
    Method,
    adapter_class,
    get_method,
    low_rank_call,
    low_rank_method,
    lowering_patterns,
    method_for,
    method_names,
    peft_format_of,
    peft_reader,
    register_method,
    registered_methods,
    signatures,
)

__all__ = [
    "SITE_KINDS", "Method", "register_method", "method_for", "registered_methods", "get_method", "method_names",
    "signatures", "adapter_class", "peft_format_of", "peft_reader", "lowering_patterns", "low_rank_method", "low_rank_call",
]

# Every folder is a method: found by name, so that a new method is a new folder and nothing else.
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.ispkg or _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
