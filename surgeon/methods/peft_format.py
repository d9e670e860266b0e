"""Pieces of PEFT's adapter format shared by the methods (each method maps its own config).

A method's PEFT format (a :class:`PeftFormat` subclass in its folder, torch-free) says how its sites are
written in PEFT's ``adapter_config.json`` (``peft_type`` and ``peft_config(sites)``), how a PEFT config of
that type reads back as rules (``rules_from_peft``), and what each field of PEFT's config is to surgeon
(``fields``, which surgeon/checkpoints/peft_fields.py checks); the tensors are its SiteAdapter's
``peft_state``. This module holds what the methods share: the bookkeeping fields, the targeting fields, one
rank and alpha per adapter plus ``rank_pattern``/``alpha_pattern`` for sites that differ (LoRA, LoHa,
LoKr), and the selectors that match what PEFT's ``target_modules`` entries match.

Rules are built as IR objects (grammar/rules.py), never as text: a
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

from surgeon.methods._registry import peft_formats

__all__ = [
    "PREFIX",
    "AdapterError",
    "PeftFidelityWarning",
    "PeftFormat",
    "COMMON_INERT",
    "AUTO_INERT",
    "TARGETING_FIELDS",
    "RANK_PATTERN_FIELDS",
    "path_globs",
    "peft_names",
    "peft_literal",
    "peft_where",
    "peft_targets",
    "refuse",
    "rank_pattern_config",
    "rank_pattern_rules",
    "call_rule",
    "both",
    "ALL_LINEAR",
    "NOT_HEAD",
    "common",
    "one_per_adapter",
    "dropout_arguments",
]

PREFIX = "base_model.model."


class AdapterError(SurgeryError):
    """An adapter folder that cannot be read, or that does not fit the model."""


class PeftFidelityWarning(UserWarning):
    """A PEFT file that says less than the rules: PEFT (or surgeon reading it alone) gets other settings."""


# The fields of a method's PEFT config, each as one of (surgeon/checkpoints/peft_fields.py checks them):
# read: turned into rules, of the type given (a word of peft_fields._is); inert: passed over (it cannot
# change what a loaded adapter computes), of the type given or null; refused: PEFT's default -> refused
# unless it has that value; warned: PEFT's default -> read without it, saying so.

# Bookkeeping every PeftConfig has: nothing of the adapter's computation.
COMMON_INERT = dict(task_type="text", peft_type="text", auto_mapping="map", peft_version="text",
                    base_model_name_or_path="text", revision="text", inference_mode="bool")
# PEFT corrects fan_in_fan_out per module (GPT-2's Conv1D or a Linear), as surgeon reads each site's kind.
AUTO_INERT = dict(fan_in_fan_out="bool")
# Which modules an adapter takes, as most methods say it.
TARGETING_FIELDS = dict(target_modules="targets", modules_to_save="names", layers_to_transform="layers",
                        layers_pattern="patterns")
# ... and the rank of the methods that hold one rank per adapter plus per-site patterns.
RANK_PATTERN_FIELDS = dict(TARGETING_FIELDS, r="int", exclude_modules="targets", rank_pattern="int_map",
                           alpha_pattern="number_map")


class PeftFormat:
    """One method in PEFT's adapter_config.json, both ways (torch-free: the tensors are the SiteAdapter's).

    A subclass per method, in its folder, registered as ``register_method(..., peft=".peft:Name")``.
    Methods may share a ``peft_type`` (PEFT writes DoRA as LoRA with ``use_dora``): ``holds(config)``
    says which one a config holds, and one of them, ``reads``, gives the type's ``fields``.
    """

    method: str = ""  # the method's name (its config's method_name)
    peft_type: str = ""  # PEFT's peft_type for an adapter of this method alone
    peft_required: tuple = ()  # fields a PEFT config of that type must have
    fields: dict = {}  # {"read": {field: type}, "inert": {field: type}, "refused": {field: default}, "warned": {...}}
    reads: bool = True  # the format of its peft_type that readers name (the others share its fields)

    @classmethod
    def holds(cls, config: dict) -> bool:
        """Does a PEFT config hold this method's sites (not another method sharing its peft_type)?"""
        return config.get("peft_type") == cls.peft_type

    # A format whose method holds plain products s B A (``Method.low_rank``) also says how a hot swap reads
    # a saved adapter of it (plain data: the config dict, the tensors); the others leave these unset.
    low_rank_reading = None  # a module with site_scale, swap_refusal, factor_pairs and FACTOR_NAMES

    @classmethod
    def described(cls) -> str:
        """The PEFT type in words, for the docs ("LORA", "LORA with use_dora")."""
        return cls.peft_type

    @classmethod
    def peft_config(cls, sites) -> dict:  # pragma: no cover - every format overrides it
        """The method's fields of PEFT's adapter_config.json for these plan sites."""
        raise NotImplementedError

    @classmethod
    def peft_saved_configs(cls, sites) -> list:
        """The config of each plan site as its saved tensors hold it (surgeon's record of the rules).

        A method that saves a converted form (LoRA's PiSSA as rank 2r) gives the
        config that reloads that form; the others give each site's own.
        """
        return [site.config for site in sites]

    @classmethod
    def rules_from_peft(cls, config: dict) -> list:
        """Rules (``ir.Rule`` objects, never text) targeting what a PEFT config of this ``peft_type`` targets,
        read by the format of that type that holds the config.

        ``config`` has been type-checked (peft_fields.py); its values become typed
        values of the rules, so no config value can add a rule.
        """
        holder = next((f for f in peft_formats(cls.peft_type) if f.holds(config)), cls)
        return holder.read_rules(config)

    @classmethod
    def read_rules(cls, config: dict) -> list:  # pragma: no cover
        """:meth:`rules_from_peft` for a config this format holds."""
        raise NotImplementedError


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


def rank_pattern_config(sites, scale_of=None, rank_of=None) -> dict:
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


def rank_pattern_rules(config: dict, method: str, alpha_key: str, extra=()) -> list:
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


def one_per_adapter(sites, *names) -> dict:
    """Config fields PEFT holds once per adapter: the sites must agree on them."""
    values = {}
    for name in names:
        seen = {getattr(s.config, name) for s in sites}
        if len(seen) > 1:
            raise AdapterError(
                f"adapter '{sites[0].adapter}' gives its sites different {name} values, which PEFT holds once per adapter",
                hint="give each setting its own adapter block to save them in PEFT's format",
            )
        values[name] = seen.pop()
    return values


def dropout_arguments(config: dict, *names) -> list:
    """``[("rank_dropout", 0.1), ...]``: the set fields of a PEFT config, as rule arguments."""
    return [(name, config[name]) for name in names if config.get(name)]
