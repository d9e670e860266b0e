"""What every method's tests check the same way: compiled once per case, PEFT files both ways, fold, unfold."""

import torch
from peft import PeftModel

import surgeon
from surgeon.capture.demos import build_demo

from .._peft_reference import inputs


def randomize_all(compiled, seed: int = 0, std: float = 0.2) -> None:
    """Every adapter parameter drawn afresh (so that each one changes the outputs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, module in compiled.sites():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * std)


class CompiledCases:
    """Each case compiled once per test module (captures cost seconds)."""

    def __init__(self, cases: dict):
        self.cases, self.made = cases, {}

    def __call__(self, case: str):
        if case not in self.made:
            demo, rules, _ = self.cases[case]
            self.made[case] = surgeon.compile(f"demo:{demo}", rules).eval()
        return self.made[case]


def check_files_both_ways_fold_and_unfold(compiled, demo: str, method: str, tmp_path) -> None:
    """PEFT loads what surgeon saves and surgeon loads what PEFT saves, with the same logits;
    the fold verifies and matches; an in-place fold is undone bit for bit."""
    expected = compiled(**inputs()).logits.detach()
    compiled.save_adapter(tmp_path / "ours")
    theirs = PeftModel.from_pretrained(build_demo(demo), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs()).logits, expected, rtol=1e-5, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    again = surgeon.compile(f"demo:{demo}", adapter=tmp_path / "theirs").eval()
    assert {s.method for s in again.plan.sites} == {method}
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs()).logits, expected, rtol=1e-5, atol=1e-5)
    folded = compiled.fold()
    with torch.no_grad():
        torch.testing.assert_close(folded(**inputs(), use_cache=False).logits, expected, rtol=1e-4, atol=1e-5)
    before = {k: v.clone() for k, v in compiled.base_model.state_dict().items()}
    compiled.fold(inplace=True)
    compiled.unfold()
    assert all(torch.equal(v, before[k]) for k, v in compiled.base_model.state_dict().items())


def peft_parameter(layer, suffix: str):
    """PEFT's parameter for one of our ``peft_state()`` keys ("lora_A.weight", "ia3_l", "lora_magnitude_vector", ...)."""
    name, _, rest = suffix.partition(".")
    value = getattr(layer, name)["default"]
    for part in filter(None, rest.split(".")):
        value = getattr(value, part)
    return value.weight if isinstance(value, torch.nn.Module) else value


def copy_into_peft(compiled, peft_model):
    """The compiled model's adapter weights, copied into the same sites of a PEFT model."""
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for _, path, module in compiled.sites():
            layer = modules[f"base_model.model.{path}"]
            for suffix, tensor in module.peft_state().items():
                peft_parameter(layer, suffix).copy_(tensor)
    return peft_model


def check_starts_at_the_base(compiled, demo: str) -> None:
    labels = demo != "bert"
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(**inputs(labels=labels)).logits, build_demo(demo).eval()(**inputs(labels=labels)).logits, rtol=1e-5, atol=1e-5
        )


def check_logits_and_gradients(compiled, reference, demo: str) -> None:
    """Same logits (1e-5) and, for a loss on them, the same gradient of every adapter parameter."""
    labels = demo != "bert"
    ours, theirs = compiled(**inputs(labels=labels)), reference(**inputs(labels=labels))
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    ours.logits.square().mean().backward()
    theirs.logits.square().mean().backward()
    modules = dict(reference.named_modules())
    for _, path, module in compiled.sites():
        layer = modules[f"base_model.model.{path}"]
        for suffix, tensor in module.peft_state().items():
            torch.testing.assert_close(tensor.grad, peft_parameter(layer, suffix).grad, rtol=1e-5, atol=1e-6)
    compiled.zero_grad()


def check_training_draws_match(compiled, reference, demo: str, seed: int = 0) -> None:
    """In training, random draws (rank/module dropout) equal PEFT's for the same seed, and they change the output."""
    labels = demo != "bert"
    compiled.eval()
    with torch.no_grad():
        plain = compiled(**inputs(labels=labels)).logits
    compiled.train()
    reference.train()
    try:
        with torch.no_grad():
            torch.manual_seed(seed)
            ours = compiled(**inputs(labels=labels)).logits
            torch.manual_seed(seed)
            theirs = reference(**inputs(labels=labels)).logits
    finally:
        compiled.eval()
        reference.eval()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-4)


def check_diagnostic_codes(cases) -> None:
    """Each (surgery text, code): parsing it fails with exactly that one diagnostic."""
    import pytest

    from surgeon.grammar import SurgeryError, parse

    for text, code in cases:
        with pytest.raises(SurgeryError) as caught:
            parse(text)
        assert [d.code for d in caught.value.diagnostics] == [code], text
