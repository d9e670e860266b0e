"""The fused LoRA linear against the base linear, eager LoRA and torch.compile of eager LoRA.

    python bench/fused_kernels.py [--tokens 1 16 512 4096] [--dim 4096] [--rank 16] [--repeats 20] [--out result.json]

One layer, W (dim, dim), r = rank, bf16 on a GPU (float32 on the CPU, where
the fused op runs its torch fallback and the table shows what that costs).
Per token count: base ``F.linear``; surgeon's ``torch.ops.surgeon.lora_linear``
(the Triton kernels on a GPU); PEFT-style eager LoRA ``linear(x) +
B(A(x)) * s``; ``torch.compile`` of that eager form. Forward, and forward +
backward (W frozen; x, A, B with gradients; against a frozen-weight linear).
Routed: N in --adapters adapters over --routed-rows rows (round-robin ids),
``surgeon.routed_lora_linear`` against the single-adapter fused op.
Each configuration is timed in turn within every round (so drift hits all
alike), after a warm-up; medians, ratios to the base linear.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import alternate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512, 4096])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--routed-rows", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 8, 32])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from surgeon.kernels import triton_mode
    from surgeon.kernels.lora_linear import lora_linear

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(args.dim, args.dim, generator=g) * 0.02).to(device, dtype)
    a = (torch.randn(args.rank, args.dim, generator=g) * 0.02).to(device, dtype)
    b = (torch.randn(args.dim, args.rank, generator=g) * 0.02).to(device, dtype)
    s = torch.tensor(2.0, device=device)

    def eager(x, a, b):
        return F.linear(x, w) + F.linear(F.linear(x, a), b) * s

    compiled_eager = torch.compile(eager)
    rows = {}
    for tokens in args.tokens:
        x = torch.randn(tokens, args.dim, generator=g).to(device, dtype)
        forward = {
            "base linear": lambda: F.linear(x, w),
            "surgeon fused": lambda: lora_linear(x, w, None, a, b, s),
            "eager LoRA (PEFT-style)": lambda: eager(x, a, b),
            "torch.compile(eager LoRA)": lambda: compiled_eager(x, a, b),
        }
        xg, ag, bg = (t.detach().clone().requires_grad_() for t in (x, a, b))

        def backward(fn):
            def run():
                fn().float().sum().backward()

            return run

        both = {
            "base linear": backward(lambda: F.linear(xg, w)),
            "surgeon fused": backward(lambda: lora_linear(xg, w, None, ag, bg, s)),
            "eager LoRA (PEFT-style)": backward(lambda: eager(xg, ag, bg)),
            "torch.compile(eager LoRA)": backward(lambda: compiled_eager(xg, ag, bg)),
        }
        for kind, runs in (("forward", forward), ("forward+backward", both)):
            with torch.enable_grad() if kind != "forward" else torch.no_grad():
                rows[(tokens, kind)] = alternate(runs, args.repeats, device=device)
    routed_rows = _routed(args, device, dtype, w, g)
    print(f"fused LoRA linear, {args.dim}x{args.dim}, r={args.rank}, {dtype}, {device} "
          f"(triton: {triton_mode() or 'no'}; {'kernels' if device.type == 'cuda' and triton_mode() == 'gpu' else 'torch fallback'})")
    names = list(next(iter(rows.values())))
    print(f"{'tokens':>6} {'pass':<17} " + " ".join(f"{n:>26}" for n in names))
    for (tokens, kind), median in rows.items():
        base = median["base linear"]
        print(f"{tokens:>6} {kind:<17} " + " ".join(f"{median[n] * 1e3:12.3f} ms {median[n] / base:6.3f}x" for n in names))
    print(f"routed forward, rank-{args.rank} adapters, ratio to one adapter (fused op):")
    for (batch, count), (t, single) in routed_rows.items():
        print(f"  {count:>3} adapters in {batch:>4} rows: {t * 1e3:9.3f} ms  {t / single:6.3f}x")
    if args.out:
        result = {f"{t}/{k}": v for (t, k), v in rows.items()}
        result.update({f"routed/{b}/{c}": t for (b, c), (t, _) in routed_rows.items()})
        args.out.write_text(json.dumps(result, indent=2))


def _routed(args, device, dtype, w, g) -> dict:
    """(rows, adapters) -> (routed median, single-adapter median), both through the fused ops."""
    from surgeon.kernels.lora_linear import lora_linear
    from surgeon.kernels.routed_lora import routed_lora_linear, stack_adapters

    results = {}
    for batch in args.routed_rows:
        x = torch.randn(batch, args.dim, generator=g).to(device, dtype)
        for count in args.adapters:
            adapters = [((torch.randn(args.rank, args.dim, generator=g) * 0.02).to(device, dtype),
                         (torch.randn(args.dim, args.rank, generator=g) * 0.02).to(device, dtype), 2.0) for _ in range(count)]
            stacks = stack_adapters(adapters)
            ids = (torch.arange(batch) % count).to(device)
            a, b, _ = adapters[0]
            scale = torch.tensor(2.0, device=device)
            runs = {"routed": lambda: routed_lora_linear(x, w, None, *stacks, ids), "single": lambda: lora_linear(x, w, None, a, b, scale)}
            with torch.no_grad():
                median = alternate(runs, args.repeats, warmup=2, device=device)
            results[(batch, count)] = (median["routed"], median["single"])
    return results


if __name__ == "__main__":
    main()
