"""surgeon: a declarative model-surgery compiler for PyTorch.

text -> rules (``surgeon.grammar``) -> graph (``surgeon.capture``) -> plan
(``surgeon.planning``) -> passes (``surgeon.passes``, with ``surgeon.kernels``)
-> the compiled model (``surgeon.compiled``) -> artifacts (``surgeon.checkpoints``).

This module is the public face, above every floor (docs/architecture.md). Importing
``surgeon`` is cheap and never imports torch: it registers the built-in methods
(torch-free) and loads each name below from its module on first use, so
``surgeon check`` stays instant.
"""

from __future__ import annotations

import importlib

# The built-in methods register their signatures with the language (torch-free, so this stays cheap).
import surgeon.methods  # noqa: F401
from surgeon._version import __version__

# public name -> the module that defines it (imported on first use, by name: the face sits above every floor)
_EXPORTS = {
    "parse": "surgeon.grammar.parse",
    "load_rules": "surgeon.grammar.parse",
    "RuleSet": "surgeon.grammar.rules",
    "Rule": "surgeon.grammar.rules",
    "Diagnostic": "surgeon.diagnostics",
    "SurgeryError": "surgeon.diagnostics",
    "RulesError": "surgeon.diagnostics",
    "ModelError": "surgeon.diagnostics",
    "PlanError": "surgeon.diagnostics",
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
