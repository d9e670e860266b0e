"""Timing shared by the benchmarks: configurations run in turn within every round, medians.

Single-thread timings on this 2-core machine drift by 5-15 % within minutes. A ratio is
best read per round (both configurations ran seconds apart, under the same drift):
``rounds`` keeps every round's time, ``round_ratio`` gives the median of the per-round
ratios with its interquartile range.
"""

from __future__ import annotations

import statistics
import time

import torch


def alternate(runs: dict, repeats: int, warmup: int = 3, device=None) -> dict:
    """name -> median seconds; each round runs every configuration once, so machine drift hits all alike."""
    return {name: statistics.median(t) for name, t in rounds(runs, repeats, warmup, device).items()}


def round_ratio(times: dict, name: str, baseline: str) -> tuple:
    """(median, first quartile, third quartile) of ``name``'s time over ``baseline``'s, round by round."""
    ratios = [a / b for a, b in zip(times[name], times[baseline])]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    low, _, high = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), low, high


def rounds(runs: dict, repeats: int, warmup: int = 3, device=None) -> dict:
    """name -> seconds of every round; each round runs every configuration once."""
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
    return times
