"""Every field of the PEFT configs surgeon reads, and what surgeon does with it (PEFT 0.21).

Each method's PEFT format declares its table (``fields``, in its folder: surgeon/methods/lora/peft.py,
...); this module checks a config against it. Each field of a config's dataclass in PEFT is one of:

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

from surgeon.methods import registered_methods
from surgeon.methods.peft_format import AdapterError, PeftFidelityWarning

__all__ = ["peft_fields", "check_peft_fields", "control_character"]


def peft_fields() -> dict:
    """peft_type -> its fields (read / inert / refused / warned), as each method's PEFT format declares them
    (one format per peft_type names them: DoRA shares LoRA's)."""
    formats = (method.peft_format() for method in registered_methods())
    return {f.peft_type: f.fields for f in formats if f is not None and f.reads}


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
    fields = peft_fields().get(peft_type)  # the registry now: a method registered later counts
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
            kind = fields["inert"][key]
            if value is not None and not _is(kind, value):
                raise AdapterError(f"{peft_type}'s {key} must be {_WORDS[kind]}, not {_shown(value)}",
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
