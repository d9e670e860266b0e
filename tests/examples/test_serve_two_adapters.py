"""The serving example trains two adapters, saves them, and answers a mixed batch in one forward."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serving_example_routes_a_mixed_batch(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "serve_two_adapters.py"), "--steps", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "every row equals its request run alone" in done.stdout
    assert (tmp_path / "adapters" / "up" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapters" / "down" / "adapter_config.json").is_file()
