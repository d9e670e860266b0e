"""The words the language knows besides its keywords: predicate fields and module types.

Fields are properties of a module that ``where`` clauses compare; module types
are the class names ``type(...)`` accepts unquoted. A class of the user's own
(``LlamaRMSNorm``, ``MyBlock``) is written quoted, ``type("MyBlock")``, and is
then checked against the model, not against this list.
"""

from __future__ import annotations

__all__ = ["PREDICATE_FIELDS", "MODULE_TYPES", "MERGE_TYPES", "MERGE_OPTIONS"]

# field -> what it means (all are numbers; a module without the property never matches).
PREDICATE_FIELDS = {
    "layer": "index of the first numbered segment of the module path (3 in model.layers.3.mlp)",
    "depth": "number of segments in the module path (model.layers.3.mlp has depth 4)",
    "in_features": "input width of a linear, Conv1D or convolution (in_channels), or an embedding's vocabulary size",
    "out_features": "output width of a linear, Conv1D or convolution (out_channels), or an embedding's dimension",
    "params": "number of parameters of the module, its children's included",
}

# Class names that type(...) accepts unquoted, by the library that defines them.
MODULE_TYPES = {
    "torch.nn": (
        "Linear", "Bilinear", "Identity",
        "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
        "Embedding", "EmbeddingBag",
        "LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
        "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
        "MultiheadAttention", "Transformer", "TransformerEncoderLayer", "TransformerDecoderLayer",
        "LSTM", "GRU", "RNN",
        "Dropout", "ReLU", "GELU", "SiLU", "Tanh", "Sigmoid", "Softmax",
        "Sequential", "ModuleList", "ModuleDict",
    ),
    "transformers.pytorch_utils": ("Conv1D",),
    "bitsandbytes.nn": ("Linear4bit", "Linear8bitLt"),
}

# merge "NAME" = TYPE(...): the combination types and the options each takes (surgeon/merging.py does
# the math; a test keeps the two in step, so that checking a file never has to import torch).
MERGE_OPTIONS = {
    "density": "the fraction of entries kept, 0 < density <= 1",
    "majority_sign": '"total" or "frequency": how ties elects the sign',
    "svd_rank": "the rank of an svd merge (an integer > 0; default the largest rank)",
    "svd_clamp": "a quantile in (0, 1] the svd factors are clamped to",
}
_PRUNED = ("density",)
MERGE_TYPES = {
    "linear": (),
    "cat": (),
    "svd": ("svd_rank", "svd_clamp"),
    "ties": ("density", "majority_sign"),
    "ties_svd": ("density", "majority_sign", "svd_rank", "svd_clamp"),
    "dare_linear": _PRUNED,
    "dare_linear_svd": _PRUNED + ("svd_rank", "svd_clamp"),
    "dare_ties": ("density", "majority_sign"),
    "dare_ties_svd": ("density", "majority_sign", "svd_rank", "svd_clamp"),
    "magnitude_prune": _PRUNED,
    "magnitude_prune_svd": _PRUNED + ("svd_rank", "svd_clamp"),
}
