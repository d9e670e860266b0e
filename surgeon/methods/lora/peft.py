"""LoRA in PEFT's adapter_config.json (``peft_type: "LORA"``), both ways (torch-free).

Written: one rank and alpha per adapter, sites that differ in ``rank_pattern``/``alpha_pattern``
(peft_format.rank_pattern_config), ``lora_dropout``, ``lora_bias``, ``use_rslora``,
``init_lora_weights``, and ``use_dora`` for DoRA (which PEFT writes as LoRA: see dora/peft.py). PiSSA and
OLoRA sites are written as plain LoRA of rank 2r on the untouched base (site.py's peft_saved_state).
Read: the same fields back into ``lora(...)`` or ``dora(...)`` rules; what surgeon does not implement is
refused by name (``fields``).
"""

from __future__ import annotations

import math
from dataclasses import replace

from surgeon.methods import peft_format as pf
from surgeon.methods.lora import swap_reading
from surgeon.methods.lora.config import LoraConfig, is_residual_init

__all__ = ["LoraPeft"]

# PEFT's LoraConfig defaults for an adapter with no sites (one that only trains whole modules).
_EMPTY = dict(r=8, lora_alpha=8, target_modules=[])
_INITS = {"kaiming": True, "gaussian": "gaussian", "zeros": False, "loftq": True}  # surgeon's init -> init_lora_weights


class LoraPeft(pf.PeftFormat):
    method = LoraConfig.method_name
    peft_type = "LORA"
    peft_required = ("r", "lora_alpha", "target_modules")
    fields = dict(
        read=dict(
            pf.RANK_PATTERN_FIELDS,
            lora_alpha="number",
            lora_dropout="number",
            use_rslora="bool",
            init_lora_weights="init",
            use_dora="bool",
            lora_bias="bool",
        ),
        # megatron_core and qalora_group_size act only with megatron_config and use_qalora (refused);
        # runtime_config is PEFT's runtime state, which PEFT itself drops from a file it reads.
        inert=dict(pf.COMMON_INERT, **pf.AUTO_INERT, megatron_core="text", qalora_group_size="int", runtime_config="map"),
        refused={
            "bias": "none",  # training the base model's biases
            "megatron_config": None,
            "trainable_token_indices": None,
            "loftq_config": {},
            "eva_config": None,
            "corda_config": None,
            "lora_ga_config": None,
            "velora_config": None,
            "alora_invocation_tokens": None,
            "use_qalora": False,
            "monteclora_config": None,
            "layer_replication": None,
            "target_parameters": None,
            "use_bdlora": None,
            "arrow_config": None,
            "kasa_config": None,
            "ensure_weight_tying": False,
        },
    )
    use_dora = False  # PEFT's use_dora: the variant of LoRA that shares LoRA's peft_type
    low_rank_reading = swap_reading

    @classmethod
    def holds(cls, config: dict) -> bool:
        return config.get("peft_type") == cls.peft_type and bool(config.get("use_dora")) == cls.use_dora

    @classmethod
    def peft_config(cls, sites) -> dict:
        """PEFT's LoraConfig fields for these sites (DoRA: the same with ``use_dora``); PEFT's defaults for none.

        PiSSA/OLoRA sites are written as plain LoRA of twice the rank (see site.py's peft_saved_state).
        """
        if not sites:
            return dict(_EMPTY)
        converted = {s.path for s in sites if s.config.residual}
        fields = pf.rank_pattern_config(sites, rank_of=lambda s: s.config.r * (2 if s.path in converted else 1))
        inits = [s.config.init for s in sites if s.path not in converted] or ["kaiming"]
        fields["lora_alpha"] = fields.pop("alpha")
        return dict(
            fields,
            lora_dropout=pf.common(s.config.dropout for s in sites),
            lora_bias=any(s.config.bias for s in sites),
            fan_in_fan_out=any(s.kind == "hf_conv1d" for s in sites),
            init_lora_weights=_INITS[inits[0]],
            bias="none",
            use_dora=cls.use_dora,
        )

    @classmethod
    def peft_saved_configs(cls, sites) -> list:
        """Each site's config as the file holds it: PiSSA/OLoRA as plain LoRA of rank 2r, LoftQ's as plain LoRA.

        The scale stays the site's own; how a fresh adapter would start (init) is
        what the PEFT config says, since the saved weights replace it.
        """
        saved = []
        for site in sites:
            config = site.config
            if config.residual:
                alpha = config.r if config.alpha is None else config.alpha
                alpha = alpha * math.sqrt(2) if config.rslora else 2 * alpha  # s = alpha/r with twice the rank
                config = replace(config, r=2 * config.r, alpha=alpha, init="kaiming")
            elif config.init == "loftq":
                config = replace(config, init="kaiming", loftq_iter=1)
            saved.append(config)
        return saved

    @classmethod
    def read_rules(cls, config: dict) -> list:
        """``lora(...)`` rules giving PEFT's rank, alpha and the other fields it read."""
        return pf.rank_pattern_rules(config, cls.method, "lora_alpha", extra=cls.read_arguments(config))

    @classmethod
    def read_arguments(cls, config: dict) -> list:
        """The rules' arguments besides r and alpha, as (name, value) pairs; AdapterError for what surgeon lacks."""
        pf.refuse(config, "layer_replication", "alora_invocation_tokens", "target_parameters")
        init = config.get("init_lora_weights", True)
        extra = ([("rslora", True)] if config.get("use_rslora") else []) + ([("bias", True)] if config.get("lora_bias") else [])
        if isinstance(init, str) and is_residual_init(init):
            # PEFT's own PiSSA/OLoRA files: the residual base is made again from the base weight, as PEFT does
            extra.append(("init", init))
        elif isinstance(init, str) and init != "gaussian":
            raise pf.AdapterError(f"LoRA's init_lora_weights={init!r} is not supported yet", hint="supported: true, false, gaussian, pissa, pissa_niter_K, olora")
        if config.get("lora_dropout"):
            extra.append(("dropout", config["lora_dropout"]))
        return extra
