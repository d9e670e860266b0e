"""bitsandbytes' AVX512-BF16 CPU layout of a Linear4bit (kernels/quantized.py, surgeon/compiled/eager.py).

On such a CPU, ``Linear4bit.forward`` in evaluation mode with an input that does not require grad rewrites
the layer's packed weight and QuantState in place (scales rounded to bfloat16) and multiplies in bfloat16.
Each model here turns bitsandbytes' switch for that path on, as its ``__init__`` does on such a CPU, so the
tests exercise it on every CPU; the reference is the direct math on the weights bitsandbytes dequantizes
before anything ran.
"""

import pytest
import torch

import surgeon
from surgeon.diagnostics import ModelError

from ._peft_reference import randomize_adapters

RULES = 'match type(Linear) apply lora(r=2, alpha=4)'


def _model():
    """Two 4-bit linears (128 -> 64 NF4, 64 -> 32 FP4: out_features divisible by 32, as the layout needs; two
    blocks of 64 per row), their switch on."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    model = torch.nn.Sequential(bnb.nn.Linear4bit(128, 64, quant_type="nf4", compute_dtype=torch.float32), torch.nn.GELU(),
                                bnb.nn.Linear4bit(64, 32, quant_type="fp4", compute_dtype=torch.float32))
    model.load_state_dict(dense.state_dict())
    model = model.to("cpu").eval()
    for layer in (model[0], model[2]):
        layer.support_avx512bf16_for_cpu = True
    return model


def _direct(model, compiled=None):
    """The model's output from its dequantized weights, with ``compiled``'s LoRA adapters added when given."""
    import bitsandbytes.functional as bnbf

    h = _x()
    for path in ("0", "2"):
        layer = model.get_submodule(path)
        weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        y = h @ weight.T + layer.bias
        if compiled is not None:
            lora = compiled.adapter_module("default", path)
            y = y + lora.scale * h @ lora.lora_A.T @ lora.lora_B.T
        h = torch.nn.functional.gelu(y) if path == "0" else y
    return h


def _x():
    return torch.randn(3, 128, generator=torch.Generator().manual_seed(1))


def test_a_compiled_4bit_model_stays_exact_in_attach_and_in_its_own_eager_forward_and_captures_again():
    model = _model()
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = surgeon.compile(model, RULES, example_inputs=(_x(),)).eval()
    randomize_adapters(compiled, seed=4)
    with torch.no_grad():
        expected, plain = _direct(model, compiled), _direct(model)
        torch.testing.assert_close(compiled(_x()), expected, rtol=1e-5, atol=1e-5)
        handles = compiled.attach()
        try:
            attached = model(_x())  # as generate() runs it: evaluation mode, no grad
        finally:
            for handle in handles:
                handle.remove()
        torch.testing.assert_close(attached, expected, rtol=1e-5, atol=1e-5)  # bfloat16's rounding is ~5e-3
        torch.testing.assert_close(model(_x()), plain, rtol=1e-5, atol=1e-5)  # the user's own eager call
        compiled.invalidate()  # a new capture reads the model's tensors again
        torch.testing.assert_close(compiled(_x()), expected, rtol=1e-5, atol=1e-5)
    # nothing rewritten in place (state_dict last: bitsandbytes turns its layout back, lossily, when saving)
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())


def test_attach_to_another_model_puts_its_switch_back_and_refuses_it_once_bitsandbytes_rewrote_it():
    from surgeon.kernels.quantized import dequantized_weight

    compiled = surgeon.compile(_model(), RULES, example_inputs=(_x(),)).eval()
    randomize_adapters(compiled, seed=4)
    other = _model()  # the same weights, never compiled
    with torch.no_grad():
        expected = _direct(other, compiled)
        handles = compiled.attach(other)
        try:
            torch.testing.assert_close(other(_x()), expected, rtol=1e-5, atol=1e-5)
        finally:
            for handle in handles:
                handle.remove()
        assert [other[0].support_avx512bf16_for_cpu, other[2].support_avx512bf16_for_cpu] == [True, True]
        other(_x())  # detached: bitsandbytes takes its CPU path again, and rewrites the layers
    assert other[0].weight.quant_state.packing_format_for_cpu and other[2].weight.quant_state.packing_format_for_cpu
    with pytest.raises(ModelError, match="CPU inference packing"):
        compiled.attach(other)
    assert not other[0]._forward_hooks and not other[2]._forward_hooks  # refused before any hook
    with pytest.raises(ModelError, match="CPU inference packing"):  # its scales are bfloat16 now
        dequantized_weight(other[0])
