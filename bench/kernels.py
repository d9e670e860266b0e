"""The fused LoRA linear against the base linear, eager LoRA and torch.compile of eager LoRA.

    python bench/kernels.py [--tokens 1 16 512 4096] [--dim 4096] [--rank 16] [--repeats 20] [--out result.json]

One layer, W (dim, dim), r = rank, bf16 on a GPU (float32 on the CPU, where
the fused op runs its torch fallback and the table shows what that costs).
Per token count: base ``F.linear``; surgeon's ``torch.ops.surgeon.lora_linear``
(the Triton kernels on a GPU); PEFT-style eager LoRA ``linear(x) +
B(A(x)) * s``; ``torch.compile`` of that eager form. Forward, and forward +
backward (W frozen; x, A, B with gradients; against a frozen-weight linear).
Each configuration is timed in turn within every round (so drift hits all
alike), after a warm-up; medians, ratios to the base linear.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512, 4096])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
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
            times = {name: [] for name in runs}
            grad = torch.enable_grad() if kind != "forward" else torch.no_grad()
            with grad:
                for _ in range(3):
                    for fn in runs.values():
                        fn()
                _sync(device)
                for _ in range(args.repeats):
                    for name, fn in runs.items():
                        _sync(device)
                        started = time.perf_counter()
                        fn()
                        _sync(device)
                        times[name].append(time.perf_counter() - started)
            median = {name: statistics.median(t) for name, t in times.items()}
            rows[(tokens, kind)] = median
    print(f"fused LoRA linear, {args.dim}x{args.dim}, r={args.rank}, {dtype}, {device} "
          f"(triton: {triton_mode() or 'no'}; {'kernels' if device.type == 'cuda' and triton_mode() == 'gpu' else 'torch fallback'})")
    names = list(next(iter(rows.values())))
    print(f"{'tokens':>6} {'pass':<17} " + " ".join(f"{n:>26}" for n in names))
    for (tokens, kind), median in rows.items():
        base = median["base linear"]
        print(f"{tokens:>6} {kind:<17} " + " ".join(f"{median[n] * 1e3:12.3f} ms {median[n] / base:6.3f}x" for n in names))
    if args.out:
        args.out.write_text(json.dumps({f"{t}/{k}": v for (t, k), v in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
