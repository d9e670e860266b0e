"""Rules text and patterns written by strangers: every one is a located diagnostic, in bounded time.

Nothing here times anything. Hangs are ruled out by structure: globs run on an automaton whose
states are counted, regexes on an engine with a time bound (whose timeout is exercised), files
are parsed in pieces (the characters handed to lark are counted), selection matches each distinct
selector once (the matches are counted).
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import random
import threading

import pytest
import regex

import surgeon
from surgeon.grammar import RegexSelector, RulesError, SurgeryError, load_rules, parse
from surgeon.diagnostics import PlanError
from surgeon.grammar.glob import GlobError, GlobMatcher, compile_glob
from surgeon.grammar.limits import MAX_DEPTH, MAX_LITERAL_CHARS, MAX_TEXT_BYTES, MAX_WORD_CHARS
from surgeon.grammar.regex import RegexError, RegexTimeout, check_regex, regex_fullmatch

PATH = "model.layers.0.self_attn.q_proj"
parse_module = importlib.import_module("surgeon.grammar.parse")  # the module (the package's `parse` is the function)


def _error(text: str) -> SurgeryError:
    with pytest.raises(SurgeryError) as caught:
        parse(text, path="hostile.surgery")
    return caught.value


def _located(error: SurgeryError, code: str):
    found = [d for d in error.diagnostics if d.code == code]
    assert found, [d.code for d in error.diagnostics]
    for d in found:
        assert d.span is not None and d.file == "hostile.surgery" and d.hint
        assert d.render().startswith(f"hostile.surgery:{d.span.line}:{d.span.column}: error: ")
    return found[0]


# --- globs: a linear-time automaton ---------------------------------------------------------


@pytest.mark.parametrize("pattern", ["*" * 10 + "Z", "*a" * 20 + "*b", "{a,a}" * 30 + "b", "*{a,*a}" * 12 + "b"])
def test_globs_that_make_a_backtracking_matcher_run_for_hours_make_few_automaton_states(pattern):
    matcher = compile_glob(pattern)
    assert isinstance(matcher, GlobMatcher)
    assert not matcher.fullmatch("a" * 5000) and not matcher.fullmatch(PATH * 100)
    # a DFA state is made at most once per character seen; these globs need no more than one per glob character
    assert matcher.states <= len(pattern) + 2


def _expand(glob: str) -> list:
    """The brace-free globs ``glob`` stands for (a reference: no backslashes, no braces inside classes)."""
    out, i = [""], 0
    while i < len(glob):
        if glob[i] == "{":
            depth, j, parts, start = 1, i + 1, [], i + 1
            while depth:
                depth += {"{": 1, "}": -1}.get(glob[j], 0)
                if glob[j] == "," and depth == 1:
                    parts.append(glob[start:j])
                    start = j + 1
                j += 1
            parts.append(glob[start:j - 1])
            out = [o + alt for o in out for part in parts for alt in _expand(part)]
            i = j
        elif glob[i] == "[":
            j = glob.index("]", i + 2)
            out, i = [o + glob[i:j + 1] for o in out], j + 1
        else:
            out, i = [o + glob[i] for o in out], i + 1
    return out


def test_the_automaton_agrees_with_brace_expansion_and_fnmatch_on_random_globs():
    rng = random.Random(19)

    def glob(depth=0):
        parts = []
        for _ in range(rng.randint(0, 5)):
            r = rng.random()
            if r < 0.25:
                parts.append("*")
            elif r < 0.35:
                parts.append("?")
            elif r < 0.45:
                parts.append(rng.choice(["[ab]", "[!a]", "[a-c]", "[]a]", "[.]"]))
            elif r < 0.55 and depth < 3:
                parts.append("{" + ",".join(glob(depth + 1) for _ in range(rng.randint(1, 3))) + "}")
            else:
                parts.append(rng.choice("ab.c,"))
        return "".join(parts)

    for _ in range(3000):
        pattern = glob()
        matcher, expanded = compile_glob(pattern), _expand(pattern)
        for _ in range(15):
            path = "".join(rng.choice("ab.c,") for _ in range(rng.randint(0, 8)))
            assert matcher.fullmatch(path) == any(fnmatch.fnmatchcase(path, e) for e in expanded), (pattern, path)


def test_braces_nested_past_the_bound_are_a_glob_error_at_the_brace():
    with pytest.raises(GlobError) as caught:
        compile_glob("{" * 5000 + "a" + "}" * 5000)
    assert caught.value.offset == MAX_DEPTH and "nest more than" in caught.value.message
    assert compile_glob("{" * MAX_DEPTH + "a" + "}" * MAX_DEPTH).fullmatch("a")


def test_5000_nested_braces_in_a_rules_file_are_a_located_bad_glob():
    d = _located(_error('match "' + "{" * 5000 + "a" + "}" * 5000 + '" apply lora(r=8)\n'), "bad-glob")
    assert (d.span.line, d.span.column) == (1, 8 + MAX_DEPTH)


# --- regexes: one bounded function --------------------------------------------------------------


def test_a_catastrophic_regex_times_out_instead_of_running_for_hours():
    with pytest.raises(RegexTimeout) as caught:
        regex_fullmatch(r"(a|aa)+$", "a" * 60 + "!", timeout=0.05)
    assert caught.value.seconds == 0.05 and "took longer than" in str(caught.value)


def test_regex_selectors_match_on_the_bounded_engine():
    from surgeon.grammar import regex as module

    assert isinstance(module._compiled(r"a+"), regex.Pattern)  # not Python's re, which cannot be stopped
    assert RegexSelector(r"model\.layers\.0\..*q_proj").matches(PATH)
    assert not RegexSelector(r"(x+x+)+y").matches("x" * 40)  # 2**40 steps for re; the engine defuses it
    try:  # either answer, never hours: the engine defuses it or stops it
        assert not RegexSelector(r"(x+x+)+y").matches("x" * 5000)
    except RegexTimeout:
        pass
    assert regex_fullmatch(r"(?=(?:.*\.)?(?:q_proj)$).*", PATH)  # lookaheads, as PEFT's rank_pattern rules use


@pytest.mark.parametrize("pattern,message", [("(" * 5000 + "a" + ")" * 5000, "nest more than"), ("(1|3", "missing )")])
def test_invalid_regexes_are_regex_errors_with_an_offset(pattern, message):
    with pytest.raises(RegexError) as caught:
        check_regex(pattern)
    assert message in caught.value.message and caught.value.offset is not None


def test_5000_nested_groups_in_a_regex_selector_are_a_located_bad_regex():
    d = _located(_error('match re"' + "(" * 5000 + "a" + ")" * 5000 + '" apply lora(r=8)\n'), "bad-regex")
    assert d.span.column == 10 + MAX_DEPTH


@pytest.fixture(scope="module")
def llama():
    return surgeon.capture_model("demo:llama")


def test_a_regex_that_times_out_in_planning_is_a_located_error_naming_the_rule(llama):
    text = 'match "*.q_proj" apply lora(r=8)\nmatch re"(?=(.|..)*Z).*" apply lora(r=4)\n'
    with pytest.raises(PlanError) as caught:
        surgeon.plan(llama, text)
    (d,) = [d for d in caught.value.diagnostics if d.code == "regex-timeout"]
    assert d.span.line == 2 and 're"(?=(.|..)*Z).*" took longer than' in d.message and "glob" in d.hint
    assert d.source_line == 'match re"(?=(.|..)*Z).*" apply lora(r=4)'


def test_a_catastrophic_peft_rank_pattern_key_is_a_plan_error_not_a_hang(llama):
    from surgeon.checkpoints.peft import rules_from_peft

    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
              "rank_pattern": {"(.|..)*Z": 16}}
    with pytest.raises(PlanError) as caught:
        surgeon.plan(llama, rules_from_peft(config))
    assert {d.code for d in caught.value.diagnostics} == {"regex-timeout"}


def test_a_regex_selector_that_backtracks_in_re_plans_to_an_honest_no_match(llama):
    with pytest.raises(PlanError) as caught:
        surgeon.plan(llama, 'match re"(a+)+$" apply lora(r=8)\n')
    assert [d.code for d in caught.value.diagnostics] == ["no-match"]


# --- what Python would raise as a traceback ---------------------------------------------------------


@pytest.mark.parametrize("text,code", [
    ('match "*.q_proj" apply lora(r=' + "9" * 5000 + ")\n", "too-long"),  # int-string conversion limit
    ('match "*.q_proj" where ' + "(" * 5000 + "layer == 1" + ")" * 5000 + " apply lora(r=8)\n", "too-deep"),
    ('match "*.q_proj" where ' + "not " * 5000 + "layer == 1 apply lora(r=8)\n", "too-deep"),
    ('match "*.q_proj" where layer in ' + "[" * 5000 + "1" + "]" * 5000 + " apply lora(r=8)\n", "too-deep"),
    ('match "*.q_proj" where layer < 1e999 apply lora(r=8)\n', "out-of-range"),
    ('match "*.q_proj" apply lora(r=8, alpha=1e999)\n', "out-of-range"),
    ('match "' + "a" * 2_000_000 + '" apply lora(r=8)\n', "too-long"),
    ('match "*.q_proj" apply lora(r=8, ' + "x" * (MAX_WORD_CHARS + 1) + "=1)\n", "too-long"),
    ('match "*.q_proj"\x00 apply lora(r=8)\n', "control-character"),
    ('match "*.q\x00_proj" apply lora(r=8)\n', "control-character"),
])
def test_hostile_text_is_a_located_diagnostic(text, code):
    _located(_error(text), code)


def test_the_bounds_leave_real_rules_alone():
    long_regex = "|".join(f"model\\.layers\\.{i}\\.self_attn\\.q_proj" for i in range(800))  # a PEFT regex, 80 layers
    assert len(long_regex) < MAX_LITERAL_CHARS
    rules = parse(f'match re"(?:{long_regex})" where ' + "(" * 50 + "layer >= 0" + ")" * 50 + " apply lora(r=8)\n")
    assert len(rules) == 1
    assert parse(f"match \"*.q_proj\" apply lora(r={'9' * 200})\n").rules[0].action.method.config.r == int("9" * 200)


def test_a_line_too_long_to_show_is_cut_and_its_control_characters_are_not_printed():
    error = _error('match "*.q_proj" apply lora(r=8, ' + ", ".join(f"a{i}=1" for i in range(5000)) + ")\n")
    assert all(len(d.source_line or "") < 1100 for d in error.diagnostics)
    error = _error('match "*.q\x01_proj" apply lora(r=8)\n')
    assert "\x01" not in str(error)


def test_invalid_utf8_is_a_located_encoding_error(tmp_path):
    path = tmp_path / "bad.surgery"
    path.write_bytes(b'match "*.q_proj" apply lora(r=8)\nmatch "\xff" skip\n')
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    (d,) = caught.value.diagnostics
    assert d.code == "encoding" and (d.span.line, d.span.column) == (2, 8)


# --- files: size and kind ---------------------------------------------------------------------


def test_rules_text_past_the_size_limit_is_refused_before_parsing(monkeypatch):
    monkeypatch.setattr(parse_module, "parse_unchecked", lambda *a: pytest.fail("parsed"))
    error = _error("\n" * MAX_TEXT_BYTES + "match")
    d = _located(error, "too-large")
    assert d.span.line == MAX_TEXT_BYTES + 1 and "8 MiB" in d.message


def test_a_file_past_the_size_limit_is_refused_and_not_read_whole(tmp_path, monkeypatch):
    path = tmp_path / "huge.surgery"
    with open(path, "wb") as f:
        f.truncate(4 * MAX_TEXT_BYTES)  # sparse: 32 MiB that read as zeros
    read = []
    real = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: read.append(n) or real(fd, n))
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    assert [d.code for d in caught.value.diagnostics] == ["too-large"]
    assert sum(read) <= MAX_TEXT_BYTES + 1


def _load_in_a_thread(path) -> list:
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_raised(path)), daemon=True)
    thread.start()
    thread.join(30)  # it returns at once; a blocking open would leave the thread waiting for a writer
    assert not thread.is_alive(), "load_rules blocked"
    return outcome


def _raised(path):
    try:
        load_rules(path)
    except RulesError as exc:
        return exc
    return None


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "rules.surgery"
    os.mkfifo(fifo)
    (error,) = _load_in_a_thread(fifo)
    assert "named pipe" in error.diagnostics[0].message and error.diagnostics[0].file == str(fifo)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_is_refused_unread():
    (error,) = _load_in_a_thread("/dev/zero")
    assert "a device, not a regular file" in error.diagnostics[0].message


# --- many rules: linear work ---------------------------------------------------------------------


def test_a_large_file_is_parsed_in_pieces_and_an_error_reparses_one_piece(monkeypatch):
    handed = []
    real = parse_module._parser

    class Counting:
        def parse(self, text):
            handed.append(len(text))
            return real().parse(text)

    monkeypatch.setattr(parse_module, "_parser", lambda: Counting())
    lines = [f'match "model.layers.{i}.*.q_proj" apply lora(r=8)' for i in range(20_000)]
    for i in range(0, 20_000, 500):
        lines[i] = 'match "*.q_proj" apply lora(r r=8)'  # a syntax error every 500 rules
    text = "\n".join(lines) + "\n"
    error = _error(text)
    assert len([d for d in error.diagnostics if d.code == "syntax"]) == 40
    assert sum(handed) <= 2 * len(text) + 40 * 2 * parse_module._PIECE_CHARS  # not 40 times the file


def test_selection_matches_each_distinct_selector_once_and_never_wins_is_not_quadratic(llama, monkeypatch):
    calls = []
    real = GlobMatcher.fullmatch
    monkeypatch.setattr(GlobMatcher, "fullmatch", lambda self, path: calls.append(path) or real(self, path))
    text = "".join('match "*.q_proj" apply lora(r=8)\n' for _ in range(3000))
    plan = surgeon.plan(llama, text)
    assert len(calls) == len(llama.modules)  # one glob, matched once against every module
    never = [w for w in plan.warnings if w.code == "never-wins"]
    assert len(never) == 2999 and all("(line 3000)" in w.message for w in never)


def test_a_no_match_hint_does_not_expand_exponentially_many_brace_alternatives():
    from surgeon.planning.select import _words

    rule = parse('match "' + "{a,b}" * 40 + '" skip\n').rules[0]
    assert len(_words(rule)) <= 128 and "aaaaaaa" in _words(rule)


def test_many_unterminated_strings_are_each_reported():
    error = _error('match "*.q_proj apply lora(r=8)\n' * 5000)
    assert len([d for d in error.diagnostics if d.code == "unterminated-string"]) == 5000
    assert error.diagnostics[-1].span.line == 5000


def test_a_diagnostic_under_a_very_long_line_shows_a_window_with_the_caret_under_the_error():
    from surgeon.diagnostics import Diagnostic, Span

    line = "x" * 5000 + "BAD" + "y" * 5000
    d = Diagnostic("code", "message", Span(1, 5001, 1, 5004, 5000, 5003), source_line=line)
    _, shown, caret = d.render().split("\n")
    assert len(shown) <= 1002 and shown.strip()[caret.index("^") - 2 :].startswith("BAD")
    assert caret.strip() == "^^^"


def test_slow_regexes_that_each_stay_within_their_bound_cannot_add_up_past_the_plans_budget(monkeypatch):
    import surgeon
    import surgeon.planning.select_regex

    from surgeon.diagnostics import PlanError

    # each backtracks over every split of the path but ends before its own bound; a thousand of them would take minutes
    text = "".join(f'match re"(?=.{{10}}(.|..)*Z).*|nope{i}" apply lora(r=2)\n' for i in range(1000))
    # A budget of several rules' matching (one takes about 0.2 s on an idle core, several times that on a loaded
    # one), so that it is the sum that runs out, however busy the machine.
    monkeypatch.setattr(surgeon.planning.select_regex, "REGEX_BUDGET", 3.0)
    # and a bound per regex well above one rule's matching, so that a slow machine does not trip it first
    monkeypatch.setattr(surgeon.planning.select_regex, "REGEX_TIMEOUT", 2.5)
    with pytest.raises(PlanError) as caught:
        surgeon.plan("demo:llama", surgeon.parse(text, path="slow.surgery"))
    (d,) = caught.value.diagnostics
    assert d.code == "regex-budget" and d.file == "slow.surgery" and d.span.line > 1
