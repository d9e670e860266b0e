"""Timing shared by the benchmarks: configurations run in turn within every round, medians."""

from __future__ import annotations

import statistics
import time

import torch


def alternate(runs: dict, repeats: int, warmup: int = 3, device=None) -> dict:
    """name -> median seconds; each round runs every configuration once, so machine drift hits all alike."""
    sync = torch.cuda.synchronize if device is not None and torch.device(device).type == "cuda" else (lambda: None)
    times = {name: [] for name in runs}
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    sync()
    for _ in range(repeats):
        for name, fn in runs.items():
            sync()
            started = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}
