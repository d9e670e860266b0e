"""``surgeon check FILE...``: the language alone. This module and everything it imports stay torch-free,
so that checking a file is instant (tests/surgeon/test_cli.py runs it in a fresh process to hold it to that)."""

from __future__ import annotations

import argparse
import json
import sys

from surgeon.diagnostics import SurgeryError
from surgeon.grammar.parse import load_rules

__all__ = ["check"]


def check(args: argparse.Namespace) -> int:
    """Every file parsed and checked; every finding reported. 0 when all are valid, else 1."""
    findings = []
    failed = False
    for name in args.files:
        try:
            rule_set = load_rules(name)
        except SurgeryError as exc:
            failed = True
            findings.append((name, None, exc.diagnostics))
        else:
            findings.append((name, rule_set, list(rule_set.warnings)))

    if args.format == "json":
        print(json.dumps([d.to_json() for _, _, diagnostics in findings for d in diagnostics], indent=2))
        return 1 if failed else 0

    for name, rule_set, diagnostics in findings:
        for d in diagnostics:
            print(d.render(), file=sys.stderr)
        if rule_set is not None:
            adapters = ", ".join(rule_set.adapter_names) or "none"
            rules = len(rule_set)
            print(f"{name}: ok ({rules} rule{'s' if rules != 1 else ''}; adapters: {adapters})")
        else:
            errors = sum(d.is_error for d in diagnostics)
            print(f"{name}: {errors} error{'s' if errors != 1 else ''}", file=sys.stderr)
    return 1 if failed else 0
