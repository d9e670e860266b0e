"""Semantic roles (surgeon/capture/roles.py) on ten architectures, built tiny from their transformers configs.

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

from .._architectures import ARCHITECTURES, build, every_layer, named

PORTABLE = Path(__file__).resolve().parents[3] / "examples" / "rules" / "portable.surgery"
PORTABLE_ROLES = {"attn.q", "attn.v", "attn.qkv", "cross_attn.q", "cross_attn.v", "mlp.gate", "mlp.up", "mlp.gate_up", "mlp.down"}
LINEAR_KINDS = ("linear", "hf_conv1d")


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_roles_match_each_architectures_names_and_the_portable_rules_pick_them(name):
    capture = surgeon.capture_model(build(name))
    expected = named(name)
    assert {path: capture.modules[path].role for path in expected} == expected
    first_layer = {p: capture.modules[p].role for p, s in capture.sites.items() if s.kind in LINEAR_KINDS and capture.modules[p].layer == 0}
    assert set(first_layer) <= set(expected), "a first-layer linear the table does not name"
    assert all(info.role != "unknown" for info in capture.modules.values())
    # One rules file, every architecture: exactly the modules of the portable roles, in every layer.
    sites = plan(capture, PORTABLE).sites
    wanted = [p for p, role in expected.items() if role in PORTABLE_ROLES]
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
    with pytest.raises(SurgeryError, match=r"matches no module of the model: role\(\*\)"):
        plan(capture, 'match role(*) apply lora(r=4)')  # unknown is no role: even * leaves those sites alone
    with pytest.raises(SurgeryError, match=r"matches no module of the model: role\(attn.q\)") as caught:
        plan(capture, 'match role(attn.q) apply lora(r=4)')
    (found,) = caught.value.diagnostics
    assert (found.span.line, found.span.column) == (1, 1)
    assert "8 sites are 'unknown' (e.g. 0.q)" in found.hint and "select them by path" in found.hint


def test_rules_from_peft_write_roles_that_carry_to_another_architecture(tmp_path, capsys):
    """A PEFT config names Llama's modules; --roles turns whole roles into role(...), which Qwen2 and GPT-2 read too."""
    from peft import LoraConfig, get_peft_model

    from surgeon.cli import main
    from surgeon.capture.demos import build_demo

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    get_peft_model(build_demo("llama"), config).save_pretrained(tmp_path)
    assert main(["rules-from-peft", str(tmp_path)]) == 0
    plain = capsys.readouterr().out
    assert main(["rules-from-peft", str(tmp_path), "--roles", "demo:llama"]) == 0
    text = capsys.readouterr().out
    assert "role(attn.q, attn.v, mlp.down)" in text and "q_proj" not in text
    assert "# 1 of 1 rules by role, as read from demo:llama" in text
    assert all(line in text for line in plain.splitlines() if line.startswith("#"))  # its comments are kept
    qwen = plan("demo:qwen2", text).sites
    assert sorted({s.path.rsplit(".", 1)[-1] for s in qwen}) == ["down_proj", "q_proj", "v_proj"] and len(qwen) == 12
    gpt2 = plan("demo:gpt2", text).sites  # no separate q and v there: its MLP output projections
    assert {s.path.rsplit(".", 1)[-1] for s in gpt2} == {"c_proj"} and all(".mlp." in s.path for s in gpt2)


def test_a_role_analysis_that_fails_warns_and_leaves_capture_working(monkeypatch):
    import surgeon.capture.captured

    def broken(program, sites):
        raise RuntimeError("a graph nobody foresaw")

    monkeypatch.setattr(surgeon.capture.captured, "site_roles", broken)
    with pytest.warns(UserWarning, match="role analysis could not read this graph .*a graph nobody foresaw"):
        capture = surgeon.capture_model(LinearAttention(), example_inputs=(torch.randn(2, 5, 16),))
    assert len(capture.sites) == 4 and {capture.modules[p].role for p in capture.sites} == {"unknown"}
