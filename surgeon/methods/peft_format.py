"""Pieces of PEFT's adapter format shared by the methods (each method maps its own config).

A method's SiteAdapter says how its sites are written in PEFT's
``adapter_config.json`` (``peft_type`` and ``peft_config(sites)``) and how a
PEFT config of that type reads back as rules (``rules_from_peft``);
this module holds what the LoRA family shares: one rank and alpha per adapter
plus ``rank_pattern``/``alpha_pattern`` for sites that differ, and the
selectors that match what PEFT's ``target_modules`` entries match.

Rules are built as IR objects (surgeon/grammar/rules.py), never as text: a
config value becomes a typed value of a rule (a selector's pattern, an
argument), so no value can add rules or change a rule's shape; text is only
ever printed from the objects.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from surgeon.diagnostics import SurgeryError
from surgeon.grammar.rules import (
    And,
    Apply,
    Argument,
    GlobSelector,
    InList,
    MethodCall,
    NameTest,
    Not,
    Or,
    RegexSelector,
    Rule,
    TypeSelector,
    TypeTest,
)

__all__ = [
    "PREFIX",
    "AdapterError",
    "PeftFidelityWarning",
    "path_globs",
    "peft_names",
    "peft_literal",
    "peft_where",
    "peft_targets",
    "refuse",
    "lora_family_config",
    "lora_family_rules",
    "call_rule",
    "both",
    "ALL_LINEAR",
    "NOT_HEAD",
    "common",
]

PREFIX = "base_model.model."


class AdapterError(SurgeryError):
    """An adapter folder that cannot be read, or that does not fit the model."""


class PeftFidelityWarning(UserWarning):
    """A PEFT file that says less than the rules: PEFT (or surgeon reading it alone) gets other settings."""


def common(values):
    """The most common of ``values`` (the first seen among equals)."""
    return Counter(values).most_common(1)[0][0]


_GLOB_SPECIAL = re.compile(r"([\\*?\[\]{},])")


def path_globs(names) -> list:
    """Globs matching exactly ``names`` (taken literally), paths that differ in one segment written once.

    ``model.layers.{0,1}.self_attn.{q_proj,v_proj}`` stands for four paths; braces
    never nest. Merging two globs that agree on every other segment keeps the
    set exact, so the result matches the names and nothing else.
    """
    items = [tuple((segment,) for segment in name.split(".")) for name in dict.fromkeys(names)]
    merged_any = True
    while merged_any:
        merged_any = False
        for i in range(max(map(len, items), default=0)):
            groups: dict = {}
            for item in items:
                key = (len(item), item[:i], item[i + 1 :]) if i < len(item) else (item,)
                groups.setdefault(key, []).append(item)
            items = []
            for group in groups.values():
                if len(group) > 1:
                    merged_any = True
                    group = [group[0][:i] + (tuple(dict.fromkeys(a for g in group for a in g[i])),) + group[0][i + 1 :]]
                items.append(group[0])
    return [".".join(_segment(alternatives) for alternatives in item) for item in items]


def _segment(alternatives) -> str:
    texts = [_GLOB_SPECIAL.sub(r"\\\1", a) for a in alternatives]
    return texts[0] if len(texts) == 1 else "{" + ",".join(texts) + "}"


def peft_names(names) -> tuple:
    """Selectors matching PEFT's rule for a list entry: the name itself, or a path ending in '.name'."""
    globs = path_globs(names)
    return tuple(GlobSelector(g) for g in globs) + tuple(GlobSelector(f"*.{g}") for g in globs)


def peft_targets(targets) -> tuple | None:
    """The selectors for a config's ``target_modules`` (a list, or one regex); None when it names none."""
    if isinstance(targets, str):
        return (RegexSelector(targets),)
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


def peft_where(config: dict):
    """The where predicate for a config's layers_to_transform (None when it has none).

    PEFT takes the layer index from the first numbered segment (surgeon's
    ``layer``), or with ``layers_pattern`` from the number after that name.
    """
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return None
    layers = tuple(layers) if isinstance(layers, list) else (layers,)
    patterns = config.get("layers_pattern")
    patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
    if not patterns or patterns == [""]:
        return InList("layer", layers)
    # PEFT puts the pattern into a regex; a dotted name ("model.layers") is meant literally
    names = [p if re.fullmatch(r"[\w.]+", p) else peft_literal(p) for p in patterns]
    if None in names:
        raise AdapterError(
            f"{config.get('peft_type')}'s layers_pattern {patterns!r} is a regex; surgeon reads plain names (e.g. \"layers\")"
        )
    globs = path_globs([f"{name}.{i}" for name in names for i in layers])
    return Or(tuple(NameTest(p) for g in globs for p in (f"{g}.*", f"*.{g}.*")))


def both(*predicates):
    """The predicates that are not None, joined by ``and`` (None when none is left)."""
    kept = tuple(p for p in predicates if p is not None)
    return None if not kept else kept[0] if len(kept) == 1 else And(kept)


# PEFT's "all-linear": every linear layer (GPT-2's Conv1D among them) but the output head
ALL_LINEAR = (TypeSelector("Linear"), TypeSelector("Conv1D"))
NOT_HEAD = Not(NameTest("*lm_head"))


def call_rule(selectors: tuple, method: str, arguments, where=None) -> Rule:
    """``match SELECTORS [where WHERE] apply METHOD(ARGUMENTS)``; ``arguments``: (name, value) pairs."""
    call = MethodCall(method, tuple(Argument(name, value) for name, value in arguments))
    return Rule(tuple(selectors), Apply(call), where)


def lora_family_rules(config: dict, method: str, alpha_key: str = "lora_alpha", extra=()) -> list:
    """Rules (IR) giving every site PEFT's rank and alpha (rank_pattern/alpha_pattern included).

    Later rules win, so each pattern's sites get their own rank and alpha. ``extra``: the method's
    other arguments, (name, value) pairs.
    """
    r, alpha = config["r"], config[alpha_key]
    targets = config["target_modules"]
    where = peft_where(config)
    if targets == "all-linear":
        selectors, where = ALL_LINEAR, both(NOT_HEAD, where)
    else:
        selectors = peft_targets(targets)
    rules = []
    if selectors is not None:
        rules.append(call_rule(selectors, method, [("r", r), ("alpha", alpha), *extra], where))
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    groups: dict = {}
    for key in dict.fromkeys([*ranks, *alphas]):
        groups.setdefault((ranks.get(key, r), alphas.get(key, alpha)), []).append(key)
    for (rank, key_alpha), keys in groups.items():
        literals = [peft_literal(k) for k in keys]
        listed = isinstance(targets, list)
        if listed and all(lit is not None and lit in targets for lit in literals):
            rule_selectors, clause = peft_names(literals), where  # each key is itself a target
        elif listed and all(lit is not None for lit in literals):
            rule_selectors = peft_names(literals)  # ... but only where a target matches too
            globs = path_globs(targets)
            clause = both(Or(tuple(NameTest(p) for p in [*globs, *(f"*.{g}" for g in globs)])), where)
        else:
            clause = where
            if targets == "all-linear":  # the keys' sites among the linears that "all-linear" takes
                target, clause = ".*", both(Or((TypeTest("Linear"), TypeTest("Conv1D"))), where)
            elif isinstance(targets, str):
                target = targets
            else:
                target = "(?:.*\\.)?(?:" + "|".join(map(re.escape, targets or [".*"])) + ")"
            rule_selectors = (RegexSelector(f'(?=(?:.*\\.)?(?:{"|".join(keys)})$){target}'),)
        rules.append(call_rule(rule_selectors, method, [("r", rank), ("alpha", key_alpha), *extra], clause))
    return rules


def refuse(config: dict, *fields: str) -> None:
    """An AdapterError for a config field surgeon does not implement, when it is set."""
    for field in fields:
        if config.get(field):
            raise AdapterError(f"{config['peft_type']}'s {field} is not supported yet (it is {config[field]!r})")
