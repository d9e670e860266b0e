"""Semantic checks of a parsed rule set, before any model is seen.

Every ``apply`` is checked against the method signatures (unknown methods,
unknown, duplicate, missing or positional arguments, wrong types, values out of
range); every selector and predicate against the language (bad regexes and
globs, unknown fields and module types, empty ranges); every adapter block for
a valid, unique name and at least one rule. All findings are collected, none
stops the others.

The signatures are plain data (grammar/signature.py): the method registry, a
floor above, hands each one to :func:`register_signature` as it registers its
method, and a caller may pass its own (``methods=``); this module never imports
the methods, so checking a file never imports torch.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import replace
from typing import Mapping

from surgeon.diagnostics import Diagnostic, RulesError, Span, closest
from surgeon.grammar import rules as ir
from surgeon.grammar.glob import GlobError, compile_glob
from surgeon.grammar.names import NAME_HINT, name_problem
from surgeon.grammar.regex import RegexError, check_regex
from surgeon.grammar.signature import MethodSignature, known_signatures
from surgeon.grammar.vocabulary import MERGE_OPTIONS, MERGE_TYPES, MODULE_TYPES, PREDICATE_FIELDS, ROLES

__all__ = ["check_rules", "checked_rule_set", "default_methods"]

_KNOWN_TYPES = tuple(name for names in MODULE_TYPES.values() for name in names)

# Names carried over from PEFT's configs (or said aloud) for the language's arguments; too far
# from them for difflib ('rank' -> 'r'), or worth the same hint when close.
_ARGUMENT_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora",
    "init_lora_weights": "init", "lora_bias": "bias", "vera_dropout": "dropout", "oft_block_size": "block_size",
}
# PEFT config fields that are a part of a rule here, not an argument.
_RULE_PARTS = {
    "target_modules": 'the modules are the rule\'s selector: match "*.q_proj", "*.v_proj" apply ...',
    "modules_to_save": 'modules that train in full take a rule of their own: match "classifier" train',
    "layers_to_transform": 'layers are chosen by a where clause: match "*.q_proj" where layer in [0, 1] apply ...',
    "rank_pattern": 'a later rule with other arguments takes its modules: match "*.down_proj" apply lora(r=16)',
    "alpha_pattern": 'a later rule with other arguments takes its modules: match "*.down_proj" apply lora(r=8, alpha=32)',
}


def _suggest(word: str, choices, listing: str, quote: str = "'") -> str:
    """'did you mean 'x'? (listing)', or just the listing when nothing is close."""
    near = closest(word, choices)
    return f"did you mean {quote}{near[0]}{quote}? ({listing})" if near else listing


def default_methods() -> dict[str, MethodSignature]:
    """The methods registered so far (``import surgeon`` registers the built-in ones)."""
    return known_signatures()


def check_rules(
    rule_set: ir.RuleSet, methods: Mapping[str, MethodSignature] | None = None
) -> tuple[ir.RuleSet, list[Diagnostic]]:
    """The rule set with each method call's ``config`` filled in, and the findings."""
    checker = _Checker(default_methods() if methods is None else dict(methods))
    adapters = tuple(checker.adapter(a) for a in rule_set.adapters)
    for merge in rule_set.merges:
        checker.merge(merge)
    return ir.RuleSet(adapters, path=rule_set.path, merges=rule_set.merges), checker.diagnostics


def checked_rule_set(rule_set: ir.RuleSet, methods: Mapping[str, MethodSignature] | None = None) -> ir.RuleSet:
    """A rule set built as objects (from a PEFT config, a merge), checked as parsed text is: RulesError on errors.

    No text is parsed: what a file on disk says reaches the rules as typed values, never as source.
    """
    checked, diagnostics = check_rules(rule_set, methods)
    diagnostics = [d if d.file else replace(d, file=rule_set.path) for d in diagnostics]
    if any(d.is_error for d in diagnostics):
        raise RulesError(diagnostics)
    return ir.RuleSet(checked.adapters, path=rule_set.path, warnings=tuple(diagnostics), merges=checked.merges)


class _Checker:
    def __init__(self, methods: dict[str, MethodSignature]):
        self.methods = methods
        self.diagnostics: list[Diagnostic] = []
        self.seen_adapters: dict[str, Span | None] = {}

    def error(self, code: str, message: str, span: Span | None, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(code, message, span, hint))

    # merges
    def merge(self, merge: ir.Merge) -> None:
        call, name = merge.call, merge.name
        if name_problem(name):
            self.error("bad-adapter-name", name_problem(name), merge.span, NAME_HINT)
        if name in self.seen_adapters:
            self.error("duplicate-adapter", f"merge '{name}' names an adapter that already exists", merge.span,
                       "give the merged adapter a new name")
        self.seen_adapters.setdefault(name, merge.span)
        if call.name not in MERGE_TYPES:
            self.error("unknown-combination", f"unknown combination type '{call.name}'", call.span,
                       _suggest(call.name, MERGE_TYPES, "combination types: " + ", ".join(MERGE_TYPES)))
            return
        takes = MERGE_TYPES[call.name]
        weights = 0
        seen: set = set()
        for arg in call.arguments:
            if arg.name is not None and arg.name in seen:
                self.error("duplicate-argument", f"'{arg.name}' is given twice", arg.span, "give each adapter and option once")
                continue
            seen.add(arg.name)
            if arg.name is None:
                self.error("positional-argument", f"arguments of {call.name} must be named", arg.value_span,
                           "write ADAPTER=WEIGHT for each adapter, and OPTION=VALUE")
            elif arg.name in MERGE_OPTIONS:
                if arg.name not in takes:
                    self.error("unknown-argument", f"{call.name} does not take {arg.name}", arg.span,
                               f"{call.name} takes: {', '.join(takes) or 'adapter weights only'}")
                elif not _merge_option_ok(arg.name, arg.value):
                    self.error("out-of-range", f"{arg.name} must be {MERGE_OPTIONS[arg.name]}, got {ir.format_value(arg.value)}",
                               arg.value_span)
            elif isinstance(arg.value, bool) or not isinstance(arg.value, (int, float)) or not math.isfinite(arg.value):
                self.error("bad-type", f"the weight of adapter '{arg.name}' must be a number, got {ir.format_value(arg.value)}",
                           arg.value_span, "write ADAPTER=WEIGHT, e.g. math=0.7")
            elif arg.name == name:
                self.error("bad-argument", f"merge '{name}' cannot take itself as a source", arg.span)
                weights += 1
            else:
                weights += 1
        if "density" in takes and "density" not in call.kwargs:
            self.error("missing-argument", f"{call.name} needs the argument 'density'", call.span,
                       f"density: {MERGE_OPTIONS['density']}")
        if not weights and not any(a.name is None for a in call.arguments):
            self.error("missing-argument", f"merge '{name}' names no adapter", call.span,
                       f"write {call.name}(ADAPTER=WEIGHT, ...)")

    # adapters and rules
    def adapter(self, adapter: ir.Adapter) -> ir.Adapter:
        name, span = adapter.name, adapter.span
        if name in self.seen_adapters:
            first = self.seen_adapters[name]
            at = f" at {first.line}:{first.column}" if first else ""
            self.error(
                "duplicate-adapter", f"adapter '{name}' is already declared{at}", span, "merge the two blocks into one"
            )
        else:
            self.seen_adapters[name] = span
        if name_problem(name):
            self.error("bad-adapter-name", name_problem(name), span, NAME_HINT)
        if not adapter.rules:
            self.error(
                "empty-adapter",
                f"adapter '{name}' has no rules",
                span,
                'give it at least one rule, e.g. match "*.q_proj" apply lora(r=8), or remove the block',
            )
        return replace(adapter, rules=tuple(self.rule(r) for r in adapter.rules))

    def rule(self, rule: ir.Rule) -> ir.Rule:
        for selector in rule.selectors:
            self.selector(selector)
        if rule.where is not None:
            self.predicate(rule.where)
        if isinstance(rule.action, ir.Apply):
            return replace(rule, action=replace(rule.action, method=self.call(rule.action.method)))
        return rule

    # selectors and predicates
    def selector(self, selector: ir.Selector) -> None:
        if isinstance(selector, ir.GlobSelector):
            self.glob(selector.pattern, selector.span, opening=1)
        elif isinstance(selector, ir.RegexSelector):
            try:
                check_regex(selector.pattern)
            except RegexError as exc:
                span = selector.span.sub(3 + exc.offset, 1) if exc.offset is not None and selector.span else selector.span
                self.error("bad-regex", f"invalid regex: {exc.message}", span, "the regex must match the whole module path")
        elif isinstance(selector, ir.RoleSelector):
            for i, pattern in enumerate(selector.roles):
                if not any(fnmatch.fnmatchcase(role, pattern) for role in ROLES):
                    span = selector.name_spans[i] if i < len(selector.name_spans) else selector.span
                    listing = f"roles: {', '.join(ROLES)}"
                    self.error("unknown-role", f"unknown role '{pattern}'", span, _suggest(pattern, ROLES, listing))
        else:
            self.type_name(selector.name, selector.quoted, selector.span)

    def glob(self, pattern: str, span: Span | None, opening: int) -> None:
        try:
            compile_glob(pattern)
        except GlobError as exc:
            exact = span is not None and span.end - span.start == len(pattern) + 2 * opening
            where = span.sub(opening + exc.offset, exc.length) if exact else span
            self.error("bad-glob", exc.message, where, "globs support * ? [0-9] {a,b}; write \\{ for a literal brace")

    def type_name(self, name: str, quoted: bool, span: Span | None) -> None:
        if quoted or name in _KNOWN_TYPES:
            return
        listing = f'to match a class of your own, quote it: type("{name}")'
        self.error("unknown-type", f"unknown module type '{name}'", span, _suggest(name, _KNOWN_TYPES, listing, quote=""))

    def predicate(self, predicate: ir.Predicate) -> None:
        if isinstance(predicate, (ir.And, ir.Or)):
            for operand in predicate.operands:
                self.predicate(operand)
        elif isinstance(predicate, ir.Not):
            self.predicate(predicate.operand)
        elif isinstance(predicate, ir.NameTest):
            self.glob(predicate.pattern, predicate.span, opening=1)
        elif isinstance(predicate, ir.TypeTest):
            self.type_name(predicate.name, predicate.quoted, predicate.span)
        else:
            self.field(predicate)

    def field(self, predicate: ir.Comparison | ir.InRange | ir.InList) -> None:
        span = predicate.span
        name_span = span.sub(0, len(predicate.field)) if span else None
        if predicate.field not in PREDICATE_FIELDS:
            listing = f"fields: {', '.join(PREDICATE_FIELDS)}; name(\"glob\") and type(Name) test paths and classes"
            self.error(
                "unknown-field",
                f"unknown field '{predicate.field}'",
                name_span,
                _suggest(predicate.field, PREDICATE_FIELDS, listing),
            )
            return
        if isinstance(predicate, ir.InRange):
            if predicate.start >= predicate.stop:
                self.error(
                    "empty-range",
                    f"the range {predicate.start}..{predicate.stop} is empty",
                    span,
                    f"ranges are half-open, as Python's range: {predicate.start}..{predicate.start + 1} "
                    f"holds only {predicate.start}",
                )
            return
        values = predicate.values if isinstance(predicate, ir.InList) else (predicate.value,)
        for value in values:
            if isinstance(value, float) and not math.isfinite(value):
                self.error("out-of-range", f"a number in the comparison of '{predicate.field}' is too large", span,
                           "numbers in a rules file are finite (below about 1.8e308)")
                return
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                self.error(
                    "bad-type",
                    f"'{predicate.field}' is a number; it cannot be compared with {ir.format_value(value)}",
                    span,
                    "to test a module's path use name(\"glob\"), to test its class type(Name)",
                )
                return

    # method calls
    def call(self, call: ir.MethodCall) -> ir.MethodCall:
        signature = self.methods.get(call.name)
        if signature is None:
            names = sorted(self.methods)
            listing = f"methods: {', '.join(names)}"
            self.error("unknown-method", f"unknown method '{call.name}'", call.span, _suggest(call.name, names, listing))
            return call
        values: dict = {}
        first_seen: dict[str, Span | None] = {}
        suggested: set = set()  # parameters an unknown argument's hint names: not reported missing as well
        ok = True
        for index, arg in enumerate(call.arguments):
            ok &= self.argument(signature, arg, index, values, first_seen, suggested)
        positional = any(arg.name is None for arg in call.arguments)
        for p in signature.params:
            if p.required and p.name not in first_seen and not positional and p.name not in suggested:
                ok = False
                self.error(
                    "missing-argument",
                    f"{call.name} needs the argument '{p.name}'",
                    call.span,
                    f"{p.describe()}; write {call.name}({p.name}=...)",
                )
        if not ok:
            return call
        try:
            config = signature.build(values)
        except (TypeError, ValueError) as exc:
            self.error("bad-argument", f"{call.name}: {exc}", call.span)
            return call
        return replace(call, config=config)

    def argument(self, signature: MethodSignature, arg: ir.Argument, index: int, values: dict, first_seen: dict,
                 suggested: set) -> bool:
        valid = ", ".join(signature.param_names)
        if arg.name is None:
            guess = signature.params[min(index, len(signature.params) - 1)].name if signature.params else "NAME"
            self.error(
                "positional-argument",
                f"arguments of {signature.name} must be named",
                arg.value_span,
                f"write NAME=VALUE, e.g. {guess}={ir.format_value(arg.value)} ({signature.name} takes: {valid})",
            )
            return False
        param = signature.get(arg.name)
        if param is None:
            hint, meant = self.argument_hint(signature, arg.name)
            suggested.add(meant)
            self.error("unknown-argument", f"{signature.name} has no argument '{arg.name}'", arg.span, hint)
            return False
        if arg.name in first_seen:
            first = first_seen[arg.name]
            at = f" (first given at {first.line}:{first.column})" if first else ""
            self.error("duplicate-argument", f"argument '{arg.name}' is given twice{at}", arg.span, "remove one of them")
            return False
        first_seen[arg.name] = arg.span
        converted, problem = param.check(arg.value)
        if problem is not None:
            hint = param.describe()
            if problem.code == "bad-choice" and isinstance(arg.value, str):
                hint = _suggest(arg.value, param.choices, hint, quote='"')
            self.error(problem.code, f"argument '{arg.name}' of {signature.name} {problem.message}", arg.value_span, hint)
            return False
        values[arg.name] = converted
        return True

    def argument_hint(self, signature: MethodSignature, name: str) -> tuple:
        """(the hint for an unknown argument ``name``, the parameter it suggests or None)."""
        listing = f"{signature.name} takes: {', '.join(signature.param_names)}"
        meant = _ARGUMENT_ALIASES.get(name)
        if meant in signature.param_names:
            return f"did you mean '{meant}'? ({listing})", meant
        other = self.methods.get(name[4:]) if name.startswith("use_") else None
        if other is not None:  # PEFT's use_dora=True is a method here
            if other.name == signature.name:
                return f"{signature.name} is {other.name} already: remove {name} ({listing})", None
            return (f"{other.name} is a method of its own: apply {other.name}(...) "
                    f"({other.name} takes: {', '.join(other.param_names)})"), None
        if name in _RULE_PARTS:
            return _RULE_PARTS[name], None
        near = closest(name, signature.param_names)
        return (f"did you mean '{near[0]}'? ({listing})", near[0]) if near else (listing, None)


def _merge_option_ok(name: str, value) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "density" or name == "svd_clamp":
        return number and 0 < value <= 1
    if name == "svd_rank":
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    return value in ("total", "frequency")
