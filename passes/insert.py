"""The LoRA insert pass: add the adapter branch at every site.

For a site computing ``y = base(x)`` (``aten.linear(x, W, b)``, or GPT-2's
``aten.addmm(b, x, W)`` with W stored (in, out)), the pass inserts::

    h = linear(dropout(x), A)        # (..., r)     A: (r, in)
    d = linear(h, B[, b_B])          # (..., out)   B: (out, r)
    y' = y + scale * d               # scale = alpha / r, or alpha / sqrt(r) with rslora

and every user of ``y`` reads ``y'``. Several adapters on one site chain their
additions. ``dropout`` appears only in a training graph with p > 0. When the
adapter's dtype differs from the input's (float32 adapters on a bfloat16
base), the branch runs in the adapter's dtype and is cast back.

A and B are parameters registered on the graph module at the site's path
(``<path>.surgeon_lora_A__<adapter>``), the very Parameter objects the
compiled model owns, so every graph of one compiled model trains the same
weights. Inserted nodes carry ``meta["surgeon"] = {adapter, site, role}``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._graph import Inserter, site_nodes
from .pipeline import PassResult

__all__ = ["LoraInsertion", "insert_lora", "param_names"]


@dataclass(frozen=True)
class LoraInsertion:
    """One adapter on one site, as the insert pass needs it."""

    path: str
    kind: str  # "linear" | "hf_conv1d"
    adapter: str
    weights: object  # surgeon.methods.lora_weights.LoraWeights (holds A, B, optional bias)
    scale: float
    dropout: float


def param_names(adapter: str) -> tuple[str, str, str]:
    return f"surgeon_lora_A__{adapter}", f"surgeon_lora_B__{adapter}", f"surgeon_lora_B_bias__{adapter}"


def insert_lora(insertions, *, training: bool):
    """A pass that inserts every LoRA branch of ``insertions`` into a graph module."""

    def insert_lora_adapters(gm) -> PassResult:
        import torch

        aten = torch.ops.aten
        changed = False
        for spec in insertions:
            nodes = site_nodes(gm, spec.path, spec.kind)
            if not nodes:
                raise ValueError(f"no {spec.kind} node computes site '{spec.path}' in this graph")
            owner = gm.get_submodule(spec.path)
            a_name, b_name, bias_name = param_names(spec.adapter)
            owner.register_parameter(a_name, spec.weights.lora_A)
            owner.register_parameter(b_name, spec.weights.lora_B)
            has_bias = spec.weights.lora_B_bias is not None
            if has_bias:
                owner.register_parameter(bias_name, spec.weights.lora_B_bias)
            for node in nodes:
                x = node.args[0] if spec.kind == "linear" else node.args[1]
                users = list(node.users)
                meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
                meta["surgeon"] = {"adapter": spec.adapter, "site": spec.path, "method": "lora"}
                put = Inserter(gm.graph, node, meta)
                a = put.get_attr(f"{spec.path}.{a_name}", "lora_A")
                b = put.get_attr(f"{spec.path}.{b_name}", "lora_B")
                bias = put.get_attr(f"{spec.path}.{bias_name}", "lora_B_bias") if has_bias else None
                dtype = spec.weights.lora_A.dtype
                x_in = put.call(aten._to_copy.default, (x,), "cast_in", {"dtype": dtype}) if _cast(x, dtype) else x
                if training and spec.dropout > 0:
                    x_in = put.call(aten.dropout.default, (x_in, spec.dropout, True), "dropout")
                h = put.call(aten.linear.default, (x_in, a), "shrink")
                d = put.call(aten.linear.default, (h, b, bias) if has_bias else (h, b), "expand")
                s = put.call(aten.mul.Tensor, (d, spec.scale), "scale")
                if _cast(x, dtype):
                    s = put.call(aten._to_copy.default, (s,), "cast_out", {"dtype": x.meta["val"].dtype})
                y = put.call(aten.add.Tensor, (node, s), "out")
                for user in users:
                    user.replace_input_with(node, y)
                changed = True
        return PassResult(gm, changed)

    return insert_lora_adapters


def _cast(x, dtype) -> bool:
    value = x.meta.get("val") if hasattr(x, "meta") else None
    return value is not None and value.dtype != dtype
