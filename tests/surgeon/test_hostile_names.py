"""Issue 19, names: one rule for adapter names (grammar/names.py) wherever a name enters, checked before anything changes."""

import shutil

import pytest
import torch

import surgeon
from surgeon.grammar import SurgeryError, parse
from surgeon.grammar.names import name_problem

RULES = 'match "*.self_attn.{q,v}_proj" apply lora(r=8, alpha=16)\n'
OUTSIDE = ["/elsewhere/x/r", "../../x", "..", ".", "a/b", "a\\b", "", "q\" {", "x" * 101, "a\nb", "v1.0", "a."]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    compiled = surgeon.compile("demo:llama", RULES)
    with torch.no_grad():
        for _, _, module in compiled.sites():
            module.lora_B.normal_()
    folder = tmp_path_factory.mktemp("adapter") / "A"
    compiled.save_adapter(folder)
    return compiled, folder


@pytest.mark.parametrize("name", OUTSIDE)
def test_the_name_rule_refuses_every_name_that_is_not_one_path_component(name):
    assert name_problem(name) is not None


@pytest.mark.parametrize("name", ["default", "math", "v1-2_final", "_x", "a" * 100, "checkpoint-500"])
def test_the_name_rule_takes_folder_safe_names(name):
    assert name_problem(name) is None


def test_a_merge_statement_with_a_path_for_a_name_fails_the_check_located():
    with pytest.raises(SurgeryError) as caught:
        parse(RULES + 'merge "/elsewhere/x/r" = linear(default=1.0)\n', path="m.surgery")
    assert "m.surgery:2:1" in str(caught.value) and "not valid" in str(caught.value)


@pytest.mark.parametrize("name", ["/elsewhere/x/b", "../../x", "v1.0"])
def test_api_names_are_checked_before_anything_changes(saved, tmp_path, name):
    compiled, folder = saved
    before = compiled.adapter_names
    with pytest.raises(SurgeryError, match="not valid"):
        compiled.merge(name, {"default": 1.0})
    with pytest.raises(SurgeryError, match="not valid"):
        compiled.load_adapter(folder, name=name)
    assert compiled.adapter_names == before
    # nothing is broken for later loads, merges and saves
    assert compiled.load_adapter(folder, name="again") == "again"
    compiled.merge("combined", {"default": 0.5, "again": 0.5}, replace=True)
    compiled.save_adapter(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["again", "combined"]
    assert not (tmp_path / "elsewhere").exists()


def test_save_adapter_of_an_unknown_adapter_is_an_error_not_a_key_error(saved, tmp_path):
    compiled, _ = saved
    with pytest.raises(SurgeryError, match="no adapter named 'nope'"):
        compiled.save_adapter(tmp_path / "out", adapters=["nope"])
    assert not (tmp_path / "out").exists()


def test_a_subfolder_name_that_is_not_an_adapter_name_is_refused(saved, tmp_path):
    compiled, folder = saved
    root = tmp_path / "several"
    shutil.copytree(folder, root)
    hostile = root / 'q" {\n match "*k_proj" apply lora(r=2)\n}\nadapter "zz'
    shutil.copytree(folder, hostile)
    with pytest.raises(SurgeryError, match="adapter name .* is not valid"):
        compiled.load_adapter(root)
    with pytest.raises(SurgeryError, match="adapter name .* is not valid"):
        surgeon.compile("demo:llama", adapter=root)


def test_saving_every_adapter_over_a_folder_with_other_adapters_is_refused_not_mixed(saved, tmp_path):
    _, folder = saved
    compiled = surgeon.compile("demo:llama", RULES)
    compiled.load_adapter(folder, name="math")
    compiled.save_adapter(tmp_path / "A")
    fresh = surgeon.compile("demo:llama", RULES)
    with pytest.raises(SurgeryError, match=r"holds adapters this model does not have \(math\)"):
        fresh.save_adapter(tmp_path / "A")
    assert surgeon.compile("demo:llama", adapter=tmp_path / "A").adapter_names == ("default", "math")  # untouched
    fresh.save_adapter(tmp_path / "A", adapters=["default"])  # named adapters: the others stay, as asked
    only_math = surgeon.compile("demo:llama", 'adapter "math" { match "*.q_proj" apply lora(r=2) }')
    with pytest.raises(SurgeryError, match=r"default \(at its top\)"):
        only_math.save_adapter(tmp_path / "A")
