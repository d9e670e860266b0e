"""Routed multi-adapter forward: a mixed batch against one adapter and against the base model, same run.

    python bench/routed.py [--size small|medium] [--repeats 15] [--threads 2] [--out result.json]

Model as bench/forward.py (medium: hidden 1024, 4 layers, batch 4 x seq 128,
float32 CPU, eval, no grad). Two LoRA adapters on q and v: "a" r=8, "b" r=16,
non-zero weights. Configurations, timed in turn within each round after a
warm-up: the base model's graph; one adapter active (b, the larger); both
adapters active (their sum, one graph); and a routed batch, adapter_ids
[0, 1, 0, 1] (each adapter computed over the whole batch and masked per row,
so its cost is the sum of the adapters' costs). Medians and ratios.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _timing import alternate
from forward import SIZES, build

RULES = """\
adapter "a" {
  match "*.self_attn.{q,v}_proj" apply lora(r=8, alpha=16)
}
adapter "b" {
  match "*.self_attn.{q,v}_proj" apply lora(r=16, alpha=16)
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import surgeon

    base, _, inputs = build(args.size)
    compiled = surgeon.compile(base, RULES, example_inputs=inputs).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, _, w in compiled.sites():
            w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=generator) * 0.01)
    batch = inputs["input_ids"].shape[0]
    ids = torch.tensor([i % 2 for i in range(batch)])
    base_graph = compiled.base_graph(**inputs)
    graph = compiled.graph(**inputs)
    routed = compiled.graph(**inputs, adapter_ids=ids)

    def active(names):
        def run():
            compiled.set_gates({n: 1.0 for n in names})
            return graph(**inputs)

        return run

    runs = {
        "base graph": lambda: base_graph(**inputs),
        "one adapter (b, r=16)": active(["b"]),
        "both adapters summed": active(["a", "b"]),
        "routed batch (a, b, a, b)": lambda: routed(**inputs, adapter_ids=ids),
    }
    with torch.no_grad():
        median = alternate(runs, args.repeats)
    base_t, single_t = median["base graph"], median["one adapter (b, r=16)"]
    print(f"routed forward, {args.size} Llama, batch {batch} x seq {inputs['input_ids'].shape[1]}, "
          f"{args.threads} threads, {args.repeats} rounds")
    print(f"{'configuration':<28} {'median ms':>10} {'/ base':>8} {'/ one adapter':>14}")
    for name, t in median.items():
        print(f"{name:<28} {t * 1e3:10.2f} {t / base_t:8.3f} {t / single_t:14.3f}")
    if args.out:
        args.out.write_text(json.dumps({"size": args.size, "threads": args.threads, "median_seconds": median}, indent=2))


if __name__ == "__main__":
    main()
