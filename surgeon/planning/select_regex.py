"""Regex selectors matched within bounds: one match by REGEX_TIMEOUT, all of a plan's by REGEX_BUDGET.

A regex that backtracks exponentially is stopped by its own bound; thousands of regexes that each stay
just under it would still add up to hours, so a plan has a budget for all of them (grammar/limits.py).
Both end in a located diagnostic at the selector, never a hang.
"""

from __future__ import annotations

import time

from surgeon.grammar import rules as ir
from surgeon.diagnostics import Diagnostic, PlanError
from surgeon.grammar.limits import REGEX_BUDGET, REGEX_TIMEOUT
from surgeon.grammar.regex import RegexTimeout, regex_fullmatch

__all__ = ["bounded_matches", "regex_problem"]


def bounded_matches(selector: ir.RegexSelector, paths: list, selection) -> tuple:
    """The indices of the ``paths`` that ``selector`` matches: each match bounded by REGEX_TIMEOUT, and all of
    a plan's (``selection.regex_seconds``, which this adds to) by REGEX_BUDGET: a PlanError past it."""
    picked = []
    for i, path in enumerate(paths):
        left = REGEX_BUDGET - selection.regex_seconds
        if left <= 0:
            span = selector.span
            raise PlanError([Diagnostic(
                "regex-budget", f"the regexes of these rules took more than {REGEX_BUDGET:g} s in all to match "
                f"the model's {len(paths)} module paths; planning stopped at {selector}", span,
                "each backtracks for a while on every path: write them without nested repetition, or as globs, "
                "which match in linear time", file=selection.rule_set.path,
                source_line=selection.rule_set.source_line(span.line) if span else None)])
        started = time.perf_counter()
        try:
            if regex_fullmatch(selector.pattern, path, timeout=min(REGEX_TIMEOUT, left)):
                picked.append(i)
        finally:
            selection.regex_seconds += time.perf_counter() - started
    return tuple(picked)


def regex_problem(selector: ir.RegexSelector, exc: Exception, rule_set: ir.RuleSet | None = None) -> Diagnostic:
    """The error for a regex selector that timed out (or that the engine refuses), at the selector."""
    span = selector.span
    source = rule_set.source_line(span.line) if rule_set is not None and span else None
    if isinstance(exc, RegexTimeout):
        message = (f"the regex {selector} took longer than {exc.seconds:g} s to match the module path {exc.text!r}: "
                   "it backtracks exponentially")
        hint = ("nested repetition such as (a+)+ or (a|aa)* tries every split of the path; write each part once "
                "(a+), or use a glob, which matches in linear time")
    else:
        message, hint = f"the regex {selector} is not supported: {exc.message}", "write it in Python's re syntax"
    return Diagnostic("regex-timeout" if isinstance(exc, RegexTimeout) else "bad-regex", message, span, hint,
                      file=rule_set.path if rule_set is not None else None, source_line=source)
