"""Property tests: no input breaks the parser, and printing round-trips."""

import string
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from surgeon.grammar import (
    Adapter,
    And,
    Apply,
    Argument,
    Comparison,
    GlobSelector,
    InList,
    InRange,
    MethodCall,
    NameTest,
    Not,
    Or,
    RegexSelector,
    Rule,
    RuleSet,
    Skip,
    SurgeryError,
    Train,
    TypeSelector,
    RoleSelector,
    TypeTest,
    parse,
)
from surgeon.grammar.vocabulary import MODULE_TYPES, PREDICATE_FIELDS, ROLES

GOOD_TEXTS = [p.read_text() for p in sorted((Path(__file__).parent / "golden" / "good").glob("*.surgery"))]
SURGERY_ALPHABET = string.ascii_letters[:12] + string.digits[:4] + ' \t\n"#(){}[],.=<>!*?\\-_re'


def parses_or_reports(text: str):
    """The only acceptable outcomes: a rule set that round-trips, or a SurgeryError."""
    try:
        rules = parse(text)
    except SurgeryError as error:
        assert error.diagnostics and all(d.message for d in error.diagnostics)
        str(error)
        return None
    assert parse(rules.to_text()) == rules
    return rules


@given(st.text(alphabet=SURGERY_ALPHABET, max_size=120))
def test_random_surgery_like_text_never_raises_anything_but_surgery_error(text):
    parses_or_reports(text)


@given(st.text(max_size=60))
def test_random_unicode_never_raises_anything_but_surgery_error(text):
    parses_or_reports(text)


@st.composite
def mutated_good_file(draw):
    text = draw(st.sampled_from(GOOD_TEXTS))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        char = draw(st.sampled_from(SURGERY_ALPHABET))
        if kind == "insert":
            text = text[:pos] + char + text[pos:]
        elif kind == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 8)) :]
        else:
            text = text[:pos] + char + text[pos + 1 :]
    return text


@given(mutated_good_file())
def test_mutations_of_valid_files_never_raise_anything_but_surgery_error(text):
    parses_or_reports(text)


def test_deep_nesting_is_a_surgery_error_not_a_crash():
    for text in ('match "x" where ' + "not " * 5000 + "layer == 1 skip", 'match "x" where ' + "(" * 3000 + "layer == 1" + ")" * 3000 + " skip"):
        parses_or_reports(text)


# --- generated rule sets ------------------------------------------------------------

KEYWORDS = {"match", "where", "apply", "skip", "train", "adapter", "type", "name", "and", "or", "not", "in", "true", "false", "re"}
words = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=6)
numbers = st.one_of(
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e30, max_value=1e30),
)


@st.composite
def globs(draw, depth=0):
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["word", "word", "star", "any", "class", "alt", "escape", "dot"] if depth < 2 else ["word", "star"]))
        if kind == "word":
            parts.append(draw(words))
        elif kind == "star":
            parts.append("*")
        elif kind == "any":
            parts.append("?")
        elif kind == "class":
            parts.append(draw(st.sampled_from(["[0-9]", "[!0-3]", "[ab]", "[]x]"])))
        elif kind == "alt":
            parts.append("{" + ",".join(draw(st.lists(globs(depth + 1), min_size=1, max_size=3))) + "}")
        elif kind == "escape":
            parts.append("\\" + draw(st.sampled_from("*?{}[],\\")))
        else:
            parts.append(".")
    return "".join(parts)


regexes = st.lists(
    st.sampled_from([r"model\.", r"layers\.[0-9]+", r"(q|v)_proj", r".*", r"\.mlp", "(a|b)", r"\d{1,2}", "x?"]), min_size=1, max_size=4
).map("".join)
type_names = st.one_of(
    st.sampled_from([n for names in MODULE_TYPES.values() for n in names]).map(lambda n: (n, False)),
    st.text(alphabet=string.ascii_letters + " .\"\\", min_size=1, max_size=10).map(lambda n: (n, True)),
)
selectors = st.one_of(
    globs().map(GlobSelector),
    regexes.map(RegexSelector),
    type_names.map(lambda t: TypeSelector(t[0], quoted=t[1])),
    st.lists(st.sampled_from(sorted(ROLES) + ["attn.*", "*.q", "mlp.*"]), min_size=1, max_size=3).map(lambda r: RoleSelector(tuple(r))),
)
fields = st.sampled_from(sorted(PREDICATE_FIELDS))
leaf_predicates = st.one_of(
    st.builds(Comparison, fields, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), numbers),
    st.tuples(fields, st.integers(-5, 50), st.integers(1, 20)).map(lambda t: InRange(t[0], t[1], t[1] + t[2])),
    st.builds(InList, fields, st.lists(numbers, max_size=4).map(tuple)),
    globs().map(NameTest),
    type_names.map(lambda t: TypeTest(t[0], quoted=t[1])),
)
predicates = st.recursive(
    leaf_predicates,
    lambda inner: st.one_of(
        inner.map(Not),
        st.lists(inner, min_size=2, max_size=3).map(lambda ps: And(tuple(ps))),
        st.lists(inner, min_size=2, max_size=3).map(lambda ps: Or(tuple(ps))),
    ),
    max_leaves=6,
)
lora_arguments = st.fixed_dictionaries(
    {"r": st.integers(1, 512)},
    optional={
        "alpha": st.one_of(st.integers(1, 64), st.floats(1e-6, 1e6)),
        "dropout": st.floats(0, 0.99),
        "rslora": st.booleans(),
        "init": st.sampled_from(["kaiming", "gaussian", "zeros"]),
        "bias": st.booleans(),
    },
).map(lambda kw: MethodCall("lora", tuple(Argument(k, v) for k, v in kw.items())))
actions = st.one_of(st.just(Skip()), st.just(Train()), lora_arguments.map(Apply))
rules = st.builds(Rule, st.lists(selectors, min_size=1, max_size=3).map(tuple), actions, st.one_of(st.none(), predicates))
adapter_names = st.one_of(st.just("default"), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,8}", fullmatch=True))


@st.composite
def rule_sets(draw):
    names = draw(st.lists(adapter_names, max_size=3, unique=True))
    return RuleSet(tuple(Adapter(n, tuple(draw(st.lists(rules, min_size=1, max_size=4)))) for n in names))


@given(rule_sets())
def test_printing_and_reparsing_a_generated_rule_set_is_the_identity(rule_set):
    text = rule_set.to_text()
    parsed = parse(text)
    assert parsed == rule_set
    assert parsed.to_text() == text
