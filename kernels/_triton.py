"""Is Triton usable here, and how: on a GPU, as its CPU interpreter, or not at all."""

from __future__ import annotations

import functools
import os

from surgeon.diagnostics import SurgeryError

__all__ = ["triton_mode", "TritonMissing", "KERNELS", "check_kernels"]


class TritonMissing(RuntimeError):
    """Triton kernels were asked for where Triton cannot run."""


@functools.lru_cache(maxsize=None)
def triton_mode() -> str | None:
    """"gpu", "interpret" (TRITON_INTERPRET=1 was set before Triton was imported), or None.

    The interpreter is checked first: the driver query raises on a machine
    without a GPU even when the interpreter is on.
    """
    try:
        import triton
    except ImportError:
        return None
    try:
        if triton.knobs.runtime.interpret:
            return "interpret"
    except AttributeError:  # pragma: no cover - older Triton
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "interpret"
    try:
        triton.runtime.driver.active  # noqa: B018 - raises without an active GPU driver
    except Exception:
        return None
    return "gpu"


KERNELS = ("auto", "triton", "torch")


def check_kernels(kernels: str) -> str:
    """``kernels`` itself when it is one of KERNELS and can run here; a SurgeryError otherwise."""
    if kernels not in KERNELS:
        raise SurgeryError(f"kernels={kernels!r} is not one of {', '.join(KERNELS)}")
    if kernels == "triton":
        if triton_mode() is None:
            raise SurgeryError(
                "kernels='triton' needs Triton and a GPU (or TRITON_INTERPRET=1 set before import, for the CPU interpreter)",
                hint="pip install 'surgeon[triton]' on a CUDA machine; kernels='auto' picks the torch ops elsewhere",
            )
    return kernels
