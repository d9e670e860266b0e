"""Model folders, factories and the capture cache under hostile conditions: each is a ModelError or a cache miss.

A folder's weights must fill the model exactly (transformers would initialise what is missing at random);
its files must lie inside it; config.json's architectures must name a transformers model class; a factory
that raises or exits while importing or building is an error, not an exit; a capture-cache file is checked,
never trusted.
"""

import json
import os
import shutil
import sys

import pytest
import safetensors.torch as st

import surgeon
from surgeon.capture.captured import capture
from surgeon.capture.cache import _checksum, capture_key
from surgeon.cli import main
from surgeon.capture.demos import build_demo
from surgeon.grammar import ModelError
from surgeon.capture.models import open_model

RULES = "match role(attn.q) apply lora(r=2)\n"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """demo:llama saved as a Hugging Face folder (lm_head not tied: every tensor is in the file)."""
    folder = tmp_path_factory.mktemp("saved") / "llama"
    build_demo("llama").save_pretrained(folder)
    return folder


def _variant(saved, tmp_path, name="model"):
    folder = tmp_path / name
    shutil.copytree(saved, folder)
    return folder


def _rewrite(folder, edit):
    tensors = st.load_file(folder / "model.safetensors")
    edit(tensors)
    st.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _compile_fails(folder, tmp_path, capsys) -> str:
    (tmp_path / "r.surgery").write_text(RULES)
    assert main(["compile", str(folder), str(tmp_path / "r.surgery"), "-o", str(tmp_path / "out"), "--fold"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    return err


def test_a_missing_tensor_is_an_error_not_random_weights(saved, tmp_path, capsys):
    folder = _variant(saved, tmp_path)
    _rewrite(folder, lambda t: t.pop("model.norm.weight"))
    err = _compile_fails(folder, tmp_path, capsys)
    assert f"error: the weights in {folder} lack 1 tensor the model needs: model.norm.weight\n" in err
    assert "never fills a missing weight with random values" in err


def test_an_empty_weights_file_is_an_error(saved, tmp_path, capsys):
    folder = _variant(saved, tmp_path)
    _rewrite(folder, lambda t: t.clear())
    assert "lack 39 tensors the model needs: lm_head.weight, " in _compile_fails(folder, tmp_path, capsys)
    (folder / "model.safetensors").write_bytes(b"")  # not even a header
    assert f"error: cannot load the weights in {folder}: " in _compile_fails(folder, tmp_path, capsys)


def test_an_unexpected_tensor_is_an_error(saved, tmp_path):
    import torch

    folder = _variant(saved, tmp_path)
    _rewrite(folder, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ModelError, match="hold tensors the model does not have: model.extra.weight"):
        open_model(folder)


def test_a_tied_head_need_not_be_saved(tmp_path):
    build_demo("gpt2").save_pretrained(tmp_path)  # lm_head is tied to wte: the file holds wte alone
    assert "lm_head.weight" not in st.load_file(tmp_path / "model.safetensors")
    opened = open_model(tmp_path)
    assert opened.module.lm_head.weight is opened.module.transformer.wte.weight


def test_a_weights_file_linked_from_outside_is_refused(saved, tmp_path, capsys):
    folder = _variant(saved, tmp_path)
    os.replace(folder / "model.safetensors", tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", folder / "model.safetensors")
    err = _compile_fails(folder, tmp_path, capsys)
    assert f"error: {folder}: model.safetensors leads outside the model folder, to {tmp_path / 'elsewhere.safetensors'}" in err
    assert main(["inspect", str(folder)]) == 1  # planning reads no weights, but the folder is refused all the same


@pytest.mark.parametrize("shard", ["../../x.safetensors", "/etc/x.safetensors", "sub/x.safetensors"])
def test_an_index_naming_a_file_outside_the_folder_is_refused(saved, tmp_path, shard):
    folder = _variant(saved, tmp_path)
    names = st.load_file(folder / "model.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: shard for k in names}}))
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=f"the weight_map names '{shard}', not a file of"):
        open_model(folder)


def test_an_index_shard_linked_from_outside_is_refused(saved, tmp_path):
    folder = _variant(saved, tmp_path)
    names = st.load_file(folder / "model.safetensors")
    os.replace(folder / "model.safetensors", tmp_path / "x.safetensors")
    os.symlink(tmp_path / "x.safetensors", folder / "shard.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "shard.safetensors" for k in names}}))
    with pytest.raises(ModelError, match="shard.safetensors leads outside the model folder"):
        open_model(folder, weights=False)


@pytest.mark.parametrize("value, says", [
    (["AutoModel"], "names 'AutoModel', which is not a model class of transformers"),
    (["logging"], "names 'logging', which is not a model class of transformers"),
    (["NoSuchModelForCausalLM"], ": transformers has no class NoSuchModelForCausalLM"),
    ("LlamaForCausalLM", 'must be a list of class names, not "LlamaForCausalLM"'),
])
def test_architectures_must_name_a_model_class(saved, tmp_path, capsys, value, says):
    folder = _variant(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, architectures=value)))
    assert main(["inspect", str(folder)]) == 1
    err = capsys.readouterr().err
    assert f'error: {folder}/config.json: "architectures"{"" if says.startswith(":") else " "}{says}' in err
    assert "Traceback" not in err


def test_a_config_of_ten_million_layers_is_refused_before_building(saved, tmp_path, capsys):
    folder = _variant(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=10**7)))
    assert main(["inspect", str(folder)]) == 1  # building 10**7 layers, even of fake tensors, would take hours
    assert "num_hidden_layers is 10,000,000; surgeon builds models of at most 4,096 layers" in capsys.readouterr().err


@pytest.mark.parametrize("source, says", [
    ("raise RuntimeError('no GPU here')\n", "importing 'hostile_factory' raised RuntimeError: no GPU here"),
    ("import sys\nsys.exit(3)\n", "importing 'hostile_factory' raised SystemExit: it called sys.exit(3)"),
    ("import sys\ndef build():\n    sys.exit(3)\n", "hostile_factory:build() raised SystemExit: it called sys.exit(3)"),
    ("def build():\n    raise ValueError('bad size')\n", "hostile_factory:build() raised ValueError: bad size"),
])
def test_a_factory_that_raises_or_exits_is_a_model_error(tmp_path, monkeypatch, capsys, source, says):
    (tmp_path / "hostile_factory.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hostile_factory", raising=False)
    assert main(["inspect", "hostile_factory:build"]) == 1
    err = capsys.readouterr().err
    assert f"error: the factory hostile_factory:build failed: {says}\n" in err


# --- the capture cache --------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGEON_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SURGEON_CAPTURE_CACHE", raising=False)
    capture(open_model("demo:llama", weights=False))
    (entry,) = (tmp_path / "captures").iterdir()
    return entry


def _q_proj_role() -> tuple:
    captured = capture(open_model("demo:llama", weights=False))
    return captured.cached, captured.modules["model.layers.0.self_attn.q_proj"].role


def test_an_edited_cache_file_is_not_trusted(cache):
    record = json.loads(cache.read_text())
    swap = {"attn.q": "attn.v", "attn.v": "attn.q"}
    record["roles"] = {path: swap.get(role, role) for path, role in record["roles"].items()}
    cache.write_text(json.dumps(record))
    assert _q_proj_role() == (False, "attn.q")  # captured again, not read ...
    assert _q_proj_role() == (True, "attn.q")  # ... and the file written again, right
    plan = surgeon.plan("demo:llama", RULES)
    assert {site.path.rsplit(".", 1)[-1] for site in plan.sites} == {"q_proj"}


@pytest.mark.parametrize("text", ["[1, 2, 3]", "null", '"text"', "{}", '{"format": 3, "key": 1}', "[" * 100_000 + "]" * 100_000])
def test_a_cache_file_of_another_shape_is_a_miss(cache, text):
    cache.write_text(text)
    assert _q_proj_role() == (False, "attn.q")
    assert _q_proj_role() == (True, "attn.q")


@pytest.mark.parametrize("edit", ["shape", "path", "role", "kind", "embedding", "features"])
def test_a_cache_file_that_does_not_fit_the_live_model_is_a_miss(cache, edit):
    record = json.loads(cache.read_text())
    site = next(s for s in record["sites"] if s["path"] == "model.layers.0.self_attn.q_proj")
    if edit == "shape":
        site["weight_shape"] = [7, 7]
    elif edit == "path":
        site["path"] = "model.layers.99.self_attn.q_proj"
    elif edit == "kind":
        site["kind"] = "teleporter"
    elif edit == "embedding":  # a kind the language knows, on a module that cannot compute it
        site["kind"] = "embedding"
    elif edit == "features":
        site["in_features"], site["out_features"] = 5, 7
    else:
        record["roles"]["model.layers.0.self_attn.q_proj"] = "attn.everything"
    record["checksum"] = _checksum(record["sites"], record["roles"])  # a consistent file, of another model
    cache.write_text(json.dumps(record))
    assert _q_proj_role() == (False, "attn.q")


def test_a_cache_file_written_for_this_model_is_read(cache):
    assert capture_key(open_model("demo:llama", weights=False)) == cache.stem
    assert _q_proj_role() == (True, "attn.q")
