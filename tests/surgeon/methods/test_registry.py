"""The method registry: signatures read from config dataclasses, one place per method."""

import dataclasses

import pytest

from surgeon.grammar import SurgeryError, parse
from surgeon.grammar.signature import param, signature_of
from surgeon.grammar.vocabulary import MODULE_TYPES
from surgeon.methods import LoraConfig, get_method, method_names, register_method
from ._checks import check_diagnostic_codes


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
