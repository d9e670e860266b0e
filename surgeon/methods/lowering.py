"""Lowering patterns: what a method contributes to the lowering pass (passes/lower.py is the driver).

A pattern is a rewrite rule, as data: ``rewrite(gm, node)`` looks at one node of a graph the insert pass
made and, when the node anchors exactly the branch shape the pattern knows (a method's output joint, or a
site's base op for a chain of branches), replaces that branch by one fused kernel call and returns True;
otherwise it leaves the graph alone and returns False. The driver offers every node of the graph to every
pattern that applies, once, in graph order.

Each pattern says where it applies, so the compiled model decides what to lower without naming a method:
``routed``: the pattern is for routed graphs (an ``adapter_ids`` input) instead of gated ones;
``fallback_pays``: its fused op's torch fallback (no Triton: the CPU) still beats the plain branch, so it
is lowered there too; ``kernel``: the module that registers the op (``torch.export.load`` needs it too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["LoweringPattern"]


@dataclass(frozen=True)
class LoweringPattern:
    name: str  # what it lowers, in words ("lora on a linear -> surgeon::lora_linear")
    method: str  # the method whose branches it rewrites
    rewrite: Callable  # rewrite(gm, node) -> bool
    kernel: str  # the module registering the fused op
    routed: bool = False
    fallback_pays: bool = False
