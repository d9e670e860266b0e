"""Opening models: folders, Hub ids (offline), factories, demos, modules; every failure a SurgeryError."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from surgeon.capture.demos import DEMOS, build_demo
from surgeon.grammar import ModelError
from surgeon.capture.models import open_model


def test_demos_are_deterministic_and_offline():
    for name in DEMOS:
        a, b = build_demo(name), build_demo(name)
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)


def test_hugging_face_models_get_example_inputs_from_their_config():
    llama = open_model("demo:llama")
    assert set(llama.example_kwargs) == {"input_ids", "attention_mask", "labels", "use_cache"}
    assert llama.example_kwargs["use_cache"] is False
    bert = open_model("demo:bert")  # a classifier: no language-model head, no labels
    assert set(bert.example_kwargs) == {"input_ids", "attention_mask"}


def test_unknown_demo_and_unknown_spec():
    with pytest.raises(ModelError) as caught:
        open_model("demo:llamma")
    assert str(caught.value) == "error: unknown demo model 'llamma'\nhint: demos: demo:llama, demo:qwen2, demo:gpt2, demo:bert"
    with pytest.raises(ModelError, match="cannot open model 'not a model': no such folder, and not a model name"):
        open_model("not a model")


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    build_demo("gpt2").save_pretrained(folder)
    return folder


def test_local_folder_loads_its_safetensors_weights(gpt2_folder):
    opened = open_model(gpt2_folder)
    assert opened.source == "folder" and not opened.fake
    reference = build_demo("gpt2")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(opened.module.state_dict()[key], value, rtol=0, atol=0)


def test_local_folder_for_planning_reads_no_weights(gpt2_folder, tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((gpt2_folder / "config.json").read_text())
    opened = open_model(config_only, weights=False)
    assert opened.fake and type(opened.module).__name__ == "GPT2LMHeadModel"
    with pytest.raises(ModelError) as caught:
        open_model(config_only, weights=True)
    assert caught.value.diagnostics[0].message == f"{config_only} has no *.safetensors weights"
    assert "never pickled .bin files" in caught.value.diagnostics[0].hint


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError) as caught:
        open_model(tmp_path)
    assert caught.value.diagnostics[0].message == f"{tmp_path} is not a Hugging Face model folder: it has no config.json"


def test_unknown_architecture_is_refused_without_running_remote_code(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(ModelError, match="transformers has no class NoSuchModelForCausalLM"):
        open_model(tmp_path, weights=False)


def test_factory_spec(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            def with_inputs():
                return torch.nn.Sequential(torch.nn.Linear(4, 3)), (torch.randn(2, 4),)
            def bare():
                return torch.nn.Linear(4, 3)
            def wrong():
                return 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    opened = open_model("my_models:with_inputs")
    assert opened.source == "factory" and len(opened.example_args) == 1
    assert open_model("my_models:bare").example_args == ()
    with pytest.raises(ModelError, match=r"my_models:wrong\(\) returned int, not a torch.nn.Module"):
        open_model("my_models:wrong")
    with pytest.raises(ModelError, match="'my_models' has no function 'nope'"):
        open_model("my_models:nope")
    with pytest.raises(ModelError, match="cannot import 'no_such_package_xyz'"):
        open_model("no_such_package_xyz:make")


def _run_isolated(code: str, env: dict) -> subprocess.CompletedProcess:
    # huggingface_hub reads its environment at import: run in a fresh process.
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)


def test_hub_ids_with_hf_hub_offline_open_from_the_local_cache_or_fail_clearly(tmp_path, gpt2_folder):
    # One fresh process for both cases (huggingface_hub reads HF_HUB_OFFLINE at import).
    # The cache layout huggingface_hub writes: refs/main names a snapshot folder.
    repo = tmp_path / "hub" / "models--some-org--tiny-gpt2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (snapshot / f).write_bytes((gpt2_folder / f).read_bytes())
    code = (
        "from surgeon.capture.models import open_model\n"
        "m = open_model('some-org/tiny-gpt2', weights=False)\n"
        "print(m.source, type(m.module).__name__, m.fake)\n"
        "from surgeon.grammar import SurgeryError\n"
        "try:\n    open_model('some-org/some-model@main', weights=False)\n"
        "except SurgeryError as e:\n    print(e)\n"
    )
    done = _run_isolated(code, {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "hub GPT2LMHeadModel True\n"
        "error: cannot fetch 'some-org/some-model@main' from the Hugging Face Hub: LocalEntryNotFoundError\n"
        "hint: HF_HUB_OFFLINE is set and this model is not in the local Hugging Face cache; "
        "download it once with network access, or pass a local folder\n"
    )
