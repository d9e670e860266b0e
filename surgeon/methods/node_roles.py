"""The roles of the graph nodes adapters add: named once, for the method branches that tag them and the
passes that read them.

Every node the insert pass adds carries ``node.meta[META] = {"adapter", "site", "method", "role"}``; a
method's ``branch`` gives each node it adds one of these roles (``graph.call(op, args, SHRINK)``), and the
passes find what they need by role:

- joints (``OUT``, ``IN``, ``WEIGHT``) stand in for a value of the base graph (the site's output, its input,
  its weight) and take the value they replace as their first argument, so that folding can put it back;
- ``ungated(joint)`` marks a method's own joint once the insert pass has interpolated it by the gate;
- ``FUSED`` is a lowered branch (one fused kernel call), ``TRAINED`` a ``train`` module's gated weight;
- ``param(name)`` is the get_attr node of the adapter's parameter ``name``;
- ``GATES``: the graph's gates (the ``GATES_BUFFER`` tensor, or ``ROUTING_INPUT == i`` per row);
- the rest name the usual steps of a branch, for passes (and users' passes) that read them.
"""

from __future__ import annotations

__all__ = [
    "META", "GATES_BUFFER", "ROUTING_INPUT", "OUT", "IN", "WEIGHT", "JOINTS", "ungated", "GATE", "GATES", "CAST", "FUSED", "TRAINED", "PARAM", "param",
    "SHRINK", "EXPAND", "SCALE", "DROPOUT", "RESIDUAL", "ROWS", "BASE", "NORM", "FACTOR", "DELTA", "VECTOR",
    "ROTATION", "MODULE_DROPOUT", "RANK_DROPOUT", "record", "role_of", "attribute",
]

META = "surgeon"  # the node.meta key of the record
GATES_BUFFER = "surgeon_gates"  # the graph module's buffer of per-adapter gates
ROUTING_INPUT = "adapter_ids"  # the keyword input of a routed graph: each batch row's adapter (-1: none)

OUT = "out"  # replaces the site's output
IN = "in"  # replaces the site's input (before the base op)
WEIGHT = "weight"  # replaces the weight the base op reads
JOINTS = (OUT, IN, WEIGHT)

GATE = "gate"  # reads the adapter's gate (or interpolates by it)
GATES = "gates"  # the graph's gate tensor (one per graph, no adapter)
CAST = "cast"  # a dtype conversion
FUSED = "fused"  # a lowered branch: one fused op
TRAINED = "trained"  # a train module's weight, lerp(base, copy, gate)
PARAM = "param:"  # prefix: the get_attr of an adapter parameter

SHRINK = "shrink"  # into the low-rank space (x A^T)
EXPAND = "expand"  # out of it (h B^T)
SCALE = "scale"  # times the adapter's scale
DROPOUT = "dropout"  # on the adapter's input
RESIDUAL = "residual"  # a residual base's correction (PiSSA, OLoRA)
ROWS = "rows"  # a weight seen as (out, in) rows
BASE = "base"  # the base op's result, recomputed or unbiased
NORM = "norm"  # a row norm
FACTOR = "factor"  # a factor of the update
DELTA = "delta"  # the full update dW
VECTOR = "vector"  # a learned scaling vector
ROTATION = "rotation"  # a rotation of the input
MODULE_DROPOUT = "module_dropout"  # skip the whole adapter in a training step
RANK_DROPOUT = "rank_dropout"  # drop rows of the update in a training step


def ungated(joint: str) -> str:
    """The role a method's joint takes once the insert pass has interpolated it by the gate."""
    return f"ungated-{joint}"


def param(name: str) -> str:
    """The role of the get_attr node of the adapter parameter ``name``."""
    return PARAM + name


def record(node) -> dict:
    """The node's record (adapter, site, method, role), {} for a node of the base graph."""
    meta = getattr(node, "meta", None)
    return meta.get(META, {}) if meta is not None else {}


def role_of(node) -> str | None:
    return record(node).get("role")


def attribute(gm, target: str):
    """The tensor (or module) a get_attr ``target`` names on ``gm``."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
