"""surgeon's command line: exit codes, human and JSON output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from surgeon.cli import main
from surgeon.methods import method_names

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(str(p) for p in (ROOT / "examples" / "rules").glob("*.surgery"))
BAD = ROOT / "tests" / "grammar" / "golden" / "bad"


def test_check_passes_on_every_example(capsys):
    assert main(["check", *EXAMPLES]) == 0
    out = capsys.readouterr().out
    assert all(f"{path}: ok (" in out for path in EXAMPLES)
    assert "llama-lora.surgery: ok (6 rules; adapters: default, math)" in out


def test_check_fails_with_the_diagnostics_on_stderr(capsys):
    assert main(["check", EXAMPLES[0], str(BAD / "unknown-method.surgery")]) == 1
    captured = capsys.readouterr()
    assert "unknown-method.surgery:2:24: error: unknown method 'lroa'" in captured.err
    assert "hint: did you mean 'lora'?" in captured.err
    assert "unknown-method.surgery: 1 error" in captured.err
    assert f"{EXAMPLES[0]}: ok" in captured.out


def test_check_json_lists_every_diagnostic_with_the_stable_schema(capsys):
    assert main(["check", "--format", "json", str(BAD / "many-errors.surgery")]) == 1
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 7
    assert set(records[0]) == {"file", "line", "column", "end_column", "severity", "code", "message", "hint"}
    assert records[0] == {
        "file": str(BAD / "many-errors.surgery"),
        "line": 1,
        "column": 24,
        "end_column": 28,
        "severity": "error",
        "code": "unknown-method",
        "message": "unknown method 'lroa'",
        "hint": f"did you mean 'lora'? (methods: {', '.join(method_names())})",
    }


def test_check_json_is_an_empty_list_for_valid_files(capsys):
    assert main(["check", "--format", "json", *EXAMPLES]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_check_missing_file(capsys, tmp_path):
    assert main(["check", str(tmp_path / "nope.surgery")]) == 1
    assert "no such rules file" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["check"])
    assert caught.value.code == 2
    with pytest.raises(SystemExit) as caught:
        main(["frobnicate"])
    assert caught.value.code == 2


def test_console_script_runs_without_importing_torch():
    # The installed `surgeon` script; `check` must never import torch (it stays instant).
    code = (
        "import sys; from surgeon.cli import main; rc = main(['check', *sys.argv[1:]]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code, *EXAMPLES], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    script = Path(sys.executable).with_name("surgeon")
    done = subprocess.run([str(script), "check", str(BAD / "bad-choice.surgery")], capture_output=True, text=True)
    assert done.returncode == 1
    assert "error: argument 'init' of lora must be one of" in done.stderr
    assert "Traceback" not in done.stderr


def test_every_command_has_a_function_in_a_command_module():
    """The dispatcher loads each command's module by name (so that `check` stays torch-free): the names hold."""
    import argparse
    import importlib

    from surgeon.cli import COMMANDS, _parser

    subcommands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subcommands.choices) == set(COMMANDS)
    for module, function in COMMANDS.values():
        assert module.startswith("surgeon.cli_") and callable(getattr(importlib.import_module(module), function))


def test_inspect_json_lists_modules_with_sites(capsys):
    assert main(["inspect", "demo:gpt2", "--match", "*.h.0.attn.*", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    paths = [m["path"] for m in data["modules"]]
    assert paths == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.attn.attn_dropout",
        "transformer.h.0.attn.resid_dropout",
    ]
    c_attn = data["modules"][0]
    assert (c_attn["type"], c_attn["site"], c_attn["weight_shape"], c_attn["layer"]) == ("Conv1D", "hf_conv1d", [64, 192], 0)
    assert data["ties"] == [["transformer.wte.weight", "lm_head.weight"]]


def test_inspect_human_table(capsys):
    assert main(["inspect", "demo:bert", "--match", "classifier"]) == 0
    out = capsys.readouterr().out
    assert "classifier" in out and "Linear" in out and "64x2" not in out and "2x64" in out
    assert "1 of 86 modules shown; 29 adaptable sites (embedding: 3, linear: 26)" in out


def test_plan_on_the_demo_with_the_example_rules(capsys):
    assert main(["plan", "demo:llama", str(ROOT / "examples/rules/llama-lora.surgery")]) == 0
    out = capsys.readouterr().out
    assert "plan: demo:llama (LlamaForCausalLM)" in out
    assert "model.layers.1.mlp.down_proj" in out and "17,408" in out
    assert "trainable parameters" in out and "152,064" in out
    assert "per-layer coverage" in out


def test_plan_json(capsys):
    assert main(["plan", "demo:bert", str(ROOT / "examples/rules/bert-classifier.surgery"), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["adapters"] == ["default", "upper"]
    assert data["totals"]["trained_modules"] == 1
    assert {s["adapter"] for s in data["sites"]} == {"default", "upper"}


def test_plan_errors_exit_1_before_capture_for_bad_rules(capsys):
    assert main(["plan", "demo:llama", str(BAD / "unknown-method.surgery")]) == 1
    assert "unknown method 'lroa'" in capsys.readouterr().err


def test_plan_errors_for_rules_that_do_not_fit_the_model(capsys, tmp_path):
    rules = tmp_path / "gpt.surgery"
    rules.write_text('match "*.q_proj" apply lora(r=8)\n')
    assert main(["plan", "demo:gpt2", str(rules), "--format", "json"]) == 1
    (record,) = json.loads(capsys.readouterr().out)
    assert (record["code"], record["line"], record["column"]) == ("no-match", 1, 1)
    assert record["hint"] == (
        "this model has no 'q_proj'; it has c_attn (e.g. transformer.h.0.attn.c_attn); "
        "role(attn.qkv) selects them by what they do, on any architecture"
    )


def test_inspect_bad_model(capsys):
    assert main(["inspect", "demo:nope"]) == 1
    assert "error: unknown demo model 'nope'" in capsys.readouterr().err


def test_compile_writes_every_artifact(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", "demo:gpt2", str(ROOT / "examples/rules/gpt2-lora.surgery"), "-o", str(out), "--fold", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["sites"] == 12
    names = sorted(p.name for p in out.iterdir())
    assert names == [".surgeon-output.json", "adapter", "merged", "merged.pt2", "plan.json", "program.pt2"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "plan.json").read_text())["totals"]["sites"] == 12
    assert main(["rules-from-peft", str(out / "adapter")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# from a PEFT adapter_config.json (base model: demo:gpt2)\nmatch ")


def test_compile_refuses_an_output_path_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep")
    assert main(["compile", "demo:llama", str(ROOT / "examples/rules/llama-lora.surgery"), "-o", str(target)]) == 1
    assert "it is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep"


def test_swapped_model_and_rules_get_a_hint_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", str(ROOT / "examples/rules/llama-lora.surgery"), "demo:llama", "-o", str(out)]) == 2
    assert "hint: the model comes first" in capsys.readouterr().err
    assert not out.exists()


def test_peft_style_bare_names_get_the_whole_path_hint(tmp_path, capsys):
    rules = tmp_path / "bare.surgery"
    rules.write_text('match "q_proj", "v_proj" apply lora(r=8)\n')
    assert main(["plan", "demo:llama", str(rules)]) == 1
    err = capsys.readouterr().err
    assert 'not a suffix as PEFT\'s target_modules does: write "*.q_proj"' in err
