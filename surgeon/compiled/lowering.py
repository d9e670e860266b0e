"""Kernel choice: which adapter branches a compiled model's graphs hand to the fused ops (passes/lower.py).

``kernels="triton"`` lowers every site a fused op serves and ``"torch"`` none.
``"auto"`` decides per device type: on a GPU with Triton, every site; on the
CPU, only the sites whose fused op's torch fallback still beats the plain
branch (the patterns that declare ``fallback_pays``: surgeon/methods/lowering.py),
and only in unrouted graphs, unless Triton's interpreter is on (which would run
the kernels themselves on the CPU); elsewhere none.

The choice is made once per device type and remembered: under
``torch.compile``, Dynamo traces the call that asks, and asking Triton about
its driver there would break the graph.
"""

from __future__ import annotations

import enum
import os
import sys

from surgeon.kernels import check_kernels, triton_mode

__all__ = ["Lowering", "KernelChoice"]


class Lowering(enum.Enum):
    """What a graph's lowering pass rewrites to fused op calls."""

    NONE = "none"  # plain aten branches
    EVERY_SITE = "every site"  # every branch a fused op serves (and the routed op in routed graphs)
    WHERE_FALLBACK_PAYS = "where the fallback pays"  # the CPU: unrouted graphs, the sites whose op's torch path is faster

    def __bool__(self) -> bool:
        return self is not Lowering.NONE

    @classmethod
    def of(cls, value) -> "Lowering":
        """A Lowering from a user's ``lowered=`` (True: every site, False: none) or a Lowering."""
        if isinstance(value, Lowering):
            return value
        return cls.EVERY_SITE if value else cls.NONE


class KernelChoice:
    """``kernels`` ("auto", "triton" or "torch", checked) and what it lowers on each device type, remembered."""

    def __init__(self, kernels: str = "auto"):
        self.kernels = check_kernels(kernels)
        self._by_device: dict = {}

    def lowering(self, device: str) -> Lowering:
        """What graphs of a model whose parameters are on ``device`` (a device type: "cpu", "cuda") lower."""
        if self.kernels != "auto":
            return Lowering.EVERY_SITE if self.kernels == "triton" else Lowering.NONE
        if device not in self._by_device:
            self._by_device[device] = _auto(device)
        return self._by_device[device]


def _auto(device: str) -> Lowering:
    if device == "cpu":
        return Lowering.NONE if _interpreting() else Lowering.WHERE_FALLBACK_PAYS
    return Lowering.EVERY_SITE if device == "cuda" and triton_mode() == "gpu" else Lowering.NONE


def _interpreting() -> bool:
    """Is Triton's interpreter on (which would run the fused kernels on the CPU)? Asked without importing Triton."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return "triton" in sys.modules and triton_mode() == "interpret"
