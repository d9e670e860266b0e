"""What runs a decoder without the compiler: the token loop over one step function (torch only).

Nothing here imports transformers or the compiler's floors, so that a
deployment process needs torch alone.
"""

from surgeon.runtime.decoding import decode, next_tokens, step_inputs

__all__ = ["decode", "next_tokens", "step_inputs"]
