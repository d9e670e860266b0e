"""A compiled model under ``torch.distributed``: DDP, FSDP2, torchrun and accelerate.

surgeon brings no engine of its own; a :class:`~surgeon.compiled.model.Compiled` is an
``nn.Module`` and PyTorch's wrappers take it as they take the model it came from.
What this file adds is what the graphs need to stay right under them.

- ``DistributedDataParallel(compiled)``: the base is frozen (``requires_grad=False``),
  so DDP makes no gradient buckets for it; the adapters' gradients are all-reduced by
  the hooks DDP puts on their accumulators, which the graphs reach because they read
  the very same ``Parameter`` objects. Nothing to do here.
- ``fully_shard(compiled)`` (FSDP2): at rest every parameter is a sharded ``DTensor``;
  the pre-forward hook all-gathers them and sets plain unsharded parameters on the
  modules. A graph keeps the tensors it was bound to, so before each call of a sharded
  model :func:`rebind` points the graph's attributes at the modules' current tensors.
  The model must be sharded as one unit: a graph replaces the calls of the submodules'
  ``forward``, so an inner ``fully_shard`` group would never be gathered
  (:func:`check_sharding` refuses it). Base weights, gradients and optimizer states are
  sharded at rest; during forward and backward the whole model is gathered.
  FSDP2 reduce-scatters one gradient dtype per group: a frozen bfloat16 base with
  float32 adapters is fine, a trained bfloat16 module copy next to float32 adapters is
  not. :func:`fully_shard` checks both before calling torch's, and says what to change.
- Files: :func:`gathered` turns sharded tensors into whole ones (a collective: every
  rank calls it) and :func:`writes_files` lets only rank 0 write, so ranks never race
  on one output folder.
"""

from __future__ import annotations

import torch
from torch import nn

from surgeon.diagnostics import SurgeryError

if torch.distributed.is_available():
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import fully_shard as torch_fully_shard
    from torch.distributed.tensor import DTensor
else:  # a torch built without distributed: nothing is ever sharded
    FSDPModule = DTensor = torch_fully_shard = None

__all__ = ["fully_shard", "writes_files", "gathered", "is_sharded", "check_sharding", "bindings", "rebind", "refuse_sharded"]


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def writes_files() -> bool:
    """Does this process write outputs? Rank 0 of a process group, or a process with none."""
    return not _initialized() or torch.distributed.get_rank() == 0


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded ``DTensor`` (every rank must call this); other tensors as they are."""
    if _initialized() and isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor


def is_sharded(module: nn.Module) -> bool:
    """Was ``fully_shard`` (FSDP2) applied to ``module``? (Asked on every forward.)"""
    return FSDPModule is not None and isinstance(module, FSDPModule)


def check_sharding(model: nn.Module) -> None:
    """Refuse ``fully_shard`` groups inside a compiled model: their gathering hooks would never run."""
    inner = [name for name, m in model.named_modules() if m is not model and is_sharded(m)]
    if inner:
        raise SurgeryError(
            f"fully_shard was applied to {inner[0]!r} inside the compiled model"
            + (f" (and {len(inner) - 1} more modules)" if len(inner) > 1 else ""),
            hint="a compiled model runs graphs, not its submodules' forward, so FSDP2 can only gather it whole: "
            "fully_shard(compiled) once, with no inner groups",
        )


def fully_shard(compiled: nn.Module, **options) -> nn.Module:
    """``torch.distributed.fsdp.fully_shard(compiled, **options)``, after checking what FSDP2 would refuse later."""
    check_sharding(compiled)
    dtypes = {}
    for name, param in compiled.named_parameters():
        if param.requires_grad:
            dtypes.setdefault(param.dtype, name)
    if len(dtypes) > 1:
        found = ", ".join(f"{name} ({str(dtype).removeprefix('torch.')})" for dtype, name in dtypes.items())
        raise SurgeryError(
            f"FSDP2 needs the trainable parameters of one group in one dtype; this model trains {found}",
            hint="give the adapters the dtype of the trained modules (surgeon.compile(..., adapter_dtype=torch.bfloat16)), "
            "or train the modules in float32 (a float32 base), or drop the train rules",
        )
    return torch_fully_shard(compiled, **options)


def bindings(model: nn.Module, gm: nn.Module) -> list:
    """(graph owner, name, model owner, name) of every parameter and buffer ``gm`` shares with ``model``."""
    where = {}
    for owner in model.modules():
        for name, tensor in list(owner._parameters.items()) + list(owner._buffers.items()):
            if tensor is not None:
                where.setdefault(id(tensor), (owner, name))
    found = []
    for owner in gm.modules():
        for name, tensor in list(owner._parameters.items()) + list(owner._buffers.items()):
            if tensor is not None and id(tensor) in where:
                found.append((owner, name, *where[id(tensor)]))
    return found


def rebind(found: list) -> None:
    """Point a graph's attributes at the tensors its model's modules hold now (FSDP2 swaps them)."""
    for owner, name, source, source_name in found:
        table = "_parameters" if source_name in source._parameters else "_buffers"
        tensor = getattr(source, table)[source_name]
        if name in owner._parameters:
            owner._parameters[name] = tensor
        else:
            owner._buffers[name] = tensor


def refuse_sharded(model: nn.Module, what: str) -> None:
    """A clear error for operations that need whole weights on a model whose weights are sharded."""
    if not _initialized():
        return
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise SurgeryError(
            f"{what} needs whole weights, and this model's are sharded by FSDP",
            hint="save_adapter() on every rank (rank 0 writes the gathered adapter), then in one process: "
            "surgeon.compile(model, adapter=folder) and fold or save_pretrained there",
        )
