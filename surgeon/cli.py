"""The ``surgeon`` command line. The only module of surgeon that prints.

    surgeon check FILE... [--format human|json]
    surgeon inspect MODEL [--match GLOB] [--format human|json]
    surgeon plan MODEL RULES [--format human|json]
    surgeon compile MODEL [RULES] -o OUT [--adapter DIR] [--fold [--requantize]] [--format human|json]
    surgeon rules-from-peft DIR [--roles MODEL]

MODEL is a local Hugging Face folder, a Hub id (org/name[@revision]),
package.module:factory, or demo:NAME (llama, qwen2, gpt2, bert; 4-bit/8-bit: llama-nf4, llama-int8, ...).

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

    def command(name: str, run, help: str, description: str, model: bool = True):
        sub = commands.add_parser(name, help=help, description=description)
        if model:
            sub.add_argument("model", metavar="MODEL", help="folder, org/name[@rev], package.module:factory or demo:NAME")
        sub.set_defaults(run=run)
        return sub

    def output_format(sub) -> None:
        sub.add_argument("--format", choices=("human", "json"), default="human", help="output format (default: human)")

    check = command(
        "check",
        _check,
        "check rules files for errors (no model needed)",
        "Parse and check .surgery rules files; report every error with its location.",
        model=False,
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="a .surgery rules file")
    output_format(check)

    inspect = command(
        "inspect",
        _inspect,
        "list a model's modules: what rules can match",
        "Capture MODEL (no weights needed) and list its modules: path, type, site kind, weight shape, parameters, layer.",
    )
    inspect.add_argument("--match", metavar="GLOB", help='only modules whose path matches GLOB (e.g. "*.self_attn.*")')
    output_format(inspect)

    plan = command(
        "plan",
        _plan,
        "show what RULES will do to MODEL, before any weight is touched",
        "Resolve RULES against MODEL: every site, its adapter and shapes, the trainable parameters, "
        "per-layer coverage and the warnings.",
    )
    plan.add_argument("rules", metavar="RULES", help="a .surgery rules file")
    output_format(plan)

    compile_ = command(
        "compile",
        _compile,
        "adapt MODEL as RULES say and write the artifacts to OUT",
        "Compile MODEL with RULES (or with the rules of a PEFT adapter, --adapter) and write OUT/plan.json, "
        "OUT/adapter/ (PEFT format), OUT/program.pt2, and with --fold OUT/merged/ (a Hugging Face checkpoint) "
        "and OUT/merged.pt2.",
    )
    compile_.add_argument("rules", metavar="RULES", nargs="?", help="a .surgery rules file (optional with --adapter)")
    compile_.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder")
    compile_.add_argument("--adapter", metavar="DIR", help="a PEFT-format adapter folder to load (its rules too, without RULES)")
    compile_.add_argument("--fold", action="store_true", help="also write the merged model: OUT/merged/ and OUT/merged.pt2")
    compile_.add_argument("--requantize", action="store_true",
                          help="with --fold on a bitsandbytes model: quantize the merged weights again (default: full "
                          "precision, no quantization); OUT/fold_report.json gives the error this adds")
    compile_.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto",
                          help="fused ops (auto: Triton kernels on a GPU, their torch path for LoRA on the CPU) or plain torch ops")
    output_format(compile_)

    merge = command(
        "merge",
        _merge,
        "merge adapters into new ones (ties, svd, ...) and save them in PEFT's format",
        "Load the adapters of ADAPTERS (a folder as save_adapter or PEFT writes it: 'default' at the top, named "
        "adapters in subfolders), make each NEW = TYPE(ADAPTER=WEIGHT, ..., OPTION=VALUE) as a rules file's merge "
        "statement would, and write the new adapters to OUT/NEW/.",
    )
    merge.add_argument("adapters", metavar="ADAPTERS", help="the folder of the adapters to merge")
    merge.add_argument("merges", nargs="+", metavar="NEW=TYPE(...)", help='e.g. "combo=ties(math=0.7, code=0.3, density=0.5)"')
    merge.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder")
    merge.add_argument("--fold", action="store_true", help="also write OUT/NEW/merged/, the model with NEW folded in")

    from_peft = command(
        "rules-from-peft",
        _rules_from_peft,
        "print the .surgery rules equivalent to a PEFT adapter_config.json",
        "Read DIR/adapter_config.json (PEFT LoRA) and print equivalent surgery rules.",
        model=False,
    )
    from_peft.add_argument("folder", metavar="DIR", help="a PEFT adapter folder")
    from_peft.add_argument("--roles", metavar="MODEL", help="write role(...) where the targets are whole roles of MODEL (portable rules)")
    return parser


def _print_errors(error, fmt: str) -> int:
    if fmt == "json":
        print(json.dumps([d.to_json() for d in error.diagnostics], indent=2))
    else:
        for d in error.diagnostics:
            print(d.render(), file=sys.stderr)
    return 1


def _quiet_libraries() -> None:
    """transformers' and huggingface_hub's progress bars and advice are noise on this command line."""
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()


def _swapped(model: str, rules: str | None) -> int:
    """Exit code 2 with a hint when MODEL and RULES look swapped, else 0."""
    from pathlib import Path

    if rules and not Path(rules).exists() and model.endswith(".surgery"):
        print(
            f"error: RULES '{rules}' is not a file, and MODEL '{model}' looks like a rules file\n"
            "hint: the model comes first: surgeon COMMAND MODEL RULES",
            file=sys.stderr,
        )
        return 2
    return 0


def _capturing(name: str):
    """A spinner on a terminal while the model is captured; nothing otherwise."""
    import contextlib

    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(f"capturing {name} ...")


def _inspect(args: argparse.Namespace) -> int:
    from surgeon.api import capture_model
    from surgeon.grammar import SurgeryError
    from surgeon.grammar.glob import GlobError, compile_glob

    _quiet_libraries()
    try:
        pattern = compile_glob(args.match) if args.match else None
    except GlobError as exc:
        print(f"error: bad --match glob: {exc.message}", file=sys.stderr)
        return 1
    try:
        with _capturing(args.model):
            captured = capture_model(args.model)
    except SurgeryError as error:
        return _print_errors(error, args.format)
    paths = [p for p in captured.modules if pattern is None or pattern.fullmatch(p)]
    if args.format == "json":
        from surgeon.cli_inspect import inspect_json

        print(json.dumps(inspect_json(captured, paths), indent=2))
        return 0
    from rich.console import Console

    from surgeon._render import inspect_table

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


def _plan(args: argparse.Namespace) -> int:
    from surgeon.api import capture_model
    from surgeon.grammar import SurgeryError, load_rules
    from surgeon.planning.plan import build_plan

    if _swapped(args.model, args.rules):
        return 2
    _quiet_libraries()
    try:
        rule_set = load_rules(args.rules)  # all rule errors before any capture
        with _capturing(args.model):
            captured = capture_model(args.model)
        plan = build_plan(rule_set, captured)
    except SurgeryError as error:
        return _print_errors(error, args.format)
    if args.format == "json":
        print(json.dumps(plan.to_json(), indent=2))
        return 0
    from rich.console import Console

    from surgeon._render import plan_tables

    console = Console(width=160)
    for renderable in plan_tables(plan):
        console.print(renderable)
        console.print()
    for warning in plan.warnings:
        print(warning.render(), file=sys.stderr)
    return 0


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


def _compile(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from surgeon.grammar import SurgeryError

    if args.rules is None and args.adapter is None:
        print("error: give RULES, or --adapter DIR to take the rules from a PEFT adapter", file=sys.stderr)
        return 2
    if args.requantize and not args.fold:
        print("error: --requantize says how --fold merges quantized weights; add --fold", file=sys.stderr)
        return 2
    if _swapped(args.model, args.rules):
        return 2
    _quiet_libraries()
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
        import surgeon
        from surgeon.artifacts import write_artifacts
        from surgeon.checkpoints.output_folder import OutputFolder
        from surgeon.grammar import load_rules

        rules = load_rules(args.rules) if args.rules else None  # every rule error before any capture
        # OUT checked (writable, not another run's, no foreign files) and its staging folder made before compiling.
        with OutputFolder(out, "compile") as folder:
            compiled = step(
                f"compile {args.model}", lambda: surgeon.compile(args.model, rules, adapter=args.adapter, kernels=args.kernels)
            )
            written = write_artifacts(compiled, out, fold=args.fold, quantized="requantize" if args.requantize else "dequantize",
                                      folder=folder, on_step=heard)
    except SurgeryError as error:
        return _print_errors(error, args.format)
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


def _merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from surgeon.grammar import SurgeryError

    _quiet_libraries()
    out = Path(args.out)
    try:
        import surgeon
        from surgeon.checkpoints.output_folder import OutputFolder
        from surgeon.merge_statements import merge_rule_set

        rules = merge_rule_set(args.adapters, args.merges)  # objects: the folder's rules are never read as text
        with OutputFolder(out, "merge") as folder:
            compiled = surgeon.compile(args.model, rules, adapter=args.adapters).eval()
            names = [m.name for m in rules.merges]
            compiled.save_adapter(folder.staging, adapters=names)
            if args.fold:
                for name in names:
                    compiled.set_active(name)
                    compiled.save_pretrained(folder.staging / name / "merged")
            folder.commit()
    except SurgeryError as error:
        return _print_errors(error, "human")
    for name in names:
        print(f"merged {name}: {sum(1 for s in compiled.plan.sites if s.adapter == name)} sites; wrote {out / name}/")
        if args.fold:
            print(f"  wrote {out / name / 'merged'}/")
    return 0


def _rules_from_peft(args: argparse.Namespace) -> int:
    from surgeon.checkpoints.peft import exact_rules_from_folder
    from surgeon.grammar import SurgeryError

    try:
        # checked rules and their text: surgeon's own folder from its exact record, any other as PEFT reads it
        text, rule_set = exact_rules_from_folder(args.folder)
        if args.roles:
            from surgeon.role_rules import rules_text_with_roles

            text = rules_text_with_roles(text, args.roles, rule_set=rule_set)
    except SurgeryError as error:
        return _print_errors(error, "human")
    print(text, end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code. Ctrl-C is exit 130 with one line (the output folder stays as it was)."""
    import warnings

    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # a warning is a line of the command's output, not a source listing
            warnings.showwarning = _show_warning
            return args.run(args)
    except BrokenPipeError:  # `surgeon check ... | head`
        return 1
    except KeyboardInterrupt:  # an output folder is as it was: see surgeon/checkpoints/output_folder.py
        print("surgeon: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not the user's input: one line, and the traceback only when asked for
        if __import__("os").environ.get("SURGEON_TRACEBACK"):
            raise
        print(f"error: internal error in surgeon {args.command}: {type(exc).__name__}: {_first_line(exc)}\n"
              "hint: please report it; SURGEON_TRACEBACK=1 shows the traceback", file=sys.stderr)
        return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
