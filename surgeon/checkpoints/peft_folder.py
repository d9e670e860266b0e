"""Reading an adapter folder's files as untrusted input: its configs, its layout, its tensors.

An adapter folder may come from anyone, so everything in it is checked before
it is used: each ``adapter_config.json`` is a JSON object of bounded depth
whose ``peft_type`` is a string (the PEFT fields are then typed by
peft_fields.py; surgeon's mixture config by :func:`read_peft_config` here);
every file or part a folder names lies inside it once links are resolved; a
folder whose last save by surgeon did not finish (its marker file is still
there, see :func:`saving`) is refused, since its weights may belong to another
config; and every tensor of ``adapter_model.safetensors`` is floating point
and finite.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from surgeon.atomic import write_text
from surgeon.grammar import DEFAULT_ADAPTER
from surgeon.grammar.names import checked_name
from surgeon.methods import method_for, method_names, peft_reader, registered_methods
from surgeon.methods.peft_format import AdapterError

from surgeon.checkpoints.peft_fields import check_peft_fields, control_character

__all__ = [
    "CONFIG",
    "WEIGHTS",
    "MIXTURE",
    "MIXTURE_PARTS",
    "SAVING",
    "folder_of",
    "read_peft_config",
    "configs",
    "adapter_folders",
    "read_tensors",
    "saving",
]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# An adapter mixing methods: surgeon's own config at the top, one PEFT adapter per method below.
MIXTURE = "SURGEON_MIXTURE"
MIXTURE_PARTS = "mixture"
# Present while surgeon writes an adapter folder's files: left behind, it says they may not belong together.
SAVING = ".surgeon-save-incomplete"
_MAX_DEPTH = 32  # PEFT's configs nest 3 deep; a deeper one is no config (and would exhaust the stack)
_HINT = "an adapter folder is what PEFT's save_pretrained writes"
# surgeon's mixture config: each field's check and what it must be ("surgeon_rules", written by older
# versions, is accepted and never read: rules come from configs and records, never from stored text).
_MIXTURE_FIELDS = {
    "peft_type": (lambda v: v == MIXTURE, MIXTURE),
    "format_version": (lambda v: type(v) is int and v == 1, "1"),
    "methods": (lambda v: isinstance(v, list) and all(isinstance(m, str) for m in v), "a list of method names"),
    "parts": (lambda v: isinstance(v, dict) and v and all(isinstance(p, str) for p in v.values()),
              "a map of method names to subfolders"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string"),
    # written by earlier versions, never read: accepted as bookkeeping
    "surgeon_fingerprint": (lambda v: isinstance(v, str), "a string"),
    "surgeon_rules": (lambda v: isinstance(v, str), "a string"),
}


def folder_of(directory: Path, adapter: str) -> Path:
    """Where adapter ``adapter`` of a saved folder lives: "default" at the top, the others in subfolders (as PEFT)."""
    return directory if adapter == DEFAULT_ADAPTER else directory / adapter


def _inside(path: Path, folder: Path, what: str) -> Path:
    """``path``, or an AdapterError when, links resolved, it lies outside ``folder``."""
    resolved, top = path.resolve(), folder.resolve()
    if resolved != top and top not in resolved.parents:
        raise AdapterError(f"{path} ({what}) lies outside {folder}: it resolves to {resolved}",
                           hint="an adapter folder's files must be inside it; copy them in instead of linking")
    return path


def _depth(value) -> int:
    """How deeply a JSON value nests (counted without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack += [(v, level + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, level + 1) for v in item]
    return deepest


def _check_saved(folder: Path) -> None:
    if (folder / SAVING).exists():
        raise AdapterError(f"{folder}: surgeon's last save into it did not finish ({SAVING} is still there), so its "
                           f"{WEIGHTS} may not belong to its {CONFIG}", hint="save the adapter again")


def read_peft_config(folder) -> dict:
    """The checked ``adapter_config.json`` of one adapter folder (a PEFT adapter's, or surgeon's mixture's)."""
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise AdapterError(f"{folder} holds no {CONFIG}", hint=_HINT)
    _inside(path, folder, CONFIG)
    _check_saved(folder)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise AdapterError(f"{path} is not valid JSON: {str(exc)[:200]}", hint=_HINT) from None
    except OSError as exc:
        raise AdapterError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterError(f"{path} does not say its peft_type", hint=_HINT)
    if _depth(config) > _MAX_DEPTH:
        raise AdapterError(f"{path} nests deeper than {_MAX_DEPTH} levels, which no adapter config does", hint=_HINT)
    peft_type = config["peft_type"]
    if not isinstance(peft_type, str) or control_character(peft_type) is not None:
        raise AdapterError(f"{path}: peft_type must be a name such as \"LORA\", not {str(peft_type)[:60]!r}", hint=_HINT)
    if peft_type == MIXTURE:
        return _mixture_config(path, config)
    if peft_reader(peft_type) is None:
        known = sorted({form.peft_type for form in (m.peft_format() for m in registered_methods()) if form is not None})
        raise AdapterError(f"{path}: surgeon loads {', '.join(known)} adapters; this one is {peft_type[:60]!r}")
    required = ("peft_type", *peft_reader(peft_type).peft_required)
    missing = [k for k in required if k not in config]
    if missing:
        raise AdapterError(f"{path} lacks {', '.join(missing)}", hint="it must say at least: " + ", ".join(required))
    try:
        check_peft_fields(config, warn=False)  # every field typed before anything (surgeon's record) is read
    except AdapterError as error:
        raise AdapterError(f"{path}: {error.diagnostics[0].message}", hint=error.diagnostics[0].hint) from None
    return config


def _mixture_config(path: Path, config: dict) -> dict:
    """surgeon's mixture config, every field type-checked (an unknown one refused unless empty)."""
    for key, value in config.items():
        check, must = _MIXTURE_FIELDS.get(key, (lambda v: v in (None, False, {}, [], ""), "absent"))
        if not check(value):
            raise AdapterError(f"{path}: the mixture's {key[:60]!r} must be {must}, not {repr(value)[:60]}",
                               hint="a mixture folder is what surgeon's save_adapter writes")
    if "parts" not in config:
        raise AdapterError(f"{path}: a surgeon mixture must list its parts")
    for method, sub in config["parts"].items():
        if method not in method_names() or control_character(sub) is not None:
            raise AdapterError(f"{path}: the mixture's part {method[:60]!r} is not a method of surgeon's with a subfolder",
                               hint=f"methods: {', '.join(method_names())}")
    return config


def configs(folder: Path) -> list:
    """(folder, checked PEFT config) of an adapter folder: one, or each part of a mixture."""
    config = read_peft_config(folder)
    if config["peft_type"] != MIXTURE:
        return [(folder, config)]
    found, seen = [], set()
    for method, sub in config["parts"].items():
        part = (folder / sub).resolve()
        if folder.resolve() not in part.parents:
            raise AdapterError(f"{folder / CONFIG}: part {method!r} lies outside the adapter folder")
        if part in seen:
            raise AdapterError(f"{folder / CONFIG}: two parts are the same subfolder ({sub[:60]!r})")
        seen.add(part)
        part_config = read_peft_config(part)
        if part_config["peft_type"] == MIXTURE:
            raise AdapterError(f"{part / CONFIG}: a mixture's part cannot be a mixture")
        held = method_for(method).peft_format()
        if held is None or part_config["peft_type"] != held.peft_type:
            raise AdapterError(f"{part / CONFIG}: the mixture's {method} part holds a {part_config['peft_type']} adapter")
        found.append((part, part_config))
    return found


def adapter_folders(directory) -> list:
    """(name, folder) of every adapter in ``directory``: "default" at its top, others in subfolders."""
    directory = Path(directory)
    found = [(DEFAULT_ADAPTER, directory)] if (directory / CONFIG).is_file() else []
    if directory.is_dir():
        for p in sorted(directory.iterdir()):
            if p.is_dir() and (p / CONFIG).is_file():
                # a subfolder's name becomes an adapter's: the one name rule, as for names written in rules
                found.append((checked_name(p.name, where=str(p)), _inside(p, directory, "an adapter's subfolder")))
    if not found:
        raise AdapterError(f"{directory} holds no {CONFIG}", hint=_HINT)
    return found


def read_tensors(folder: Path) -> dict:
    """Every tensor of ``folder``'s weights file, each checked to be floating point."""
    weights_path = folder / WEIGHTS
    if not weights_path.is_file():
        hint = "surgeon reads only safetensors, never pickles" if (folder / "adapter_model.bin").exists() else None
        raise AdapterError(f"{folder} holds no {WEIGHTS}", hint=hint)
    _inside(weights_path, folder, WEIGHTS)
    try:
        with safe_open(str(weights_path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise AdapterError(f"cannot read {weights_path}: {str(exc)[:200]}", hint="the file is truncated or not safetensors") from None
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterError(f"{weights_path}: {key[:120]} holds {str(tensor.dtype).removeprefix('torch.')} values, "
                               "not floating point", hint="adapter weights are float tensors; the file is not an adapter's")
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{weights_path}: {key[:120]} holds NaN or infinite values",
                               hint="the adapter diverged in training, or the file is damaged")
    return tensors


@contextlib.contextmanager
def saving(folder: Path):
    """Mark ``folder`` as being written while the body writes its files: a crash leaves the mark, and readers
    refuse the folder (its weights may belong to another config) until a save completes.

    Yields a list: the body appends to it each time it has replaced a file. An error before the first
    replacement leaves the folder as it was, so the mark goes; one after it stays."""
    marker = folder / SAVING
    write_text(marker, "surgeon is writing this adapter folder; if no save is running, it was interrupted\n")
    replaced: list = []
    try:
        yield replaced
    except BaseException:
        if not replaced:
            os.unlink(marker)
        raise
    os.unlink(marker)
