"""Plan a 7B-shaped Llama without its weights: peak memory and time, in fresh processes.

    python bench/plan_7b.py [--layers 32] [--out result.json]

Writes a config.json (Llama-2-7B's shapes: 32 layers, hidden 4096, MLP 11008,
vocab 32000) into a temporary folder and runs ``surgeon plan`` on it in a fresh
process, next to a baseline process that only imports torch and transformers,
then plans again in another fresh process, which finds the first one's capture
in the capture cache (a new cache folder per run, so the first plan is cold).
Reports each one's peak resident memory (ru_maxrss) and wall time; the bound
from the capture issue is 1.5 GB for the planning process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RULES = 'match "*.self_attn.{q,k,v,o}_proj" apply lora(r=16, alpha=32)\nmatch "*.mlp.*_proj" where layer >= 16 apply lora(r=8)\n'
BOUND_BYTES = 1.5 * 2**30

CHILD = """
import json, resource, sys, time
started = time.perf_counter()
import torch, transformers
imported = time.perf_counter()
if sys.argv[1] == "plan":
    import surgeon
    import surgeon.api, surgeon.capture.captured
    spent = {"open": 0.0, "export": 0.0, "roles": 0.0}

    def timed(module, name, key):  # how much of planning is torch.export, and how much surgeon's own analysis
        fn = getattr(module, name)

        def inner(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t

        setattr(module, name, inner)

    timed(surgeon.api, "open_model", "open")
    timed(surgeon.capture.captured, "export_program", "export")
    timed(surgeon.capture.captured, "_with_roles", "roles")
    t = time.perf_counter()
    plan = surgeon.api.plan(sys.argv[2], sys.argv[3])
    planning = time.perf_counter() - t
    result = {"sites": len(plan.sites), "trainable_params": plan.trainable_params, "total_params": plan.total_params,
              "capture_seconds": plan.capture_seconds, "planning_seconds": planning, "open_seconds": spent["open"],
              "export_seconds": spent["export"], "roles_seconds": spent["roles"],
              "surgeon_own_seconds": planning - spent["open"] - spent["export"]}
else:
    result = {}
result["import_seconds"] = imported - started
result["seconds"] = time.perf_counter() - started
result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(result))
"""


def run(cache: str, *args: str) -> dict:
    """The child's result; ``cache``: its capture-cache folder (this run's own, so the first plan is cold)."""
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True,
                          env={**os.environ, "SURGEON_CACHE_DIR": cache})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from transformers import LlamaConfig

    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "cache")
        folder = Path(tmp) / "llama-7b-shaped"
        LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=args.layers,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            architectures=["LlamaForCausalLM"],
        ).save_pretrained(folder)
        rules = Path(tmp) / "rules.surgery"
        rules.write_text(RULES)
        baseline = run(cache, "baseline")
        planned = run(cache, "plan", str(folder), str(rules))
        warm = run(cache, "plan", str(folder), str(rules))  # the capture cache holds the first plan's capture
    fp32_weights = planned["total_params"] * 4
    result = {
        "layers": args.layers,
        "baseline_import": baseline,
        "plan": planned,
        "plan_warm": warm,
        "plan_rss_over_import_rss": planned["max_rss_bytes"] / baseline["max_rss_bytes"],
        "plan_rss_over_fp32_weights": planned["max_rss_bytes"] / fp32_weights,
        "within_bound": planned["max_rss_bytes"] < BOUND_BYTES,
    }
    gib = 2**30
    print(f"7B-shaped Llama ({args.layers} layers, {planned['total_params'] / 1e9:.2f}B parameters) planned from config.json alone")
    print(f"  import torch+transformers only : {baseline['max_rss_bytes'] / gib:6.2f} GiB peak RSS, {baseline['seconds']:5.1f} s")
    print(f"  surgeon plan (fake tensors)    : {planned['max_rss_bytes'] / gib:6.2f} GiB peak RSS, {planned['seconds']:5.1f} s "
          f"(capture {planned['capture_seconds']:.1f} s), {planned['sites']} sites")
    print(f"  planning {planned['planning_seconds']:.1f} s: open (fake weights) {planned['open_seconds']:.1f} s, torch.export "
          f"{planned['export_seconds']:.1f} s, surgeon's own analysis {planned['surgeon_own_seconds']:.1f} s "
          f"(roles {planned['roles_seconds']:.1f} s)")
    print(f"  the same plan again (warm)     : {warm['max_rss_bytes'] / gib:6.2f} GiB peak RSS, {warm['seconds']:5.1f} s "
          f"(capture {warm['capture_seconds']:.1f} s from the capture cache; open {warm['open_seconds']:.1f} s)")
    print(f"  ratio plan / import floor      : {result['plan_rss_over_import_rss']:.2f}")
    print(f"  ratio plan / fp32 weights      : {result['plan_rss_over_fp32_weights']:.4f} (the weights would be {fp32_weights / gib:.1f} GiB)")
    print(f"  bound 1.5 GiB                  : {'met' if result['within_bound'] else 'MISSED'}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
