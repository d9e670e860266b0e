"""Pieces of PEFT's adapter format shared by the methods (each method maps its own config).

A method's SiteAdapter says how its sites are written in PEFT's
``adapter_config.json`` (``peft_type`` and ``peft_config(sites)``) and how a
PEFT config of that type reads back as surgery text (``rules_from_peft``);
this module holds what the LoRA family shares: one rank and alpha per adapter
plus ``rank_pattern``/``alpha_pattern`` for sites that differ, and the
selectors that match what PEFT's ``target_modules`` entries match.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from surgeon.grammar.diagnostics import SurgeryError

__all__ = [
    "PREFIX",
    "AdapterError",
    "peft_names",
    "peft_literal",
    "peft_where",
    "peft_targets",
    "refuse",
    "lora_family_config",
    "lora_family_rules",
    "common",
]

PREFIX = "base_model.model."


class AdapterError(SurgeryError):
    """An adapter folder that cannot be read, or that does not fit the model."""


def common(values):
    """The most common of ``values`` (the first seen among equals)."""
    return Counter(values).most_common(1)[0][0]


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


def peft_names(names) -> str:
    """Selectors matching PEFT's rule for a list entry: the name itself, or a path ending in '.name'."""
    body = _alternation(names)
    return f'"{body}", "*.{body}"'


def peft_targets(targets) -> str | None:
    """The selector for a config's ``target_modules`` (a list, or one regex)."""
    if isinstance(targets, str):
        return f're"{targets}"'
    return peft_names(targets) if targets else None


def peft_literal(pattern: str) -> str | None:
    """The plain text a PEFT pattern key stands for, if it has no regex syntax but escapes."""
    if re.fullmatch(r"\w+", pattern):
        return pattern
    text = re.sub(r"\\(.)", r"\1", pattern)
    return text if re.escape(text) == pattern else None


def lora_family_config(sites, scale_of=None, rank_of=None) -> dict:
    """``r``, ``alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora`` and ``target_modules`` for sites.

    The most common rank, rslora flag and alpha are the adapter's; sites that
    differ get their escaped path in the patterns, with the alpha that gives
    them their own scale under the adapter-wide rslora flag.
    """
    scale_of = scale_of or (lambda s: s.config.scale)
    rank_of = rank_of or (lambda s: s.config.r)
    rslora = common(getattr(s.config, "rslora", False) for s in sites)
    rank = common(rank_of(s) for s in sites)

    def alpha_for(s):
        value = scale_of(s) * (math.sqrt(rank_of(s)) if rslora else rank_of(s))
        return int(value) if float(value).is_integer() else value

    alpha = common(alpha_for(s) for s in sites)
    return dict(
        r=rank,
        alpha=alpha,
        use_rslora=rslora,
        target_modules=[s.path for s in sites],
        rank_pattern={re.escape(s.path): rank_of(s) for s in sites if rank_of(s) != rank},
        alpha_pattern={re.escape(s.path): alpha_for(s) for s in sites if alpha_for(s) != alpha},
    )


def peft_where(config: dict) -> str:
    """The where clause for a config's layers_to_transform ("" when it has none)."""
    layers = config.get("layers_to_transform")
    if layers is None:
        return ""
    return f"layer in {list(layers) if isinstance(layers, list) else [layers]}"


def lora_family_rules(config: dict, method: str, alpha_key: str = "lora_alpha", extra: str = "") -> list:
    """Rules giving every site PEFT's rank and alpha (rank_pattern/alpha_pattern included).

    Later rules win, so each pattern's sites get their own rank and alpha.
    """
    r, alpha = config["r"], config[alpha_key]
    targets = config["target_modules"]
    where = peft_where(config)
    if targets == "all-linear":
        selector = "type(Linear), type(Conv1D)"
        where = " and ".join(filter(None, ['not name("*lm_head")', where]))
    else:
        selector = peft_targets(targets)
    lines = []
    if selector is not None:
        lines.append(f"match {selector}{f' where {where}' if where else ''} apply {method}(r={r}, alpha={alpha}{extra})")
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    groups: dict = {}
    for key in dict.fromkeys([*ranks, *alphas]):
        groups.setdefault((ranks.get(key, r), alphas.get(key, alpha)), []).append(key)
    for (rank, key_alpha), keys in groups.items():
        literals = [peft_literal(k) for k in keys]
        listed = isinstance(targets, list)
        if listed and all(lit is not None and lit in targets for lit in literals):
            rule_selector, clause = peft_names(literals), where  # each key is itself a target
        elif listed and all(lit is not None for lit in literals):
            rule_selector = peft_names(literals)  # ... but only where a target matches too
            body = _alternation(targets)
            clause = " and ".join(filter(None, [f'(name("{body}") or name("*.{body}"))', where]))
        else:
            target = targets if isinstance(targets, str) else "(?:.*\\.)?(?:" + "|".join(map(re.escape, targets or [".*"])) + ")"
            rule_selector = f're"(?=(?:.*\\.)?(?:{"|".join(keys)})$){target}"'
            clause = where
        lines.append(f"match {rule_selector}{f' where {clause}' if clause else ''} apply {method}(r={rank}, alpha={key_alpha}{extra})")
    return lines


def refuse(config: dict, *fields: str) -> None:
    """An AdapterError for a config field surgeon does not implement, when it is set."""
    for field in fields:
        if config.get(field):
            raise AdapterError(f"{config['peft_type']}'s {field} is not supported yet (it is {config[field]!r})")
