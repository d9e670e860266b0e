"""Surgeon's record of an adapter's rules, kept beside PEFT's config, which holds less.

PEFT's ``adapter_config.json`` holds some settings once per adapter, so rules
that give sites different values cannot be written there (saving warns where
PEFT would read them otherwise: peft_fidelity.py). The
exact per-site settings always go into the metadata of
``adapter_model.safetensors`` (a string map PEFT does not read), key
``surgeon_sites``, as JSON::

    {"format_version": 1,
     "peft_config_sha256": "<sha256 of the config's fields this file was written with>",
     "sites": [{"path": "model.layers.0.self_attn.q_proj", "method": "lora", "config": {"r": 4, "dropout": 0.05}}, ...],
     "trained": ["lm_head"]}

``config`` holds the method's arguments that differ from their defaults, as
the file holds the site (LoRA's PiSSA as the rank-2r LoRA it is saved as).
Reading it never goes through rules text: each value is checked against the
method's signature (type and range) and the rules are built as objects, one
exact-path glob per group of equal sites. A record that is absent (PEFT's own
files) is not missed; one that does not parse, names what the method cannot
take, belongs to another config (the config was edited since) or does not
match the weights' modules is passed over with a warning, and the adapter is
read from its PEFT config, as PEFT reads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings

from safetensors import SafetensorError, safe_open

from surgeon.grammar import rules as ir
from surgeon.grammar.check import check_rules
from surgeon.methods import get_method, method_for, method_names
from surgeon.methods.peft_format import PREFIX, PeftFidelityWarning, path_globs

from surgeon.checkpoints.peft_fields import control_character

__all__ = ["RECORD_KEY", "record", "saved_sites", "read_metadata", "recorded_rules"]

RECORD_KEY = "surgeon_sites"
_VERSION = 1
# Config fields that say nothing of the adapter's computation: tools rewrite them freely.
_BOOKKEEPING = ("task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version")


def _digest(config: dict) -> str:
    kept = {k: v for k, v in config.items() if k not in _BOOKKEEPING}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def saved_sites(plan, adapter: str, method: str | None) -> list:
    """(path, method, config as saved) of the adapter's sites in ``plan`` (of one method), in plan order."""
    by_method: dict = {}
    for site in plan.sites:
        if site.adapter == adapter and method in (None, site.method):
            by_method.setdefault(site.method, []).append(site)
    configs = {}
    for name, sites in by_method.items():
        for site, config in zip(sites, method_for(name).peft_format().peft_saved_configs(sites)):
            configs[site.path] = (name, config)
    return [(s.path, *configs[s.path]) for s in plan.sites if s.path in configs and s.adapter == adapter]


def _arguments(method: str, config) -> dict:
    """The config's arguments that differ from the method's defaults, as JSON values."""
    out = {}
    for param in get_method(method).params:
        value = getattr(config, param.name)
        if not param.required and value == param.default:
            continue
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)  # alpha=16, as written (the checker makes it a float again)
        out[param.name] = list(value) if isinstance(value, tuple) else value
    return out


def record(plan, adapter: str, method: str | None, config: dict, trained: list) -> str:
    """The metadata value for one PEFT adapter file (one adapter of ``plan``, or one method's part of a mixture)."""
    sites = [
        {"path": path, "method": name, "config": _arguments(name, cfg)} for path, name, cfg in saved_sites(plan, adapter, method)
    ]
    body = {"format_version": _VERSION, "peft_config_sha256": _digest(config), "sites": sites, "trained": list(trained)}
    return json.dumps(body)  # the arguments in the signature's order, as a person writes them


class _Invalid(Exception):
    """Why a record cannot be used."""


def _value(value):
    """A JSON value as a rules value (lists become tuples); anything else is invalid."""
    if isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    if isinstance(value, list) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return tuple(value)
    raise _Invalid(f"a value of another type ({type(value).__name__})")


def _rules(body: dict, config: dict) -> tuple:
    """Checked rules (objects) from a parsed record: one rule per group of sites with equal settings."""
    if not isinstance(body, dict) or type(body.get("format_version")) is not int or body["format_version"] != _VERSION:
        raise _Invalid(f"its format_version is not {_VERSION}")
    if control_character(body) is not None:  # no module path or value holds one; it could not be printed as rules
        raise _Invalid("it holds a control character")
    sites, trained = body.get("sites"), body.get("trained", [])
    if not isinstance(sites, list) or not isinstance(trained, list) or not all(isinstance(t, str) for t in trained):
        raise _Invalid("it lists no sites")
    groups: dict = {}
    for entry in sites:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("config"), dict):
            raise _Invalid("a site entry is not {path, method, config}")
        method = entry.get("method")
        if method not in method_names():
            raise _Invalid(f"it names the method {method!r}")
        held = method_for(method).peft_format()
        if held is None or not held.holds(config):  # methods sharing a peft_type are told apart by the config
            raise _Invalid(f"it gives {entry['path']} the method {method}, which a {config['peft_type']} file does not hold")
        arguments = tuple(ir.Argument(str(k), _value(v)) for k, v in entry["config"].items())
        groups.setdefault((method, arguments), []).append(entry["path"])
    paths = [entry["path"] for entry in sites] + trained
    if len(set(paths)) != len(paths):
        raise _Invalid("it lists a module twice")
    rules = [
        ir.Rule(tuple(ir.GlobSelector(g) for g in path_globs(paths)), ir.Apply(ir.MethodCall(method, arguments)))
        for (method, arguments), paths in groups.items()
    ]
    if trained:
        rules.append(ir.Rule(tuple(ir.GlobSelector(g) for g in path_globs(trained)), ir.Train()))
    checked, diagnostics = check_rules(ir.RuleSet((ir.Adapter(ir.DEFAULT_ADAPTER, tuple(rules)),)))
    errors = [d for d in diagnostics if d.is_error]
    if errors:
        raise _Invalid(f"surgeon's rules checker refuses it ({errors[0].message})")
    return checked.adapters[0].rules


def _check_weights(body: dict, keys) -> None:
    """Every site has weights, and every per-module weight belongs to a site or a trained module."""
    sites = {entry["path"] for entry in body["sites"]}
    owners = sites | set(body.get("trained", []))
    seen = set()
    for key in keys:
        if not key.startswith(PREFIX):
            continue  # weights saved once per adapter (VeRA's projections)
        segments = key[len(PREFIX) :].split(".")  # the module is the longest listed path before the tensor's name
        prefixes = (".".join(segments[:i]) for i in range(len(segments) - 1, 0, -1))
        owner = next((p for p in prefixes if p in owners), None)
        if owner is None:
            raise _Invalid(f"the weights hold {key}, of a module it does not list")
        seen.add(owner)
    if sites - seen:
        raise _Invalid(f"the weights hold nothing for {sorted(sites - seen)[0]}")


def read_metadata(weights_path) -> tuple:
    """(safetensors metadata or None, tensor names) of a weights file; (None, []) when it cannot be read."""
    try:
        with safe_open(str(weights_path), "pt") as f:
            return f.metadata(), list(f.keys())
    except (SafetensorError, OSError, ValueError):
        return None, []  # the loader says what is wrong with the file; printing rules needs only the config


def recorded_rules(weights_path, config: dict, metadata: dict | None, keys) -> tuple | None:
    """The record's rules for one PEFT adapter file, or None: no record, or one that cannot be used (a warning says why)."""
    if not metadata or RECORD_KEY not in metadata:
        return None
    try:
        try:
            body = json.loads(metadata[RECORD_KEY])
        except (ValueError, RecursionError):
            raise _Invalid("it is not JSON") from None
        rules = _rules(body, config)
        if not isinstance(body.get("peft_config_sha256"), str) or body["peft_config_sha256"] != _digest(config):
            raise _Invalid("adapter_config.json was changed after surgeon wrote it")
        _check_weights(body, keys)
        return rules
    except _Invalid as why:
        warnings.warn(
            f"{weights_path}: surgeon's record of the rules cannot be used: {why}; reading adapter_config.json as PEFT does",
            PeftFidelityWarning,
            stacklevel=3,
        )
        return None
