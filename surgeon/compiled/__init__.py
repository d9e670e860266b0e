"""The compiled runtime: a model whose adapters live in captured graphs, and what acts on it (adapter state,
folding, merging, eager hooks, distributed training)."""
