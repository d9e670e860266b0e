"""The one rule for adapter names, wherever a name enters: rules files, the API, the CLI, folders on disk.

An adapter's name becomes a folder name when it is saved (PEFT puts an adapter
not named "default" in a subfolder of that name), so a name is a single path
component that every filesystem accepts: letters, digits, ``_`` and ``-``,
starting with a letter, digit or ``_`` (never a separator, never ``..``), at
most 100 characters. No ``.``: an adapter's modules are kept in a
``torch.nn.ModuleDict`` under its name, and torch refuses dotted keys (PEFT's
adapter names have the same limit).
"""

from __future__ import annotations

import json
import re

from surgeon.diagnostics import SurgeryError

__all__ = ["ADAPTER_NAME", "NAME_HINT", "name_problem", "checked_name"]

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,99}")
NAME_HINT = "use letters, digits, '_' and '-', at most 100 (the name becomes a folder name when saved)"


def name_problem(name) -> str | None:
    """Why ``name`` is not an adapter name, or None when it is one."""
    if not isinstance(name, str):
        return f"an adapter name is a string, not {type(name).__name__}"
    if not ADAPTER_NAME.fullmatch(name):
        return f"adapter name {_shown(name)} is not valid"
    return None


def checked_name(name, where: str = "") -> str:
    """``name``, or a SurgeryError saying why it cannot name an adapter (``where``: what gave it, e.g. a path)."""
    problem = name_problem(name)
    if problem is not None:
        raise SurgeryError(f"{where}: {problem}" if where else problem, hint=NAME_HINT)
    return name


def _shown(name: str) -> str:
    text = json.dumps(name)  # quoted as in a rules file, control characters escaped
    return text if len(text) <= 60 else text[:56] + '..."'
