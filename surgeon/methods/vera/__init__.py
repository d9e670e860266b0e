"""VeRA (Kopiczko et al., 2024): shared frozen random projections, trained scaling vectors. See config.py."""

from surgeon.methods.vera.config import VeraConfig

__all__ = ["VeraConfig"]
