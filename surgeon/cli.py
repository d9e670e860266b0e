"""The ``surgeon`` command line. The only module of surgeon that prints.

    surgeon check FILE... [--format human|json]

Exit codes: 0 when every file is valid, 1 when any has an error, 2 for a
command line that is itself wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from surgeon import __version__

    parser = argparse.ArgumentParser(
        prog="surgeon", description="A declarative model-surgery compiler for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"surgeon {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = commands.add_parser(
        "check",
        help="check rules files for errors (no model needed)",
        description="Parse and check .surgery rules files; report every error with its location.",
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="a .surgery rules file")
    check.add_argument("--format", choices=("human", "json"), default="human", help="output format (default: human)")
    check.set_defaults(run=_check)
    return parser


def _check(args: argparse.Namespace) -> int:
    from surgeon.grammar import SurgeryError, load_rules

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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # `surgeon check ... | head`
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
