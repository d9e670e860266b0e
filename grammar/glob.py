"""Globs over dotted module paths, matched in time linear in the path, whatever the glob.

The whole path must match. ``*`` matches any run of characters, dots included
(so ``"*.q_proj"`` finds ``q_proj`` at any depth); ``?`` matches one character;
``[0-9]`` and ``[!0-9]`` are character classes; ``{a,b}`` is alternation and
may nest (``"*.{self_attn.{q,v},mlp.up}_proj"``); a backslash makes the next
character literal.

Why no regex: a backtracking engine (Python's ``re``) tries every way of splitting
a path among the stars, so the time grows exponentially with the number of stars; ``{a,a}{a,a}...`` does the same with no star. Here a glob
compiles to a position automaton (one state per character of the glob, no empty
moves: Glushkov's construction), run as a DFA that is built on demand: a path costs
one dictionary look-up per character once its states are known, and a state is
made at most once per character of the path. Braces nest at most ``MAX_DEPTH`` deep.
"""

from __future__ import annotations

import functools
import re

from surgeon.grammar.limits import MAX_DEPTH

__all__ = ["GlobError", "GlobMatcher", "compile_glob"]

_MAX_STATES = 1024  # DFA states kept per glob; past it the table starts afresh (each path still makes at most len(path))


class GlobError(ValueError):
    """A malformed glob; ``offset`` is the index of the offending character."""

    def __init__(self, message: str, offset: int, length: int = 1):
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.length = length


@functools.lru_cache(maxsize=1024)
def compile_glob(pattern: str) -> "GlobMatcher":
    """The matcher of ``pattern`` (GlobError if it is malformed); ``compile_glob(p).fullmatch(path)`` is a bool."""
    return GlobMatcher(pattern)


class _Table:
    """The DFA built so far: state id -> set of automaton positions (an int bitmask), its moves, acceptance."""

    __slots__ = ("sets", "ids", "rows", "accepting", "masks")

    def __init__(self, accept: int):
        self.sets = [0, 1]  # id 0: no position (dead); id 1: the start position alone
        self.ids = {0: 0, 1: 1}
        self.rows: list = [{}, {}]
        self.accepting = [False, bool(1 & accept)]
        self.masks: dict = {}  # character -> the positions that accept it


class GlobMatcher:
    """A compiled glob: ``fullmatch(path)`` says whether the whole path matches."""

    __slots__ = ("pattern", "_edges", "_follow", "_literals", "_any", "_classes", "_accept", "_table")

    def __init__(self, pattern: str):
        self.pattern = pattern
        self._literals: dict = {}  # character -> the positions that are that literal
        self._any = 0  # positions of '?' and '*'
        self._classes: list = []  # (position bit, compiled one-character class)
        # (from, to): any position in `from` may be followed by any position in `to`. Position 0 is the start.
        self._edges: list = []
        self._follow: dict = {}  # position bit -> the positions that may follow it (made when first needed)
        self._accept = _Parser(pattern, self).parse()
        self._table = _Table(self._accept)

    def fullmatch(self, path: str) -> bool:
        table = self._table
        if len(table.sets) > _MAX_STATES:
            table = self._table = _Table(self._accept)
        rows, state = table.rows, 1
        for ch in path:
            nxt = rows[state].get(ch)
            if nxt is None:
                nxt = self._step(table, state, ch)
            if not nxt:
                return False
            state = nxt
        return table.accepting[state]

    @property
    def states(self) -> int:
        """How many DFA states matching has made so far (at most one per character matched)."""
        return len(self._table.sets)

    def _step(self, table: _Table, state: int, ch: str) -> int:
        current, following, follow = table.sets[state], 0, self._follow
        while current:
            bit = current & -current
            current ^= bit
            after = follow.get(bit)
            if after is None:  # once per position: the union of the edges leaving it
                after = follow[bit] = functools.reduce(int.__or__, (t for s, t in self._edges if s & bit), 0)
            following |= after
        following &= self._mask(table, ch)
        found = table.ids.get(following)
        if found is None:
            found = table.ids[following] = len(table.sets)
            table.sets.append(following)
            table.rows.append({})
            table.accepting.append(bool(following & self._accept))
        table.rows[state][ch] = found
        return found

    def _mask(self, table: _Table, ch: str) -> int:
        mask = table.masks.get(ch)
        if mask is None:
            mask = self._literals.get(ch, 0) | self._any
            for bit, cls in self._classes:
                if cls.fullmatch(ch):
                    mask |= bit
            table.masks[ch] = mask
        return mask

    def __repr__(self) -> str:
        return f"GlobMatcher({self.pattern!r})"


class _Parser:
    """One left-to-right pass over a glob, with an explicit stack for braces (no recursion).

    Each sequence is summarised as Glushkov's (first positions, last positions, matches empty);
    concatenating two links the first one's last positions to the second one's first.
    """

    def __init__(self, pattern: str, matcher: GlobMatcher):
        self.pattern, self.m = pattern, matcher
        self.count = 1  # position 0 is the start

    def position(self) -> int:
        bit = 1 << self.count
        self.count += 1
        return bit

    def concat(self, a: tuple, b: tuple) -> tuple:
        if a[1] and b[0]:
            self.m._edges.append((a[1], b[0]))
        return (a[0] | (b[0] if a[2] else 0), b[1] | (a[1] if b[2] else 0), a[2] and b[2])

    def parse(self) -> int:
        """Fill the matcher's positions and edges; return the accepting positions."""
        pattern, m = self.pattern, self.m
        empty = (0, 0, True)
        seq, stack = (1, 1, True), []  # stack: (offset of '{', sequence before it, finished alternatives)
        i, n, star = 0, len(pattern), False
        while i < n:
            ch, atom, was_star, star = pattern[i], None, star, False
            if ch == "*":
                star = True
                if not was_star:  # '**' matches what '*' does
                    bit = self.position()
                    m._any |= bit
                    m._edges.append((bit, bit))
                    atom = (bit, bit, True)
            elif ch == "?":
                bit = self.position()
                m._any |= bit
                atom = (bit, bit, False)
            elif ch == "\\":
                if i + 1 == n:
                    raise GlobError("glob ends with a lone backslash", i)
                i += 1
                atom = self.literal(pattern[i])
            elif ch == "[":
                cls, end = _char_class(pattern, i)
                bit = self.position()
                m._classes.append((bit, cls))
                atom, i = (bit, bit, False), end - 1
            elif ch == "{":
                if len(stack) >= MAX_DEPTH:
                    raise GlobError(f"braces in this glob nest more than {MAX_DEPTH} deep", i)
                stack.append((i, seq, []))
                seq = empty
            elif ch == "," and stack:
                stack[-1][2].append(seq)
                seq = empty
            elif ch == "}":
                if not stack:
                    raise GlobError("unmatched '}' in glob", i)
                _, before, options = stack.pop()
                options.append(seq)
                alternatives = (0, 0, False)
                for first, last, nullable in options:
                    alternatives = (alternatives[0] | first, alternatives[1] | last, alternatives[2] or nullable)
                seq = self.concat(before, alternatives)
            else:
                atom = self.literal(ch)
            if atom is not None:
                seq = self.concat(seq, atom)
            i += 1
        if stack:
            raise GlobError("unclosed '{' in glob", stack[-1][0])
        return seq[1]

    def literal(self, ch: str) -> tuple:
        bit = self.position()
        self.m._literals[ch] = self.m._literals.get(ch, 0) | bit
        return (bit, bit, False)


def _char_class(pattern: str, start: int) -> tuple:
    """(the class at ``start`` as a one-character regex, the offset after it)."""
    i = start + 1
    negate = i < len(pattern) and pattern[i] in "!^"
    if negate:
        i += 1
    body_start = i
    # A ']' right after '[' (or '[!') is a literal member, as in shells.
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 1
    if i >= len(pattern):
        raise GlobError("unclosed '[' in glob", start)
    body = pattern[body_start:i]
    members = ["-" if ch == "-" and 0 < j < len(body) - 1 else re.escape(ch) for j, ch in enumerate(body)]
    try:  # a class matches one character: no backtracking is possible
        cls = re.compile("[" + ("^" if negate else "") + "".join(members) + "]")
    except re.error as exc:
        raise GlobError(f"bad character class in glob: {exc.msg}", start, i + 1 - start) from None
    return cls, i + 1
