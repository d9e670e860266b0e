"""The compiled runtime: a model whose adapters live in captured graphs (model.py: the module facade and its graph
cache), and what acts on it, each in a module of its own: building its parameters, adding and replacing adapters,
the gates, the kernel choice, the checked fold and the merged model, merging and hot-swapping low-rank adapters,
its files, eager hooks and FSDP2 (see model.py's docstring for the map)."""
