"""LoKr (Edalati et al., 2022; LyCORIS): a low-rank Kronecker product update. See config.py for the math."""

from surgeon.methods.lokr.config import LokrConfig, factorization, lokr_shapes

__all__ = ["LokrConfig", "factorization", "lokr_shapes"]
