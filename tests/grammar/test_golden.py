"""Golden files: good examples parse and print back; bad ones give exactly the expected diagnostics.

Set SURGEON_UPDATE_GOLDEN=1 to rewrite the .expected files (then read the diff).
"""

import json
import os
from pathlib import Path

import pytest

from surgeon.grammar import SurgeryError, load_rules, parse

GOLDEN = Path(__file__).parent / "golden"
GOOD = sorted((GOLDEN / "good").glob("*.surgery"))
BAD = sorted((GOLDEN / "bad").glob("*.surgery"))
UPDATE = os.environ.get("SURGEON_UPDATE_GOLDEN") == "1"


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.stem)
def test_good_file_parses_and_prints_back_to_an_equal_rule_set(path):
    rule_set = load_rules(path)
    printed = rule_set.to_text()
    again = parse(printed)
    assert again == rule_set
    assert again.to_text() == printed  # printing is a fixed point


def _check_bad(path: Path, monkeypatch) -> SurgeryError:
    monkeypatch.chdir(path.parent)  # diagnostics name the file as given: NAME.surgery
    with pytest.raises(SurgeryError) as caught:
        load_rules(path.name)
    return caught.value


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_file_gives_exactly_the_expected_diagnostics(path, monkeypatch):
    error = _check_bad(path, monkeypatch)
    expected = path.with_suffix(".expected")
    if UPDATE:
        expected.write_text(str(error) + "\n", encoding="utf-8")
    assert str(error) + "\n" == expected.read_text(encoding="utf-8")


# Every diagnostic a user can cause, and the golden file that shows it.
DIAGNOSTIC_CODES = {
    "syntax": "syntax-missing-action",
    "unknown-method": "unknown-method",
    "unknown-argument": "unknown-argument",
    "duplicate-argument": "duplicate-argument",
    "missing-argument": "missing-argument",
    "positional-argument": "positional-argument",
    "bad-type": "bad-type",
    "out-of-range": "out-of-range",
    "bad-choice": "bad-choice",
    "bad-regex": "bad-regex",
    "bad-glob": "bad-glob",
    "unknown-field": "unknown-field",
    "unknown-type": "unknown-type",
    "empty-range": "empty-range",
    "empty-adapter": "empty-adapter",
    "duplicate-adapter": "duplicate-adapter",
    "bad-adapter-name": "bad-adapter-name",
    "unterminated-string": "unterminated-string",
    "unclosed-bracket": "unclosed-bracket",
    "encoding": "encoding",
    "unknown-combination": "unknown-combination",
}


@pytest.mark.parametrize("code,stem", sorted(DIAGNOSTIC_CODES.items()))
def test_every_diagnostic_code_has_a_golden_file(code, stem, monkeypatch):
    error = _check_bad(GOLDEN / "bad" / f"{stem}.surgery", monkeypatch)
    assert code in {d.code for d in error.diagnostics}


def test_every_error_has_a_location_and_no_lark_terminal_names(monkeypatch):
    for path in BAD:
        error = _check_bad(path, monkeypatch)
        for d in error.diagnostics:
            assert d.span is not None, (path.name, d)
            record = d.to_json()
            assert set(record) == {"file", "line", "column", "end_column", "severity", "code", "message", "hint"}
            assert record["end_column"] > record["column"]
            json.dumps(record)
            assert "__ANON" not in d.render() and "$END" not in d.render() and "_NL" not in d.render()


def test_many_errors_are_all_reported_not_just_the_first(monkeypatch):
    error = _check_bad(GOLDEN / "bad" / "many-errors.surgery", monkeypatch)
    lines = sorted({d.span.line for d in error.diagnostics})
    assert lines == [1, 2, 3, 6, 7, 9]
