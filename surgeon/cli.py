"""The ``surgeon`` command line: its arguments, and the dispatch to each command's module.

    surgeon check FILE... [--format human|json]
    surgeon inspect MODEL [--match GLOB] [--format human|json]
    surgeon plan MODEL RULES [--format human|json]
    surgeon compile MODEL [RULES] -o OUT [--adapter DIR] [--fold [--requantize]] [--format human|json]
    surgeon merge MODEL ADAPTERS NEW=TYPE(...)... -o OUT [--fold]
    surgeon rules-from-peft DIR [--roles MODEL]

MODEL is a local Hugging Face folder, a Hub id (org/name[@revision]),
package.module:factory, or demo:NAME (llama, qwen2, gpt2, bert; 4-bit/8-bit: llama-nf4, llama-int8, ...).

Exit codes: 0 when every file is valid, 1 when any has an error, 2 for a
command line that is itself wrong, 130 when interrupted.

The CLI is the top floor and the only one that prints: this module, the
command modules ``cli_check`` (the language alone, no torch), ``cli_model``
(inspect, plan), ``cli_artifacts`` (compile, merge, rules-from-peft), their
shared ``cli_common`` and the renderables of ``_render``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Sequence

from surgeon._version import __version__

__all__ = ["main", "COMMANDS"]

# command -> (module, function). Loaded by name when the command runs: `surgeon check` must stay torch-free and
# instant, and the modules of the other commands import torch (through capture) at their top.
COMMANDS = {
    "check": ("surgeon.cli_check", "check"),
    "inspect": ("surgeon.cli_model", "inspect_model"),
    "plan": ("surgeon.cli_model", "plan"),
    "compile": ("surgeon.cli_artifacts", "compile_model"),
    "merge": ("surgeon.cli_artifacts", "merge"),
    "rules-from-peft": ("surgeon.cli_artifacts", "rules_from_peft"),
}
_MODEL = "folder, org/name[@rev], package.module:factory or demo:NAME"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgeon", description="A declarative model-surgery compiler for PyTorch.")
    parser.add_argument("--version", action="version", version=f"surgeon {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, description: str, model: bool = True, output: bool = True):
        sub = commands.add_parser(name, help=help, description=description)
        if model:
            sub.add_argument("model", metavar="MODEL", help=_MODEL)
        if output:
            sub.add_argument("--format", choices=("human", "json"), default="human", help="output format (default: human)")
        return sub

    check = command("check", "check rules files for errors (no model needed)",
                    "Parse and check .surgery rules files; report every error with its location.", model=False)
    check.add_argument("files", nargs="+", metavar="FILE", help="a .surgery rules file")

    inspect = command("inspect", "list a model's modules: what rules can match",
                      "Capture MODEL (no weights needed) and list its modules: path, type, site kind, weight shape, "
                      "parameters, layer.")
    inspect.add_argument("--match", metavar="GLOB", help='only modules whose path matches GLOB (e.g. "*.self_attn.*")')

    plan = command("plan", "show what RULES will do to MODEL, before any weight is touched",
                   "Resolve RULES against MODEL: every site, its adapter and shapes, the trainable parameters, "
                   "per-layer coverage and the warnings.")
    plan.add_argument("rules", metavar="RULES", help="a .surgery rules file")

    compile_ = command("compile", "adapt MODEL as RULES say and write the artifacts to OUT",
                       "Compile MODEL with RULES (or with the rules of a PEFT adapter, --adapter) and write OUT/plan.json, "
                       "OUT/adapter/ (PEFT format), OUT/program.pt2, and with --fold OUT/merged/ (a Hugging Face "
                       "checkpoint) and OUT/merged.pt2.")
    compile_.add_argument("rules", metavar="RULES", nargs="?", help="a .surgery rules file (optional with --adapter)")
    compile_.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder")
    compile_.add_argument("--adapter", metavar="DIR", help="a PEFT-format adapter folder to load (its rules too, without RULES)")
    compile_.add_argument("--fold", action="store_true", help="also write the merged model: OUT/merged/ and OUT/merged.pt2")
    compile_.add_argument("--requantize", action="store_true",
                          help="with --fold on a bitsandbytes model: quantize the merged weights again (default: full "
                          "precision, no quantization); OUT/fold_report.json gives the error this adds")
    compile_.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto",
                          help="fused ops (auto: Triton kernels on a GPU, their torch path for LoRA on the CPU) or plain torch ops")

    merge = command("merge", "merge adapters into new ones (ties, svd, ...) and save them in PEFT's format",
                    "Load the adapters of ADAPTERS (a folder as save_adapter or PEFT writes it: 'default' at the top, "
                    "named adapters in subfolders), make each NEW = TYPE(ADAPTER=WEIGHT, ..., OPTION=VALUE) as a rules "
                    "file's merge statement would, and write the new adapters to OUT/NEW/.", output=False)
    merge.add_argument("adapters", metavar="ADAPTERS", help="the folder of the adapters to merge")
    merge.add_argument("merges", nargs="+", metavar="NEW=TYPE(...)", help='e.g. "combo=ties(math=0.7, code=0.3, density=0.5)"')
    merge.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder")
    merge.add_argument("--fold", action="store_true", help="also write OUT/NEW/merged/, the model with NEW folded in")

    from_peft = command("rules-from-peft", "print the .surgery rules equivalent to a PEFT adapter_config.json",
                        "Read DIR/adapter_config.json (PEFT LoRA) and print equivalent surgery rules.",
                        model=False, output=False)
    from_peft.add_argument("folder", metavar="DIR", help="a PEFT adapter folder")
    from_peft.add_argument("--roles", metavar="MODEL",
                           help="write role(...) where the targets are whole roles of MODEL (portable rules)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code. Ctrl-C is exit 130 with one line (the output folder stays as it was)."""
    args = _parser().parse_args(argv)
    module, function = COMMANDS[args.command]
    try:
        with warnings.catch_warnings():  # a warning is a line of the command's output, not a source listing
            warnings.showwarning = _show_warning
            return getattr(importlib.import_module(module), function)(args)  # by name: see COMMANDS
    except BrokenPipeError:  # `surgeon check ... | head`
        return 1
    except KeyboardInterrupt:  # an output folder is as it was: see surgeon/checkpoints/output_folder.py
        print("surgeon: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not the user's input: one line, and the traceback only when asked for
        if os.environ.get("SURGEON_TRACEBACK"):
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
