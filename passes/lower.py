"""The lowering pass: adapter branches that match a method's lowering pattern become one fused kernel call.

Lowering is a table of rewrite rules, each method contributing its own (a
:class:`~surgeon.methods.lowering.LoweringPattern`, declared in the method's folder:
surgeon/methods/lora/lowering.py, surgeon/methods/dora/lowering.py), and this
module is the one driver that applies them: every node of the graph is offered,
in graph order, to every pattern that applies to the graph, and a pattern that
recognises exactly the branch it knows at that node replaces it by its fused op
(surgeon/kernels: Triton kernels on CUDA, the same math in torch elsewhere; an
autograd formula, a fake implementation for export and torch.compile). A branch
no pattern recognises (dropout on the adapter input, a dtype cast, a method
with no pattern) stays as plain aten ops. Folding works on the graph before
this pass.

Which patterns apply is decided from what each declares: ``routed`` patterns
for a routed graph (an ``adapter_ids`` input), the others for gated graphs; and
with ``fallback=True`` (the fused ops will run their torch fallback: no Triton,
the CPU) only those whose fallback still beats the plain branch
(``fallback_pays``)::

    >>> print(describe_patterns())    # doctest: +SKIP
    dora on a linear -> surgeon::dora_linear                  gated graphs
    lora on a linear -> surgeon::lora_linear                  gated graphs, also on the torch fallback
    routed lora on a linear -> surgeon::routed_lora_linear    routed graphs
"""

from __future__ import annotations

from surgeon.methods import lowering_patterns

from surgeon.passes.pipeline import PassResult

__all__ = ["lower_adapters", "patterns_for", "describe_patterns", "kernel_modules"]


def patterns_for(*, routed: bool = False, fallback: bool = False) -> tuple:
    """The lowering patterns that apply to a graph (routed or gated; on the fused kernels or their fallback)."""
    return tuple(p for p in lowering_patterns() if p.routed == routed and (p.fallback_pays or not fallback))


def lower_adapters(*, routed: bool = False, fallback: bool = False):
    """A pass lowering every branch that a pattern of :func:`patterns_for` recognises to its fused op."""
    patterns = patterns_for(routed=routed, fallback=fallback)

    def lower_adapters_to_fused_kernels(gm) -> PassResult:
        changed = False
        for node in list(gm.graph.nodes):
            for pattern in patterns:
                if getattr(node, "_erased", False):  # a rewrite earlier in the walk took it out
                    break
                changed |= bool(pattern.rewrite(gm, node))
        return PassResult(gm, changed)

    return lower_adapters_to_fused_kernels


def describe_patterns() -> str:
    """Every method's lowering patterns, one a line, with where each applies."""
    rows = []
    for p in lowering_patterns():
        where = "routed graphs" if p.routed else "gated graphs"
        rows.append((p.name, where + (", also on the torch fallback" if p.fallback_pays else "")))
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"{name.ljust(width)}    {where}" for name, where in sorted(rows))


def kernel_modules() -> tuple:
    """The modules registering the fused ops a lowered graph (or a saved program) may call."""
    return tuple(dict.fromkeys(p.kernel for p in lowering_patterns()))
