"""surgeon.passes: graph rewrites over captured models.

A pass is a function from a ``torch.fx.GraphModule`` to a :class:`PassResult`
(the module, and whether it changed); the pipeline's stages are data
(:data:`STAGES`, printed by :func:`describe_stages`, with a point before and
after each: :data:`POINTS`); :class:`Pipeline` runs them, lints after each pass
and names the one that failed. The built-in passes: ``insert_adapters`` (add
each adapter method's branch at its sites, gated per adapter or routed per row),
``lower_adapters`` (the branches the methods' lowering patterns recognise, to
fused kernel ops) and ``fold_adapters`` (merge them into the base weights,
giving back the base graph). Passes find the nodes adapters added by their
roles (surgeon/methods/node_roles.py).
"""

from surgeon.passes._graph import adapter_nodes, module_path
from surgeon.passes.fold import FoldError, copy_graph_module, fold_adapters, verify_fold
from surgeon.passes.insert import Gates, GraphBuilder, Insertion, insert_adapters
from surgeon.passes.lower import describe_patterns, lower_adapters
from surgeon.passes.pipeline import POINTS, STAGES, PassError, PassResult, Pipeline, Stage, describe_stages, run_passes

__all__ = [
    "PassResult",
    "PassError",
    "Pipeline",
    "Stage",
    "STAGES",
    "POINTS",
    "describe_stages",
    "describe_patterns",
    "run_passes",
    "insert_adapters",
    "Insertion",
    "Gates",
    "lower_adapters",
    "GraphBuilder",
    "fold_adapters",
    "verify_fold",
    "FoldError",
    "copy_graph_module",
    "adapter_nodes",
    "module_path",
]
