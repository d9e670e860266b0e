"""The rules of ``surgeon merge ADAPTERS NEW=TYPE(...) ...``, built as objects, never pasted together as text.

The adapters come from the folder as rule objects
(:func:`surgeon.checkpoints.peft_rules.exact_rules_from_folder`), so nothing a folder
holds is ever read as rules source. Each ``NEW=TYPE(...)`` argument is parsed
from the user's own text alone, as one merge statement; NEW must be an adapter
name (grammar/names.py), so it cannot name a path outside OUT. The two are
joined into one RuleSet and checked whole (``checked_rule_set``), which is where
a merge's sources are checked against the folder's adapters.
"""

from __future__ import annotations

from dataclasses import replace

from surgeon.checkpoints.peft_rules import exact_rules_from_folder
from surgeon.diagnostics import RulesError, SurgeryError
from surgeon.grammar import rules as ir
from surgeon.grammar.check import checked_rule_set
from surgeon.grammar.names import checked_name
from surgeon.grammar.parse import parse_unchecked

__all__ = ["merge_rule_set"]

_EXAMPLE = 'e.g. "combo=ties(math=0.7, code=0.3, density=0.5)"'


def merge_rule_set(folder, statements) -> ir.RuleSet:
    """The checked rule set: the adapters of ``folder`` and one merge per ``NEW=TYPE(...)`` of ``statements``."""
    merges = []
    for text in statements:
        name, equals, expression = text.partition("=")
        if not equals or not name.strip():
            raise SurgeryError(f"cannot read {text!r} as NEW=TYPE(...)", hint=_EXAMPLE)
        name = checked_name(name.strip(), where=f"merge {text!r}")
        merges.append(_merge(name, expression.strip(), text))
    _, found = exact_rules_from_folder(folder)
    return checked_rule_set(ir.RuleSet(found.adapters, path="<merge>", merges=tuple(merges)))


def _merge(name: str, expression: str, text: str) -> ir.Merge:
    """The one merge statement of the user's ``text``: only its syntax here, its sense in the whole rule set."""
    statement = f'merge "{name}" = {expression}'  # the name is checked (grammar/names.py): nothing to escape
    parsed, diagnostics = parse_unchecked(statement, path="<merge>")
    errors = [replace(d, file=d.file or "<merge>", source_line=statement) for d in diagnostics if d.is_error]
    if errors:
        raise RulesError(errors)
    if len(parsed.merges) != 1 or any(adapter.rules for adapter in parsed.adapters):
        raise SurgeryError(f"cannot read {text!r} as one NEW=TYPE(...)", hint=_EXAMPLE)
    return parsed.merges[0]
