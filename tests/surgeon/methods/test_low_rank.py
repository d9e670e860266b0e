"""The low-rank contract of a site's adapter: what merging and hot swaps read instead of naming LoRA."""

import pytest
import torch

from surgeon.diagnostics import SurgeryError
from surgeon.methods import DoraConfig, Ia3Config, LoraConfig, adapter_class


def _site(method: str, config, kind: str = "linear", weight=None):
    weight = torch.randn(6, 4) if weight is None else weight
    module = adapter_class(method)(config, kind, weight.shape[1], weight.shape[0], weight=weight)
    module.site_path = "model.q"
    return module


def test_plain_lora_on_a_linear_is_one_product_s_b_a():
    module = _site("lora", LoraConfig(r=2, alpha=4))
    a, b, s = module.low_rank_factors()
    assert a is module.lora_A and b is module.lora_B and s == 2.0 and module.low_rank_refusal() is None
    torch.testing.assert_close(module.fold(torch.zeros(6, 4), None, "linear")[0], s * b @ a)
    new_a, new_b = torch.randn(2, 4), torch.randn(6, 2)
    module.load_low_rank_factors(new_a, new_b)
    assert torch.equal(module.lora_A, new_a) and torch.equal(module.lora_B, new_b)


@pytest.mark.parametrize("method, config, kind, refusal", [
    ("lora", LoraConfig(r=2, bias=True), "linear", "lora on model.q (linear, with a bias on B)"),
    ("lora", LoraConfig(r=2, init="pissa"), "linear", 'lora on model.q (linear, started from the base weight (init="pissa"))'),
    ("lora", LoraConfig(r=2), "embedding", "lora on model.q (embedding)"),
    ("dora", DoraConfig(r=2), "linear", "dora on model.q (linear)"),
    ("ia3", Ia3Config(), "linear", "ia3 on model.q (linear)"),
])
def test_other_sites_say_why_they_hold_no_plain_product(method, config, kind, refusal):
    module = _site(method, config, kind)
    assert module.low_rank_factors() is None and module.low_rank_refusal() == refusal
    with pytest.raises(SurgeryError, match="cannot load low-rank factors"):
        module.load_low_rank_factors(torch.zeros(2, 4), torch.zeros(6, 2))
