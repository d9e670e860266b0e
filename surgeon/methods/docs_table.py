"""The methods table of docs/adapters.md, rendered from the registry (a test keeps the page's copy current).

To write it again after changing a method::

    python -c "from pathlib import Path; from surgeon.methods.docs_table import with_methods_table as w; \\
    p = Path('docs/adapters.md'); p.write_text(w(p.read_text()))"

Each row is what a method's folder declares: its config's summary and arguments, the site kinds it adapts
(and sites of several weights, nn.MultiheadAttention), its PEFT type, whether it adapts bitsandbytes-
quantized linears, and the fused kernels its lowering patterns call.
"""

from __future__ import annotations

from surgeon.methods._registry import registered_methods

__all__ = ["methods_table", "with_methods_table", "BEGIN", "END"]

BEGIN = "<!-- methods table: surgeon.methods.docs_table.methods_table() writes it; tests/surgeon/methods/test_docs_table.py checks it -->"
END = "<!-- end of the methods table -->"


def _row(method) -> tuple:
    cls, peft = method.adapter_class(), method.peft_format()
    arguments = ", ".join(f"`{p.name}`" for p in method.signature.params)
    sites = ", ".join(method.sites) + (", MultiheadAttention" if method.multi_weight is not None else "")
    limits = cls.quantized_limits() if cls is not None and cls.adapts_quantized else None
    quantized = "no" if limits is None else f"yes ({limits})" if limits else "yes"
    lowered = "; ".join(p.name.rpartition("-> ")[2] + (" (routed)" if p.routed else "") + (" (also on CPU)" if p.fallback_pays else "")
                        for p in method.lowering_patterns()) or "-"
    routed = "yes" if cls is None or cls.unroutable is None else f"no: {cls.unroutable}"
    return (f"`{method.name}`", method.summary, arguments, sites, peft.described() if peft is not None else "-", quantized,
            routed, lowered)


def methods_table() -> str:
    """The Markdown table of every registered method, between the page's markers."""
    header = ("method", "what it is", "arguments", "sites", "PEFT type", "on quantized linears", "routed per row", "lowered to")
    rows = [header, ("---",) * len(header), *(_row(m) for m in registered_methods())]
    return "\n".join([BEGIN, *("| " + " | ".join(row) + " |" for row in rows), END])


def with_methods_table(page: str) -> str:
    """``page`` (a Markdown text holding the markers) with the current table between them."""
    start, end = page.index(BEGIN), page.index(END) + len(END)
    return page[:start] + methods_table() + page[end:]
