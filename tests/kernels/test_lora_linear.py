"""The fused LoRA linear op: its torch path (gradcheck in float64, opcheck, export, torch.compile), and the
Triton kernels under the interpreter in a session of their own."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import surgeon
from surgeon.grammar import SurgeryError
from surgeon.kernels.lora_linear import lora_linear, lora_linear_eager, lora_linear_torch

HERE = Path(__file__).parent


def _args(dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5, 12), (7, 12), (7,), (3, 12), (7, 3)]
    tensors = [torch.randn(*s, generator=g, dtype=dtype).requires_grad_(requires_grad) for s in shapes]
    return (*tensors, torch.tensor(0.7, dtype=dtype))


def test_the_torch_path_passes_gradcheck_in_float64():
    *tensors, scale = _args(requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: lora_linear(*t, scale), tuple(tensors))


def test_the_eager_path_and_its_gradients_equal_the_reference_in_float64():
    """The op's torch path (scale on x A^T, the expand accumulated into the base GEMM's output) against
    autograd through ``F.linear(x, W, b) + s F.linear(F.linear(x, A), B)``."""
    for with_bias in (True, False):
        ours = [t.detach().clone().requires_grad_() for t in _args()[:5]]
        theirs = [t.detach().clone().requires_grad_() for t in ours]
        scale = torch.tensor(0.7, dtype=torch.float64)
        if not with_bias:
            ours[2] = theirs[2] = None
        got, want = lora_linear(*ours, scale), lora_linear_torch(*theirs, scale)
        torch.testing.assert_close(lora_linear_eager(*ours, scale), want, rtol=1e-12, atol=1e-12)
        grad = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        got.backward(grad), want.backward(grad)
        for mine, reference in zip(ours, theirs):
            if mine is not None:
                torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-12, atol=1e-12)


def test_auto_on_the_cpu_lowers_plain_lora_sites_only_and_keeps_what_the_plain_graph_computes():
    rules = 'match "*.q_proj" apply lora(r=2)\nmatch "*.k_proj" apply lora(r=2, dropout=0.1)\nmatch "*.v_proj" apply dora(r=2)\n'
    compiled = surgeon.compile("demo:llama", rules).train()
    for _, _, module in compiled.sites():  # B = 0 at the start: give the branches something to add
        torch.nn.init.normal_(module.lora_B, std=0.1)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "labels": ids}
    lowered, plain = compiled.graph(**batch), compiled.graph(lowered=False, **batch)
    fused = [n for n in lowered.graph.nodes if n.target is torch.ops.surgeon.lora_linear.default]
    layers = compiled.config.num_hidden_layers
    assert [n.meta["surgeon"]["site"].rsplit(".", 1)[-1] for n in fused] == ["q_proj"] * layers  # dropout, DoRA: plain
    grads = []
    for graph in (lowered, plain):
        torch.manual_seed(0)  # the same dropout masks
        graph(**batch, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in compiled.named_parameters() if p.grad is not None})
        compiled.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_the_op_registration_is_sound():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch (torch.library.opcheck)."""
    results = torch.library.opcheck(lora_linear, _args(torch.float32, requires_grad=True))
    assert set(results.values()) == {"SUCCESS"}


def test_exported_programs_keep_the_op_and_torch_compile_traces_it_whole():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            _, self.w, self.b, self.a, self.bb, self.s = (torch.nn.Parameter(t, requires_grad=False) for t in _args(torch.float32))

        def forward(self, x):
            return lora_linear(x, self.w, self.b, self.a, self.bb, self.s)

    layer, x = Layer(), torch.randn(2, 4, 12)
    program = torch.export.export(layer, (x,))
    assert any(n.target is torch.ops.surgeon.lora_linear.default for n in program.graph.nodes)
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    torch.testing.assert_close(compiled(x), lora_linear_torch(x, layer.w, layer.b, layer.a, layer.bb, layer.s))
    assert counter.frame_count == 1


def test_kernels_triton_without_triton_or_a_gpu_is_a_clear_error():
    from surgeon.kernels import triton_mode

    if triton_mode() is not None:
        pytest.skip("Triton runs here")
    with pytest.raises(SurgeryError, match="kernels='triton' needs Triton and a GPU"):
        surgeon.compile("demo:llama", 'match "*.q_proj" apply lora(r=2)', kernels="triton")
    assert surgeon.compile("demo:llama", 'match "*.q_proj" apply lora(r=2)').lowers()  # auto: the op's torch path on CPU


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (pip install '.[triton]')")
def test_triton_kernels_under_the_interpreter():
    """The kernels' parity tests, in a pytest session that sets TRITON_INTERPRET=1 before Triton is imported."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "interpreted_parity.py")],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout


def test_the_routed_op_s_torch_path_equals_rows_alone_and_registers_soundly():
    from surgeon.kernels.routed_lora import routed_lora_linear, stack_adapters

    g = torch.Generator().manual_seed(1)
    adapters = [(torch.randn(r, 12, generator=g), torch.randn(7, r, generator=g), s) for r, s in ((2, 1.5), (4, 0.5))]
    stacks = stack_adapters(adapters)
    x, w, b = torch.randn(3, 5, 12, generator=g), torch.randn(7, 12, generator=g), torch.randn(7, generator=g)
    ids = torch.tensor([1, -1, 0])
    got = routed_lora_linear(x, w, b, *stacks, ids)
    for row, i in enumerate(ids.tolist()):
        alone = lora_linear_torch(x[row], w, b, *adapters[i]) if i >= 0 else torch.nn.functional.linear(x[row], w, b)
        torch.testing.assert_close(got[row], alone, rtol=1e-5, atol=1e-5)
    results = torch.library.opcheck(routed_lora_linear, (x, w, b, *stacks, ids))
    assert set(results.values()) == {"SUCCESS"}


def test_the_routed_op_s_gradients_equal_autograd_through_the_reference_in_float64():
    from surgeon.kernels.routed_lora import routed_lora_linear, routed_lora_linear_torch, stack_adapters

    g = torch.Generator().manual_seed(2)
    adapters = [(torch.randn(r, 12, generator=g, dtype=torch.float64), torch.randn(7, r, generator=g, dtype=torch.float64), s)
                for r, s in ((2, 1.5), (4, 0.5), (3, 2.0))]
    a_stack, b_stack, scales = stack_adapters(adapters)
    tensors = [torch.randn(4, 5, 12, generator=g, dtype=torch.float64), torch.randn(7, 12, generator=g, dtype=torch.float64),
               torch.randn(7, generator=g, dtype=torch.float64), a_stack, b_stack]
    ids = torch.tensor([2, -1, 0, 2])  # adapter 1 has no rows: its gradients are zero
    grads = []
    for op in (routed_lora_linear, routed_lora_linear_torch):
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = op(*leaves[:5], scales, ids)
        grads.append(torch.autograd.grad((out * out.detach().cos()).sum(), leaves))
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    assert grads[0][3][1].abs().max() == 0
    leaves = [t.clone().requires_grad_() for t in tensors]
    assert set(torch.library.opcheck(routed_lora_linear, (*leaves, scales, ids)).values()) == {"SUCCESS"}


def test_the_dora_op_matches_pefts_dora_layer():
    """Against PEFT's own DoRA linear (use_dora=True) on the same weights: output and gradients. (No gradcheck:
    the norm is detached by design, as in PEFT, so finite differences through it disagree on purpose.)"""
    from peft import LoraConfig, get_peft_model

    from surgeon.kernels.dora import dora_linear

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9))
    peft = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=["0"], use_dora=True))
    layer = peft.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(1.2)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    x = torch.randn(4, 12)
    ours = dora_linear(x, layer.base_layer.weight, layer.base_layer.bias, a, b, torch.tensor(2.0), m, torch.tensor(1.0))
    theirs = peft(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(ours.square().sum(), (a, b, m))
    expected = torch.autograd.grad(theirs.square().sum(), (a, b, m))
    for mine, reference in zip(grads, expected):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)


def test_under_autocast_the_graph_keeps_plain_ops_and_trains():
    """The fused ops take one dtype for all their tensors; autocast casts op by op, so it gets the plain graph,
    captured under autocast (export asserts the dtypes it traced: the fp32 graph would fail there)."""
    compiled = surgeon.compile("demo:llama", 'match "*.q_proj" apply lora(r=2)').train()
    for _, _, module in compiled.sites():
        torch.nn.init.normal_(module.lora_B, std=0.1)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    exact = compiled(input_ids=ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compiled(input_ids=ids, labels=ids).loss
        graph = compiled.graph(input_ids=ids, labels=ids)
    loss.backward()
    assert not any(n.target is torch.ops.surgeon.lora_linear.default for n in graph.graph.nodes)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in compiled.trainable_parameters())
    torch.testing.assert_close(loss.float(), exact.detach(), rtol=5e-2, atol=5e-2)
