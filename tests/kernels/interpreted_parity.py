"""Triton kernels against their torch references, under the Triton interpreter (CPU).

Run only through tests/kernels/test_lora_linear.py, which starts a pytest
session with TRITON_INTERPRET=1 set before anything imports Triton. Shapes are
small and odd (not multiples of the tile sizes): the interpreter is slow.
"""

import functools
import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (see test_lora_linear.py)"

import surgeon  # noqa: E402
from surgeon.capture.demos import demo_config  # noqa: E402
from surgeon.kernels import triton_mode  # noqa: E402
from surgeon.kernels.lora_linear import lora_linear, lora_linear_torch, lora_linear_triton  # noqa: E402

TOLERANCE = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _tensors(dtype, m=(2, 19), k=40, n=37, r=5, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(dtype)  # noqa: E731
    return make(*m, k), make(n, k, std=0.2), make(n) if bias else None, make(r, k, std=0.2), make(n, r, std=0.2), torch.tensor(1.7)


def test_the_interpreter_is_on():
    assert triton_mode() == "interpret"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(m=(2, 19), k=40, n=37, r=5), dict(m=(1,), k=17, n=70, r=16, bias=False), dict(m=(33,), k=64, n=16, r=1)])
def test_fused_forward_equals_the_reference(dtype, shape):
    x, w, b, a, bb, s = _tensors(dtype, **shape)
    got = lora_linear_triton(x, w, b, a, bb, s)
    expected = lora_linear_torch(*(t.double() if t is not None else None for t in (x, w, b, a, bb, s)))
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * expected.abs().max().item())


def test_the_op_takes_the_kernels_and_its_gradients_equal_the_references():
    x, w, b, a, bb, s = _tensors(torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, a, bb)]
    ours = lora_linear(leaves[0], w, b, leaves[1], leaves[2], s)
    ours.square().sum().backward()
    refs = [t.clone().requires_grad_() for t in (x, a, bb)]
    lora_linear_torch(refs[0], w, b, refs[1], refs[2], s).square().sum().backward()
    for mine, theirs in zip(leaves, refs):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-4)


def test_the_wrapper_refuses_what_the_kernel_cannot_take():
    x, w, b, a, bb, s = _tensors(torch.float32)
    with pytest.raises(TypeError, match="share one of"):
        lora_linear_triton(x.half(), w, b, a, bb, s)
    with pytest.raises(ValueError, match="shapes do not fit"):
        lora_linear_triton(x, w, b, a, bb[:, :3], s)


@functools.lru_cache(maxsize=1)
def _two_layer_llama():
    """The demo Llama cut to two layers: the interpreter runs every kernel call in Python, and two layers show it all."""
    config, model_class = demo_config("llama")
    config.num_hidden_layers = 2
    torch.manual_seed(0)
    return model_class(config).eval()  # shared by the tests below (their compiled models only read it)


def _fused_and_plain(rules):
    """The demo Llama compiled with the kernels (random adapter weights), and a call of its torch-op graphs."""
    fused = surgeon.compile(_two_layer_llama(), rules, kernels="triton").eval()
    with torch.no_grad():
        for _, _, module in fused.sites():
            for x in module.parameters():
                x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(x.numel())) * 0.2)

    def plain(**batch):
        return fused.graph(**batch, lowered=False)(**batch, use_cache=False)

    return fused, plain


def test_a_compiled_model_lowered_to_the_kernels_equals_the_torch_graph():
    rules = 'match "*.self_attn.{q,v}_proj" apply lora(r=4, alpha=8)\nmatch "*.self_attn.o_proj" apply dora(r=4, alpha=8)\nmatch "*.mlp.up_proj" apply ia3()'
    batch = {"input_ids": torch.arange(14).reshape(2, 7) * 5 + 3, "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    fused, plain = _fused_and_plain(rules)
    graph = fused.graph(**batch)
    calls = [n for n in graph.graph.nodes if n.target is torch.ops.surgeon.lora_linear.default]
    assert len(calls) == 4  # q and v of 2 layers; ia3 stays plain aten ops
    assert sum(n.target is torch.ops.surgeon.dora_linear.default for n in graph.graph.nodes) == 2  # o of 2 layers
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch).logits, plain(**batch).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.fold(kwargs=batch)(**batch, use_cache=False).logits, plain(**batch).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dx_is_the_forward_kernels_on_transposed_views(dtype, monkeypatch):
    """dx = g W + s (g B) A through lora_linear_triton(g, W^T, None, B^T, A^T, s), as the op's backward calls it."""
    import surgeon.kernels.lora_linear as module

    x, w, b, a, bb, s = _tensors(dtype, m=(21,), k=33, n=40, r=3)
    calls = []
    real = module.lora_linear_triton
    monkeypatch.setattr(module, "lora_linear_triton", lambda *args: calls.append(args[0].shape) or real(*args))
    leaf = x.clone().requires_grad_()
    out = lora_linear(leaf, w, b, a, bb, s)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(g)
    assert calls == [x.shape, g.shape]  # the forward, then dx
    expected = g.double() @ w.double() + (g.double() @ bb.double()) @ a.double() * 1.7
    torch.testing.assert_close(leaf.grad.double(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_routed_kernels_equal_each_row_with_its_own_adapter(dtype):
    from surgeon.kernels.routed_lora import routed_lora_linear, routed_lora_linear_torch, stack_adapters

    g = torch.Generator().manual_seed(3)
    k, n = 36, 45
    adapters = [((torch.randn(r, k, generator=g) * 0.2).to(dtype), (torch.randn(n, r, generator=g) * 0.2).to(dtype), s)
                for r, s in ((3, 2.0), (8, 0.5), (1, 1.0))]
    a_stack, b_stack, scales = stack_adapters(adapters)
    x = torch.randn(5, 3, k, generator=g).to(dtype)  # 5 requests of 3 tokens
    w, b = (torch.randn(n, k, generator=g) * 0.2).to(dtype), torch.randn(n, generator=g).to(dtype)
    ids = torch.tensor([2, -1, 0, 1, 0])
    got = routed_lora_linear(x, w, b, a_stack, b_stack, scales, ids)
    for row, i in enumerate(ids.tolist()):  # each request alone, in float64
        xr = x[row].double()
        expected = xr @ w.double().T + b.double()
        if i >= 0:
            a, bb, s = adapters[i]
            expected = expected + (xr @ a.double().T) @ bb.double().T * s
        torch.testing.assert_close(got[row].double(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * expected.abs().max().item())
    reference = routed_lora_linear_torch(x.double(), w.double(), b.double(), a_stack.double(), b_stack.double(), scales.double(), ids)
    torch.testing.assert_close(got.double(), reference, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * reference.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dora_row_norm_and_linear_equal_the_direct_computation(dtype):
    from surgeon.kernels.dora import dora_linear, dora_row_norm_triton

    x, w, b, a, bb, s = _tensors(dtype, m=(3, 7), k=45, n=50, r=6)
    direct = (w.double() + 1.7 * bb.double() @ a.double()).norm(dim=1)  # ||W + s B A|| with B A materialised
    norm = dora_row_norm_triton(w, a, bb, 1.7)
    torch.testing.assert_close(norm.double(), direct, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    magnitude = w.double().norm(dim=1).float() * 1.3
    base, lora, f = x.double() @ w.double().T, (x.double() @ a.double().T) @ bb.double().T * 1.7, magnitude.double() / direct
    for gate in (1.0, 0.4):  # alone: PEFT's f (x W^T + s B A x) + b; gated: base + g (that - base)
        y = dora_linear(x, w, b, a, bb, s, magnitude, torch.tensor(gate))
        expected = base + gate * ((f - 1) * base + f * lora) + b.double()
        torch.testing.assert_close(y.double(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * expected.abs().max().item())


def test_a_routed_graph_lowered_to_the_routed_kernels_equals_the_torch_graph():
    rules = ('adapter "a" { match "*.self_attn.{q,v}_proj" apply lora(r=4, alpha=8) }\n'
             'adapter "b" { match "*.self_attn.q_proj" apply lora(r=2)\n match "*.mlp.up_proj" apply ia3() }\n')
    batch = {"input_ids": torch.arange(21).reshape(3, 7) * 5 + 3, "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    ids = torch.tensor([1, -1, 0])
    fused, plain = _fused_and_plain(rules)
    graph = fused.graph(**batch, adapter_ids=ids)
    calls = [n for n in graph.graph.nodes if n.target is torch.ops.surgeon.routed_lora_linear.default]
    assert len(calls) == 4  # q (a and b) and v (a) in 2 layers; ia3 stays aten ops
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch, adapter_ids=ids).logits, plain(**batch, adapter_ids=ids).logits, rtol=1e-5, atol=1e-5)
