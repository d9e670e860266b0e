"""Artifacts: PEFT-format adapters, merged Hugging Face checkpoints, .pt2 programs; all written atomically."""
