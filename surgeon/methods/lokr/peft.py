"""LoKr in PEFT's adapter_config.json (``peft_type: "LOKR"``), both ways (torch-free)."""

from __future__ import annotations

from surgeon.methods import peft_format as pf
from surgeon.methods.lokr.config import LokrConfig

__all__ = ["LokrPeft"]


class LokrPeft(pf.PeftFormat):
    method = LokrConfig.method_name
    peft_type = "LOKR"
    peft_required = ("r", "alpha", "target_modules")
    fields = dict(
        read=dict(
            pf.RANK_PATTERN_FIELDS,
            alpha="number",
            rank_dropout="number",
            module_dropout="number",
            decompose_both="bool",
            decompose_factor="int",
            rank_dropout_scale="bool",
        ),
        inert=dict(pf.COMMON_INERT, init_weights="init"),
        refused={"use_effective_conv2d": False},
    )

    @classmethod
    def peft_config(cls, sites) -> dict:
        shapes = {(s.config.factor, s.config.decompose_both) for s in sites}
        if len(shapes) > 1:
            raise pf.AdapterError(f"adapter '{sites[0].adapter}' mixes LoKr factor/decompose_both settings, which PEFT holds once per adapter")
        factor, decompose_both = shapes.pop()
        fields = pf.rank_pattern_config(sites)
        del fields["use_rslora"]
        dropouts = pf.one_per_adapter(sites, "rank_dropout", "module_dropout", "rank_dropout_scale")
        return dict(fields, decompose_both=decompose_both, decompose_factor=factor or -1, **dropouts, init_weights=True)

    @classmethod
    def read_rules(cls, config: dict) -> list:
        pf.refuse(config, "use_effective_conv2d")
        factor = config.get("decompose_factor", -1)
        extra = ([("factor", factor)] if factor and factor > 0 else []) + ([("decompose_both", True)] if config.get("decompose_both") else [])
        extra += pf.dropout_arguments(config, "rank_dropout", "module_dropout")
        extra += [("rank_dropout_scale", True)] if config.get("rank_dropout_scale") else []
        return pf.rank_pattern_rules(config, cls.method, "alpha", extra=extra)
