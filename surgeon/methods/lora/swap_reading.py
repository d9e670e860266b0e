"""What a hot swap reads of a PEFT LoRA adapter: its per-site scale, whether it is a plain product, its factors.

Plain data in (adapter_config.json as a dict, adapter_model.safetensors as a dict of tensors), so the
program-side swap (surgeon/checkpoints/hot_swap.py) never names LoRA's fields. ``where`` prefixes every
message (the folder or file the data came from).

PEFT's scale for a site is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), where ``rank_pattern``
and ``alpha_pattern`` keys override ``r`` and ``lora_alpha`` for the paths they match at a dot.
"""

from __future__ import annotations

import math
import re

from surgeon.diagnostics import SurgeryError
from surgeon.grammar.regex import RegexError, RegexTimeout, regex_fullmatch
from surgeon.methods.peft_format import PREFIX, AdapterError

__all__ = ["site_scale", "swap_refusal", "factor_pairs", "FACTOR_NAMES"]

FACTOR_NAMES = ("lora_A", "lora_B")  # the SiteAdapter's parameters that hold A (r, in) and B (out, r)


def site_scale(config: dict, path: str) -> float:
    """The scale PEFT gives ``path`` under a LoRA config (rank_pattern / alpha_pattern as PEFT matches them)."""

    def pattern_value(patterns: dict, default):
        for key, value in (patterns or {}).items():
            try:  # PEFT: the key matches the path's end, at a dot; bounded, as every regex surgeon matches
                if regex_fullmatch(rf"(?:.*\.)?(?:{key})", path):
                    return value
            except RegexTimeout as exc:
                raise AdapterError(f"the pattern key {key!r} took longer than {exc.seconds:g} s to match {path!r}",
                                   hint="nested repetition such as (a+)+ backtracks; write each part once") from None
            except RegexError as exc:
                raise AdapterError(f"the pattern key {key!r} is not a regex surgeon can match: {exc.message}") from None
        return default

    r = pattern_value(config.get("rank_pattern"), config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def swap_refusal(config: dict, where) -> None:
    """Raise unless a LoRA config (already type-checked) holds plain products s B A with positive ranks."""
    if config.get("lora_bias"):
        raise SurgeryError(f"{where}: hot-swapping takes plain LoRA adapters (this one is {config['peft_type']} with a bias)",
                           hint="compile a new model for other methods")
    if isinstance(config.get("init_lora_weights"), str) and config["init_lora_weights"] not in ("gaussian",):
        raise SurgeryError(f"{where}: an init_lora_weights={config['init_lora_weights']!r} adapter "
                           "changes the base weight; save it converted (surgeon does) to swap it in")
    ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]
    if any(r <= 0 for r in ranks):  # the scale divides by the rank
        raise AdapterError(f"{where}: a LoRA rank must be positive (found {min(ranks)})",
                           hint="adapter_config.json is not as PEFT writes it")


def factor_pairs(tensors: dict, folder, weights_file) -> dict:
    """module path -> {"A": (r, in), "B": (out, r)}, refusing a key that is not a LoRA factor, a half pair,
    or factors whose shapes do not make a product B A."""
    pairs: dict = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise SurgeryError(f"{folder}: {key} is not a LoRA weight this swap can take (modules_to_save?)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    for path, pair in pairs.items():
        for leaf in "AB":
            if leaf not in pair:
                raise AdapterError(f"{weights_file}: {PREFIX}{path}.lora_{leaf}.weight is missing "
                                   f"(it has lora_{'BA'[leaf == 'B']} there)", hint="a LoRA site needs both factors")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"{weights_file}: {path} has factors of shapes {tuple(a.shape)} and {tuple(b.shape)} "
                               f"({a.dtype}, {b.dtype}); LoRA's are floating (r, in) and (out, r)")
    return pairs
