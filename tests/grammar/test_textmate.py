"""The TextMate grammar (editor highlighting) is valid and covers the language."""

import json
import re
from pathlib import Path

import surgeon.grammar
from surgeon.grammar.parse import KEYWORDS, _parser

TM = Path(surgeon.grammar.__file__).parent / "surgery.tmLanguage.json"


def _patterns(node):
    if isinstance(node, dict):
        for key in ("match", "begin"):
            if key in node:
                yield node.get("name") or next(iter(node.get("captures", {}).values()), {}).get("name"), node[key]
        for value in node.values():
            yield from _patterns(value)
    elif isinstance(node, list):
        for value in node:
            yield from _patterns(value)


def test_textmate_grammar_is_valid_json_with_a_scope():
    grammar = json.loads(TM.read_text())
    assert grammar["scopeName"] == "source.surgery"
    assert "surgery" in grammar["fileTypes"]
    for _, pattern in _patterns(grammar):
        re.compile(pattern)  # the patterns used are plain enough for Python's re too


def test_every_keyword_of_the_lark_grammar_is_highlighted():
    grammar = json.loads(TM.read_text())
    lark_keywords = {t.pattern.value for t in _parser().terminals if t.pattern.type == "str" and t.pattern.value.isalpha()}
    assert lark_keywords == set(KEYWORDS)
    patterns = list(_patterns(grammar))
    for keyword in lark_keywords:
        text = f"{keyword}(" if keyword in ("type", "role", "name") else keyword
        assert any(
            scope and re.search(p, text) and re.search(p, text).group(0).startswith(keyword) for scope, p in patterns
        ), keyword


def test_strings_regexes_comments_and_numbers_have_scopes():
    grammar = json.loads(TM.read_text())
    scopes = {scope for scope, _ in _patterns(grammar)}
    for scope in ("comment.line.number-sign.surgery", "string.regexp.surgery", "string.quoted.double.surgery", "constant.numeric.surgery"):
        assert scope in scopes
