"""(IA)^3 (Liu et al., 2022): learned vectors that rescale activations. See config.py for the math."""

from surgeon.methods.ia3.config import Ia3Config

__all__ = ["Ia3Config"]
