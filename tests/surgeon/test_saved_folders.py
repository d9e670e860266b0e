"""Every architecture the tests build from a config plans from its saved folder, and compiles from it.

Planning a folder builds the model without weights (fake tensors, no weight initialisation: ViT's
``trunc_normal_`` cannot run on fake values). The references: the live model the folder was saved from
(its parameters' names, shapes and ties) and each architecture's own module names for the roles
(tests/surgeon/_architectures.py, what test_roles checks the live models' captures against). The capture
cache is off here, so that the folder's capture is made, not read.
"""

from pathlib import Path

import pytest
import torch

import surgeon
from surgeon.capture.captured import capture
from surgeon.cli import main
from surgeon.grammar import ModelError
from surgeon.capture.models import hugging_face_inputs, open_model

from ._architectures import ARCHITECTURES, build, every_layer, named

PORTABLE = Path(__file__).resolve().parents[2] / "examples" / "rules" / "portable.surgery"
PORTABLE_ROLES = {"attn.q", "attn.v", "attn.qkv", "cross_attn.q", "cross_attn.v", "mlp.gate", "mlp.up", "mlp.gate_up", "mlp.down"}


@pytest.fixture(autouse=True)
def no_capture_cache(monkeypatch):
    monkeypatch.setenv("SURGEON_CAPTURE_CACHE", "0")


def _saved(name: str, folder: Path):
    model = build(name)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_a_saved_folder_plans_as_its_live_model(name, tmp_path):
    model = _saved(name, tmp_path)
    opened = open_model(tmp_path, weights=False)
    assert opened.fake and not any(p.device.type == "meta" for p in opened.module.parameters())
    captured = capture(opened)
    for site in captured.sites.values():  # every site reads a parameter the live model has, of its shape
        assert tuple(model.get_parameter(site.weight).shape) == site.weight_shape, site.path
    shared: dict = {}
    for parameter_name, parameter in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(parameter), []).append(parameter_name)
    assert captured.ties == tuple(tuple(group) for group in shared.values() if len(group) > 1)
    assert captured.total_params == sum(p.numel() for p in model.parameters())
    expected = named(name)
    assert {path: captured.modules[path].role for path in expected} == expected
    plan = surgeon.plan(captured, PORTABLE)
    assert {site.path for site in plan.sites} == every_layer([p for p, role in expected.items() if role in PORTABLE_ROLES])


@pytest.mark.parametrize("name", ["vit", "gpt2"])  # the issue's ViT; GPT-2's tied head and Conv1D
def test_a_saved_folder_compiles_with_its_weights(name, tmp_path):
    model = _saved(name, tmp_path)
    compiled = surgeon.compile(tmp_path, PORTABLE).eval()  # a compiled model starts in training mode (dropout)
    assert [s.to_json() for s in compiled.plan.sites] == surgeon.plan(tmp_path, PORTABLE).to_json()["sites"]
    inputs = hugging_face_inputs(model, model.config)
    with torch.no_grad():  # LoRA's B starts at zero: the compiled folder computes what the model it was saved from does
        expected, got = model(**inputs), compiled(**inputs)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)


def test_a_folder_whose_config_cannot_build_is_a_clear_error(tmp_path, capsys):
    config = build("vit").config
    config.num_attention_heads = 0  # ViT's attention divides by it while being built
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="cannot (build|read) "):
        surgeon.plan(tmp_path, PORTABLE)
    assert main(["plan", str(tmp_path), str(PORTABLE)]) != 0
    err = capsys.readouterr().err
    assert "error: cannot " in err and "hint:" in err and "Traceback" not in err
