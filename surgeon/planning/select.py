"""Rules x modules -> who gets what: the language's semantics applied to a captured model.

For each adapter, every module is matched against that adapter's rules; the
last matching rule in the file wins (``apply``, ``skip`` or ``train`` alike).
A rule matches a module when any of its selectors matches and its ``where``
clause holds. Nothing here touches a weight.

Errors (all reported at once, at the rule's line and column): a rule that
matches no module, an ``apply`` rule whose modules are all of kinds its
method cannot adapt, and a regex that takes too long to match (it backtracks).
Warnings: a rule that never wins, because later rules take over every module
it matches.

Cost: each distinct selector is matched against every module path once (globs
by a linear-time automaton, regexes with a time bound), each rule's where clause
is then tested on the modules its selectors picked, and the winners come from
one pass over the matches; nothing is quadratic in the number of rules.
"""

from __future__ import annotations

import difflib
import operator
import re
from dataclasses import dataclass, field

from surgeon.grammar import rules as ir
from surgeon.diagnostics import Diagnostic, PlanError
from surgeon.grammar.glob import compile_glob
from surgeon.grammar.regex import RegexError, RegexTimeout, regex_fullmatch

from surgeon.planning.select_regex import bounded_matches, regex_problem as _regex_problem

__all__ = ["RuleMatch", "Resolution", "resolve", "matches"]

_MAX_EXPANSIONS = 64  # brace alternatives a "matches nothing" hint reads words from
_MAX_TIMEOUTS = 10  # regexes that ran out of time before planning stops trying more (each costs REGEX_TIMEOUT)

_COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}

# What other architectures call the same projection (for "matches nothing" hints).
_SYNONYMS = (
    ("q_proj", "k_proj", "v_proj", "query", "key", "value", "c_attn", "query_key_value", "qkv_proj", "W_pack", "Wqkv", "qkv"),
    ("o_proj", "out_proj", "dense", "c_proj", "wo", "proj"),
    ("gate_proj", "up_proj", "c_fc", "fc1", "gate_up_proj", "w1", "w3", "dense_h_to_4h", "intermediate"),
    ("down_proj", "c_proj", "fc2", "w2", "dense_4h_to_h", "output"),
    ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared"),
    ("lm_head", "embed_out", "output", "classifier", "score"),
)


@dataclass
class RuleMatch:
    """One rule's outcome: the modules it matched, won, and could not adapt."""

    adapter: str
    index: int  # position within its adapter
    rule: ir.Rule
    matched: list = field(default_factory=list)
    won: list = field(default_factory=list)
    unsupported: list = field(default_factory=list)  # won modules its method cannot adapt
    adaptable: list = field(default_factory=list)  # matched modules its method can adapt (apply rules)

    @property
    def action(self) -> str:
        return {ir.Apply: "apply", ir.Skip: "skip", ir.Train: "train"}[type(self.rule.action)]


@dataclass
class Resolution:
    matches: list  # RuleMatch, in rule order
    diagnostics: list  # errors and warnings

    @property
    def errors(self) -> list:
        return [d for d in self.diagnostics if d.is_error]


def matches(rule: ir.Rule, info) -> bool:
    """Does ``rule`` match the module described by ``info`` (a capture.ModuleInfo)? PlanError for a regex
    that runs out of time."""
    try:
        if not any(_selects(s, info) for s in rule.selectors):
            return False
    except (RegexTimeout, RegexError) as exc:
        raise PlanError([_regex_problem(next(s for s in rule.selectors if isinstance(s, ir.RegexSelector)), exc)]) from None
    return rule.where is None or _holds(rule.where, info)


def _selects(selector, info) -> bool:
    if isinstance(selector, ir.GlobSelector):
        return compile_glob(selector.pattern).fullmatch(info.path)
    if isinstance(selector, ir.RegexSelector):
        return regex_fullmatch(selector.pattern, info.path)
    if isinstance(selector, ir.RoleSelector):
        return selector.matches_role(info.role)
    return selector.name in info.type_names


class _Selection:
    """Selector -> the modules it picks (indices, in module order), each distinct selector matched once."""

    def __init__(self, modules: dict, rule_set: ir.RuleSet):
        self.paths, self.infos, self.rule_set = list(modules), list(modules.values()), rule_set
        self.picked: dict = {}
        self.problems: list = []  # regex selectors that timed out: one diagnostic per rule that uses one
        self.timeouts = 0
        self.regex_seconds = 0.0  # spent matching regexes, against REGEX_BUDGET

    def rule(self, rule: ir.Rule) -> list:
        """The indices of the modules ``rule`` matches, in module order."""
        found = [self.selector(s) for s in rule.selectors]
        picked = found[0] if len(found) == 1 else sorted(set().union(*found))
        if rule.where is None:
            return list(picked)
        infos = self.infos
        return [i for i in picked if _holds(rule.where, infos[i])]

    def selector(self, selector) -> tuple:
        if selector in self.picked:
            picked = self.picked[selector]
            if isinstance(picked, Exception):
                self.problems.append(_regex_problem(selector, picked, self.rule_set))
                return ()
            return picked
        paths, infos = self.paths, self.infos
        if isinstance(selector, ir.GlobSelector):
            glob = compile_glob(selector.pattern)
            picked = tuple(i for i, p in enumerate(paths) if glob.fullmatch(p))
        elif isinstance(selector, ir.RegexSelector):
            try:
                picked = bounded_matches(selector, paths, self)
            except (RegexTimeout, RegexError) as exc:
                self.picked[selector] = exc
                self.timeouts += isinstance(exc, RegexTimeout)
                self.problems.append(_regex_problem(selector, exc, self.rule_set))
                if self.timeouts >= _MAX_TIMEOUTS:  # each costs the time bound: stop before they add up
                    raise PlanError(self.problems) from None
                return ()
        elif isinstance(selector, ir.RoleSelector):
            picked = tuple(i for i, info in enumerate(infos) if selector.matches_role(info.role))
        else:
            picked = tuple(i for i, info in enumerate(infos) if selector.name in info.type_names)
        self.picked[selector] = picked
        return picked


def _holds(predicate, info) -> bool:
    if isinstance(predicate, ir.And):
        return all(_holds(p, info) for p in predicate.operands)
    if isinstance(predicate, ir.Or):
        return any(_holds(p, info) for p in predicate.operands)
    if isinstance(predicate, ir.Not):
        return not _holds(predicate.operand, info)
    if isinstance(predicate, ir.NameTest):
        return compile_glob(predicate.pattern).fullmatch(info.path)
    if isinstance(predicate, ir.TypeTest):
        return predicate.name in info.type_names
    value = info.field(predicate.field)
    if value is None:  # a module without this property (no layer index, no features)
        return False
    if isinstance(predicate, ir.InRange):
        return predicate.start <= value < predicate.stop
    if isinstance(predicate, ir.InList):
        return value in predicate.values
    return _COMPARE[predicate.op](value, predicate.value)


def resolve(rule_set: ir.RuleSet, modules: dict, sites: dict, methods: dict) -> Resolution:
    """Apply ``rule_set`` to ``modules`` (path -> ModuleInfo) with ``sites`` (path -> Site)."""
    results: list[RuleMatch] = []
    selection = _Selection(modules, rule_set)
    paths = selection.paths
    winners: dict = {}  # (adapter, path) -> the RuleMatch that wins it
    for adapter in rule_set.adapters:
        rule_matches = [RuleMatch(adapter.name, i, rule) for i, rule in enumerate(adapter.rules)]
        won: dict = {}  # module index -> the last rule that matches it
        for match in rule_matches:
            found = selection.rule(match.rule)
            match.matched = [paths[i] for i in found]
            for i in found:
                won[i] = match
        for i in sorted(won):
            winner, path = won[i], paths[i]
            winners[(adapter.name, path)] = winner
            winner.won.append(path)
            if winner.action == "apply" and not _adaptable(winner.rule, sites.get(path), methods):
                winner.unsupported.append(path)
        for match in rule_matches:
            if match.action == "apply":
                match.adaptable = [p for p in match.matched if _adaptable(match.rule, sites.get(p), methods)]
        results.extend(rule_matches)
    diagnostics = list(selection.problems)
    for match in results:
        diagnostics.extend(_findings(match, winners, modules, sites, methods, rule_set, selection))
    diagnostics.sort(key=lambda d: (d.span.line, d.span.column) if d.span else (0, 0))  # in file order
    return Resolution(results, diagnostics)


def _adaptable(rule: ir.Rule, site, methods: dict) -> bool:
    method = methods.get(rule.action.method.name)
    return site is not None and method is not None and site.kind in method.sites


def _findings(match: RuleMatch, winners: dict, modules, sites, methods, rule_set, selection) -> list:
    rule = match.rule
    where = _where(rule, rule_set)
    if not match.matched:
        if any(isinstance(selection.picked.get(s), Exception) for s in rule.selectors):
            return []  # its regex failed: that is the error
        return [_no_match(rule, modules, sites, where, selection)]
    found = []
    if match.action == "apply":
        method = methods[rule.action.method.name]
        if not match.adaptable:
            types = _type_counts(match.matched, modules)
            found.append(
                where(
                    "nothing-adaptable",
                    f"{method.name} cannot adapt any module this rule matches ({types})",
                    f"{method.name} adapts {_kinds(method.sites)} sites; "
                    f"try type(Linear) or a glob that ends at a projection",
                )
            )
            return found
    if not match.won:  # the later rules that took its modules: the winners of what it matched
        later = sorted({id(w): w for w in (winners[(match.adapter, p)] for p in match.matched)}.values(), key=lambda m: m.index)
        lines = ", ".join(str(m.rule.span.line) for m in later if m.rule.span) or "later"
        found.append(
            where(
                "never-wins",
                f"this rule never wins: every module it matches is taken by a later rule (line {lines})",
                "within an adapter the last matching rule wins; move this rule after the others, or narrow them",
                severity="warning",
            )
        )
    return found


def _where(rule: ir.Rule, rule_set: ir.RuleSet):
    def make(code, message, hint=None, severity="error"):
        span = rule.span
        source = rule_set.source_line(span.line) if span else None
        return Diagnostic(code, message, span, hint, severity, rule_set.path, source)

    return make


def _kinds(kinds) -> str:
    kinds = list(kinds)
    return kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " and " + kinds[-1]


def _type_counts(paths, modules) -> str:
    counts: dict = {}
    for p in paths:
        counts[modules[p].type_name] = counts.get(modules[p].type_name, 0) + 1
    return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in sorted(counts.items(), key=lambda kv: -kv[1]))


def _no_match(rule: ir.Rule, modules: dict, sites: dict, where, selection) -> Diagnostic:
    picked = sorted(set().union(*(selection.selector(s) for s in rule.selectors)))
    selected = [selection.infos[i] for i in picked]
    selectors = ", ".join(str(s) for s in rule.selectors)
    if selected:  # the selector found modules; the where clause removed them all
        ranges = _field_ranges(rule.where, selected)
        return where(
            "no-match",
            f"no module matched by {selectors} satisfies 'where {rule.where}' ({len(selected)} modules were tested)",
            f"among those modules {ranges}" if ranges else "check the where clause",
        )
    if all(isinstance(s, ir.RoleSelector) for s in rule.selectors):
        return where("no-match", f"this rule matches no module of the model: {selectors}", _role_hint(modules))
    words = _words(rule)
    closest = _closest_paths(words, list(modules))
    message = f"this rule matches no module of the model: {selectors}"
    if closest:
        message += f"; closest module paths: {', '.join(closest)}"
    return where("no-match", message, _synonym_hint(words, sites, modules, rule))


def _role_hint(modules: dict) -> str:
    """The roles this model's sites have, and the sites the dataflow analysis could not decide."""
    counts: dict = {}
    for info in modules.values():
        if info.role is not None:
            counts[info.role] = counts.get(info.role, 0) + 1
    unknown = [p for p, i in modules.items() if i.role == "unknown"]
    found = ", ".join(f"{r} x{c}" if c > 1 else r for r, c in counts.items() if r != "unknown")
    hint = f"roles found in this model: {found}" if found else "no site of this model has a known role"
    if unknown:
        hint += (f"; {len(unknown)} sites are 'unknown' (e.g. {unknown[0]}): their dataflow matches no attention, "
                 "MLP, embedding or head the analysis knows; select them by path")
    return hint


def _field_ranges(predicate, infos) -> str:
    fields = sorted(_fields_of(predicate))
    parts = []
    for name in fields:
        values = sorted({v for v in (getattr(i, name) for i in infos) if v is not None})
        if values:
            parts.append(f"{name} is {values[0]}" if len(values) == 1 else f"{name} runs from {values[0]} to {values[-1]}")
        else:
            parts.append(f"none has a {name}")
    return "; ".join(parts)


def _fields_of(predicate) -> set:
    if isinstance(predicate, (ir.And, ir.Or)):
        return set().union(*(_fields_of(p) for p in predicate.operands))
    if isinstance(predicate, ir.Not):
        return _fields_of(predicate.operand)
    return {predicate.field} if hasattr(predicate, "field") else set()


def _words(rule: ir.Rule) -> list:
    """The literal names a rule's selectors mention (q_proj, v_proj, lm_head, ...)."""
    words = []
    for s in rule.selectors:
        text = getattr(s, "pattern", None) or getattr(s, "name", "")
        expanded = [text]
        # expand {a,b} alternatives, while they stay few: n groups of two are 2**n names
        while any("{" in t for t in expanded) and len(expanded) <= _MAX_EXPANSIONS:
            nxt = []
            for t in expanded:
                m = re.search(r"\{([^{}]*)\}", t)
                nxt += [t[: m.start()] + alt + t[m.end() :] for alt in m.group(1).split(",")] if m else [t]
            if nxt == expanded:
                break
            expanded = nxt
        for t in expanded[:_MAX_EXPANSIONS]:
            leaf = re.split(r"\\?\.", t)[-1]
            words.extend(w for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", leaf) if w != "re")
    return list(dict.fromkeys(words))


def _closest_paths(words: list, paths: list) -> list:
    leaves = {}
    for p in paths:
        leaves.setdefault(p.rsplit(".", 1)[-1], p)
    close = []
    for w in words:
        for leaf in difflib.get_close_matches(w, list(leaves), n=2, cutoff=0.6):
            if leaves[leaf] not in close:
                close.append(leaves[leaf])
    return close[:3]


def _synonym_hint(words: list, sites: dict, modules: dict, rule: ir.Rule) -> str:
    leaves = {}
    for path in sites:
        leaves.setdefault(path.rsplit(".", 1)[-1], path)
    present = [w for w in words if w in leaves]
    if present:  # the names exist: the rest of the pattern (prefix, layer numbers) is off
        layers = sorted({i.layer for i in modules.values() if i.layer is not None})
        span = f"; its layers are numbered {layers[0]} to {layers[-1]}" if layers else ""
        word = present[0]
        if any(getattr(s, "pattern", None) == word for s in rule.selectors):
            return (
                f"a glob matches the whole module path, not a suffix as PEFT's target_modules does: "
                f'write "*.{word}" (e.g. {leaves[word]})'
            )
        return f"this model does have '{word}' (e.g. {leaves[word]}); check the rest of the pattern{span}"
    for word in words:
        for group in _SYNONYMS:
            if word in group:
                others = [leaf for leaf in group if leaf in leaves and leaf != word]
                if others:
                    examples = ", ".join(f"{leaf} (e.g. {leaves[leaf]})" for leaf in others[:3])
                    # only when every module with those names does one thing (GPT-2's c_proj is attn.out and mlp.down)
                    roles = {modules[p].role for p in sites if p.rsplit(".", 1)[-1] in others[:3]}
                    one = len(roles) == 1 and not roles & {None, "unknown"}
                    portable = f"; role({next(iter(roles))}) selects them by what they do, on any architecture" if one else ""
                    return f"this model has no '{word}'; it has {examples}{portable}"
    names = sorted(leaves)
    return f"the adaptable modules of this model end in: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}"
