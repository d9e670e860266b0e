"""LoHa (Hyeon-Woo et al., 2022): a low-rank Hadamard product update. See config.py for the math."""

from surgeon.methods.loha.config import LohaConfig

__all__ = ["LohaConfig"]
