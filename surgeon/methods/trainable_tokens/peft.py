"""Trainable tokens in PEFT's adapter_config.json (``peft_type: "TRAINABLE_TOKENS"``), both ways (torch-free)."""

from __future__ import annotations

from surgeon.methods import peft_format as pf
from surgeon.methods.trainable_tokens.config import TrainableTokensConfig

__all__ = ["TrainableTokensPeft"]


class TrainableTokensPeft(pf.PeftFormat):
    method = TrainableTokensConfig.method_name
    peft_type = "TRAINABLE_TOKENS"
    peft_required = ("token_indices", "target_modules")
    fields = dict(
        read=dict(target_modules="targets", token_indices="indices"),
        inert=dict(pf.COMMON_INERT, init_weights="init"),
        refused={},
    )

    @classmethod
    def peft_config(cls, sites) -> dict:
        indices = {tuple(s.config.indices) for s in sites}
        if len(indices) > 1:
            raise pf.AdapterError(
                f"adapter '{sites[0].adapter}' trains different token ids on different embeddings, "
                "which PEFT holds once per adapter",
                hint="give each embedding its own adapter block",
            )
        return dict(target_modules=[s.path for s in sites], token_indices=list(indices.pop()), init_weights=True)

    @classmethod
    def read_rules(cls, config: dict) -> list:
        selectors = pf.peft_targets(config.get("target_modules"))  # PEFT fills it in (the input embeddings) when saving
        if selectors is None:
            raise pf.AdapterError("a TRAINABLE_TOKENS config must name its target_modules")
        return [pf.call_rule(selectors, cls.method, [("indices", tuple(config["token_indices"]))])]
