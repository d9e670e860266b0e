"""surgeon.passes: graph rewrites over captured models (insert, lower, fold, verify).

The pass contract (a function from a GraphModule to a result record) and the
pipeline arrive with the LoRA end-to-end work; this package holds them.
"""

__all__: list[str] = []
