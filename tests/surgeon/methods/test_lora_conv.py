"""LoRA on Conv2d against PEFT on a plain CNN: logits, gradients, files both ways, fold and unfold."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import surgeon

from ..conftest import TinyCNN, tiny_cnn


class PaddedCNN(TinyCNN):
    """The tiny CNN with a strided, padded first convolution."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)


def _pair(model_class):
    torch.manual_seed(0)
    model = model_class().eval()
    twin = model_class().eval()
    twin.load_state_dict(model.state_dict())
    return model, twin


def test_conv_lora_matches_peft_and_folds(tmp_path):
    model, twin = _pair(PaddedCNN)
    x = tiny_cnn()[1][0]
    compiled = surgeon.compile(model, 'match "conv1" apply lora(r=4, alpha=8)\nmatch "conv2" apply lora(r=2, alpha=2, bias=true)', example_inputs=(x,)).eval()
    assert compiled.plan.sites[0].trainable_params == 4 * (3 * 3 * 3 + 8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), twin(x), rtol=0, atol=0)  # B = 0
        for _, _, module in compiled.sites():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    reference = get_peft_model(twin, LoraConfig(r=4, lora_alpha=8, target_modules=["conv1", "conv2"], rank_pattern={"conv2": 2}, alpha_pattern={"conv2": 2}, lora_bias=True))
    reference.eval()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for _, path, module in compiled.sites():
            layer = modules[f"base_model.model.{path}"]
            layer.lora_A["default"].weight.copy_(module.lora_A)
            layer.lora_B["default"].weight.copy_(module.lora_B)
            if module.lora_B_bias is not None:
                layer.lora_B["default"].bias.copy_(module.lora_B_bias)
            elif layer.lora_B["default"].bias is not None:
                layer.lora_B["default"].bias.zero_()
    ours, theirs = compiled(x), reference(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for _, path, module in compiled.sites():
        layer = modules[f"base_model.model.{path}"]
        torch.testing.assert_close(module.lora_A.grad, layer.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.lora_B.grad, layer.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-6)
    folded = compiled.fold()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ours, rtol=1e-4, atol=1e-5)
    before = {k: v.clone() for k, v in compiled.base_model.state_dict().items()}
    compiled.fold(inplace=True)
    compiled.unfold()
    assert all(torch.equal(v, before[k]) for k, v in compiled.base_model.state_dict().items())


def test_conv_lora_peft_files_both_ways(tmp_path):
    model, twin = _pair(TinyCNN)
    x = tiny_cnn()[1][0]
    compiled = surgeon.compile(model, 'match "conv*" apply lora(r=4, alpha=8)', example_inputs=(x,)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, _, module in compiled.sites():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.2)
        expected = compiled(x)
    compiled.save_adapter(tmp_path / "ours")
    theirs = PeftModel.from_pretrained(twin, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    fresh, _ = _pair(TinyCNN)
    again = surgeon.compile(fresh, adapter=tmp_path / "theirs", example_inputs=(x,)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), expected, rtol=1e-5, atol=1e-5)


class ConvZoo(torch.nn.Module):
    """Conv3d, a grouped Conv2d, and a strided Conv1d, one after another."""

    def __init__(self):
        super().__init__()
        self.c3 = torch.nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1))
        self.g2 = torch.nn.Conv2d(4, 8, 3, groups=2, padding=1)
        self.c1 = torch.nn.Conv1d(8, 8, 3, stride=2)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.c3(x.unsqueeze(2)).squeeze(2))
        h = torch.relu(self.g2(h)).flatten(2)
        return self.head(torch.relu(self.c1(h)).mean(-1))


def test_conv1d_conv3d_and_grouped_conv2d_match_peft(tmp_path):
    model, twin = _pair(ConvZoo)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    compiled = surgeon.compile(model, 'match "c3", "g2", "c1" apply lora(r=4, alpha=8)', example_inputs=(x,)).eval()
    assert [s.kind for s in compiled.plan.sites] == ["conv3d", "conv2d", "conv1d"]
    assert compiled.plan.sites[1].trainable_params == 4 * 4 * 9 + 8 * 2  # B is grouped: (8, 4 / 2, 1, 1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), twin(x), rtol=0, atol=0)
        for _, _, module in compiled.sites():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    reference = get_peft_model(twin, LoraConfig(r=4, lora_alpha=8, target_modules=["c3", "g2", "c1"]))
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for _, path, module in compiled.sites():
            modules[f"base_model.model.{path}"].lora_A["default"].weight.copy_(module.lora_A)
            modules[f"base_model.model.{path}"].lora_B["default"].weight.copy_(module.lora_B)
    ours, theirs = compiled(x), reference(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for _, path, module in compiled.sites():
        layer = modules[f"base_model.model.{path}"]
        torch.testing.assert_close(module.lora_A.grad, layer.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.lora_B.grad, layer.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-6)
    compiled.save_adapter(tmp_path / "ours")
    fresh, _ = _pair(ConvZoo)
    again = surgeon.compile(fresh, adapter=tmp_path / "ours", example_inputs=(x,)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours, rtol=1e-5, atol=1e-5)
    # The grouped site cannot fold (PEFT refuses too); the others fold exactly.
    from surgeon.passes import FoldError

    with pytest.raises(FoldError, match="2 groups cannot be folded"):
        compiled.fold()
    ungrouped = surgeon.compile(_pair(ConvZoo)[0], 'match "c3", "c1" apply lora(r=4, alpha=8)', example_inputs=(x,)).eval()
    with torch.no_grad():
        for _, _, module in ungrouped.sites():
            module.lora_B.normal_(std=0.2)
        torch.testing.assert_close(ungrouped.fold()(x), ungrouped(x), rtol=1e-4, atol=1e-5)


def test_a_rank_the_groups_do_not_divide_is_refused():
    from surgeon.grammar import SurgeryError

    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(SurgeryError, match="needs a rank divisible by 2, not 3"):
        surgeon.compile(ConvZoo(), 'match "g2" apply lora(r=3)', example_inputs=(x,))


def test_a_dilated_convolution_adapts_with_the_same_dilation():
    """PEFT's A ignores the base's dilation (and fails on the shapes); surgeon's uses it, so that
    the adapted conv equals a conv with the kernel W + s (B A), in float64."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=2, dilation=2)).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    compiled = surgeon.compile(model, 'match "0" apply lora(r=2, alpha=4)', example_inputs=(x,)).eval()
    module = compiled.adapter_module("default", "0")
    with torch.no_grad():
        module.lora_B.normal_()
        kernel = model[0].weight + 2.0 * torch.einsum("or,rikl->oikl", module.lora_B.flatten(1), module.lora_A)
        expected = torch.nn.functional.conv2d(x, kernel, model[0].bias, padding=2, dilation=2)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(compiled.fold()(x), expected, rtol=1e-10, atol=1e-10)
