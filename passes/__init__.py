"""surgeon.passes: graph rewrites over captured models.

A pass is a function from a ``torch.fx.GraphModule`` to a :class:`PassResult`
(the module, and whether it changed); :class:`Pipeline` runs named stages,
lints after each pass and names the one that failed. The built-in passes:
``insert_adapters`` (add each adapter method's branch at its sites, gated per
adapter or routed per row), ``lower_adapters`` (plain LoRA branches to the
fused kernel op) and ``fold_adapters`` (merge them into the base weights,
giving back the base graph).
"""

from surgeon.passes._graph import adapter_nodes, module_path
from surgeon.passes.fold import FoldError, copy_graph_module, fold_adapters, verify_fold
from surgeon.passes.insert import Gates, GraphBuilder, Insertion, insert_adapters
from surgeon.passes.lower import lower_adapters
from surgeon.passes.pipeline import POINTS, PassError, PassResult, Pipeline, run_passes

__all__ = [
    "PassResult",
    "PassError",
    "Pipeline",
    "POINTS",
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
