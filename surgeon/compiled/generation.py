"""``Compiled.generate``: decoding on the adapted graphs of a static-cache decoder step.

The step (surgeon/capture/decoding.py) is exported once per batch size and
cache length (rounded up to a multiple of ``LENGTH_STEP``, so that prompts of
nearby lengths share it) and adapted by the same pass pipeline as every other
graph: the adapters' branches read their gates (``set_active``, weights and
hot swaps change tensors only, never the graph), or, with ``adapter_ids``, each
row's own adapter through prefill and every decode step. After
``fold(inplace=True)`` the step runs the merged weights unadapted. The token
loop is the runtime's (surgeon/runtime/decoding.py), as a deployed program
runs it.
"""

from __future__ import annotations

import torch

from surgeon.capture.decoding import DecoderStep, export_decoder, is_decoder_lm
from surgeon.diagnostics import SurgeryError
from surgeon.passes.insert import Gates
from surgeon.runtime.decoding import decode

from surgeon.compiled.adapted_graph import adapted_graph, unadapted_graph
from surgeon.compiled.gates import checked_ids
from surgeon.compiled.lowering import Lowering

__all__ = ["generate", "decoder_graph", "LENGTH_STEP"]

LENGTH_STEP = 64  # cache lengths are rounded up to a multiple of this: one graph serves nearby prompt lengths
STEP = "surgeon_step"  # graph_module.meta key: the DecoderStep whose cache buffers the graph reads


def _cache_length(config, needed: int) -> int:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    rounded = -(-needed // LENGTH_STEP) * LENGTH_STEP
    return min(rounded, limit) if limit else rounded


def decoder_graph(compiled, batch: int, length: int, routed: bool, lowering=None):
    """The adapted (or, folded in place, plain) graph of ``compiled``'s decoder step for this cache (made once)."""
    lowering = compiled.lowering() if lowering is None else lowering
    key = ("generate", batch, length, routed, lowering, compiled.folded_in_place)
    graphs = compiled._graphs
    if key not in graphs:
        step = DecoderStep(compiled.base_model, batch, length)
        program = export_decoder(step, compiled.name)
        if compiled.folded_in_place:
            gm = unadapted_graph(program, step, compiled)
        else:
            gm = adapted_graph(program, step, compiled, insertions=compiled.insertions(),
                               gates=Gates(compiled.adapter_names, compiled.adapter_gates, routed),
                               trained=tuple(compiled.plan.trained), copies=compiled.trained, training=False,
                               lowering=lowering, user_passes=compiled.user_passes, lint=compiled.lint)
        gm.meta[STEP] = step
        graphs[key] = gm
    return graphs[key]


def _checked_prompt(compiled, input_ids, attention_mask, max_new_tokens: int):
    if not is_decoder_lm(compiled.base_model):
        raise SurgeryError(f"{compiled.name} is not a decoder-only language model: it cannot generate",
                           hint="generate() runs transformers' *ForCausalLM / *LMHeadModel models")
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.shape[1] == 0:
        raise SurgeryError(f"input_ids must be [batch, tokens] integers, not {tuple(input_ids.shape)} {input_ids.dtype}")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != input_ids.shape:
            raise SurgeryError(f"attention_mask is {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}",
                               hint="one mask entry per token (0 on the left padding)")
        if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
            raise SurgeryError("attention_mask has padding after a real token: generation needs left padding",
                               hint="pad on the left (tokenizer.padding_side = 'left'), as for transformers' generate")
    if type(max_new_tokens) is not int or max_new_tokens < 1:
        raise SurgeryError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
    config = compiled.base_model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    needed = input_ids.shape[1] + max_new_tokens
    if limit and needed > limit:
        raise SurgeryError(f"a prompt of {input_ids.shape[1]} tokens and {max_new_tokens} new ones need {needed} positions; "
                           f"{compiled.name} has {limit}", hint="shorten the prompt or ask for fewer new tokens")
    return input_ids, attention_mask


def generate(compiled, input_ids, attention_mask=None, *, folded=None, **options) -> torch.Tensor:
    """Prompt plus new tokens [B, T + n], as transformers' ``generate`` returns them (see Compiled.generate);
    ``folded``: a Folded of ``compiled``, whose merged weights generate instead (its fold pass on the step's graph)."""
    return _generate(compiled, input_ids, attention_mask, folded=folded, **options)


def _folded_graph(folded, batch: int, length: int):
    compiled = folded._compiled
    key = ("generate", batch, length)
    if key not in folded._graphs:  # folding reads the plain branches
        unfolded = decoder_graph(compiled, batch, length, routed=False, lowering=Lowering.NONE)
        gm = folded.fold_graph(unfolded)
        gm.meta[STEP] = unfolded.meta[STEP]
        folded._graphs[key] = gm
    return folded._graphs[key]


def _generate(compiled, input_ids, attention_mask=None, *, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
             pad_token_id: int | None = None, adapter_ids=None, generator: torch.Generator | None = None,
             on_tokens=None, folded=None) -> torch.Tensor:
    input_ids, attention_mask = _checked_prompt(compiled, input_ids, attention_mask, max_new_tokens)
    if do_sample and not (temperature > 0):
        raise SurgeryError(f"temperature must be positive, not {temperature!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise SurgeryError(f"top_p must be in (0, 1], not {top_p!r}")
    device = compiled.adapter_gates.device
    input_ids = input_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    routing = {}
    if adapter_ids is not None:
        routing["adapter_ids"] = checked_ids(adapter_ids, compiled.adapter_names, device, (input_ids,))
    generation = getattr(compiled.base_model, "generation_config", None)
    if eos_token_id is None and generation is not None:
        eos_token_id = generation.eos_token_id
    if pad_token_id is None and generation is not None:
        pad_token_id = generation.pad_token_id
    length = _cache_length(compiled.base_model.config, input_ids.shape[1] + max_new_tokens)
    if folded is not None and routing:
        raise SurgeryError("a folded model has no adapters to route: adapter_ids needs the compiled model",
                           hint="compiled.generate(..., adapter_ids=...), or fold(adapters={...}) the mix you want")
    gm = (decoder_graph(compiled, input_ids.shape[0], length, bool(routing)) if folded is None or folded.identity
          else _folded_graph(folded, input_ids.shape[0], length))
    gm.meta[STEP].reset()

    def step(ids, mask, positions, cache_position):
        return gm(input_ids=ids, attention_mask=mask, position_ids=positions, cache_position=cache_position, **routing)

    with torch.no_grad():
        return decode(step, input_ids, attention_mask, length=length, max_new_tokens=max_new_tokens, do_sample=do_sample,
                      temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                      pad_token_id=pad_token_id, generator=generator, on_tokens=on_tokens)
