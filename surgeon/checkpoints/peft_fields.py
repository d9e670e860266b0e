"""Every field of the PEFT configs surgeon reads, and what surgeon does with it (PEFT 0.21).

Each field of a config's dataclass in PEFT is one of:

- read: surgeon turns it into rules; its value must have the type given here
  (a value of another type is refused, so that no config value reaches the
  rules text unchecked);
- inert: it cannot change what a loaded adapter computes or how it trains
  (bookkeeping, or a setting PEFT itself decides per module), so it is passed
  over, but its value must still have the type PEFT writes (or be null);
- refused: surgeon does not implement it, and a config that sets it to anything
  but PEFT's default is refused with an AdapterError naming it;
- warned: it changes training only, and a PEFT test of surgeon's reader fixes
  that it is read without it; reading it says so (OFT's module_dropout).

A key that is none of these (a field of a newer PEFT?) is refused unless it is
empty. No string of a read field may hold a control character or a line
break (a module name never does; a regex holding one could not be printed as
rules text), and no number may be infinite or NaN. tests/surgeon/test_peft_fidelity.py checks these tables against PEFT's
own dataclasses, so that a field PEFT adds cannot slip through unread.
"""

from __future__ import annotations

import math
import unicodedata
import warnings

from surgeon.methods.peft_format import AdapterError, PeftFidelityWarning

__all__ = ["PEFT_FIELDS", "INERT_KINDS", "check_peft_fields", "control_character"]

# Bookkeeping every PeftConfig has: nothing of the adapter's computation.
_COMMON = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode")
# PEFT corrects fan_in_fan_out per module (GPT-2's Conv1D or a Linear), as surgeon reads each site's kind;
# an init setting only says how a fresh adapter starts: a loaded adapter's weights replace it.
_AUTO = ("fan_in_fan_out",)

# Which modules an adapter takes, as every method but IA3 and trainable tokens says it.
_TARGETING = dict(target_modules="targets", modules_to_save="names", layers_to_transform="layers", layers_pattern="patterns")

_LORA_FAMILY = dict(_TARGETING, r="int", exclude_modules="targets", rank_pattern="int_map", alpha_pattern="number_map")

PEFT_FIELDS = {
    "LORA": dict(
        read=dict(
            _LORA_FAMILY,
            lora_alpha="number",
            lora_dropout="number",
            use_rslora="bool",
            init_lora_weights="init",
            use_dora="bool",
            lora_bias="bool",
        ),
        # megatron_core and qalora_group_size act only with megatron_config and use_qalora (refused);
        # runtime_config is PEFT's runtime state, which PEFT itself drops from a file it reads.
        inert=(*_COMMON, *_AUTO, "megatron_core", "qalora_group_size", "runtime_config"),
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
    ),
    "LOHA": dict(
        read=dict(_LORA_FAMILY, alpha="number", rank_dropout="number", module_dropout="number"),
        inert=(*_COMMON, "init_weights"),
        refused={"use_effective_conv2d": False},
    ),
    "LOKR": dict(
        read=dict(
            _LORA_FAMILY,
            alpha="number",
            rank_dropout="number",
            module_dropout="number",
            decompose_both="bool",
            decompose_factor="int",
            rank_dropout_scale="bool",
        ),
        inert=(*_COMMON, "init_weights"),
        refused={"use_effective_conv2d": False},
    ),
    "IA3": dict(
        read=dict(target_modules="targets", exclude_modules="targets", feedforward_modules="targets", modules_to_save="names"),
        inert=(*_COMMON, *_AUTO, "init_ia3_weights"),
        refused={},
    ),
    "OFT": dict(
        read=dict(
            _TARGETING,
            exclude_modules="targets",
            r="int",
            oft_block_size="int",
            coft="bool",
            eps="number",
            block_share="bool",
            use_cayley_neumann="bool",
            num_cayley_neumann_terms="int",
        ),
        # PEFT's OFT leaves GPT-2's Conv1D alone whatever fan_in_fan_out says (see oft_weights.py)
        inert=(*_COMMON, *_AUTO, "init_weights"),
        refused={"bias": "none"},
        warned={"module_dropout": 0.0},
    ),
    "VERA": dict(
        read=dict(
            _TARGETING,
            r="int",
            projection_prng_key="int",
            save_projection="bool",
            vera_dropout="number",
            d_initial="number",
        ),
        inert=(*_COMMON, *_AUTO, "init_weights"),
        refused={"bias": "none"},
    ),
    "TRAINABLE_TOKENS": dict(
        read=dict(target_modules="targets", token_indices="indices"),
        inert=(*_COMMON, "init_weights"),
        refused={},
    ),
}

# The type of each inert field, as PEFT writes it (null is accepted for every one): passed over, never read.
INERT_KINDS = {
    "task_type": "text",
    "peft_type": "text",
    "auto_mapping": "map",
    "peft_version": "text",
    "base_model_name_or_path": "text",
    "revision": "text",
    "inference_mode": "bool",
    "fan_in_fan_out": "bool",
    "megatron_core": "text",
    "qalora_group_size": "int",
    "runtime_config": "map",
    "init_weights": "init",
    "init_ia3_weights": "bool",
}

_EMPTY = (None, False, {}, [], "")


def control_character(value) -> str | None:
    """The first control character or line break in the strings of a JSON value (keys too), or None."""
    stack = [value]  # without recursion: a hostile value may nest deeply
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = next((c for c in item if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
            if found is not None:
                return found
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return None


def _is(kind: str, value) -> bool:
    """Does ``value`` (from JSON) have the type ``kind``?"""

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def strings(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    return {
        "int": lambda: integer(value),
        "number": lambda: number(value),
        "bool": lambda: isinstance(value, bool),
        "init": lambda: isinstance(value, (bool, str)),
        "targets": lambda: value is None or isinstance(value, str) or strings(value),
        "names": lambda: value is None or strings(value),
        "patterns": lambda: value is None or isinstance(value, str) or strings(value),
        "layers": lambda: value is None or integer(value) or (isinstance(value, list) and all(map(integer, value))),
        "indices": lambda: isinstance(value, list) and all(map(integer, value)),
        "int_map": lambda: isinstance(value, dict) and all(integer(v) for v in value.values()),
        "number_map": lambda: isinstance(value, dict) and all(number(v) for v in value.values()),
        "text": lambda: value is None or isinstance(value, str),
        "map": lambda: value is None or isinstance(value, dict),
    }[kind]()


_WORDS = {
    "int": "an integer",
    "number": "a number",
    "bool": "true or false",
    "init": "true, false or a name",
    "targets": "a list of module names or one regex",
    "names": "a list of module names",
    "patterns": "a name or a list of names",
    "layers": "a layer index or a list of them",
    "indices": "a list of token ids",
    "int_map": "a map of patterns to integers",
    "number_map": "a map of patterns to numbers",
    "text": "a string",
    "map": "an object",
}


def _unset(value, default) -> bool:
    return value == default or (default in _EMPTY and value in _EMPTY)


def check_peft_fields(config: dict, warn: bool = True) -> None:
    """Refuse a config that sets what surgeon does not implement, or gives a field a value of the wrong type.

    ``warn=False``: check only (the reader checks a folder's configs first; reading them warns)."""
    peft_type = config.get("peft_type")
    fields = PEFT_FIELDS.get(peft_type)
    if fields is None:
        return
    read, refused, warned = fields["read"], fields["refused"], fields.get("warned", {})
    for key, value in config.items():
        if key in read:
            if not _is(read[key], value):
                raise AdapterError(
                    f"{peft_type}'s {key} must be {_WORDS[read[key]]}, not {_shown(value)}",
                    hint="adapter_config.json is not as PEFT writes it",
                )
            if control_character(value) is not None:
                raise AdapterError(
                    f"{peft_type}'s {key} holds the control character {control_character(value)!r} ({_shown(value)})",
                    hint="module names and patterns never hold control characters or line breaks",
                )
        elif key in fields["inert"]:
            if value is not None and not _is(INERT_KINDS[key], value):
                raise AdapterError(f"{peft_type}'s {key} must be {_WORDS[INERT_KINDS[key]]}, not {_shown(value)}",
                                   hint="adapter_config.json is not as PEFT writes it")
        elif key in refused:
            if not _unset(value, refused[key]):
                raise AdapterError(
                    f"{peft_type}'s {key} is not supported yet (it is {_shown(value)}; surgeon reads only its default, "
                    f"{refused[key]!r})",
                    hint=f"surgeon cannot load this adapter as it was trained; retrain it without {key}",
                )
        elif key in warned:
            if warn and not _unset(value, warned[key]):
                warnings.warn(
                    f"{peft_type}'s {key}={value!r} is not implemented: surgeon reads the adapter without it "
                    "(the same outputs; training differs)",
                    PeftFidelityWarning,
                    stacklevel=3,
                )
        elif value not in _EMPTY:
            raise AdapterError(
                f"{peft_type}'s {key} is not a field surgeon knows (it is {_shown(value)})",
                hint="a field of a newer PEFT? surgeon reads PEFT 0.21's fields",
            )


def _shown(value) -> str:
    """A config value in a message: its repr, cut short (a hostile config may hold megabytes)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:76] + "...'"
