"""Deployable programs: ``torch.export.save`` of the compiled model's evaluation graph.

``fold=True`` (the default) saves the merged graph, the base model's op
sequence with folded weights; ``fold=False`` keeps the adapter branches. Both
keep dynamic batch and sequence dimensions. Loading one checks it first
(program_archive.py, program_graph.py), as a ``.pt2`` may come from anyone.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgeon.compiled.distributed import refuse_sharded, writes_files
from surgeon.diagnostics import SurgeryError

from surgeon.atomic import output_folder, save_exported

__all__ = ["export_program_file", "load_program"]


def export_program_file(compiled, path, *, fold: bool = True, args: tuple = (), kwargs: dict | None = None,
                        quantized: str = "dequantize", folded=None) -> None:
    """``folded``: the fold to save (a :class:`surgeon.compiled.folded.Folded`; default: ``compiled.fold(...)`` now)."""
    import torch

    from surgeon.capture.export import dynamic_shapes, widen_inputs

    refuse_sharded(compiled, "export")
    if not writes_files():  # in a process group, rank 0 writes
        return
    path = Path(path)
    if path.is_dir():
        raise SurgeryError(f"cannot write the program to {path}: it is a folder", hint="give a file name ending in .pt2")
    output_folder(path.parent)
    args = args or compiled.example_args
    kwargs = compiled._with_defaults(dict(kwargs) if kwargs is not None else dict(compiled.example_kwargs))
    # Unfolded: the fused ops where kernels run (GPU, kernels="triton"); on the CPU plain aten ops, which any torch loads.
    if not fold and compiled.folded_in_place:
        raise SurgeryError("cannot export the unfolded program: the adapters are folded into the base weights (fold(inplace=True))",
                           hint="unfold() first, or export(fold=True)")
    if fold and folded is None:
        folded = compiled.fold(args=args, kwargs=kwargs, quantized=quantized)
    graph = (folded.graph(*args, **kwargs) if fold
             else compiled.graph(*args, training=False, lowered=compiled._lowering() is True, **kwargs))
    args, kwargs = widen_inputs(args, kwargs, compiled.hugging_face)
    with torch.no_grad():
        program = torch.export.export(
            graph, args, kwargs, dynamic_shapes=dynamic_shapes(args, kwargs, compiled.hugging_face), strict=False
        )
    extra = {} if fold else {"surgeon.json": json.dumps(lora_sites(compiled))}  # what a hot swap needs to know
    save_exported(program, path, extra_files=extra)  # a failed write (a full disk) is an error, not an abort


def lora_sites(compiled) -> dict:
    """adapter -> path -> (rank, scale, in, out) of its plain LoRA sites."""
    found: dict = {}
    for adapter, path, module in compiled.sites():
        plain = not getattr(module, "residual", False) and module.lora_B_bias is None if module.method == "lora" else False
        if module.method == "lora" and module.kind in ("linear", "hf_conv1d") and plain:
            found.setdefault(adapter, {})[path] = (module.config.r, module.scale, module.in_features, module.out_features)
    return found


def register_ops() -> None:
    """Import the ops a program may call (torch.export.load resolves them by name): the kernels of a
    lowered program, the quantized linears of a bitsandbytes model's."""
    import importlib

    for module in ("surgeon.kernels.lora_linear", "surgeon.kernels.routed_lora", "surgeon.kernels.dora", "surgeon.kernels.quantized"):
        importlib.import_module(module)


def load_program(path):
    """The saved program, ready to call (``.module()(**inputs)``).

    The file is checked before torch reads it (program_archive.py): a ``.pt2``
    from anyone loads without running code of its own; anything else is a
    SurgeryError naming the file.
    """
    from surgeon.checkpoints.program_archive import open_program

    return open_program(path)[0]
