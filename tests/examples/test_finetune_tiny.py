"""The fine-tuning example runs end to end (few steps here; the example's default is 300).

It runs in this process (as ``python examples/finetune_tiny.py`` would, by runpy), so
that it shares the session's warmed-up torch.export instead of paying a new interpreter's.
"""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_example(name: str, argv: list, monkeypatch, capsys) -> list:
    """Run examples/NAME as a script with ``argv``; its printed lines."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "examples" / name), *argv])
    runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")
    return capsys.readouterr().out.splitlines()


def test_finetune_example_trains_saves_folds_reloads_and_generates(tmp_path, monkeypatch, capsys):
    lines = run_example("finetune_tiny.py", ["--steps", "30", "--out", str(tmp_path / "run")], monkeypatch, capsys)
    losses = [float(line.split("loss")[1].split()[0]) for line in lines if line.startswith("step")]
    assert losses[-1] < losses[0] - 2  # from ~6.9 (uniform over 1000 tokens) down
    assert any(line.startswith("generated :") for line in lines)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()
