"""Trainable tokens: only chosen rows of an embedding train (PEFT's TRAINABLE_TOKENS). See config.py."""

from surgeon.methods.trainable_tokens.config import TrainableTokensConfig

__all__ = ["TrainableTokensConfig"]
