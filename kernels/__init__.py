"""surgeon.kernels: fused Triton adapter kernels and their plain-torch fallbacks, and the quantized ops.

Kernels know nothing of graphs or rules: they take tensors (and, for
bitsandbytes, layers). Each op is a kernel, a validating launch wrapper, a
torch reference, a parity test (tests/kernels/) and a benchmark (bench/).
Importing this package never imports Triton (``triton_mode()`` looks for it);
the kernels are defined on their first launch.

- ``lora_linear.py``: ``x W^T + b + s (x A^T) B^T`` (shrink, then the base GEMM
  with the expand in its epilogue), registered as ``torch.ops.surgeon.lora_linear``;
  its two kernels are ``_fused.py``'s, which the next two launch too.
- ``routed_lora.py``: each row with its own adapter, ``torch.ops.surgeon.routed_lora_linear``.
- ``dora.py``: DoRA's factored row norm and ``torch.ops.surgeon.dora_linear``.
- ``quantized.py``: bitsandbytes' 4-bit and 8-bit matmuls as ``torch.ops.surgeon.linear_4bit``
  / ``linear_8bit``, and a quantized layer's weight read and written.
"""

from surgeon.kernels._triton import KERNELS, TritonMissing, check_kernels, triton_mode

__all__ = ["triton_mode", "TritonMissing", "KERNELS", "check_kernels"]
