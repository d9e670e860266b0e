"""Rules from adapter folders: built as objects from typed config values, checked as objects, printed last.

A PEFT config is read by its method's ``rules_from_peft`` (its PeftFormat: surgeon/methods/<name>/peft.py)
into ``ir.Rule`` objects, after peft_fields.py has type-checked every field;
surgeon's record in the weights' metadata is read into objects too
(peft_record.py). The rules are checked with ``checked_rule_set``, exactly as
parsed text is, and never go through text: text is only ever printed from the
checked objects (``str(rule)``), for people (``rules-from-peft``), so a value
in a file can neither add a rule nor change one's shape.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgeon.grammar import DEFAULT_ADAPTER
from surgeon.grammar import rules as ir
from surgeon.grammar.check import checked_rule_set
from surgeon.methods.adapter import peft_reader

from surgeon.checkpoints.peft_fields import check_peft_fields, control_character
from surgeon.checkpoints.peft_folder import CONFIG, WEIGHTS, adapter_folders, configs
from surgeon.methods.peft_format import peft_names
from surgeon.checkpoints.peft_record import read_metadata, recorded_rules

__all__ = [
    "peft_rules",
    "rules_from_peft",
    "rules_from_folder",
    "rules_from_peft_folder",
    "peft_rule_set",
    "part_rules",
    "adapter_rule_set",
    "exact_rules_from_folder",
]


def peft_rules(config: dict) -> tuple:
    """The rules (unchecked objects) that target what a PEFT config targets, with the same ranks and scales.

    A field surgeon does not implement, set to anything but PEFT's default, is
    refused naming it (see peft_fields.py), as is a field of the wrong type.
    """
    check_peft_fields(config)
    rules = list(peft_reader(config["peft_type"]).rules_from_peft(config))
    excluded = config.get("exclude_modules")
    if isinstance(excluded, str):  # PEFT: one regex the whole name must match
        rules.append(ir.Rule((ir.RegexSelector(excluded),), ir.Skip()))
    elif excluded:
        rules.append(ir.Rule(peft_names(excluded), ir.Skip()))
    if config.get("modules_to_save"):
        rules.append(ir.Rule(peft_names(config["modules_to_save"]), ir.Train()))
    return tuple(rules)


def _checked(adapters, path: str) -> ir.RuleSet:
    """``adapters`` ((name, rules) pairs) as one checked RuleSet: a RulesError names ``path``."""
    return checked_rule_set(ir.RuleSet(tuple(ir.Adapter(name, tuple(rules)) for name, rules in adapters), path=path))


def _header(config: dict) -> str:
    name = config.get("base_model_name_or_path")
    # a comment ends at a line break: a name holding one is printed as an escaped JSON string
    shown = name if isinstance(name, str) and control_character(name) is None else json.dumps(name)
    return f"# from a PEFT adapter_config.json (base model: {shown})"


def _text(config: dict, rules: tuple, note: str | None = None) -> str:
    return "\n".join([_header(config), *map(str, rules), *([note] if note else [])]) + "\n"


def rules_from_peft(config: dict) -> str:
    """Surgery text (printed from the checked rules) for what a PEFT config targets."""
    rule_set = _checked([(DEFAULT_ADAPTER, peft_rules(config))], path=f"{CONFIG} (as rules)")
    return _text(config, rule_set.rules)


def _block(name: str, text: str) -> str:
    if name == DEFAULT_ADAPTER:
        return text
    body = "".join(f"  {line}\n" for line in text.splitlines())
    return f"adapter {json.dumps(name)} {{\n{body}}}\n"  # a checked name (grammar/names.py): quoting cannot fail


def rules_from_folder(folder) -> str:
    """Surgery text for one adapter folder (a PEFT adapter, or surgeon's mixture of them), as PEFT reads it."""
    folder = Path(folder)
    found = [(config, peft_rules(config)) for _, config in configs(folder)]
    _checked([(DEFAULT_ADAPTER, [r for _, rules in found for r in rules])], path=f"{folder / CONFIG} (as rules)")
    return "\n".join(_text(config, rules) for config, rules in found)  # each part's header before its rules


def rules_from_peft_folder(directory) -> str:
    """Surgery text for every adapter of a folder: "default" at the top level, the others in blocks.

    From the PEFT configs alone, as PEFT reads them (:func:`exact_rules_from_folder` reads surgeon's record too).
    """
    return "\n".join(_block(name, rules_from_folder(folder)) for name, folder in adapter_folders(directory))


def peft_rule_set(directory) -> ir.RuleSet:
    """The checked RuleSet of every adapter of a folder, from the PEFT configs alone (what
    :func:`rules_from_peft_folder` prints), built without text."""
    directory = Path(directory)
    adapters = [(name, [r for _, c in configs(folder) for r in peft_rules(c)]) for name, folder in adapter_folders(directory)]
    return _checked(adapters, path=f"{directory} (adapter_config.json as rules)")


def part_rules(part: Path, config: dict, keys=None) -> tuple:
    """(rules, from surgeon's record?) of one PEFT adapter file: the record's checked rules where it has a
    usable one, else the config's (unchecked) as PEFT reads it. ``keys``: the tensor names (default: the file's)."""
    metadata, found = read_metadata(part / WEIGHTS)
    rules = recorded_rules(part / WEIGHTS, config, metadata, found if keys is None else keys)
    return (peft_rules(config), False) if rules is None else (tuple(rules), True)


def adapter_rule_set(name: str, folder: Path, found: list) -> ir.RuleSet:
    """The checked RuleSet of adapter ``name`` from its parts' :func:`part_rules`."""
    return _checked([(name, [r for rules, _ in found for r in rules])], path=f"{folder / CONFIG} (as rules)")


def exact_rules_from_folder(directory) -> tuple:
    """(text, RuleSet) of every adapter of a folder, each from surgeon's record where it has one (else as PEFT reads it)."""
    texts, adapters = [], []
    note = f"# surgeon's exact rules, from its record in {WEIGHTS} (PEFT reads {CONFIG} alone)"
    for name, folder in adapter_folders(directory):
        parts = configs(folder)
        found = [part_rules(part, config) for part, config in parts]
        adapter_rule_set(name, folder, found)  # checked, so that only checked rules are printed
        part_texts = [_text(config, rules, note if recorded else None) for (_, config), (rules, recorded) in zip(parts, found)]
        texts.append(_block(name, "\n".join(part_texts)))
        adapters.append(ir.Adapter(name, tuple(r for part, _ in found for r in part)))
    return "\n".join(texts), _checked([(a.name, a.rules) for a in adapters], path=f"{directory} (as rules)")
