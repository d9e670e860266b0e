"""The method registry: signatures read from config dataclasses, one place per method."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from surgeon.grammar import SurgeryError, parse
from surgeon.grammar.rules import Argument, MethodCall
from surgeon.grammar.signature import param, signature_of
from surgeon.grammar.vocabulary import MODULE_TYPES
from surgeon.methods import (
    LoraConfig,
    adapter_class,
    get_method,
    low_rank_call,
    low_rank_method,
    method_for,
    method_names,
    peft_format_of,
    peft_reader,
    register_method,
    registered_methods,
)
from surgeon.methods.adapter import SiteAdapter
from surgeon.methods.peft_format import PeftFormat
from ._checks import check_diagnostic_codes

ROOT = Path(__file__).resolve().parents[3]


def test_lora_signature_matches_its_config():
    sig = get_method("lora")
    assert sig.param_names == ("r", "alpha", "dropout", "rslora", "init", "bias", "loftq_iter")
    assert sig.sites == ("linear", "hf_conv1d", "embedding", "conv1d", "conv2d", "conv3d")
    r = sig.get("r")
    assert (r.kind, r.required, r.gt) == ("int", True, 0)
    assert sig.get("alpha").optional and sig.get("alpha").kind == "float"
    assert sig.get("init").choices == ("kaiming", "gaussian", "zeros", "pissa", "olora", "loftq")
    assert sig.get("init").pattern == (r"pissa_niter_[1-9][0-9]*", "pissa_niter_<K>")
    assert sig.config_class is LoraConfig


def test_a_new_method_registers_in_one_place_and_the_language_checks_it():
    @dataclasses.dataclass(frozen=True)
    class Scale:
        """A test-only method."""

        factors: list[float] = param([1.0], doc="per-group factors")
        mode: str = param("out", choices=("in", "out"))

    signatures = {"lora": get_method("lora"), "scale": signature_of("scale", Scale, ("linear",))}
    rules = parse('match "x" apply scale(factors=[1, 2.5], mode="in")', methods=signatures)
    assert rules.rules[0].action.method.config == Scale(factors=(1.0, 2.5), mode="in")
    with pytest.raises(SurgeryError, match="must be a list of numbers"):
        parse('match "x" apply scale(factors=["a"])', methods=signatures)
    # The default registry does not know it.
    assert "scale" not in method_names()


def test_registering_twice_or_an_unknown_site_kind_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_method("lora", sites=("linear",))(LoraConfig)
    with pytest.raises(ValueError, match="unknown site kinds"):
        register_method("other", sites=("teleporter",))


def test_fields_without_param_are_refused():
    @dataclasses.dataclass(frozen=True)
    class Bad:
        r: int = 3

    with pytest.raises(TypeError, match="param()"):
        signature_of("bad", Bad)


def test_every_known_module_type_exists_in_its_library():
    import torch.nn
    import transformers.pytorch_utils

    for name in MODULE_TYPES["torch.nn"]:
        assert isinstance(getattr(torch.nn, name), type), name
    for name in MODULE_TYPES["transformers.pytorch_utils"]:
        assert isinstance(getattr(transformers.pytorch_utils, name), type), name


def test_every_method_argument_is_checked_by_the_language():
    check_diagnostic_codes(
        (
            ('match "x" apply dora(r=0)', "out-of-range"),
            ('match "x" apply dora(r=4, bias=true)', "unknown-argument"),
            ('match "x" apply ia3(feedforward=1)', "bad-type"),
            ('match "x" apply ia3(r=4)', "unknown-argument"),
            ('match "x" apply loha(alpha=2)', "missing-argument"),
            ('match "x" apply lokr(r=4, factor=0)', "out-of-range"),
        )
    )


def test_one_record_per_method_keyed_by_its_config_class():
    record = method_for("lora")
    assert method_for(LoraConfig) is record is method_for(LoraConfig(r=2))
    assert record.signature is get_method("lora") and record.sites == get_method("lora").sites
    assert [m.name for m in registered_methods()] == method_names()


def test_every_method_folder_declares_its_torch_side_and_its_peft_format():
    for method in registered_methods():
        cls, form = method.adapter_class(), method.peft_format()
        assert issubclass(cls, SiteAdapter) and cls is adapter_class(method.name), method.name
        assert cls.method == method.name == form.method, method.name
        assert issubclass(form, PeftFormat) and form is peft_format_of(method.name) and cls.peft_type == form.peft_type
        assert cls.__module__.startswith(f"surgeon.methods.{method.name}."), "a method's torch side lives in its folder"
        assert all(p.method == method.name for p in method.lowering_patterns())


def test_one_method_holds_a_plain_low_rank_product():
    assert low_rank_method() == "lora"
    assert low_rank_call(6) == MethodCall("lora", (Argument("r", 6), Argument("alpha", 6)))


def test_a_peft_type_two_methods_share_is_read_by_the_one_holding_the_config():
    reader = peft_reader("LORA")
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    assert {r.action.method.name for r in reader.rules_from_peft(config)} == {"lora"}
    assert {r.action.method.name for r in reader.rules_from_peft(dict(config, use_dora=True))} == {"dora"}


def test_no_module_outside_a_method_folder_names_a_method():
    """The shared modules of the methods, planning and the passes read declarations; only a method's folder
    names it (string constants other than docstrings)."""
    root = ROOT
    words = re.compile(r"\b(" + "|".join(method_names()) + r")(_\w+)?\b", re.I)
    files = [*(root / "passes").rglob("*.py"), *(root / "surgeon" / "planning").rglob("*.py"),
             *(root / "surgeon" / "methods").glob("*.py"), root / "surgeon" / "checkpoints" / "peft_fields.py"]
    found = []
    for path in files:
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        found += [f"{path.relative_to(root)}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  and words.search(node.value)]
    assert not found, "\n".join(found)


def test_a_method_names_its_parts_relative_to_its_folder():
    """An absolute "module:name" could point up a floor where tests/test_floors.py cannot see it."""
    with pytest.raises(ValueError, match="relative to the method's folder"):
        register_method("upward", sites=("linear",), adapter="surgeon.compiled.model:Compiled")
