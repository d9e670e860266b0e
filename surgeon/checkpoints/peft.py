"""Adapters in PEFT's file format, both directions.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors``; an
adapter not named "default" goes in a subfolder of its name, as PEFT does.
Keys are ``base_model.model.<module path>.<suffix>``, each site's suffixes its
method's (``peft_state()`` of its SiteAdapter), and
``base_model.model.<module path>.<param>`` for ``modules_to_save``.

Each method maps its own config fields (its PeftFormat: ``peft_type``,
``peft_config`` and ``rules_from_peft``, in its folder under surgeon/methods/).
The reader turns a config back into rules, as objects (peft_rules.py), so a
loaded adapter is planned and checked like any other. An adapter that mixes
methods is saved in surgeon's mixture format (see :func:`adapter_files`). A folder is untrusted input (peft_folder.py): only
safetensors are read, every field is type-checked, files must lie inside their
folder; a config or tensor that does not fit the model is an error, never
silently ignored, and so is a PEFT field surgeon does not implement
(peft_fields.py), and a load checks everything before it changes the model
(peft_load.py). What PEFT's config cannot hold per site (LoRA's dropout, bias)
is said when saving (peft_fidelity.py), and kept exactly in surgeon's record in
the safetensors metadata, which surgeon reads back (peft_record.py).

This file is the save side on plain data: a plan, the tensors to save, a
folder. Gathering those tensors from a compiled model (on every rank of a
process group) is surgeon/compiled/checkpointing.py.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from surgeon.atomic import atomic_path, output_folder, write_text
from surgeon.grammar import DEFAULT_ADAPTER
from surgeon.methods import low_rank_method, method_for
from surgeon.methods.peft_format import AdapterError, PeftFidelityWarning

from surgeon.checkpoints.peft_fidelity import fidelity_warning
from surgeon.checkpoints.peft_folder import CONFIG, MIXTURE, MIXTURE_PARTS, WEIGHTS, adapter_folders, folder_of, read_peft_config, saving
from surgeon.checkpoints.peft_record import RECORD_KEY, record
from surgeon.checkpoints.peft_rules import exact_rules_from_folder, rules_from_folder, rules_from_peft, rules_from_peft_folder

__all__ = [
    "AdapterFiles",
    "adapter_files",
    "method_parts",
    "peft_config",
    "refuse_stale_adapters",
    "write_adapter_files",
    "rules_from_peft",
    "read_peft_config",
    "adapter_folders",
    "folder_of",
    "rules_from_peft_folder",
    "exact_rules_from_folder",
    "rules_from_folder",
    "AdapterError",
    "PeftFidelityWarning",
    "CONFIG",
    "WEIGHTS",
]


@dataclass
class AdapterFiles:
    """One adapter's files, ready to write: each PEFT part (a folder, its config, tensors and metadata),
    the mixture config above them (None for an adapter of one method), and the fidelity warnings to give."""

    folder: Path
    parts: list  # (folder, config dict, PEFT key -> CPU tensor, safetensors metadata)
    mixture: dict | None
    warnings: list


def method_parts(plan, adapter: str) -> dict:
    """The adapter's sites in ``plan`` by method, in order of first use ({} for an adapter that only trains modules)."""
    parts: dict = {}
    for site in plan.sites:
        if site.adapter == adapter:
            parts.setdefault(site.method, []).append(site)
    return parts


def peft_config(plan, model_name: str, adapter: str, method: str | None = None) -> dict:
    """PEFT's adapter_config.json for one adapter of ``plan`` (of a mixture: for its sites of ``method``)."""
    parts = method_parts(plan, adapter)
    if method is None and len(parts) > 1:
        raise AdapterError(
            f"adapter '{adapter}' uses {' and '.join(parts)}: a PEFT adapter holds one method",
            hint="save_adapter writes such an adapter in surgeon's mixture format (a PEFT adapter per method)",
        )
    # An adapter that only trains modules still needs a method in PEFT's format: the low-rank one, on no module.
    first = next(iter(parts), low_rank_method())
    method = method or first
    trained = [t.path for t in plan.trained if t.adapter == adapter] if method == first else []  # with the first part
    form = method_for(method).peft_format()
    if form is None:
        raise AdapterError(f"adapter '{adapter}' uses {method}, which PEFT's format has no place for",
                           hint="save it with compiled.state_dict(), or export(path) a program")
    config = {"task_type": None, "base_model_name_or_path": model_name, "inference_mode": True}
    return dict(config, peft_type=form.peft_type, **form.peft_config(parts.get(method, [])), modules_to_save=trained or None)


def adapter_files(plan, captured, model_name: str, folder: Path, adapter: str, tensors) -> AdapterFiles:
    """The files of adapter ``adapter`` of ``plan`` (planned on ``captured``) in ``folder``.

    ``tensors(method, trained)``: PEFT key -> CPU tensor of the adapter's sites (of ``method``; None: all),
    with its trained modules' parameters when ``trained``. An adapter using one method is one PEFT adapter.
    One mixing methods is written in surgeon's mixture format: its folder holds an ``adapter_config.json``
    with ``"peft_type": "SURGEON_MIXTURE"`` listing the methods, and ``mixture/<method>/`` holds each
    method's sites as a complete PEFT adapter (the ``train`` modules go with the first). PEFT loads each
    part on its own; surgeon loads the whole. No rules text is stored: surgeon's record (peft_record.py)
    holds the rules as checked JSON values.
    """
    parts, lossy = method_parts(plan, adapter), []

    def metadata(method, config, first=True):
        trained = [t.path for t in plan.trained if t.adapter == adapter] if first else []
        lossy.append(fidelity_warning(plan, captured, adapter, method, config))
        return {"format": "pt", RECORD_KEY: record(plan, adapter, method, config, trained)}

    if len(parts) <= 1:
        config = peft_config(plan, model_name, adapter)
        files = [(folder, config, tensors(None, True), metadata(None, config))]
        return AdapterFiles(folder, files, None, [w for w in lossy if w])
    files = []
    for i, method in enumerate(parts):
        config = peft_config(plan, model_name, adapter, method)
        files.append((folder / MIXTURE_PARTS / method, config, tensors(method, i == 0), metadata(method, config, i == 0)))
    mixture = {
        "peft_type": MIXTURE,
        "format_version": 1,
        "methods": list(parts),
        "parts": {m: f"{MIXTURE_PARTS}/{m}" for m in parts},
        "base_model_name_or_path": model_name,
    }
    return AdapterFiles(folder, files, mixture, [w for w in lossy if w])


def refuse_stale_adapters(directory: Path, adapter_names) -> None:
    """Saving every adapter: an adapter already in ``directory`` that is not among ``adapter_names`` would be
    read back with them (and surgeon never deletes what it did not write in this call)."""
    if not directory.is_dir():
        return
    stale = [p.name for p in sorted(directory.iterdir()) if p.is_dir() and (p / CONFIG).is_file()
             and p.name not in adapter_names and p.name != MIXTURE_PARTS]
    if (directory / CONFIG).is_file() and DEFAULT_ADAPTER not in adapter_names:
        stale.insert(0, f"{DEFAULT_ADAPTER} (at its top)")
    if stale:
        raise AdapterError(
            f"cannot save every adapter into {directory}: it holds adapters this model does not have ({', '.join(stale)}), "
            "which a load of the folder would read back with them",
            hint="save into a new folder, remove those adapters from it, or name the adapters to save (adapters=[...])",
        )


def write_adapter_files(units: list, stacklevel: int = 2) -> None:
    """Give each unit's fidelity warnings (``stacklevel``: as for ``warnings.warn``, from the caller), then write
    every unit: one adapter's files (its PEFT files, or a mixture's parts then its config) as one unit, the folder
    marked while they are written, so that a crash half way leaves a folder readers refuse (peft_folder.py)."""
    for unit in units:
        for message in unit.warnings:
            warnings.warn(message, PeftFidelityWarning, stacklevel=stacklevel + 1)
    for unit in units:
        with saving(output_folder(unit.folder)) as replaced:
            for part, config, tensors, metadata in unit.parts:
                _write(part, config, tensors, metadata, replaced)
            if unit.mixture is not None:
                write_text(unit.folder / CONFIG, json.dumps(unit.mixture, indent=2, sort_keys=True) + "\n")


def _write(folder: Path, config: dict, tensors: dict, metadata: dict, replaced: list) -> None:
    folder = output_folder(folder)
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    replaced.append(folder / WEIGHTS)
    write_text(folder / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
