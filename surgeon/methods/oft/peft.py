"""OFT in PEFT's adapter_config.json (``peft_type: "OFT"``), both ways (torch-free).

PEFT holds one OFT config per adapter, so every site of an adapter must use the same arguments. PEFT's
OFT leaves GPT-2's Conv1D alone whatever fan_in_fan_out says.
"""

from __future__ import annotations

import warnings

from surgeon.grammar.rules import TypeSelector

from surgeon.methods import peft_format as pf
from surgeon.methods.oft.config import DEFAULT_BLOCK_SIZE, OftConfig

__all__ = ["OftPeft"]


class OftPeft(pf.PeftFormat):
    method = OftConfig.method_name
    peft_type = "OFT"
    peft_required = ("r", "oft_block_size", "target_modules")
    fields = dict(
        read=dict(
            pf.TARGETING_FIELDS,
            exclude_modules="targets",
            r="int",
            oft_block_size="int",
            coft="bool",
            eps="number",
            block_share="bool",
            use_cayley_neumann="bool",
            num_cayley_neumann_terms="int",
        ),
        inert=dict(pf.COMMON_INERT, **pf.AUTO_INERT, init_weights="init"),
        refused={"bias": "none"},
        warned={"module_dropout": 0.0},
    )

    @classmethod
    def peft_config(cls, sites) -> dict:
        c = sites[0].config
        if any(s.config != c for s in sites):
            raise pf.AdapterError(f"adapter '{sites[0].adapter}' mixes OFT settings, which PEFT holds once per adapter")
        return dict(
            target_modules=[s.path for s in sites],
            r=c.r or 0,
            oft_block_size=0 if c.r else c.block_size or DEFAULT_BLOCK_SIZE,
            module_dropout=0.0,
            fan_in_fan_out=False,
            bias="none",
            init_weights=True,
            coft=c.coft,
            eps=c.eps,
            block_share=c.block_share,
            use_cayley_neumann=c.neumann,
            num_cayley_neumann_terms=c.neumann_terms,
            # the Cayley-Neumann series as PEFT >= 0.18.0 computes it (PEFT warns on older versions' files)
            peft_version="0.18.0",
        )

    @classmethod
    def read_rules(cls, config: dict) -> list:
        if config.get("bias", "none") not in ("none", None):
            raise pf.AdapterError(f"OFT's bias is not supported yet (it is {config['bias']!r})")
        r, size = config.get("r") or 0, config.get("oft_block_size") or 0
        if bool(r) == bool(size):
            raise pf.AdapterError(f"OFT needs exactly one of r ({r}) and oft_block_size ({size}) non-zero, as PEFT does")
        neumann = config.get("use_cayley_neumann", True)
        if neumann and _older(config.get("peft_version"), (0, 18)):
            warnings.warn("this OFT adapter predates PEFT 0.18.0, whose Cayley-Neumann series surgeon computes (as PEFT 0.21 does)")
        arguments = [("r", r) if r else ("block_size", size)]
        if config.get("coft"):
            arguments += [("coft", True), ("eps", config.get("eps", 6e-5))]
        if config.get("block_share"):
            arguments.append(("block_share", True))
        if not neumann:
            arguments.append(("neumann", False))
        terms = config.get("num_cayley_neumann_terms", 5)
        if terms != 5:
            arguments.append(("neumann_terms", terms))
        targets, where = config.get("target_modules"), pf.peft_where(config)
        if targets == "all-linear":  # PEFT's OFT adapts nn.Linear among them (not GPT-2's Conv1D)
            selectors, where = (TypeSelector("Linear"),), pf.both(pf.NOT_HEAD, where)
        else:
            selectors = pf.peft_targets(targets)
        return [] if selectors is None else [pf.call_rule(selectors, cls.method, arguments, where)]


def _older(version, than: tuple) -> bool:
    """Is a PEFT version string (None: older than 0.18, when PEFT began writing it) before ``than``?"""
    if not version:
        return True
    try:
        return tuple(int(p) for p in version.partition("@")[0].split(".")[:2]) < than
    except ValueError:
        return False
