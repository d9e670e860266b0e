"""The bounds surgeon puts on rules text, in one place, so that a hostile file fails fast and in words.

Each bound is far above what a real rules file needs and low enough that checking a file at the bound
takes seconds, not hours or gigabytes. Every check that enforces one reports a located diagnostic that
names the bound; none raises a traceback.

- ``MAX_TEXT_BYTES``: a rules file (bytes on disk) or rules text (characters) is at most 8 MiB, about
  100,000 rules; a larger one is refused before it is read (checking is linear in the size:
  bench/rules_throughput.py).
- ``MAX_DEPTH``: brackets nest at most 100 deep, in a where clause (parentheses, lists, ``not``), in a
  glob (``{a,{b,c}}``) and in a regex (groups); real files stay under 10, and the parsers of Python's
  ``re`` and of the tree builder recurse once a level.
- ``MAX_LITERAL_CHARS``: a quoted string or regex is at most 65,536 characters (a PEFT regex over every
  site of an 80-layer model is about 25,000).
- ``MAX_WORD_CHARS``: a name or a run of digits is at most 256 characters, so that every number converts
  (Python refuses integers of more than 4,300 digits) and no name floods a message.
- ``REGEX_TIMEOUT``: one regex match may take 0.25 s (a module path matches in microseconds; a regex that
  backtracks exponentially would take hours).
- ``REGEX_BUDGET``: all the regex matching of one plan may take 10 s (a real file's regexes take
  milliseconds; thousands of slow-but-bounded regexes would otherwise add up to hours).
"""

from __future__ import annotations

__all__ = ["MAX_TEXT_BYTES", "MAX_DEPTH", "MAX_LITERAL_CHARS", "MAX_WORD_CHARS", "REGEX_TIMEOUT", "REGEX_BUDGET", "size_words"]

MAX_TEXT_BYTES = 8 * 2**20
MAX_DEPTH = 100
MAX_LITERAL_CHARS = 65_536
MAX_WORD_CHARS = 256
REGEX_TIMEOUT = 0.25
REGEX_BUDGET = 10.0


def size_words(n: int) -> str:
    """``8 MiB`` for 8 * 2**20: how the limits read in messages."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n:,} bytes"
