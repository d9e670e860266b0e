"""Check and plan throughput of a large rules file on demo:llama: rules per second.

    python bench/rules_throughput.py [--rules 10000 ...] [--repeats 3] [--threads 1] [--out result.json]

Writes N rules of four kinds, every pattern distinct (so no cache hides the cost of
compiling it) and every rule matching at least one module: globs with alternation,
where clauses (layer lists, not name("...")), regexes, and type/role selectors.
"check" is ``surgeon.grammar.parse`` of the text (scan, LALR parse, IR build, method
checks); "plan" is ``build_plan`` on a model captured once beforehand (selection,
winners, per-rule findings, sites). Each is timed ``--repeats`` times; the table gives
medians. Give several ``--rules`` to see the growth: time per rule should stay flat.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def rules_text(n: int) -> str:
    """``n`` rules, each with a pattern of its own, each matching a module of demo:llama (2 layers)."""
    lines = []
    for i in range(n):
        layer, proj = i % 2, PROJECTIONS[i % len(PROJECTIONS)]
        kind = i % 4
        if kind == 0:
            part, leaf = proj.split(".")
            lines.append(f'match "model.layers.{layer}.{part}.{{{leaf},unused_{i}}}" apply lora(r={1 + i % 16}, alpha=16)')
        elif kind == 1:
            lines.append(f'match "*.{proj}" where layer in [{layer}] and not name("*.unused_{i}") apply lora(r=4)')
        elif kind == 2:
            escaped = proj.replace(".", "\\.")
            lines.append(f'match re"model\\.layers\\.{layer}\\.(?:{escaped}|unused_{i})" apply lora(r=8, dropout=0.1)')
        else:
            lines.append(f"match type(Linear) where layer == {layer} and in_features >= {i % 7} skip" if i % 8 == 3
                         else "match role(attn.q, mlp.up) apply lora(r=2)")
    return "\n".join(lines) + "\n"


def timed(fn, repeats: int) -> tuple:
    """(median seconds, the last result)."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, nargs="+", default=[10_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import surgeon
    from surgeon.grammar import parse
    from surgeon.planning.plan import build_plan

    captured = surgeon.capture_model("demo:llama")
    parse('match "*.q_proj" apply lora(r=8)\n')  # the parser and the method registry, built once
    rows = []
    for n in args.rules:
        text = rules_text(n)
        check_s, rule_set = timed(lambda: parse(text), args.repeats)
        plan_s, plan = timed(lambda: build_plan(rule_set, captured), args.repeats)
        rows.append({"rules": n, "megabytes": len(text) / 1e6, "check_seconds": check_s, "plan_seconds": plan_s,
                     "check_rules_per_second": n / check_s, "plan_rules_per_second": n / plan_s,
                     "sites": len(plan.sites), "warnings": len(plan.warnings)})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"rules throughput on demo:llama ({len(captured.modules)} modules), {args.threads} thread(s), "
          f"median of {args.repeats}; peak RSS {peak:.0f} MB")
    print(f"{'rules':>8} {'MB':>6} {'check s':>8} {'check rules/s':>14} {'plan s':>8} {'plan rules/s':>13} {'sites':>6}")
    for r in rows:
        print(f"{r['rules']:>8} {r['megabytes']:6.2f} {r['check_seconds']:8.2f} {r['check_rules_per_second']:14,.0f} "
              f"{r['plan_seconds']:8.2f} {r['plan_rules_per_second']:13,.0f} {r['sites']:>6}")
    if args.out:
        args.out.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
