"""The language's semantics: what each construct parses to."""

import pytest

from surgeon.grammar import (
    DEFAULT_ADAPTER,
    And,
    Apply,
    Comparison,
    GlobSelector,
    InList,
    InRange,
    NameTest,
    Not,
    Or,
    RegexSelector,
    Skip,
    SurgeryError,
    Train,
    TypeSelector,
    TypeTest,
    load_rules,
    parse,
)
from surgeon.methods import LoraConfig

EXAMPLE = """\
# examples/rules/llama-lora.surgery
match "*.self_attn.{q,v}_proj"                  apply lora(r=8, alpha=16, dropout=0.05)
match "*.mlp.*_proj" where layer in 0..4        apply lora(r=4, alpha=8)
match re"model\\.layers\\.(1|3)\\.mlp\\.down_proj"  apply lora(r=16, alpha=16, rslora=true)
match "*.layers.0.*"                            skip
match "lm_head"                                 train

adapter "math" {
  match type(Linear) where out_features >= 1024 and not name("*lm_head") apply lora(r=2)
}
"""


def test_the_issue_example_parses_to_the_rules_it_says():
    rules = parse(EXAMPLE, "llama-lora.surgery")
    assert rules.adapter_names == ("default", "math")
    default = rules.adapter("default").rules
    assert [type(r.action) for r in default] == [Apply, Apply, Apply, Skip, Train]
    first = default[0]
    assert first.selectors == (GlobSelector("*.self_attn.{q,v}_proj"),)
    assert first.action.method.config == LoraConfig(r=8, alpha=16.0, dropout=0.05)
    assert default[1].where == InRange("layer", 0, 4)
    assert default[2].selectors == (RegexSelector(r"model\.layers\.(1|3)\.mlp\.down_proj"),)
    assert default[2].action.method.config.rslora is True
    (math,) = rules.adapter("math").rules
    assert math.selectors == (TypeSelector("Linear"),)
    assert math.where == And((Comparison("out_features", ">=", 1024), Not(NameTest("*lm_head"))))
    assert math.action.method.kwargs == {"r": 2}


def test_rules_carry_their_source_spans():
    rules = parse(EXAMPLE)
    default = rules.adapter("default").rules
    assert [r.span.line for r in default] == [2, 3, 4, 5, 6]
    assert default[0].span.column == 1
    assert default[0].action.method.span.column == 55  # the 'lora' of line 2
    assert rules.adapter("math").span.line == 8
    assert EXAMPLE[default[4].span.start : default[4].span.end] == 'match "lm_head"                                 train'


def test_lora_defaults_and_scale():
    config = parse('match "x" apply lora(r=8)').rules[0].action.method.config
    assert (config.alpha, config.dropout, config.rslora, config.init, config.bias) == (None, 0.0, False, "kaiming", False)
    assert config.scale == 1.0  # alpha defaults to r
    assert parse('match "x" apply lora(r=8, alpha=16)').rules[0].action.method.config.scale == 2.0
    assert parse('match "x" apply lora(r=16, alpha=16, rslora=true)').rules[0].action.method.config.scale == 4.0


def test_a_statement_continues_while_a_bracket_is_open():
    rules = parse('match "x" apply lora(\n    r=8,   # rank\n    alpha=16,\n)\nmatch "y" where layer in [\n 1,\n 2] skip\n')
    assert len(rules) == 2
    assert rules.rules[0].action.method.kwargs == {"r": 8, "alpha": 16}
    assert rules.rules[1].where == InList("layer", (1, 2))


def test_a_newline_outside_brackets_ends_the_statement():
    with pytest.raises(SurgeryError) as caught:
        parse('match "x"\n  apply lora(r=8)\n')
    assert caught.value.diagnostics[0].span.line == 1


def test_empty_and_comment_only_texts_are_empty_rule_sets():
    for text in ("", "\n\n", "# nothing\n   # at all", "  \t\n"):
        rules = parse(text)
        assert rules.adapters == () and len(rules) == 0


def test_an_empty_file_is_an_empty_rule_set(tmp_path):
    path = tmp_path / "empty.surgery"
    path.write_bytes(b"")
    assert len(load_rules(path)) == 0


def test_a_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "bom.surgery"
    path.write_bytes(b'\xef\xbb\xbfmatch "x" skip\n')
    assert load_rules(path).rules[0].selectors == (GlobSelector("x"),)


def test_missing_rules_file_is_a_surgery_error(tmp_path):
    with pytest.raises(SurgeryError, match="no such rules file"):
        load_rules(tmp_path / "nope.surgery")
    with pytest.raises(SurgeryError, match="is a folder"):
        load_rules(tmp_path)


def test_adapters_keep_declaration_order_and_default_collects_top_level_rules():
    text = 'adapter "b" { match "x" skip }\nmatch "y" skip\nadapter "a" {\n match "z" skip\n}\nmatch "w" train\n'
    rules = parse(text)
    assert rules.adapter_names == ("b", DEFAULT_ADAPTER, "a")
    assert [r.selectors[0].pattern for r in rules.adapter("default").rules] == ["y", "w"]


def test_several_selectors_and_type_forms():
    rule = parse('match "a", re"b.*", type(Conv1D), type("LlamaRMSNorm") skip').rules[0]
    assert rule.selectors == (
        GlobSelector("a"),
        RegexSelector("b.*"),
        TypeSelector("Conv1D"),
        TypeSelector("LlamaRMSNorm", quoted=True),
    )


def test_predicate_precedence_not_and_or():
    rule = parse('match "x" where layer == 1 or depth > 2 and not params < 5 skip').rules[0]
    assert rule.where == Or(
        (Comparison("layer", "==", 1), And((Comparison("depth", ">", 2), Not(Comparison("params", "<", 5)))))
    )
    grouped = parse('match "x" where (layer == 1 or depth > 2) and type(Linear) skip').rules[0]
    assert grouped.where == And((Or((Comparison("layer", "==", 1), Comparison("depth", ">", 2))), TypeTest("Linear")))


def test_values():
    call = parse(
        'match "x" apply lora(r=8, alpha=1e-4, dropout=0.5, init="gaussian", rslora=false, bias=true)'
    ).rules[0].action.method
    assert call.kwargs == {"r": 8, "alpha": 1e-4, "dropout": 0.5, "init": "gaussian", "rslora": False, "bias": True}
    assert parse('match "x" where layer > -1 and params >= 2.5e6 skip').rules[0].where == And(
        (Comparison("layer", ">", -1), Comparison("params", ">=", 2.5e6))
    )


def test_string_escapes_and_verbatim_regexes():
    rule = parse(r'match "a\"b\\c\{d", re"x\.y\"z" skip').rules[0]
    assert rule.selectors[0].pattern == 'a"b\\c\\{d'
    assert rule.selectors[1].pattern == r"x\.y\"z"


def test_keywords_are_names_where_no_keyword_can_stand():
    # lark's contextual lexer: after 'apply' only a method name can follow.
    with pytest.raises(SurgeryError, match="unknown method 'skip'"):
        parse('match "x" apply skip(r=1)')
    with pytest.raises(SurgeryError, match="unexpected keyword 'skip'; expected"):
        parse('match skip')


@pytest.mark.parametrize(
    "pattern,path,expected",
    [
        ("*.self_attn.{q,v}_proj", "model.layers.0.self_attn.q_proj", True),
        ("*.self_attn.{q,v}_proj", "model.layers.0.self_attn.v_proj", True),
        ("*.self_attn.{q,v}_proj", "model.layers.0.self_attn.k_proj", False),
        ("*.q_proj", "q_proj", False),  # '*.' needs a dot before
        ("*q_proj", "q_proj", True),
        ("lm_head", "lm_head", True),
        ("lm_head", "model.lm_head", False),  # the whole path must match
        ("model.layers.?.mlp", "model.layers.3.mlp", True),
        ("model.layers.?.mlp", "model.layers.13.mlp", False),
        ("*.layers.[0-3].*", "model.layers.2.mlp", True),
        ("*.layers.[!0-3].*", "model.layers.2.mlp", False),
        ("*.layers.[!0-3].*", "model.layers.7.mlp", True),
        ("*.{self_attn.{q,k},mlp.up}_proj", "m.self_attn.k_proj", True),
        ("*.{self_attn.{q,k},mlp.up}_proj", "m.mlp.up_proj", True),
        ("*.{self_attn.{q,k},mlp.up}_proj", "m.mlp.down_proj", False),
        ("a\\*b", "a*b", True),
        ("a\\*b", "axb", False),
        ("a.b", "aXb", False),  # '.' is literal
    ],
)
def test_glob_semantics(pattern, path, expected):
    assert GlobSelector(pattern).matches(path) is expected


def test_regex_must_match_the_whole_path():
    assert RegexSelector(r"model\.layers\.(1|3)\.mlp\.down_proj").matches("model.layers.3.mlp.down_proj")
    assert not RegexSelector(r"layers\.3").matches("model.layers.3.mlp")


def _hints(text: str) -> list:
    with pytest.raises(SurgeryError) as caught:
        parse(text)
    return [(d.code, d.hint) for d in caught.value.diagnostics]


LORA_TAKES = "lora takes: r, alpha, dropout, rslora, init, bias, loftq_iter"


@pytest.mark.parametrize("given,meant", [("rank=8", "r"), ("r=8, lora_alpha=16", "alpha"), ("r=8, lora_dropout=0.1", "dropout"),
                                         ("r=8, use_rslora=true", "rslora"), ("r=8, init_lora_weights=true", "init")])
def test_pefts_argument_names_suggest_the_languages(given, meant):
    # rank=8 alone: the missing r is not reported as well, the hint already names it
    assert _hints(f'match "x" apply lora({given})') == [("unknown-argument", f"did you mean '{meant}'? ({LORA_TAKES})")]


def test_pefts_use_dora_and_target_modules_say_where_they_live_here():
    assert _hints('match "x" apply lora(r=8, use_dora=true)') == [
        ("unknown-argument", "dora is a method of its own: apply dora(...) (dora takes: r, alpha, dropout, rslora)")]
    assert _hints('match "x" apply lora(r=8, target_modules=["q_proj"])') == [
        ("unknown-argument", 'the modules are the rule\'s selector: match "*.q_proj", "*.v_proj" apply ...')]


def test_a_misspelt_choice_suggests_the_closest():
    (only,) = _hints('match "x" apply lora(r=8, init="pisa")')
    assert only[0] == "bad-choice" and only[1].startswith('did you mean "pissa"? (init: one of "kaiming", ')
    assert _hints('match "x" apply lora(r=8, init="Gaussian")')[0][1].startswith('did you mean "gaussian"?')
    assert _hints('match "x" apply lora(r=8, init="svd")')[0][1].startswith("init: one of")  # nothing close: the listing
