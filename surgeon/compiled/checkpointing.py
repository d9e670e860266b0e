"""A compiled model's files: its adapters saved and loaded in PEFT's format, its graph exported as a program.

The formats are surgeon/checkpoints/ (plain data: plans, tensors, configs,
programs); this file gathers what they need from a compiled model and puts
what they read back into it:

- :func:`save_adapter`: each adapter's tensors gathered (in a process group
  every rank gathers its FSDP shards, a collective) and written by rank 0
  (checkpoints/peft.py). Everything that can fail runs on every rank first: a
  rank that raised alone would leave the others waiting.
- :func:`load_adapter`: a folder's rules and tensors read (checkpoints/peft_load.py),
  the adapter staged (staging.py) on the meta device and checked against the
  file, then built, filled and committed; a load that fails changes nothing.
- :func:`export_program`: the evaluation graph (folded, or with its adapters and
  their low-rank sites listed for a hot swap) exported with dynamic batch and
  sequence dimensions and written by rank 0 (checkpoints/program.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from surgeon.atomic import output_folder
from surgeon.capture.export import dynamic_shapes, widen_inputs
from surgeon.diagnostics import SurgeryError
from surgeon.grammar.names import checked_name
from surgeon.methods.peft_format import PREFIX, AdapterError

from surgeon.checkpoints.peft import adapter_files, folder_of, refuse_stale_adapters, write_adapter_files
from surgeon.checkpoints.peft_folder import CONFIG, adapter_folders
from surgeon.checkpoints.peft_load import expected_state, fitted_state, read_adapter
from surgeon.checkpoints.program import program_path, write_program
from surgeon.compiled.building import site_key
from surgeon.compiled.distributed import gathered, refuse_sharded, writes_files
from surgeon.compiled.lowering import Lowering
from surgeon.compiled.low_rank import low_rank_sites
from surgeon.compiled.staging import commit_adapter, rolled_back, stage_adapter

__all__ = ["save_adapter", "load_adapter", "export_program"]


def save_adapter(compiled, directory, adapters=None) -> None:
    """Write ``compiled``'s adapters (default: every one) into ``directory`` in PEFT's format (see checkpoints/peft.py)."""
    unknown = [a for a in adapters or () if a not in compiled.adapter_names]
    if unknown:
        raise AdapterError(f"save_adapter: no adapter named {unknown[0]!r}", hint=f"adapters: {', '.join(compiled.adapter_names)}")
    if adapters is None:
        refuse_stale_adapters(Path(directory), compiled.adapter_names)
    directory = output_folder(directory)
    units = [adapter_files(compiled.plan, compiled.captured, compiled.name, folder_of(directory, adapter), adapter,
                           _saved_tensors(compiled, adapter))
             for adapter in adapters or compiled.adapter_names]
    if writes_files():  # in a process group, rank 0 writes
        write_adapter_files(units, stacklevel=3)  # the warnings name the user's call of Compiled.save_adapter


def _saved_tensors(compiled, adapter: str):
    """(method, trained) -> PEFT key -> whole CPU tensor, for adapter_files."""

    def tensors(method, trained):
        live = expected_state(compiled.plan, lambda path: compiled.adapter_module(adapter, path),
                              lambda path: compiled.trained[site_key(path)], adapter, method, trained, saving=True)
        return {key: gathered(tensor.detach()).to("cpu").contiguous().clone() for key, tensor in live.items()}

    return tensors


def load_adapter(compiled, directory, name: str | None = None) -> str:
    """Load a PEFT-format adapter (surgeon's or PEFT's) as adapter ``name``; returns the name.

    A folder holding several adapters (subfolders) loads them all under their own names, as one
    step: if one fails, the model gets back what it had before the first.
    """
    if name is not None:
        checked_name(name, where="load_adapter")
    folders = adapter_folders(directory)
    if len(folders) > 1 and name is None:
        with rolled_back(compiled):
            for adapter, folder in folders:
                _load_one(compiled, folder, adapter)
        return ", ".join(a for a, _ in folders)
    return _load_one(compiled, folders[0][1], name or folders[0][0])


def _load_one(compiled, folder: Path, name: str) -> str:
    rules, tensors, source = read_adapter(folder, name)
    try:
        shapes = stage_adapter(compiled, name, rules, device="meta")
    except (NotImplementedError, RuntimeError, SurgeryError):
        # a site that cannot be built without the weight's values (PiSSA starts from its SVD): checked once built;
        # a real planning error is raised again by the build below
        shapes = None
    if shapes is not None:
        _fitted(compiled, shapes, tensors, source)
    try:
        staged = stage_adapter(compiled, name, rules)
    except (RuntimeError, MemoryError) as exc:  # e.g. out of memory: nothing was changed
        raise AdapterError(f"{folder / CONFIG}: cannot build adapter '{name}': {str(exc)[:200]}") from None
    expected = _fitted(compiled, staged, tensors, source)
    shared = tuple(f"{PREFIX}{key.replace('__', '.')}." for key in staged.shared)  # copies other adapters train too
    with torch.no_grad():
        for key, param in expected.items():  # the new modules first: none is the model's yet
            if not key.startswith(shared):
                param.copy_(tensors[key].to(param.dtype))
        commit_adapter(compiled, staged)
        for key, param in expected.items():  # the shared copies, once the adapter is in
            if key.startswith(shared):
                param.copy_(tensors[key].to(param.dtype))
    return name


def _fitted(compiled, staged, tensors: dict, source: Path) -> dict:
    """The staged adapter's PEFT key -> tensor, once ``tensors`` fit it exactly (else an AdapterError)."""
    expected = expected_state(staged.plan, staged.module, lambda path: staged.trained[site_key(path)], staged.name)
    adapted = [site.path for site in staged.plan.sites if site.adapter == staged.name]
    return fitted_state(expected, tensors, adapted, lambda path: compiled.base_model.get_submodule(path).weight, source)


def export_program(compiled, path, *, fold: bool = True, args: tuple = (), kwargs: dict | None = None,
                   quantized: str = "dequantize", folded=None) -> None:
    """``compiled``'s evaluation graph for ``args``/``kwargs`` (default: the example inputs) as a ``.pt2`` program.

    ``fold=True``: the merged graph (``folded``, a :class:`~surgeon.compiled.merged_model.Folded`, default
    ``compiled.fold(...)`` now); ``fold=False``: the adapter branches kept, as fused ops where kernels run
    (a GPU, kernels="triton"), else as plain aten ops, which any torch loads.
    """
    refuse_sharded(compiled, "export")
    if not writes_files():  # in a process group, rank 0 writes
        return
    path = program_path(path)
    args = args or compiled.example_args
    kwargs = compiled.with_defaults(dict(kwargs) if kwargs is not None else dict(compiled.example_kwargs))
    if not fold and compiled.folded_in_place:
        raise SurgeryError("cannot export the unfolded program: the adapters are folded into the base weights (fold(inplace=True))",
                           hint="unfold() first, or export(fold=True)")
    if fold and folded is None:
        folded = compiled.fold(args=args, kwargs=kwargs, quantized=quantized)
    graph = (folded.graph(*args, **kwargs) if fold
             else compiled.graph(*args, training=False, lowered=compiled.lowering() is Lowering.EVERY_SITE, **kwargs))
    args, kwargs = widen_inputs(args, kwargs, compiled.hugging_face)
    with torch.no_grad():
        program = torch.export.export(
            graph, args, kwargs, dynamic_shapes=dynamic_shapes(args, kwargs, compiled.hugging_face), strict=False
        )
    write_program(program, path, None if fold else low_rank_sites(compiled))  # what a hot swap needs to know
