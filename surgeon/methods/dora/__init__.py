"""DoRA (Liu et al., 2024): LoRA with a learned magnitude per output row. See config.py for the math."""

from surgeon.methods.dora.config import DoraConfig

__all__ = ["DoraConfig"]
