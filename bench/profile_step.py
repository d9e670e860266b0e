"""Where a LoRA training step's time goes, next to the floor's and PEFT's: torch.profiler, op by op.

    python bench/profile_step.py [--size medium] [--steps 3] [--threads 1] [--out FILE]

The same model and step as row 2 of bench/compare_peft.py: surgeon's step,
PEFT's step, and the floor (every weight frozen, backward down to the input
embeddings). Each runs a warm-up step, then ``--steps`` steps under
torch.profiler; the table gives each aten op's self CPU time per step (ms) for
the three, largest first, and the total. What surgeon and PEFT spend beyond the
floor is what the adapters cost; the rows say in which ops.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from compare_peft import _floor, _surgeon_and_peft, _trainer
from forward import SIZES, build


def _profile(step, steps: int) -> dict:
    """aten op -> self CPU milliseconds per step."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm-up: graphs, optimizer state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {e.key: e.self_cpu_time_total / 1000 / steps for e in prof.key_averages() if e.key.startswith("aten::")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base, _, inputs = build(args.size)
    compiled, reference, _, _ = _surgeon_and_peft(base, inputs)
    compiled.train(), reference.train()
    steps = {
        "floor": _floor(base, inputs),
        "surgeon": _trainer(compiled, inputs, [p for p in compiled.parameters() if p.requires_grad]),
        "peft": _trainer(reference, inputs, [p for p in reference.parameters() if p.requires_grad]),
    }
    ops = {name: _profile(step, args.steps) for name, step in steps.items()}
    totals = {name: sum(table.values()) for name, table in ops.items()}
    names = sorted(set().union(*ops.values()), key=lambda k: -max(ops[n].get(k, 0.0) for n in ops))
    print(f"self CPU ms per training step ({args.size}, {args.threads} thread(s), {args.steps} profiled steps each)")
    print(f"{'op':40s} {'floor':>9s} {'surgeon':>9s} {'peft':>9s} {'surgeon-floor':>14s}")
    for name in names[: args.top]:
        row = [ops[n].get(name, 0.0) for n in ("floor", "surgeon", "peft")]
        print(f"{name:40s} {row[0]:9.1f} {row[1]:9.1f} {row[2]:9.1f} {row[1] - row[0]:14.1f}")
    print(f"{'total (every aten op)':40s} {totals['floor']:9.1f} {totals['surgeon']:9.1f} {totals['peft']:9.1f} "
          f"{totals['surgeon'] - totals['floor']:14.1f}")
    print(f"ratios: surgeon / floor {totals['surgeon'] / totals['floor']:.3f}, peft / floor {totals['peft'] / totals['floor']:.3f}")
    if args.out:
        args.out.write_text(json.dumps({"size": args.size, "threads": args.threads, "ms_per_step": ops, "totals": totals}, indent=1))


if __name__ == "__main__":
    main()
