"""The fine-tuning example runs end to end (few steps here; the example's default is 300)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_finetune_example_trains_saves_folds_reloads_and_generates(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "finetune_tiny.py"), "--steps", "30", "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    losses = [float(line.split("loss")[1].split()[0]) for line in lines if line.startswith("step")]
    assert losses[-1] < losses[0] - 2  # from ~6.9 (uniform over 1000 tokens) down
    assert any(line.startswith("generated :") for line in lines)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()
