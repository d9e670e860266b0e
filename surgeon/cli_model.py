"""``surgeon inspect MODEL`` and ``surgeon plan MODEL RULES``: a model captured (no weights needed), and what
rules would do to it, before any weight is touched."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import transformers
from huggingface_hub.utils import disable_progress_bars
from rich.console import Console

from surgeon._render import WEIGHT_LAYOUTS, inspect_table, plan_tables
from surgeon.api import capture_model
from surgeon.cli_common import print_errors, swapped
from surgeon.diagnostics import SurgeryError
from surgeon.grammar.glob import GlobError, compile_glob
from surgeon.grammar.parse import load_rules
from surgeon.planning.plan import build_plan

__all__ = ["inspect_model", "plan", "inspect_json", "quiet_libraries", "capturing"]


def quiet_libraries() -> None:
    """transformers' and huggingface_hub's progress bars and advice are noise on this command line."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()


def capturing(name: str):
    """A spinner on a terminal while the model is captured; nothing otherwise."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    return Console(stderr=True).status(f"capturing {name} ...")


def inspect_model(args: argparse.Namespace) -> int:
    """``surgeon inspect``: the model's modules (those matching ``--match``), as a table or JSON."""
    quiet_libraries()
    try:
        pattern = compile_glob(args.match) if args.match else None
    except GlobError as exc:
        print(f"error: bad --match glob: {exc.message}", file=sys.stderr)
        return 1
    try:
        with capturing(args.model):
            captured = capture_model(args.model)
    except SurgeryError as error:
        return print_errors(error, args.format)
    paths = [p for p in captured.modules if pattern is None or pattern.fullmatch(p)]
    if args.format == "json":
        print(json.dumps(inspect_json(captured, paths), indent=2))
        return 0
    console = Console(width=160)
    console.print(inspect_table(captured, paths))
    kinds: dict = {}
    for site in captured.sites.values():
        kinds[site.kind] = kinds.get(site.kind, 0) + 1
    summary = ", ".join(f"{k}: {n}" for k, n in kinds.items())
    console.print(
        f"{len(paths)} of {len(captured.modules)} modules shown; {len(captured.sites)} adaptable sites ({summary}); "
        f"{captured.total_params:,} parameters; captured in {captured.seconds:.1f} s"
        f"{' (from the capture cache)' if captured.cached else ''}"
    )
    for group in captured.ties:
        console.print(f"tied: {' = '.join(group)}")
    return 0


def plan(args: argparse.Namespace) -> int:
    """``surgeon plan``: every rule error first (before any capture), then the plan as tables or JSON."""
    if swapped(args.model, args.rules):
        return 2
    quiet_libraries()
    try:
        rule_set = load_rules(args.rules)  # all rule errors before any capture
        with capturing(args.model):
            captured = capture_model(args.model)
        planned = build_plan(rule_set, captured)
    except SurgeryError as error:
        return print_errors(error, args.format)
    if args.format == "json":
        print(json.dumps(planned.to_json(), indent=2))
        return 0
    console = Console(width=160)
    for renderable in plan_tables(planned):
        console.print(renderable)
        console.print()
    for warning in planned.warnings:
        print(warning.render(), file=sys.stderr)
    return 0


def inspect_json(captured, paths) -> dict:
    """The record ``surgeon inspect --format json`` prints: the model, each module in ``paths``, the ties."""
    modules = []
    for path in paths:
        info = captured.modules[path]
        site = captured.sites.get(path)
        modules.append(
            {
                "path": path,
                "type": info.type_name,
                "site": site.kind if site else None,
                "role": info.role,
                "weight_shape": list(info.weight_shape) if info.weight_shape else None,
                "weight_layout": WEIGHT_LAYOUTS.get(site.kind) if site else None,  # Conv1D's is (in, out)
                "params": info.params,
                "layer": info.layer,
                "in_features": info.in_features,
                "out_features": info.out_features,
                "tied_with": list(site.tied_with) if site else [],
                "quantization": info.quantization,
            }
        )
    return {
        "model": {"name": captured.opened.name, "class": type(captured.opened.module).__name__},
        "modules": modules,
        "ties": [list(g) for g in captured.ties],
        "total_params": captured.total_params,
        "capture_seconds": round(captured.seconds, 3),
        "capture_cached": captured.cached,
    }
