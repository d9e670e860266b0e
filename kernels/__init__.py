"""surgeon.kernels: fused Triton adapter kernels and their plain-torch fallbacks.

Kernels know nothing of graphs or rules: each is a kernel, a validating launch
wrapper, a torch reference, a parity test and a benchmark.
"""

__all__: list[str] = []
