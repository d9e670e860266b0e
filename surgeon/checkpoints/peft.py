"""Adapters in PEFT's file format, both directions.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors``; an
adapter not named "default" goes in a subfolder of its name, as PEFT does.
Keys are ``base_model.model.<module path>.lora_A.weight`` (r, in),
``.lora_B.weight`` (out, r), ``.lora_B.bias`` with ``lora_bias``, and
``base_model.model.<module path>.<param>`` for ``modules_to_save``.

Each method maps its own config fields (``peft_type``, ``peft_config`` and
``rules_from_peft`` on its SiteAdapter; the LoRA family's shared rank/alpha
patterns are in peft_format.py). The reader turns a config back into rules, so
a loaded adapter is planned and checked like any other. An adapter that mixes
methods is saved in surgeon's mixture format (see :func:`save_adapter`). Only
safetensors are read; a config or tensor that does not fit the model is an
error, never silently ignored, and so is a PEFT field surgeon does not
implement (peft_fields.py). What PEFT's config cannot hold per site (LoRA's
dropout, bias) is said when saving, and kept exactly in surgeon's record in the
safetensors metadata, which surgeon reads back (peft_record.py).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from surgeon.distributed import gathered, writes_files
from surgeon.grammar import DEFAULT_ADAPTER, parse
from surgeon.grammar import rules as ir
from surgeon.grammar.names import checked_name
from surgeon.methods._registry import method_names
from surgeon.methods.adapter import adapter_class, peft_reader

from .atomic import atomic_path, output_folder, write_text
from .peft_fields import check_peft_fields
from .peft_format import PREFIX, AdapterError, PeftFidelityWarning, peft_names, regex_text
from .peft_record import RECORD_KEY, fidelity_warning, read_metadata, record, recorded_rules

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
]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# An adapter mixing methods: surgeon's own config at the top, one PEFT adapter per method below.
MIXTURE = "SURGEON_MIXTURE"
MIXTURE_PARTS = "mixture"


def _folder(directory: Path, adapter: str) -> Path:
    return directory if adapter == DEFAULT_ADAPTER else directory / adapter


def fingerprint(shapes: dict) -> str:
    """A short hash of the adapted sites' weight shapes: which base model an adapter was made for."""
    text = json.dumps(sorted((k, list(v)) for k, v in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def _tensors(compiled, adapter: str, method: str | None = None, trained: bool = True) -> tuple:
    """(PEFT keys -> tensors, site shapes) for one adapter, or for its sites of one method."""
    from surgeon.capture import site_weight

    tensors, shapes = {}, {}
    for key, tensor in _expected(compiled, adapter, method, trained, saving=True).items():
        tensors[key] = gathered(tensor.detach())
    for site in compiled.plan.sites:
        if site.adapter == adapter and method in (None, site.method):
            shapes[site.path] = site_weight(compiled.base_model, compiled.captured.sites[site.path]).shape  # MHA: in_proj_weight
    return {k: v.to("cpu").contiguous().clone() for k, v in tensors.items()}, shapes


def _expected(compiled, adapter: str, method: str | None = None, trained: bool = True, saving: bool = False) -> dict:
    """PEFT key -> the live tensor it saves from or loads into, for one adapter (or its sites of one method)."""
    expected, modules = {}, {}
    for site in compiled.plan.sites:
        if site.adapter != adapter or method not in (None, site.method):
            continue
        module = compiled.adapter_module(adapter, site.path)
        modules.setdefault(site.method, []).append(module)
        for suffix, tensor in (module.peft_saved_state() if saving else module.peft_state()).items():
            expected[f"{PREFIX}{site.path}.{suffix}"] = tensor
    for name, group in modules.items():
        expected.update(adapter_class(name).peft_shared_state(group))
    for t in compiled.plan.trained:
        if t.adapter == adapter and trained:
            for pname, param in compiled.trained[t.path.replace(".", "__")].named_parameters():
                expected[f"{PREFIX}{t.path}.{pname}"] = param
    return expected


def _write(folder: Path, config: dict, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    folder = output_folder(folder)
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    write_text(folder / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")


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
    directory = output_folder(directory)
    files, configs, lossy = [], [], []

    def recorded(adapter, method, config, first=True):
        # surgeon's exact record of the sites (PEFT's config may hold less: see peft_record.py)
        trained = [t.path for t in compiled.plan.trained if t.adapter == adapter] if first else []
        lossy.append(fidelity_warning(compiled, adapter, method, config))
        return {RECORD_KEY: record(compiled, adapter, method, config, trained)}

    for adapter in adapters or compiled.rules.adapter_names:
        folder = _folder(directory, adapter)
        rules = "".join(f"{rule}\n" for rule in compiled.rules.adapter(adapter).rules)
        parts = _parts(compiled, adapter)
        if len(parts) <= 1:
            tensors, shapes = _tensors(compiled, adapter)
            config = peft_config(compiled, adapter)
            metadata = {"format": "pt", "surgeon_rules": rules, "surgeon_fingerprint": fingerprint(shapes)}
            files.append((folder, config, tensors, dict(metadata, **recorded(adapter, None, config))))
            continue
        everything = {}
        for i, method in enumerate(parts):
            tensors, shapes = _tensors(compiled, adapter, method, trained=i == 0)  # train modules go with the first part
            config = peft_config(compiled, adapter, method)
            metadata = {"format": "pt", "surgeon_fingerprint": fingerprint(shapes), **recorded(adapter, method, config, i == 0)}
            files.append((folder / MIXTURE_PARTS / method, config, tensors, metadata))
            everything.update(shapes)
        config = {
            "peft_type": MIXTURE,
            "format_version": 1,
            "methods": list(parts),
            "parts": {m: f"{MIXTURE_PARTS}/{m}" for m in parts},
            "base_model_name_or_path": compiled.name,
            "surgeon_rules": rules,
            "surgeon_fingerprint": fingerprint(everything),
        }
        configs.append((folder, config))
    if not writes_files():
        return
    for message in filter(None, lossy):
        warnings.warn(message, PeftFidelityWarning, stacklevel=3)
    for folder, config, tensors, metadata in files:
        _write(folder, config, tensors, metadata)
    for folder, config in configs:
        write_text(output_folder(folder) / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_peft_config(folder) -> dict:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise AdapterError(f"{folder} holds no {CONFIG}", hint="an adapter folder is what PEFT's save_pretrained writes")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterError(f"{path} does not say its peft_type", hint="an adapter folder is what PEFT's save_pretrained writes")
    if config["peft_type"] == MIXTURE:
        if not isinstance(config.get("parts"), dict) or not config["parts"]:
            raise AdapterError(f"{path}: a surgeon mixture must list its parts")
        return config
    if peft_reader(config["peft_type"]) is None:
        known = sorted({adapter_class(m).peft_type for m in method_names()} - {""})
        raise AdapterError(f"{path}: surgeon loads {', '.join(known)} adapters; this one is {config['peft_type']}")
    required = ("peft_type", *peft_reader(config["peft_type"]).peft_required)
    missing = [k for k in required if k not in config]
    if missing:
        raise AdapterError(f"{path} lacks {', '.join(missing)}", hint="it must say at least: " + ", ".join(required))
    return config


def _header(config: dict) -> str:
    return f"# from a PEFT adapter_config.json (base model: {config.get('base_model_name_or_path')})"


def rules_from_peft(config: dict) -> str:
    """Surgery text that targets what a PEFT config targets, with the same ranks and scales.

    A field surgeon does not implement, set to anything but PEFT's default, is
    refused naming it (see peft_fields.py), as is a read field of the wrong type.
    """
    check_peft_fields(config)
    lines = [_header(config)]
    lines += peft_reader(config["peft_type"]).rules_from_peft(config)
    excluded = config.get("exclude_modules")
    if isinstance(excluded, str):  # PEFT: one regex the whole name must match
        lines.append(f"match {regex_text(excluded)} skip")
    elif excluded:
        lines.append(f"match {peft_names(excluded)} skip")
    if config.get("modules_to_save"):
        lines.append(f"match {peft_names(config['modules_to_save'])} train")
    return "\n".join(lines) + "\n"


def _configs(folder: Path) -> list:
    """(folder, PEFT config) of an adapter folder: one, or each part of a mixture."""
    config = read_peft_config(folder)
    if config["peft_type"] != MIXTURE:
        return [(folder, config)]
    found = []
    for method, sub in config["parts"].items():
        part = (folder / sub).resolve()
        if folder.resolve() not in part.parents:
            raise AdapterError(f"{folder / CONFIG}: part {method!r} lies outside the adapter folder")
        part_config = read_peft_config(part)
        if part_config["peft_type"] == MIXTURE:
            raise AdapterError(f"{part / CONFIG}: a mixture's part cannot be a mixture")
        found.append((part, part_config))
    return found


def rules_from_folder(folder) -> str:
    """Surgery text for one adapter folder (a PEFT adapter, or surgeon's mixture of them)."""
    return "\n".join(rules_from_peft(config) for _, config in _configs(Path(folder)))


def adapter_folders(directory) -> list:
    """(name, folder) of every adapter in ``directory``: "default" at its top, others in subfolders."""
    directory = Path(directory)
    found = [(DEFAULT_ADAPTER, directory)] if (directory / CONFIG).is_file() else []
    if directory.is_dir():
        # a subfolder's name becomes an adapter's: the one name rule, as for names written in rules
        found += [(checked_name(p.name, where=str(p)), p) for p in sorted(directory.iterdir()) if p.is_dir() and (p / CONFIG).is_file()]
    if not found:
        raise AdapterError(f"{directory} holds no {CONFIG}", hint="an adapter folder is what PEFT's save_pretrained writes")
    return found


def _block(name: str, text: str) -> str:
    if name == DEFAULT_ADAPTER:
        return text
    body = "".join(f"  {line}\n" for line in text.splitlines())
    return f'adapter "{name}" {{\n{body}}}\n'


def rules_from_peft_folder(directory) -> str:
    """Surgery text for every adapter of a folder: "default" at the top level, the others in blocks.

    From the PEFT configs alone, as PEFT reads them (:func:`exact_rules_from_folder` reads surgeon's record too).
    """
    return "\n".join(_block(name, rules_from_folder(folder)) for name, folder in adapter_folders(directory))


def _part_rules(part: Path, config: dict, keys=None) -> tuple:
    """(checked rules from surgeon's record, or None where it has no usable one; text) of one PEFT adapter file.

    The record's rules are objects, printed and never parsed; without them the text is the config's, as PEFT reads it.
    """
    metadata, found = read_metadata(part / WEIGHTS)
    rules = recorded_rules(part / WEIGHTS, config, metadata, found if keys is None else keys)
    if rules is None:
        return None, rules_from_peft(config)
    note = f"# surgeon's exact rules, from its record in {WEIGHTS} (PEFT reads {CONFIG} alone)"
    return rules, "\n".join([_header(config), *map(str, rules), note]) + "\n"


def _folder_rules(folder: Path, found: list) -> tuple:
    """The rules of an adapter folder from its parts' :func:`_part_rules`: a config's text is parsed, a record's not."""
    if all(rules is None for rules, _ in found):  # a PEFT folder: one text, so diagnostics show its lines
        return parse("\n".join(text for _, text in found), path=f"{folder / CONFIG} (as rules)").rules
    parsed = [rules if rules is not None else parse(text, path=f"{folder / CONFIG} (as rules)").rules for rules, text in found]
    return tuple(rule for rules in parsed for rule in rules)


def exact_rules_from_folder(directory) -> tuple:
    """(text, RuleSet) of every adapter of a folder, each from surgeon's record where it has one (else as PEFT reads it)."""
    texts, adapters = [], []
    for name, folder in adapter_folders(directory):
        found = [_part_rules(part, config) for part, config in _configs(folder)]
        texts.append(_block(name, "\n".join(text for _, text in found)))
        adapters.append(ir.Adapter(name, _folder_rules(folder, found)))
    return "\n".join(texts), ir.RuleSet(tuple(adapters))


def load_adapter(compiled, directory, name: str | None = None) -> str:
    """Load a PEFT-format adapter (surgeon's or PEFT's) as adapter ``name``; returns the name.

    A folder holding several adapters (subfolders) loads them all under their own names.
    """
    if name is not None:
        checked_name(name, where="load_adapter")
    folders = adapter_folders(directory)
    if len(folders) > 1 and name is None:
        for adapter, folder in folders:
            _load_one(compiled, folder, adapter)
        return ", ".join(a for a, _ in folders)
    return _load_one(compiled, folders[0][1], name or folders[0][0])


def _load_one(compiled, folder: Path, name: str) -> str:
    tensors, found = {}, []
    for part, config in _configs(folder):
        part_tensors = _read_tensors(part)
        tensors.update(part_tensors)
        found.append(_part_rules(part, config, keys=part_tensors))  # surgeon's own folder: its exact rules
    source = "\n".join(text for _, text in found) if all(rules is None for rules, _ in found) else None
    rules = ir.Adapter(name, _folder_rules(folder, found))
    compiled.add_adapter(name, ir.RuleSet((rules,), path=f"{folder / CONFIG} (as rules)", source=source))
    _fill(compiled, name, tensors, folder / WEIGHTS)
    return name


def _read_tensors(folder: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    weights_path = folder / WEIGHTS
    if not weights_path.is_file():
        hint = "surgeon reads only safetensors, never pickles" if (folder / "adapter_model.bin").exists() else None
        raise AdapterError(f"{folder} holds no {WEIGHTS}", hint=hint)
    try:
        with safe_open(str(weights_path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"cannot read {weights_path}: {exc}", hint="the file is truncated or not safetensors") from None


def _fill(compiled, adapter: str, tensors: dict, source: Path) -> None:
    import torch

    expected = _expected(compiled, adapter)
    for name, path, module in compiled.sites():
        # PEFT also saves the whole base embedding when one is adapted (save_embedding_layers):
        # accept it when it is the base model's own, refuse a resized or changed one.
        key = f"{PREFIX}{path}.base_layer.weight"
        if name != adapter or key not in tensors:
            continue
        base = compiled.base_model.get_submodule(path).weight.detach()
        if tuple(tensors[key].shape) != tuple(base.shape) or not torch.equal(tensors[key].to(base.dtype), base):
            raise AdapterError(
                f"{source} carries a changed copy of {path}.weight (a resized vocabulary?), which surgeon does not load",
                hint="compile the model the adapter was trained on, with its embedding as saved",
            )
        tensors = {k: v for k, v in tensors.items() if k != key}
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        # every odd tensor at a module the rules adapt: a PEFT setting the reading missed, not another base model
        adapted = tuple(f"{PREFIX}{path}." for owner, path, _ in compiled.sites() if owner == adapter)
        here = all(k.startswith(adapted) for k in unknown + missing)
        what = f"{'tensors its adapters here do not have' if here else 'weights for modules this model does not adapt'}: "
        what = what + ", ".join(unknown[:3]) if unknown else ""
        what += ("; " if what else "") + (f"no weights for {', '.join(missing[:3])}" if missing else "")
        hint = "the adapter uses a PEFT setting surgeon does not read?" if here else "was it saved from another base model?"
        raise AdapterError(f"{source} does not fit this model: {what}", hint=hint)
    for key, param in expected.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != tuple(param.shape):
            raise AdapterError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, this model needs {tuple(param.shape)}",
                hint="the adapter was made for another base model, or another rank",
            )
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key].to(param.dtype))
