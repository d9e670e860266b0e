"""surgeon: a declarative model-surgery compiler for PyTorch.

text -> rules (``surgeon.grammar``) -> graph -> passes (``surgeon.passes``)
-> kernels (``surgeon.kernels``) -> artifacts.

Importing ``surgeon`` is cheap and never imports torch: the names below are
loaded on first use, so ``surgeon check`` stays instant.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# The built-in methods register their signatures with the language (torch-free, so this stays cheap).
import surgeon.methods  # noqa: E402,F401

# public name -> module that defines it (loaded lazily)
_EXPORTS = {
    "parse": "surgeon.grammar",
    "load_rules": "surgeon.grammar",
    "RuleSet": "surgeon.grammar",
    "Rule": "surgeon.grammar",
    "Diagnostic": "surgeon.grammar",
    "SurgeryError": "surgeon.grammar",
    "RulesError": "surgeon.grammar",
    "ModelError": "surgeon.grammar",
    "PlanError": "surgeon.grammar",
    "register_method": "surgeon.methods",
    "method_names": "surgeon.methods",
    "plan": "surgeon.api",
    "compile": "surgeon.api",
    "capture_model": "surgeon.api",
    "open_model": "surgeon.capture.models",
    "Plan": "surgeon.planning.plan",
    "write_artifacts": "surgeon.artifacts",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'surgeon' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
