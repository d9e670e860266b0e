"""What PEFT's config loses: the warning that saving gives when PEFT would read an adapter otherwise than its rules.

PEFT's ``adapter_config.json`` holds some settings once per adapter (LoRA's
``lora_dropout``, ``lora_bias``, ``use_rslora``, ``init_lora_weights``), so
rules that give sites different values cannot be written there. Saving warns
(:class:`PeftFidelityWarning`, naming the sites and what PEFT gets instead)
where PEFT would compute or train a site otherwise than the rules (a per-site
dropout; a bias of B on some sites only). A per-site rslora flag is not warned
about (``alpha_pattern`` keeps the site's scale, which is all the flag changes),
nor init (it says how a fresh adapter starts; saved weights replace it).
surgeon's own record (peft_record.py) keeps the exact settings either way.
"""

from __future__ import annotations

import dataclasses
import math

from surgeon.diagnostics import SurgeryError
from surgeon.grammar import rules as ir
from surgeon.grammar.check import checked_rule_set
from surgeon.methods.peft_format import path_globs
from surgeon.planning.plan import build_plan

from surgeon.checkpoints.peft_record import saved_sites
from surgeon.checkpoints.peft_rules import peft_rules

__all__ = ["fidelity_warning"]


def _differences(saved, read) -> list:
    """What a site's config read back from PEFT's config changes (names and values), its scale compared as a number.

    ``init`` is not compared: it only says how a fresh adapter starts, and the saved weights replace it.
    """
    names = [f.name for f in dataclasses.fields(saved) if f.name not in ("init", "loftq_iter")]
    changes = []
    if "alpha" in names and hasattr(saved, "scale"):
        # PEFT keeps a site's scale in alpha_pattern (under the adapter's rslora flag): the same computation
        names = [n for n in names if n not in ("alpha", "rslora")]
        if not math.isclose(saved.scale, read.scale, rel_tol=1e-9):
            changes.append(f"scale {read.scale:g} instead of {saved.scale:g}")
    for name in names:
        if getattr(saved, name) != getattr(read, name):
            changes.append(f"{name}={ir.format_value(getattr(read, name))} instead of {ir.format_value(getattr(saved, name))}")
    return changes


def fidelity_warning(plan, captured, adapter: str, method: str | None, config: dict) -> str | None:
    """The warning for a PEFT config that PEFT reads otherwise than ``plan``'s rules (None when it reads them exactly).

    The config is read back as surgeon reads a PEFT adapter (peft_rules.py's :func:`peft_rules`,
    planned on ``captured``, the model ``plan`` was made for) and compared site by site with the plan.
    """
    try:
        rules = checked_rule_set(ir.RuleSet((ir.Adapter(ir.DEFAULT_ADAPTER, peft_rules(config)),)))
        read = build_plan(rules, captured)
    except SurgeryError as error:
        return f"adapter '{adapter}': surgeon cannot read back its own PEFT config ({error}); PEFT may read it otherwise"
    read_sites = {s.path: s for s in read.sites}
    found: dict = {}
    saved = saved_sites(plan, adapter, method)
    for path, name, cfg in saved:
        other = read_sites.get(path)
        if other is None:
            change = "no adapter"
        elif other.method != name:
            change = f"{other.method} instead of {name}"
        else:
            change = ", ".join(_differences(cfg, other.config))
        if change:
            found.setdefault(change, []).append(path)
    for path in sorted(set(read_sites) - {p for p, _, _ in saved}):
        found.setdefault(f"an adapter ({read_sites[path].method}) the rules do not give", []).append(path)
    if not found:
        return None
    what = "; ".join(f"{change} on {', '.join(path_globs(paths))}" for change, paths in found.items())
    return (
        f"adapter '{adapter}': PEFT's adapter_config.json holds some settings once per adapter, so PEFT reads "
        f"{sum(map(len, found.values()))} sites otherwise than the rules: {what}. surgeon keeps the exact rules in "
        "the metadata of adapter_model.safetensors and reloads them from there; PEFT and other readers get the config's"
    )
