"""Saved programs (.pt2) from strangers: surgeon's loaders run no code from the file and answer every bad
file with a SurgeryError naming it. Each hostile archive is a real exported program with one member changed."""

import contextlib
import io
import json
import zipfile

import pytest
import torch

import surgeon
from surgeon.checkpoints.program import load_program
from surgeon.grammar import SurgeryError
from surgeon.checkpoints.hot_swap import swap_program_adapter

from ._peft_reference import inputs
from .methods._checks import randomize_all

RULES = 'match "*.self_attn.{q,v}_proj" apply lora(r=8, alpha=16)'


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(compiled model, unfolded program, folded program, an adapter folder to swap in)."""
    root = tmp_path_factory.mktemp("programs")
    compiled = surgeon.compile("demo:llama", RULES)
    randomize_all(compiled, seed=0, std=0.2)
    compiled.eval()
    compiled.export(root / "unfolded.pt2", fold=False)
    compiled.export(root / "folded.pt2")
    other = surgeon.compile("demo:llama", 'match "*.self_attn.v_proj" apply lora(r=4, alpha=8)')
    randomize_all(other, seed=1, std=0.2)
    other.save_adapter(root / "adapter")
    return compiled, root / "unfolded.pt2", root / "folded.pt2", root / "adapter"


class Marker:
    """Unpickling this creates the file ``path``: proof that a loader ran the file's code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle(marker) -> bytes:
    buffer = io.BytesIO()
    torch.save(Marker(marker), buffer)
    return buffer.getvalue()


def rewrite(source, target, change, add=()):
    """Copy the archive ``source`` to ``target``, member by member through ``change(relative name, bytes)``
    (None drops the member); ``add``: (relative name, bytes) to append."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            data = change(info.filename.split("/", 1)[1], zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)
        for name, data in add:
            zout.writestr(name if name.startswith("/") else f"{root}/{name}", data)
    return target


def _edit_json(name, edit):
    def change(relative, data):
        if relative != name:
            return data
        value = json.loads(data)
        value = edit(value) or value
        return json.dumps(value).encode()

    return change


def _loaders(path, adapter):
    return (lambda: load_program(path), lambda: swap_program_adapter(path, adapter))


def _refused(path, adapter, match):
    for load in _loaders(path, adapter):
        with pytest.raises(SurgeryError, match=match) as caught:
            load()
        assert str(path) in str(caught.value) and "hint:" in str(caught.value)


def _pickled_weight(program, target, marker):
    """The first weight marked use_pickle with a pickle in its place (torch: torch.load(weights_only=False))."""
    config = {}

    def change(relative, data):
        if relative == "data/weights/model_weights_config.json":
            config.update(json.loads(data))
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            config["victim"] = first["path_name"]
            return json.dumps({"config": config["config"]}).encode()
        return data

    rewrite(program, target.with_suffix(".tmp.pt2"), change)
    victim = "data/weights/" + config["victim"]
    return rewrite(target.with_suffix(".tmp.pt2"), target, lambda r, d: _pickle(marker) if r == victim else d)


def _pickled_sample_inputs(program, target, marker):
    return rewrite(program, target, lambda r, d: _pickle(marker) if r == "data/sample_inputs/model.pt" else d)


def _eval_in_shape(program, target, marker):
    """A shape expression that sympy.sympify would eval."""
    code = f"__import__('builtins').open('{marker}', 'w') and Symbol('s38', integer=True)".encode()
    return rewrite(program, target, lambda r, d: d.replace(b"Symbol('s38', positive=True, integer=True)", code, 1)
                   if r == "models/model.json" else d)


@pytest.mark.parametrize("make", [_pickled_weight, _pickled_sample_inputs, _eval_in_shape])
def test_code_in_a_program_never_runs_and_is_refused(saved, tmp_path, make):
    compiled, unfolded, _, adapter = saved
    marker = tmp_path / "ran"
    hostile = make(unfolded, tmp_path / "hostile.pt2", marker)
    _refused(hostile, adapter, r"pickle|plain tensor data|not plain sympy")
    assert not marker.exists()
    # the reference: torch's own loader runs it (so the file above is truly hostile)
    with contextlib.suppress(Exception):  # torch may or may not fail afterwards; the code has run
        torch.export.load(str(hostile))
    assert marker.exists()


def test_pickled_constants_and_objects_are_refused(saved, tmp_path):
    _, unfolded, _, adapter = saved
    for name in ("tensor_constant_0", "custom_obj_0", "opaque_obj_0"):
        entry = {"path_name": name, "is_param": False, "use_pickle": True, "tensor_meta": None}
        hostile = rewrite(unfolded, tmp_path / f"{name}.pt2",
                          _edit_json("data/constants/model_constants_config.json", lambda c: c["config"].update(c0=entry)),
                          add=[(f"data/constants/{name}", _pickle(tmp_path / "ran"))])
        _refused(hostile, adapter, "stored as a pickle or an object")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("member", ["data/weights/model.pt", "data/aotinductor/model/model.so", "models/other.json",
                                    "serialized_state_dict.pt"])
def test_members_torch_would_unpickle_or_run_are_refused(saved, tmp_path, member):
    _, unfolded, _, adapter = saved
    hostile = rewrite(unfolded, tmp_path / "extra.pt2", lambda r, d: d, add=[(member, _pickle(tmp_path / "ran"))])
    _refused(hostile, adapter, f"the member '{member}' is not part of a saved program")


def test_guards_and_targets_that_would_be_code_are_refused(saved, tmp_path):
    _, unfolded, _, adapter = saved
    guard = rewrite(unfolded, tmp_path / "guard.pt2", _edit_json(
        "models/model.json", lambda m: m["guards_code"].append("__import__('os').getcwd() == 0")))
    _refused(guard, adapter, "more than arithmetic on input shapes")

    def call_system(model):
        node = next(n for n in model["graph_module"]["graph"]["nodes"] if n["target"].startswith("torch.ops.aten"))
        node["target"] = "torch.os.system"

    target = rewrite(unfolded, tmp_path / "target.pt2", _edit_json("models/model.json", call_system))
    _refused(target, adapter, "calls 'torch.os.system', which is not a registered operator")


@pytest.mark.parametrize("kind", ["random", "truncated", "empty", "missing", "folder", "escape", "twice", "deflated", "deep"])
def test_a_broken_file_is_a_clear_error(saved, tmp_path, kind):
    _, unfolded, _, adapter = saved
    path = tmp_path / "bad.pt2"
    data = unfolded.read_bytes()
    match = {"random": "not a zip", "truncated": "not a zip", "empty": "not a zip", "missing": "no such file",
             "folder": "is a folder", "escape": "not a plain relative name", "twice": "appears twice",
             "deflated": "compressed or encrypted", "deep": "is not valid JSON"}[kind]
    if kind == "random":
        path.write_bytes(bytes(range(256)) * 64)
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "folder":
        path.mkdir()
    elif kind == "escape":
        rewrite(unfolded, path, lambda r, d: d, add=[("../../evil", b"x")])
    elif kind == "twice":
        rewrite(unfolded, path, lambda r, d: d, add=[("extra/surgeon.json", b"{}")])
    elif kind == "deep":  # nested past the JSON decoder's depth bound
        deep = ("[" * 100_000 + "]" * 100_000).encode()
        rewrite(unfolded, path, lambda r, d: deep if r == "models/model.json" else d)
    elif kind == "deflated":
        with zipfile.ZipFile(unfolded) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                zout.writestr(info.filename, zin.read(info))
    _refused(path, adapter, match)
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("text", ["not json", "[]", '{"default": []}', '{"default": {"p": [8, 2.0, 64]}}',
                                  '{"default": {"p": ["8", 2.0, 64, 64]}}', '{"default": {"p": [8, NaN, 64, 64]}}',
                                  "[" * 100_000 + "]" * 100_000])
def test_surgeon_json_that_export_did_not_write_is_a_clear_error(saved, tmp_path, text):
    _, unfolded, _, adapter = saved
    path = rewrite(unfolded, tmp_path / "meta.pt2", lambda r, d: text.encode() if r == "extra/surgeon.json" else d)
    with pytest.raises(SurgeryError, match=r"extra/surgeon.json( is not|: .default. site)"):
        swap_program_adapter(path, adapter)


def test_a_bad_output_path_is_refused_before_any_work_and_a_missing_folder_is_made(saved, tmp_path):
    compiled, unfolded, _, adapter = saved
    with pytest.raises(SurgeryError, match="it is a folder"):
        swap_program_adapter(unfolded, adapter, out=tmp_path)
    out = tmp_path / "new" / "folder" / "swapped.pt2"
    program = swap_program_adapter(unfolded, adapter, out=out)
    fresh = surgeon.compile("demo:llama", adapter=adapter).eval()
    kwargs = dict(inputs(), use_cache=False)
    with torch.no_grad():
        expected = fresh(**inputs()).logits
        torch.testing.assert_close(program.module()(**kwargs).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_program(out).module()(**kwargs).logits, expected, rtol=1e-5, atol=1e-5)


def _broken_adapter(source, target, *, drop=None, config=None):
    from safetensors.torch import load_file, save_file

    target.mkdir()
    tensors = load_file(source / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if drop is None or drop not in k}, target / "adapter_model.safetensors")
    settings = json.loads((source / "adapter_config.json").read_text())
    settings.update(config or {})
    (target / "adapter_config.json").write_text(json.dumps(settings))
    return target


def test_a_bad_adapter_is_a_clear_error_and_changes_nothing(saved, tmp_path):
    compiled, unfolded, _, adapter = saved
    before = {k: v.clone() for k, v in compiled.state_dict().items() if "lora" in k}
    half = _broken_adapter(adapter, tmp_path / "half", drop="lora_B")
    typed = _broken_adapter(adapter, tmp_path / "typed", config={"r": "8"})
    for folder, match in ((half, r"lora_B.weight is missing"), (typed, r"adapter_config.json: LORA's r must be")):
        with pytest.raises(SurgeryError, match=match):
            swap_program_adapter(unfolded, folder)
        with pytest.raises(SurgeryError, match=match):
            compiled.swap_adapter("default", folder)
    # rank 4 fits q_proj; a site listed later with a too-large rank fails the whole swap before any write
    mixed = surgeon.compile("demo:llama", 'match "*.self_attn.q_proj" apply lora(r=4)\n'
                                          'match "model.layers.1.self_attn.v_proj" apply lora(r=16)')
    mixed.save_adapter(tmp_path / "mixed")
    with pytest.raises(SurgeryError, match="rank 16"):
        compiled.swap_adapter("default", tmp_path / "mixed")
    after = {k: v for k, v in compiled.state_dict().items() if "lora" in k}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("fold", [True, False])
def test_surgeons_own_programs_still_load_and_compute_the_model(saved, fold):
    compiled, unfolded, folded, _ = saved
    program = load_program(folded if fold else unfolded).module()
    for batch, seq in ((1, 3), (3, 11)):
        with torch.no_grad():
            torch.testing.assert_close(program(**inputs(batch, seq), use_cache=False).logits,
                                       compiled(**inputs(batch, seq)).logits, rtol=1e-4, atol=1e-5)


def test_a_catastrophic_rank_pattern_key_is_an_error_not_a_hang(saved, tmp_path):
    # a backtracking engine tries every split of a run of a's: 2**60 of them
    _, unfolded, _, adapter = saved
    hostile = _broken_adapter(adapter, tmp_path / "hostile", config={"rank_pattern": {"(a|aa)+": 8}})
    from surgeon.checkpoints.hot_swap import peft_site_scale

    config = json.loads((hostile / "adapter_config.json").read_text())
    with pytest.raises(SurgeryError, match="took longer than"):
        peft_site_scale(config, "a" * 60 + "!")
    assert peft_site_scale(config, "model.layers.0.self_attn.q_proj") == config["lora_alpha"] / config["r"]
