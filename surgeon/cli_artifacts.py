"""``surgeon compile``, ``surgeon merge`` and ``surgeon rules-from-peft``: adapter folders read, artifacts written.

Each command parses, calls the API, and prints: which files an output folder
holds is :func:`surgeon.artifacts.write_artifacts`'s to say, and the folder's
safety (a lock, no foreign files, the earlier OUT intact on failure) is
:class:`surgeon.checkpoints.output_folder.OutputFolder`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from surgeon.api import compile as compile_rules
from surgeon.artifacts import write_artifacts
from surgeon.checkpoints.output_folder import OutputFolder
from surgeon.checkpoints.peft_rules import exact_rules_from_folder
from surgeon.cli_common import print_errors, swapped
from surgeon.cli_model import quiet_libraries
from surgeon.diagnostics import SurgeryError
from surgeon.grammar.parse import load_rules
from surgeon.merge_statements import merge_rule_set
from surgeon.portable_rules import rules_text_with_roles

__all__ = ["compile_model", "merge", "rules_from_peft"]


def compile_model(args: argparse.Namespace) -> int:
    """``surgeon compile``: every rule error before any capture, OUT checked before compiling, then the artifacts."""
    if args.rules is None and args.adapter is None:
        print("error: give RULES, or --adapter DIR to take the rules from a PEFT adapter", file=sys.stderr)
        return 2
    if args.requantize and not args.fold:
        print("error: --requantize says how --fold merges quantized weights; add --fold", file=sys.stderr)
        return 2
    if swapped(args.model, args.rules):
        return 2
    quiet_libraries()
    out = Path(args.out)
    human = args.format == "human"
    timings: dict = {}

    def step(name: str, work):
        started = time.perf_counter()
        if human:
            print(f"{name} ...", file=sys.stderr, flush=True)
        result = work()
        timings[name] = round(time.perf_counter() - started, 3)
        return result

    def heard(name: str, seconds: float | None) -> None:
        if seconds is None and human:
            print(f"{name} ...", file=sys.stderr, flush=True)
        elif seconds is not None:
            timings[name] = round(seconds, 3)

    try:
        rules = load_rules(args.rules) if args.rules else None  # every rule error before any capture
        # OUT checked (writable, not another run's, no foreign files) and its staging folder made before compiling.
        with OutputFolder(out, "compile") as folder:
            compiled = step(f"compile {args.model}",
                            lambda: compile_rules(args.model, rules, adapter=args.adapter, kernels=args.kernels))
            written = write_artifacts(compiled, out, fold=args.fold, quantized="requantize" if args.requantize else "dequantize",
                                      folder=folder, on_step=heard)
    except SurgeryError as error:
        return print_errors(error, args.format)
    totals = compiled.plan.totals()
    if not human:
        print(json.dumps({"out": str(out), "files": [str(out / p) for p in written], "totals": totals, "seconds": timings}, indent=2))
        return 0
    for warning in compiled.plan.warnings:
        print(warning.render(), file=sys.stderr)
    print(f"compiled {args.model}: {totals['sites']} adapter sites, {totals['trainable_params']:,} trainable parameters")
    report = compiled.fold_report if args.fold else None
    if report is not None:
        print(f"folded {report['quantized_sites']} quantized sites ({report['quantized']}): outputs differ from the "
              f"unmerged model by max {report['max_abs_output_difference']:.3g}, mean {report['mean_abs_output_difference']:.3g}")
    for name in written:
        print(f"  wrote {out / name}{'/' if name.endswith('/') else ''}")
    return 0


def merge(args: argparse.Namespace) -> int:
    """``surgeon merge``: the new adapters of NEW=TYPE(...) made from the folder's and saved to OUT/NEW/."""
    quiet_libraries()
    out = Path(args.out)
    try:
        rules = merge_rule_set(args.adapters, args.merges)  # objects: the folder's rules are never read as text
        with OutputFolder(out, "merge") as folder:
            compiled = compile_rules(args.model, rules, adapter=args.adapters).eval()
            names = [m.name for m in rules.merges]
            compiled.save_adapter(folder.staging, adapters=names)
            if args.fold:
                for name in names:
                    compiled.set_active(name)
                    compiled.save_pretrained(folder.staging / name / "merged")
            folder.commit()
    except SurgeryError as error:
        return print_errors(error, "human")
    for name in names:
        print(f"merged {name}: {sum(1 for s in compiled.plan.sites if s.adapter == name)} sites; wrote {out / name}/")
        if args.fold:
            print(f"  wrote {out / name / 'merged'}/")
    return 0


def rules_from_peft(args: argparse.Namespace) -> int:
    """``surgeon rules-from-peft``: the folder's rules as text (with ``--roles MODEL``, portable ones)."""
    try:
        # checked rules and their text: surgeon's own folder from its exact record, any other as PEFT reads it
        text, rule_set = exact_rules_from_folder(args.folder)
        if args.roles:
            text = rules_text_with_roles(text, args.roles, rule_set=rule_set)
    except SurgeryError as error:
        return print_errors(error, "human")
    print(text, end="")
    return 0
