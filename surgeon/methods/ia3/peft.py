"""(IA)^3 in PEFT's adapter_config.json (``peft_type: "IA3"``), both ways (torch-free).

``target_modules`` are the sites, ``feedforward_modules`` those that scale their input (``feedforward=true``).
"""

from __future__ import annotations

from surgeon.methods import peft_format as pf
from surgeon.methods.ia3.config import Ia3Config

__all__ = ["Ia3Peft"]


class Ia3Peft(pf.PeftFormat):
    method = Ia3Config.method_name
    peft_type = "IA3"
    peft_required = ("target_modules",)
    fields = dict(
        read=dict(target_modules="targets", exclude_modules="targets", feedforward_modules="targets", modules_to_save="names"),
        inert=dict(pf.COMMON_INERT, **pf.AUTO_INERT, init_ia3_weights="bool"),
        refused={},
    )

    @classmethod
    def peft_config(cls, sites) -> dict:
        return dict(
            target_modules=[s.path for s in sites],
            feedforward_modules=[s.path for s in sites if s.config.feedforward],
            fan_in_fan_out=any(s.kind == "hf_conv1d" for s in sites),
            init_ia3_weights=True,
        )

    @classmethod
    def read_rules(cls, config: dict) -> list:
        rules = []
        for key, arguments in (("target_modules", []), ("feedforward_modules", [("feedforward", True)])):
            selectors = pf.peft_targets(config.get(key))
            if selectors:  # feed-forward sites: the later rule wins
                rules.append(pf.call_rule(selectors, cls.method, arguments))
        return rules
