"""What every command prints the same way: a SurgeryError's diagnostics, and a MODEL and RULES given in the
wrong order. Torch-free, as ``surgeon check`` is."""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["print_errors", "swapped"]


def print_errors(error, fmt: str) -> int:
    """``error``'s diagnostics: rendered on stderr, or as one JSON list on stdout. The exit code, 1."""
    if fmt == "json":
        print(json.dumps([d.to_json() for d in error.diagnostics], indent=2))
    else:
        for d in error.diagnostics:
            print(d.render(), file=sys.stderr)
    return 1


def swapped(model: str, rules: str | None) -> int:
    """Exit code 2 with a hint when MODEL and RULES look swapped, else 0."""
    if rules and not Path(rules).exists() and model.endswith(".surgery"):
        print(
            f"error: RULES '{rules}' is not a file, and MODEL '{model}' looks like a rules file\n"
            "hint: the model comes first: surgeon COMMAND MODEL RULES",
            file=sys.stderr,
        )
        return 2
    return 0
