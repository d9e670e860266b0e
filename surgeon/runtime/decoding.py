"""The token loop of generation over a step function with a static cache, and its sampling.

A step is ``step(input_ids, attention_mask, position_ids, cache_position) ->
logits`` of each row's last new token (surgeon/capture/decoding.py makes one;
a loaded program is one). Rows are left-padded: ``attention_mask`` is 0 on the
padding, and each row's positions count only its real tokens
(``cumsum(mask) - 1``), as transformers' ``generate`` does, so a padded row
computes what it would alone.

Choosing the next token follows transformers' order of logits processors:
temperature, then top-k, then top-p (nucleus: the smallest set of most likely
tokens whose probability reaches ``top_p``, the most likely always kept);
greedy is the argmax. A row that has made ``eos_token_id`` makes
``pad_token_id`` from then on, and the loop stops when every row has.
"""

from __future__ import annotations

import torch

__all__ = ["decode", "next_tokens", "step_inputs"]


def step_inputs(attention_mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the cache-wide mask [B, length], the prompt's positions [B, T]) of a left-padded prompt mask [B, T]."""
    batch, tokens = attention_mask.shape
    mask = torch.zeros(batch, length, dtype=torch.long, device=attention_mask.device)
    mask[:, :tokens] = attention_mask
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return mask, positions


def next_tokens(logits: torch.Tensor, *, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row [B] from its logits [B, vocab] (greedy unless ``do_sample``)."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= (1 - top_p)
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def decode(step, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, length: int, max_new_tokens: int,
           do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           eos_token_id=None, pad_token_id: int | None = None, generator: torch.Generator | None = None,
           on_tokens=None) -> torch.Tensor:
    """The prompt and its new tokens [B, T + n] (n <= ``max_new_tokens``), made by ``step`` over a cache of ``length``.

    ``on_tokens(tokens [B])`` is called with each step's new tokens (streaming).
    """
    batch, prompt = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask, positions = step_inputs(attention_mask, length)
    eos = torch.as_tensor([] if eos_token_id is None else eos_token_id, device=input_ids.device).reshape(-1)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    out = [input_ids]
    logits = step(input_ids, mask, positions, torch.arange(prompt, device=input_ids.device))
    position = positions[:, -1:]
    written = prompt
    for made in range(max_new_tokens):
        tokens = next_tokens(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=generator)
        tokens = torch.where(done, torch.full_like(tokens, pad), tokens)
        out.append(tokens[:, None])
        if on_tokens is not None:
            on_tokens(tokens)
        if eos.numel():
            done = done | torch.isin(tokens, eos)
        if made + 1 == max_new_tokens or bool(done.all()):
            break
        mask[:, written] = 1
        position = position + 1
        logits = step(tokens[:, None], mask, position, torch.tensor([written], device=input_ids.device))
        written += 1
    return torch.cat(out, dim=1)
