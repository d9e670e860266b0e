"""Adapters in PEFT's file format, both directions.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors``; an
adapter not named "default" goes in a subfolder of its name, as PEFT does.
Keys are ``base_model.model.<module path>.lora_A.weight`` (r, in),
``.lora_B.weight`` (out, r), ``.lora_B.bias`` with ``lora_bias``, and
``base_model.model.<module path>.<param>`` for ``modules_to_save``.

Each method maps its own config fields (``peft_type``, ``peft_config`` and
``rules_from_peft`` on its SiteAdapter; the LoRA family's shared rank/alpha
patterns are in peft_format.py). The reader turns a config back into rules, as
objects (peft_rules.py), so a loaded adapter is planned and checked like any
other. An adapter that mixes methods is saved in surgeon's mixture format (see
:func:`save_adapter`). A folder is untrusted input (peft_folder.py): only
safetensors are read, every field is type-checked, files must lie inside their
folder; a config or tensor that does not fit the model is an error, never
silently ignored, and so is a PEFT field surgeon does not implement
(peft_fields.py), and a load checks everything before it changes the model
(peft_load.py). What PEFT's config cannot hold per site (LoRA's dropout, bias)
is said when saving, and kept exactly in surgeon's record in the safetensors
metadata, which surgeon reads back (peft_record.py).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from surgeon.compiled.distributed import gathered, writes_files
from surgeon.grammar import DEFAULT_ADAPTER
from surgeon.methods.adapter import adapter_class

from surgeon.atomic import atomic_path, output_folder, write_text
from surgeon.checkpoints.peft_folder import CONFIG, MIXTURE, MIXTURE_PARTS, WEIGHTS, adapter_folders, folder_of, read_peft_config, saving
from surgeon.methods.peft_format import AdapterError, PeftFidelityWarning
from surgeon.checkpoints.peft_load import expected_state, load_adapter
from surgeon.checkpoints.peft_record import RECORD_KEY, fidelity_warning, record
from surgeon.checkpoints.peft_rules import exact_rules_from_folder, rules_from_folder, rules_from_peft, rules_from_peft_folder

__all__ = [
    "save_adapter",
    "load_adapter",
    "peft_config",
    "rules_from_peft",
    "read_peft_config",
    "adapter_folders",
    "rules_from_peft_folder",
    "exact_rules_from_folder",
    "rules_from_folder",
    "AdapterError",
    "PeftFidelityWarning",
    "CONFIG",
    "WEIGHTS",
]


def _parts(compiled, adapter: str) -> dict:
    """The adapter's sites by method, in order of first use ({} for an adapter that only trains modules)."""
    parts: dict = {}
    for site in compiled.plan.sites:
        if site.adapter == adapter:
            parts.setdefault(site.method, []).append(site)
    return parts


def peft_config(compiled, adapter: str, method: str | None = None) -> dict:
    """PEFT's adapter_config.json for one adapter (of a mixture: for its sites of ``method``)."""
    parts = _parts(compiled, adapter)
    if method is None and len(parts) > 1:
        raise AdapterError(
            f"adapter '{adapter}' uses {' and '.join(parts)}: a PEFT adapter holds one method",
            hint="save_adapter writes such an adapter in surgeon's mixture format (a PEFT adapter per method)",
        )
    method = method or next(iter(parts), "lora")
    trained = [t.path for t in compiled.plan.trained if t.adapter == adapter]
    if method != next(iter(parts), "lora"):
        trained = []  # modules_to_save go with a mixture's first part
    config = {"task_type": None, "base_model_name_or_path": compiled.name, "inference_mode": True}
    if not parts:
        return dict(config, peft_type="LORA", r=8, lora_alpha=8, target_modules=[], modules_to_save=trained or None)
    cls = adapter_class(method)
    return dict(config, peft_type=cls.peft_type, **cls.peft_config(parts[method]), modules_to_save=trained or None)


def _tensors(compiled, adapter: str, method: str | None = None, trained: bool = True) -> dict:
    """PEFT keys -> tensors (on the CPU) for one adapter, or for its sites of one method."""
    tensors = {key: gathered(tensor.detach()) for key, tensor in _expected(compiled, adapter, method, trained, saving=True).items()}
    return {k: v.to("cpu").contiguous().clone() for k, v in tensors.items()}


def _expected(compiled, adapter: str, method: str | None = None, trained: bool = True, saving: bool = False) -> dict:
    """PEFT key -> the live tensor it saves from, for one adapter (or its sites of one method)."""
    from surgeon.compiled.adapter_state import site_key

    return expected_state(compiled.plan, lambda path: compiled.adapter_module(adapter, path),
                          lambda path: compiled.trained[site_key(path)], adapter, method, trained, saving)


def _write(folder: Path, config: dict, tensors: dict, metadata: dict, replaced: list) -> None:
    from safetensors.torch import save_file

    folder = output_folder(folder)
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    replaced.append(folder / WEIGHTS)
    write_text(folder / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_adapter(folder: Path, files: list, mixture: dict | None) -> None:
    """One adapter's files (its PEFT files, or a mixture's parts then its config) as one unit: the folder is
    marked while they are written, so that a crash half way leaves a folder readers refuse (peft_folder.py)."""
    with saving(output_folder(folder)) as replaced:
        for part, config, tensors, metadata in files:
            _write(part, config, tensors, metadata, replaced)
        if mixture is not None:
            write_text(folder / CONFIG, json.dumps(mixture, indent=2, sort_keys=True) + "\n")


def _refuse_stale_adapters(compiled, directory: Path) -> None:
    """Saving every adapter: an adapter already in ``directory`` that the model does not have would be read back
    with them (and surgeon never deletes what it did not write in this call)."""
    if not directory.is_dir():
        return
    stale = [p.name for p in sorted(directory.iterdir()) if p.is_dir() and (p / CONFIG).is_file()
             and p.name not in compiled.rules.adapter_names and p.name != MIXTURE_PARTS]
    if (directory / CONFIG).is_file() and DEFAULT_ADAPTER not in compiled.rules.adapter_names:
        stale.insert(0, f"{DEFAULT_ADAPTER} (at its top)")
    if stale:
        raise AdapterError(
            f"cannot save every adapter into {directory}: it holds adapters this model does not have ({', '.join(stale)}), "
            "which a load of the folder would read back with them",
            hint="save into a new folder, remove those adapters from it, or name the adapters to save (adapters=[...])",
        )


def save_adapter(compiled, directory, adapters=None) -> None:
    """Write adapters in PEFT's format (every adapter of the model by default).

    An adapter using one method is one PEFT adapter. One mixing methods is
    written in surgeon's mixture format: its folder holds an
    ``adapter_config.json`` with ``"peft_type": "SURGEON_MIXTURE"`` listing the
    methods, and ``mixture/<method>/`` holds each method's sites as a complete
    PEFT adapter (the ``train`` modules go with the first). PEFT loads each part
    on its own; surgeon loads the whole.
    """
    # Everything that can fail runs on every rank first (in a process group each rank gathers its FSDP shards, a
    # collective): a rank that raised alone would leave the others waiting. Then rank 0 writes.
    unknown = [a for a in adapters or () if a not in compiled.rules.adapter_names]
    if unknown:
        raise AdapterError(f"save_adapter: no adapter named {unknown[0]!r}", hint=f"adapters: {', '.join(compiled.adapter_names)}")
    if adapters is None:
        _refuse_stale_adapters(compiled, Path(directory))
    directory = output_folder(directory)
    units, lossy = [], []

    def recorded(adapter, method, config, first=True):
        # surgeon's exact record of the sites (PEFT's config may hold less: see peft_record.py)
        trained = [t.path for t in compiled.plan.trained if t.adapter == adapter] if first else []
        lossy.append(fidelity_warning(compiled, adapter, method, config))
        return {RECORD_KEY: record(compiled, adapter, method, config, trained)}

    for adapter in adapters or compiled.rules.adapter_names:
        folder = folder_of(directory, adapter)
        parts = _parts(compiled, adapter)
        # No rules text is stored: surgeon's record (peft_record.py) holds the rules as checked JSON values.
        if len(parts) <= 1:
            tensors = _tensors(compiled, adapter)
            config = peft_config(compiled, adapter)
            metadata = {"format": "pt"}
            units.append((folder, [(folder, config, tensors, dict(metadata, **recorded(adapter, None, config)))], None))
            continue
        files = []
        for i, method in enumerate(parts):
            tensors = _tensors(compiled, adapter, method, trained=i == 0)  # train modules go with the first part
            config = peft_config(compiled, adapter, method)
            metadata = {"format": "pt", **recorded(adapter, method, config, i == 0)}
            files.append((folder / MIXTURE_PARTS / method, config, tensors, metadata))
        config = {
            "peft_type": MIXTURE,
            "format_version": 1,
            "methods": list(parts),
            "parts": {m: f"{MIXTURE_PARTS}/{m}" for m in parts},
            "base_model_name_or_path": compiled.name,
        }
        units.append((folder, files, config))
    if not writes_files():
        return
    for message in filter(None, lossy):
        warnings.warn(message, PeftFidelityWarning, stacklevel=3)
    for folder, files, mixture in units:
        _write_adapter(folder, files, mixture)


