"""LoRA (Hu et al., 2021): a low-rank update added to a frozen map. See config.py for the math."""

from surgeon.methods.lora.config import LoraConfig, lora_scale

__all__ = ["LoraConfig", "lora_scale"]
