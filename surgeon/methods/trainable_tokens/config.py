"""Trainable tokens: only chosen rows of an embedding train, as PEFT's TRAINABLE_TOKENS computes it.

For an embedding E (num_embeddings x dim) and token indices i_1..i_n, the
method holds a trainable table T (n x dim), starting at E[i] so that the
adapted model starts equal to the base, and uses::

    E' = E with row i_k replaced by T_k        (index_copy(E, 0, idx, T))
    y' = embedding(E', ids)

Every other reader of the same tensor sees E' too: a tied output layer
(GPT-2's ``lm_head``) computes ``x E'^T``, as PEFT keeps it tied. Folding
writes T into the rows of E (into the shared tensor when tied).
PEFT saves T as ``trainable_tokens_delta`` although it holds the rows
themselves, not a difference.

The folder: this config (torch-free), site.py (the SiteAdapter), peft.py (PEFT's TrainableTokensConfig
both ways).
"""

from __future__ import annotations

from dataclasses import dataclass

from surgeon.grammar.signature import param

from surgeon.methods._registry import register_method

__all__ = ["TrainableTokensConfig"]


@register_method("trainable_tokens", sites=("embedding",), adapter=".site:TrainableTokensWeights",
                 peft=".peft:TrainableTokensPeft")
@dataclass(frozen=True)
class TrainableTokensConfig:
    """Train only the listed rows of an embedding (new or re-trained tokens)."""

    indices: list[int] = param(ge=0, doc="the token ids whose embedding rows train")

    def __post_init__(self):
        if not self.indices:
            raise ValueError("indices must list at least one token id")
        repeated = sorted({i for i in self.indices if self.indices.count(i) > 1})
        if repeated:
            raise ValueError(f"token ids are listed twice: {', '.join(map(str, repeated))}")

    def trainable_params(self, in_features: int, out_features: int, weight_shape: tuple = ()) -> int:
        """One row of the embedding's width per listed token."""
        return len(self.indices) * out_features
