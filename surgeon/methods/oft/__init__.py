"""OFT (Qiu et al., 2023): a block-diagonal rotation of a site's input. See config.py for the math."""

from surgeon.methods.oft.config import OftConfig, nearest_divisor

__all__ = ["OftConfig", "nearest_divisor"]
