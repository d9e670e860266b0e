"""Semantic roles (surgeon/roles.py) on ten architectures, built tiny from their transformers configs.

The reference is each architecture's own module names (what PEFT's per-architecture target
tables spell out by hand): the dataflow analysis must find the same modules without reading names.
"""

from pathlib import Path

import pytest
import torch
from peft import PeftModel

import surgeon
from surgeon.api import plan
from surgeon.grammar import SurgeryError

from ._architectures import ARCHITECTURES, build, every_layer, named

PORTABLE = Path(__file__).resolve().parents[2] / "examples" / "rules" / "portable.surgery"
PORTABLE_ROLES = {"attn.q", "attn.v", "attn.qkv", "cross_attn.q", "cross_attn.v", "mlp.gate", "mlp.up", "mlp.gate_up", "mlp.down"}
LINEAR_KINDS = ("linear", "hf_conv1d")


@pytest.fixture(scope="module")
def captured():
    made = {}

    def get(name):
        if name not in made:
            made[name] = surgeon.capture_model(build(name))
        return made[name]

    return get


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_linear_of_the_first_layer_gets_the_role_its_architecture_names(captured, name):
    capture = captured(name)
    expected = named(name)
    roles = {path: capture.modules[path].role for path in expected}
    assert roles == expected
    first_layer = {p: capture.modules[p].role for p, s in capture.sites.items() if s.kind in LINEAR_KINDS and capture.modules[p].layer == 0}
    assert first_layer == {p: r for p, r in expected.items() if p in first_layer}
    assert set(first_layer) <= set(expected), "a first-layer linear the table does not name"
    assert all(info.role != "unknown" for info in capture.modules.values())


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_the_portable_rules_pick_the_same_roles_on_every_architecture(captured, name):
    sites = plan(captured(name), PORTABLE).sites
    wanted = [p for p, role in named(name).items() if role in PORTABLE_ROLES]
    assert {site.path for site in sites} == every_layer(wanted)


@pytest.mark.parametrize("name", ["gpt2", "t5", "vit"])
def test_portable_rules_train_save_in_pefts_format_and_fold(name, tmp_path):
    """Fused Conv1D projections, an encoder-decoder, a vision model: PEFT loads what surgeon saved and agrees."""
    compiled = surgeon.compile(build(name), PORTABLE)
    kwargs = dict(compiled.example_kwargs)
    compiled.train()
    optimizer = torch.optim.SGD([p for _, p in compiled.trainable_parameters()], lr=0.5)
    out = compiled(**kwargs)
    loss = out.loss if getattr(out, "loss", None) is not None else out.logits.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    compiled.eval()
    compiled.save_adapter(tmp_path)
    with torch.no_grad():
        mine = compiled(**kwargs).logits
        theirs = PeftModel.from_pretrained(build(name), tmp_path).eval()(**kwargs).logits
        assert not torch.allclose(mine, build(name)(**kwargs).logits, atol=1e-6)  # the step changed the outputs
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        folded = compiled.fold(kwargs=kwargs)  # verified against the unfolded graph
        torch.testing.assert_close(folded(**kwargs).logits, mine, rtol=1e-4, atol=1e-5)


class LinearAttention(torch.nn.Module):
    """Attention without softmax or the attention op: q, k, v mix by elementwise products."""

    def __init__(self, width=16):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        return x + self.o(torch.cumsum(self.k(x) * self.v(x), dim=1) * self.q(x))


def test_a_graph_the_analysis_cannot_read_reports_unknown_and_role_rules_fail_clearly():
    model = torch.nn.Sequential(LinearAttention(), LinearAttention())
    capture = surgeon.capture_model(model, example_inputs=(torch.randn(2, 5, 16),))
    assert {capture.modules[p].role for p in capture.sites} == {"unknown"}
    with pytest.raises(SurgeryError, match=r"matches no module of the model: role\(attn.q\)") as caught:
        plan(capture, 'match role(attn.q) apply lora(r=4)')
    (found,) = caught.value.diagnostics
    assert (found.span.line, found.span.column) == (1, 1)
    assert "8 sites are 'unknown' (e.g. 0.q)" in found.hint and "select them by path" in found.hint
