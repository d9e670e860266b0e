"""Hot-swapping LoRA adapters: new weights into a compiled graph or a saved program, with no new graph.

A LoRA site compiled with rank r and scale s computes ``s * B A x``. An
adapter of rank r' <= r and scale s' on the same site is written into the
same tensors as::

    A <- [A'; 0]            (r, in): the new rows, then zero rows
    B <- [B' s'/s, 0]       (out, r): the new columns rescaled, then zero columns

so that ``s B A = s' B' A'`` exactly where s'/s is exact, and the program's
shapes and constants (its scale) do not change: a ``torch.compile``d graph is
not recompiled, and a saved ``.pt2`` program is not exported again. Sites the
new adapter does not adapt get zeros (no change). A site the program has no
adapter on, or a rank above the compiled one, is an error naming what to
compile for.

This file reads the PEFT folder and writes a saved program; the compiled
model's side (which of its sites are low-rank, writing the factors into them)
is surgeon/compiled/low_rank.py. Which method a config holds, and how its
fields give each site's scale and factors, is the low-rank method's PEFT
format's answer (``low_rank_reading``: surgeon/methods/lora/swap_reading.py),
read from plain data, as a saved program holds no model to plan the file's
rules against.
"""

from __future__ import annotations

from pathlib import Path

import torch

from surgeon.atomic import save_exported
from surgeon.diagnostics import SurgeryError
from surgeon.methods import low_rank_method, method_for, registered_methods
from surgeon.methods.peft_format import AdapterError
from surgeon.passes.insert import attribute_prefix

from surgeon.checkpoints.peft_fields import check_peft_fields
from surgeon.checkpoints.peft_folder import CONFIG, WEIGHTS, read_peft_config, read_tensors
from surgeon.checkpoints.program import PROGRAM_METADATA, program_path, program_sites
from surgeon.checkpoints.program_archive import open_program

__all__ = ["swapped_factors", "peft_site_scale", "swap_program_adapter"]


def _reading():
    """How the low-rank method's PEFT format reads a saved adapter for a swap (its scale, refusals, factors)."""
    return method_for(low_rank_method()).peft_format().low_rank_reading


def peft_site_scale(config: dict, path: str) -> float:
    """The scale PEFT gives ``path`` under the low-rank method's config (its rank/alpha patterns as PEFT matches them)."""
    return _reading().site_scale(config, path)


def _checked_config(directory: Path) -> dict:
    """The adapter's config, refused unless it holds plain low-rank products, with fields of PEFT's types."""
    config = read_peft_config(directory)
    try:
        check_peft_fields(config)
    except AdapterError as exc:
        found = exc.diagnostics[0]
        raise AdapterError(f"{directory / CONFIG}: {found.message}", hint=found.hint) from None
    held = next((m.name for m in registered_methods() if (form := m.peft_format()) is not None and form.holds(config)), None)
    if held != low_rank_method():
        raise SurgeryError(
            f"{directory / CONFIG}: hot-swapping takes plain {low_rank_method()} adapters (this one is {config['peft_type']}"
            f"{f' holding {held}' if held is not None else ''})",
            hint="compile a new model for other methods",
        )
    _reading().swap_refusal(config, directory / CONFIG)
    return config


def swapped_factors(sites: dict, directory) -> dict:
    """path -> (A, B) to write into sites compiled as ``sites`` (path -> (rank, scale, in, out)), for the
    PEFT LoRA adapter in ``directory``. Everything is checked before anything is returned, so a caller
    that writes only after this returns never writes half an adapter."""
    directory = Path(directory)
    config = _checked_config(directory)
    new = _reading().factor_pairs(read_tensors(directory), directory, directory / WEIGHTS)
    extra = sorted(set(new) - set(sites))
    if extra:
        raise SurgeryError(f"{directory}: the adapter adapts {extra[0]}, where this program has no LoRA site",
                           hint="compile with rules that adapt it too (a zero adapter there changes nothing)")
    out: dict = {}
    for path, (rank, scale, in_features, out_features) in sites.items():
        a_new = torch.zeros(rank, in_features)
        b_new = torch.zeros(out_features, rank)
        if path in new:
            a, b = new[path]["A"].float(), new[path]["B"].float()
            r = a.shape[0]
            if r > rank:
                raise SurgeryError(
                    f"{directory}: the adapter has rank {r} at {path}; this program was compiled with rank {rank} there",
                    hint=f"compile with {low_rank_method()}(r={r}) (or higher) on that site to swap this adapter in",
                )
            if a.shape[1] != in_features or b.shape[0] != out_features:
                raise SurgeryError(f"{directory}: {path} has shapes {tuple(a.shape)}, {tuple(b.shape)}; "
                                   f"this site is ({rank}, {in_features}), ({out_features}, {rank})")
            a_new[:r] = a
            b_new[:, :r] = b * (peft_site_scale(config, path) / scale)
        out[path] = (a_new, b_new)
    return out


def swap_program_adapter(program, directory, name: str = "default", out=None):
    """Swap a LoRA adapter into a saved program (a ``.pt2`` path, exported with ``fold=False``).

    Returns the ExportedProgram with the new weights (and writes it to ``out`` when given). The program
    is loaded through surgeon's checks (checkpoints/program_archive.py); every site, key and shape is
    checked before the first tensor is written, and ``out`` is replaced atomically.
    """
    out = program_path(out) if out is not None else None
    loaded, extra = open_program(program)
    if PROGRAM_METADATA not in extra:
        raise SurgeryError(f"{program} was not saved by surgeon with its adapters kept",
                           hint="export(..., fold=False) saves what a swap needs")
    sites = program_sites(extra[PROGRAM_METADATA], program).get(name, {})
    if not sites:
        raise SurgeryError(f"{program} has no LoRA sites of an adapter named {name!r}")
    prefix = attribute_prefix(name)  # the adapter's parameters in the graph: <site>.surgeon_<adapter>__<name>
    writes = []
    for path, (a, b) in swapped_factors(sites, directory).items():
        for leaf, value in zip(_reading().FACTOR_NAMES, (a, b)):
            key = f"{path}.{prefix}{leaf}"
            tensor = loaded.state_dict.get(key)
            if tensor is None or tuple(tensor.shape) != tuple(value.shape):
                raise SurgeryError(f"{program}: extra/{PROGRAM_METADATA} lists {path} with {leaf} of shape "
                                   f"{tuple(value.shape)}, which the program's weights do not hold"
                                   + ("" if tensor is None else f" (they hold {key} of shape {tuple(tensor.shape)})"),
                                   hint="the program and its surgeon.json disagree: re-export it")
            writes.append((tensor, value))
    with torch.no_grad():
        for tensor, value in writes:  # only now, with everything checked
            tensor.copy_(value.to(tensor.dtype))
    if out is not None:
        save_exported(loaded, out, extra_files=extra)
    return loaded
