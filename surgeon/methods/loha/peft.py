"""LoHa in PEFT's adapter_config.json (``peft_type: "LOHA"``), both ways (torch-free)."""

from __future__ import annotations

from surgeon.methods import peft_format as pf
from surgeon.methods.loha.config import LohaConfig

__all__ = ["LohaPeft"]


class LohaPeft(pf.PeftFormat):
    method = LohaConfig.method_name
    peft_type = "LOHA"
    peft_required = ("r", "alpha", "target_modules")
    fields = dict(
        read=dict(pf.RANK_PATTERN_FIELDS, alpha="number", rank_dropout="number", module_dropout="number"),
        inert=dict(pf.COMMON_INERT, init_weights="init"),
        refused={"use_effective_conv2d": False},
    )

    @classmethod
    def peft_config(cls, sites) -> dict:
        fields = pf.rank_pattern_config(sites)
        del fields["use_rslora"]
        return dict(fields, **pf.one_per_adapter(sites, "rank_dropout", "module_dropout"), init_weights=True)

    @classmethod
    def read_rules(cls, config: dict) -> list:
        pf.refuse(config, "use_effective_conv2d")
        return pf.rank_pattern_rules(config, cls.method, "alpha", extra=pf.dropout_arguments(config, "rank_dropout", "module_dropout"))
