"""The words the language knows besides its keywords: predicate fields and module types.

Fields are properties of a module that ``where`` clauses compare; module types
are the class names ``type(...)`` accepts unquoted. A class of the user's own
(``LlamaRMSNorm``, ``MyBlock``) is written quoted, ``type("MyBlock")``, and is
then checked against the model, not against this list.
"""

from __future__ import annotations

__all__ = ["PREDICATE_FIELDS", "MODULE_TYPES", "MERGE_TYPES", "MERGE_OPTIONS", "ROLES"]

# field -> what it means (all are numbers; a module without the property never matches).
PREDICATE_FIELDS = {
    "layer": "index of the first numbered segment of the module path (3 in model.layers.3.mlp)",
    "depth": "number of segments in the module path (model.layers.3.mlp has depth 4)",
    "in_features": "input width of a linear, Conv1D or convolution (in_channels), or an embedding's vocabulary size",
    "out_features": "output width of a linear, Conv1D or convolution (out_channels), or an embedding's dimension",
    "params": "number of parameters of the module, its children's included",
}

# role(...): what a site does, read from the graph's dataflow (surgeon/capture/roles.py says how each is found).
ROLES = {
    "attn.q": "the query projection of a self-attention",
    "attn.k": "the key projection of a self-attention",
    "attn.v": "the value projection of a self-attention",
    "attn.qkv": "one projection feeding query, key and value (GPT-2's c_attn, GPT-NeoX's query_key_value)",
    "attn.kv": "one projection feeding a self-attention's key and value",
    "attn.out": "the projection of the attention's output",
    "cross_attn.q": "the query projection of a cross-attention (a decoder attending to an encoder)",
    "cross_attn.k": "the key projection of a cross-attention",
    "cross_attn.v": "the value projection of a cross-attention",
    "cross_attn.kv": "one projection feeding a cross-attention's key and value",
    "cross_attn.out": "the projection of a cross-attention's output",
    "mlp.gate": "the gated MLP's projection that goes through the activation",
    "mlp.up": "the MLP's other input projection (the only one of an ungated MLP)",
    "mlp.gate_up": "one projection holding a gated MLP's gate and up halves (Phi-3's gate_up_proj)",
    "mlp.down": "the MLP's output projection",
    "embed": "the embedding of the model's input (tokens, or image patches)",
    "embed.extra": "other embeddings (positions, token types, relative position biases)",
    "lm_head": "the output projection onto the token vocabulary",
    "head": "other output projections outside the numbered layers, after the last attention (classifiers, poolers)",
    "norm": "a normalization module (LayerNorm, RMSNorm): for train rules",
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

# merge "NAME" = TYPE(...): the combination types and the options each takes (surgeon/compiled/merge_math.py does
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
