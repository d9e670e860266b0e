"""VeRA in PEFT's adapter_config.json (``peft_type: "VERA"``), both ways (torch-free).

One config per adapter (its sites share A and B); the projections themselves are saved once per
adapter by the SiteAdapter (``peft_shared_state``) unless ``save_projection`` is false.
"""

from __future__ import annotations

from surgeon.methods import peft_format as pf
from surgeon.methods.vera.config import VeraConfig

__all__ = ["VeraPeft"]

# (PEFT's config field, the vera() argument, PEFT's default): read_rules writes only what differs.
_DEFAULTS = (("d_initial", "d_initial", 0.1), ("projection_prng_key", "projection_prng_key", 0), ("vera_dropout", "dropout", 0.0))


class VeraPeft(pf.PeftFormat):
    method = VeraConfig.method_name
    peft_type = "VERA"
    peft_required = ("r", "target_modules")
    fields = dict(
        read=dict(pf.TARGETING_FIELDS, r="int", projection_prng_key="int", save_projection="bool", vera_dropout="number",
                  d_initial="number"),
        inert=dict(pf.COMMON_INERT, **pf.AUTO_INERT, init_weights="init"),
        refused={"bias": "none"},
    )

    @classmethod
    def peft_config(cls, sites) -> dict:
        config = sites[0].config  # the same for every site (checked when the sites were planned)
        return dict(
            r=config.r,
            target_modules=[s.path for s in sites],
            projection_prng_key=config.projection_prng_key,
            save_projection=config.save_projection,
            vera_dropout=config.dropout,
            d_initial=config.d_initial,
            fan_in_fan_out=any(s.kind == "hf_conv1d" for s in sites),
            bias="none",
            init_weights=True,
            layers_to_transform=None,
            layers_pattern=None,
        )

    @classmethod
    def read_rules(cls, config: dict) -> list:
        if config.get("bias", "none") != "none":
            raise pf.AdapterError(f"VERA's bias={config['bias']!r} (training the base model's biases) is not supported yet")
        arguments = [("r", config["r"])]
        for key, name, default in _DEFAULTS:
            if config.get(key, default) != default:
                arguments.append((name, config[key]))
        if not config.get("save_projection", True):
            arguments.append(("save_projection", False))
        targets, where = config["target_modules"], pf.peft_where(config)  # layers_to_transform (and layers_pattern)
        if targets == "all-linear":
            selectors, where = pf.ALL_LINEAR, pf.both(pf.NOT_HEAD, where)
        else:
            selectors = pf.peft_targets(targets)
        return [] if selectors is None else [pf.call_rule(selectors, cls.method, arguments, where)]
