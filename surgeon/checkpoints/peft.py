"""Adapters in PEFT's file format, both directions.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors``; an
adapter not named "default" goes in a subfolder of its name, as PEFT does.
Keys are ``base_model.model.<module path>.lora_A.weight`` (r, in),
``.lora_B.weight`` (out, r), ``.lora_B.bias`` with ``lora_bias``, and
``base_model.model.<module path>.<param>`` for ``modules_to_save``.

PEFT has one rank, alpha and rslora flag per adapter plus regex patterns; a
surgeon adapter may give every site its own. The writer takes the most common
rank and alpha as the defaults and lists the others in ``rank_pattern`` and
``alpha_pattern`` (keyed by the escaped module path), so PEFT computes the same
scale for every site. The reader turns a config back into rules
(:func:`rules_from_peft`), so a loaded adapter is planned and checked like any
other. Only safetensors are read; a config or tensor that does not fit the
model is an error, never silently ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path

from surgeon.grammar import DEFAULT_ADAPTER, parse
from surgeon.grammar.diagnostics import SurgeryError

from .atomic import atomic_path, output_folder, write_text

__all__ = [
    "save_adapter",
    "load_adapter",
    "peft_config",
    "rules_from_peft",
    "read_peft_config",
    "adapter_folders",
    "rules_from_peft_folder",
    "AdapterError",
]

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# What a config must say, by peft_type.
_REQUIRED = {
    "LORA": ("peft_type", "r", "lora_alpha", "target_modules"),
    "LOHA": ("peft_type", "r", "alpha", "target_modules"),
    "LOKR": ("peft_type", "r", "alpha", "target_modules"),
    "IA3": ("peft_type", "target_modules"),
}


class AdapterError(SurgeryError):
    """An adapter folder that cannot be read, or that does not fit the model."""


def _folder(directory: Path, adapter: str) -> Path:
    return directory if adapter == DEFAULT_ADAPTER else directory / adapter


def fingerprint(shapes: dict) -> str:
    """A short hash of the adapted sites' weight shapes: which base model an adapter was made for."""
    text = json.dumps(sorted((k, list(v)) for k, v in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def peft_config(compiled, adapter: str) -> dict:
    """PEFT's adapter_config.json for one adapter of a compiled model."""
    sites = [s for s in compiled.plan.sites if s.adapter == adapter]
    trained = [t.path for t in compiled.plan.trained if t.adapter == adapter]
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": compiled.name, "inference_mode": True}
    if not sites:
        config.update(r=8, lora_alpha=8, target_modules=[], modules_to_save=trained or None)
        return config
    methods = sorted({s.method for s in sites})
    if len(methods) > 1:
        raise AdapterError(
            f"adapter '{adapter}' uses {' and '.join(methods)}: a PEFT adapter holds one method, not a mixture",
            hint="give each method its own adapter block to save them in PEFT's format",
        )
    if methods == ["ia3"]:
        config.update(
            peft_type="IA3",
            target_modules=[s.path for s in sites],
            feedforward_modules=[s.path for s in sites if s.config.feedforward],
            fan_in_fan_out=any(s.kind == "hf_conv1d" for s in sites),
            modules_to_save=trained or None,
            init_ia3_weights=True,
        )
        return config
    rslora = Counter(s.config.rslora for s in sites).most_common(1)[0][0]
    rank = Counter(s.config.r for s in sites).most_common(1)[0][0]

    def alpha_for(s):  # the alpha that gives this site its scale under the adapter-wide rslora flag
        value = s.config.scale * (math.sqrt(s.config.r) if rslora else s.config.r)
        return int(value) if float(value).is_integer() else value

    alpha = Counter(alpha_for(s) for s in sites).most_common(1)[0][0]
    patterns = dict(
        r=rank,
        target_modules=[s.path for s in sites],
        rank_pattern={re.escape(s.path): s.config.r for s in sites if s.config.r != rank},
        alpha_pattern={re.escape(s.path): alpha_for(s) for s in sites if alpha_for(s) != alpha},
        modules_to_save=trained or None,
    )
    if methods == ["loha"]:
        config.update(peft_type="LOHA", alpha=alpha, rank_dropout=0.0, module_dropout=0.0, init_weights=True, **patterns)
        return config
    if methods == ["lokr"]:
        shapes = {(s.config.factor, s.config.decompose_both) for s in sites}
        if len(shapes) > 1:
            raise AdapterError(f"adapter '{adapter}' mixes LoKr factor/decompose_both settings, which PEFT holds once per adapter")
        factor, decompose_both = shapes.pop()
        config.update(
            peft_type="LOKR", alpha=alpha, decompose_both=decompose_both, decompose_factor=factor or -1,
            rank_dropout=0.0, module_dropout=0.0, rank_dropout_scale=False, init_weights=True, **patterns,
        )
        return config
    init = sites[0].config.init
    config.update(
        r=rank,
        lora_alpha=alpha,
        use_rslora=rslora,
        target_modules=[s.path for s in sites],
        rank_pattern={re.escape(s.path): s.config.r for s in sites if s.config.r != rank},
        alpha_pattern={re.escape(s.path): alpha_for(s) for s in sites if alpha_for(s) != alpha},
        lora_dropout=Counter(s.config.dropout for s in sites).most_common(1)[0][0],
        lora_bias=any(s.config.bias for s in sites),
        fan_in_fan_out=any(s.kind == "hf_conv1d" for s in sites),
        modules_to_save=trained or None,
        init_lora_weights={"kaiming": True, "gaussian": "gaussian", "zeros": False}[init],
        bias="none",
        use_dora=methods == ["dora"],
    )
    return config


def save_adapter(compiled, directory, adapters=None) -> None:
    """Write adapters in PEFT's format (every adapter of the model by default)."""
    from safetensors.torch import save_file

    directory = output_folder(directory)
    for adapter in adapters or compiled.rules.adapter_names:
        folder = output_folder(_folder(directory, adapter))
        tensors, shapes = {}, {}
        for name, path, module in compiled.sites():
            if name != adapter:
                continue
            for suffix, tensor in module.peft_state().items():
                tensors[f"{PREFIX}{path}.{suffix}"] = tensor.detach()
            shapes[path] = compiled.base_model.get_submodule(path).weight.shape
        for t in compiled.plan.trained:
            if t.adapter == adapter:
                module = compiled.trained[t.path.replace(".", "__")]
                for pname, param in module.named_parameters():
                    tensors[f"{PREFIX}{t.path}.{pname}"] = param.detach()
        tensors = {k: v.to("cpu").contiguous().clone() for k, v in tensors.items()}
        rules = "".join(f"{rule}\n" for rule in compiled.rules.adapter(adapter).rules)
        metadata = {"format": "pt", "surgeon_rules": rules, "surgeon_fingerprint": fingerprint(shapes)}
        with atomic_path(folder / WEIGHTS) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        write_text(folder / CONFIG, json.dumps(peft_config(compiled, adapter), indent=2, sort_keys=True) + "\n")


def read_peft_config(folder) -> dict:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise AdapterError(f"{folder} holds no {CONFIG}", hint="an adapter folder is what PEFT's save_pretrained writes")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from None
    required = _REQUIRED.get(config.get("peft_type"), _REQUIRED["LORA"])
    missing = [k for k in required if k not in config]
    if missing:
        raise AdapterError(f"{path} lacks {', '.join(missing)}", hint="it must say at least: " + ", ".join(required))
    if config["peft_type"] not in _REQUIRED:
        raise AdapterError(
            f"{path}: surgeon loads {' and '.join(sorted(_REQUIRED))} adapters; this one is {config['peft_type']}"
        )
    for unsupported in ("layer_replication", "alora_invocation_tokens", "target_parameters"):
        if config.get(unsupported):
            raise AdapterError(f"{path}: {unsupported} is not supported yet")
    return config


def _compact(names) -> list:
    """Names that differ only in one layer number, written once: model.layers.{1,2,3}.mlp.up_proj."""
    groups: dict = {}
    for name in names:
        match = re.search(r"(?<=\.)\d+(?=\.)", name)
        key = (name[: match.start()], name[match.end() :]) if match else (name, None)
        groups.setdefault(key, []).append(match.group() if match else None)
    out = []
    for (head, tail), numbers in groups.items():
        if tail is None:
            out.append(head)
        else:
            out.append(f"{head}{numbers[0] if len(numbers) == 1 else '{' + ','.join(numbers) + '}'}{tail}")
    return out


def _alternation(names) -> str:
    names = _compact(names)
    return names[0] if len(names) == 1 else "{" + ",".join(names) + "}"


def _names(names) -> str:
    """Selectors matching PEFT's rule for a list entry: the name itself, or a path ending in '.name'."""
    body = _alternation(names)
    return f'"{body}", "*.{body}"'


def _literal(pattern: str) -> str | None:
    """The plain text a PEFT pattern key stands for, if it has no regex syntax but escapes."""
    if re.fullmatch(r"\w+", pattern):
        return pattern
    text = re.sub(r"\\(.)", r"\1", pattern)
    return text if re.escape(text) == pattern else None


def _ia3_rules(config: dict) -> str:
    lines = [f"# from a PEFT adapter_config.json (base model: {config.get('base_model_name_or_path')})"]
    for key, arguments in (("target_modules", ""), ("feedforward_modules", "feedforward=true")):
        names = config.get(key)
        if not names:
            continue
        selector = f're"{names}"' if isinstance(names, str) else _names(names)
        lines.append(f"match {selector} apply ia3({arguments})")  # feed-forward sites: the later rule wins
    if config.get("modules_to_save"):
        lines.append(f"match {_names(config['modules_to_save'])} train")
    return "\n".join(lines) + "\n"


def rules_from_peft(config: dict) -> str:
    """Surgery text that targets what a PEFT config targets, with the same ranks and scales."""
    if config["peft_type"] == "IA3":
        return _ia3_rules(config)
    if config["peft_type"] in ("LOHA", "LOKR"):
        for dropout in ("rank_dropout", "module_dropout"):
            if config.get(dropout):
                raise AdapterError(f"{config['peft_type']}'s {dropout} is not supported yet (it is {config[dropout]})")
        config = {**config, "lora_alpha": config["alpha"]}
    r, alpha = config["r"], config["lora_alpha"]
    method = {"LOHA": "loha", "LOKR": "lokr"}.get(config["peft_type"], "dora" if config.get("use_dora") else "lora")
    extra = (", rslora=true" if config.get("use_rslora") else "") + (", bias=true" if config.get("lora_bias") else "")
    if config["peft_type"] == "LOKR":
        factor = config.get("decompose_factor", -1)
        extra += (f", factor={factor}" if factor and factor > 0 else "") + (", decompose_both=true" if config.get("decompose_both") else "")
    if config.get("lora_dropout"):
        extra += f", dropout={config['lora_dropout']}"
    targets = config["target_modules"]
    lines = [f"# from a PEFT adapter_config.json (base model: {config.get('base_model_name_or_path')})"]
    where = ""
    if config.get("layers_to_transform") is not None:
        layers = config["layers_to_transform"]
        where = f"layer in {list(layers) if isinstance(layers, list) else [layers]}"
    if targets == "all-linear":
        selector = "type(Linear), type(Conv1D)"
        where = " and ".join(filter(None, ['not name("*lm_head")', where]))
    elif isinstance(targets, str):
        selector = f're"{targets}"'
    else:
        selector = _names(targets) if targets else None
    if selector is not None:
        lines.append(f"match {selector}{f' where {where}' if where else ''} apply {method}(r={r}, alpha={alpha}{extra})")
    # rank_pattern / alpha_pattern: later rules win, so each pattern's sites get their own rank and alpha.
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    groups: dict = {}
    for key in dict.fromkeys([*ranks, *alphas]):
        groups.setdefault((ranks.get(key, r), alphas.get(key, alpha)), []).append(key)
    for (rank, key_alpha), keys in groups.items():
        literals = [_literal(k) for k in keys]
        listed = isinstance(targets, list)
        if listed and all(lit is not None and lit in targets for lit in literals):
            rule_selector, clause = _names(literals), where  # each key is itself a target
        elif listed and all(lit is not None for lit in literals):
            rule_selector = _names(literals)  # ... but only where a target matches too
            body = _alternation(targets)
            clause = " and ".join(filter(None, [f'(name("{body}") or name("*.{body}"))', where]))
        else:
            target = targets if isinstance(targets, str) else "(?:.*\\.)?(?:" + "|".join(map(re.escape, targets or [".*"])) + ")"
            rule_selector = f're"(?=(?:.*\\.)?(?:{"|".join(keys)})$){target}"'
            clause = where
        lines.append(f"match {rule_selector}{f' where {clause}' if clause else ''} apply {method}(r={rank}, alpha={key_alpha}{extra})")
    for name in config.get("exclude_modules") or ():
        lines.append(f"match {_names([name])} skip")
    if config.get("modules_to_save"):
        lines.append(f"match {_names(config['modules_to_save'])} train")
    return "\n".join(lines) + "\n"


def adapter_folders(directory) -> list:
    """(name, folder) of every adapter in ``directory``: "default" at its top, others in subfolders."""
    directory = Path(directory)
    found = [(DEFAULT_ADAPTER, directory)] if (directory / CONFIG).is_file() else []
    if directory.is_dir():
        found += [(p.name, p) for p in sorted(directory.iterdir()) if p.is_dir() and (p / CONFIG).is_file()]
    if not found:
        raise AdapterError(f"{directory} holds no {CONFIG}", hint="an adapter folder is what PEFT's save_pretrained writes")
    return found


def rules_from_peft_folder(directory) -> str:
    """Surgery text for every adapter of a folder: "default" at the top level, the others in blocks."""
    parts = []
    for name, folder in adapter_folders(directory):
        text = rules_from_peft(read_peft_config(folder))
        if name == DEFAULT_ADAPTER:
            parts.append(text)
        else:
            body = "".join(f"  {line}\n" for line in text.splitlines())
            parts.append(f'adapter "{name}" {{\n{body}}}\n')
    return "\n".join(parts)


def load_adapter(compiled, directory, name: str | None = None) -> str:
    """Load a PEFT-format adapter (surgeon's or PEFT's) as adapter ``name``; returns the name.

    A folder holding several adapters (subfolders) loads them all under their own names.
    """
    folders = adapter_folders(directory)
    if len(folders) > 1 and name is None:
        for adapter, folder in folders:
            _load_one(compiled, folder, adapter)
        return ", ".join(a for a, _ in folders)
    return _load_one(compiled, folders[0][1], name or folders[0][0])


def _load_one(compiled, folder: Path, name: str) -> str:
    from safetensors import SafetensorError, safe_open

    config = read_peft_config(folder)
    weights_path = folder / WEIGHTS
    if not weights_path.is_file():
        hint = "surgeon reads only safetensors, never pickles" if (folder / "adapter_model.bin").exists() else None
        raise AdapterError(f"{folder} holds no {WEIGHTS}", hint=hint)
    try:
        with safe_open(str(weights_path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"cannot read {weights_path}: {exc}", hint="the file is truncated or not safetensors") from None
    text = rules_from_peft(config)
    rules = parse(text, path=f"{folder / CONFIG} (as rules)")
    compiled.add_adapter(name, rules)
    _fill(compiled, name, tensors, weights_path)
    return name


def _fill(compiled, adapter: str, tensors: dict, source: Path) -> None:
    import torch

    expected = {}
    for name, path, module in compiled.sites():
        if name == adapter:
            for suffix, tensor in module.peft_state().items():
                expected[f"{PREFIX}{path}.{suffix}"] = tensor
    for t in compiled.plan.trained:
        if t.adapter == adapter:
            for pname, param in compiled.trained[t.path.replace(".", "__")].named_parameters():
                expected[f"{PREFIX}{t.path}.{pname}"] = param
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
        what = f"weights for modules this model does not adapt: {', '.join(unknown[:3])}" if unknown else ""
        what += ("; " if what else "") + (f"no weights for {', '.join(missing[:3])}" if missing else "")
        raise AdapterError(f"{source} does not fit this model: {what}", hint="was it saved from another base model?")
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
