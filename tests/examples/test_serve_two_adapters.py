"""The serving example trains two adapters, saves them, and answers a mixed batch in one forward."""

from .test_finetune_tiny import run_example


def test_serving_example_routes_a_mixed_batch(tmp_path, monkeypatch, capsys):
    lines = run_example("serve_two_adapters.py", ["--steps", "1", "--out", str(tmp_path)], monkeypatch, capsys)
    assert "every row equals its request run alone" in "\n".join(lines)
    assert (tmp_path / "adapters" / "up" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapters" / "down" / "adapter_config.json").is_file()
