"""DoRA in PEFT's adapter_config.json: PEFT writes it as LoRA (``peft_type: "LORA"``) with ``use_dora``.

The fields are LoRA's (lora/peft.py); a LORA config with ``use_dora`` reads as ``dora(...)`` rules, refused
where surgeon's DoRA lacks what the config sets (a bias of B, a start from the base weight).
"""

from __future__ import annotations

from surgeon.methods import peft_format as pf
from surgeon.methods.dora.config import DoraConfig
from surgeon.methods.lora.config import is_residual_init
from surgeon.methods.lora.peft import LoraPeft

__all__ = ["DoraPeft"]


class DoraPeft(LoraPeft):
    method = DoraConfig.method_name
    use_dora = True
    reads = False  # LoRA's format names the type; it hands configs with use_dora here

    @classmethod
    def described(cls) -> str:
        return f"{cls.peft_type} with use_dora"

    @classmethod
    def read_rules(cls, config: dict) -> list:
        pf.refuse(config, "layer_replication", "alora_invocation_tokens", "target_parameters")
        init = config.get("init_lora_weights", True)
        if config.get("lora_bias") or (isinstance(init, str) and is_residual_init(init)):
            # surgeon's dora has neither a bias of B nor a start from the base weight's SVD/QR
            field = "lora_bias" if config.get("lora_bias") else f"init_lora_weights={init!r}"
            raise pf.AdapterError(f"LoRA's use_dora with {field} is not supported yet", hint="dora takes r, alpha, dropout and rslora")
        return super().read_rules(config)
