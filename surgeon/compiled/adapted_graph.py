"""Pipeline assembly: an exported base program and the adapters' modules -> one adapted graph module.

The base model's program is bound to the model's own parameters (every graph
shares them), the ``train`` modules' trainable copies stand in for their
parameters, and the pass pipeline runs on the result: the insert stage (the
adapters' branches, read through their gates; the trained copies read through
theirs, trained_modules.py), then, when the kernel choice asks for it
(lowering.py), the lower stage, with the user's passes at their points
(passes/pipeline.py). The graph remembers which module owns each tensor it
reads, which FSDP2 swaps before each call (distributed.py).
"""

from __future__ import annotations

from torch import nn

from surgeon.capture.export import bind_program, export_program, widen_inputs
from surgeon.passes import Pipeline, insert_adapters
from surgeon.passes.insert import Gates
from surgeon.passes.lower import lower_adapters

from surgeon.compiled.distributed import bindings
from surgeon.compiled.lowering import Lowering
from surgeon.compiled.trained_modules import gate_trained_modules

__all__ = ["BINDINGS", "exported", "adapted_graph", "unadapted_graph"]

BINDINGS = "surgeon_bindings"  # graph_module.meta key: (graph owner, name, model owner, name) of every shared tensor


def exported(model: nn.Module, args, kwargs, *, training: bool, hugging_face: bool, name: str):
    """``model``'s ExportedProgram for this call, traced in ``training`` mode (the model's own mode comes back)."""
    args, kwargs = widen_inputs(args, kwargs, hugging_face)
    was = model.training
    model.train(training)
    try:
        return export_program(model, args, kwargs, hugging_face, name)
    finally:
        model.train(was)


def unadapted_graph(program, base_model: nn.Module, owner: nn.Module):
    """``program`` bound to ``base_model``'s tensors, unadapted (``owner``: the module whose tensors FSDP2 swaps)."""
    gm = bind_program(program, base_model)
    gm.meta[BINDINGS] = bindings(owner, gm)
    return gm


def adapted_graph(program, base_model: nn.Module, owner: nn.Module, *, insertions: list, gates: Gates, trained: tuple,
                  copies, training: bool, lowering: Lowering, user_passes: dict, lint: bool = True):
    """The adapted graph module of ``program`` (an ExportedProgram of ``base_model``).

    ``insertions``: the passes' view of every site; ``gates``: where the branches read their gates (routed:
    per batch row); ``trained``: the plan's trained modules, ``copies``: site key -> their trainable copies;
    ``owner``: the compiled model, whose modules own every tensor the graph reads.
    """
    gm = bind_program(program, base_model)
    for key, module in copies.items():  # the graph trains the copies, not the user's module
        path = key.replace("__", ".")
        for name, param in module.named_parameters():
            owner_path, _, leaf = f"{path}.{name}".rpartition(".")
            setattr(gm.get_submodule(owner_path), leaf, param)
    insert = insert_adapters(insertions, training=training, gates=gates)
    core = {"insert": [insert, gate_trained_modules(trained, gates.names, copies, base_model)]}
    fallback = lowering is Lowering.WHERE_FALLBACK_PAYS
    if lowering and not (gates.routed and fallback):  # no routed branch pays on the fused op's fallback
        core["lower"] = [lower_adapters(routed=gates.routed, fallback=fallback)]
    gm = Pipeline.with_points(core, user_passes).run(gm, lint=lint).graph_module
    gm.meta[BINDINGS] = bindings(owner, gm)
    return gm
