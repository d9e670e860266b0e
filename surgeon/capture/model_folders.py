"""What a local model folder may hold, checked before and after transformers reads it.

A folder names files (its ``*.safetensors``, the shards ``model.safetensors.index.json`` lists) and a model
class (config.json's ``architectures``); surgeon reads only what lies inside the folder and only calls
transformers' model classes, and it refuses weights that do not fill the model exactly, because
transformers would initialise a missing weight at random and only log it.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgeon.diagnostics import ModelError

__all__ = ["check_loaded", "check_depth", "inside_folder", "model_class_of"]


# A config's counts of repeated blocks: building the model makes that many modules, fake tensors or not, so a
# config saying 10**7 layers would run for hours. The deepest published models have a few hundred layers.
MAX_BLOCKS = 4096
_BLOCK_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers",
                 "num_experts", "num_local_experts", "n_routed_experts")


def check_depth(config, where: str) -> None:
    """Refuse a config (sub-configs included) whose counts of layers or experts pass MAX_BLOCKS."""
    stack = [config.to_dict()]
    while stack:
        fields = stack.pop()
        for key, value in fields.items():
            if isinstance(value, dict):
                stack.append(value)
            elif key in _BLOCK_COUNTS and isinstance(value, int) and value > MAX_BLOCKS:
                raise ModelError(f"{where}: {key} is {value:,}; surgeon builds models of at most {MAX_BLOCKS:,} "
                                 "layers or experts", hint="a config of a real model, or a tiny one for tests?")


def check_loaded(folder: Path, info: dict) -> None:
    """Refuse weights that do not match the model: transformers would initialise a missing tensor at random
    (and only log it, which surgeon silences) and drop an unexpected one, so a fold would ship random weights.

    transformers' loading info already leaves out what a folder need not hold: a weight tied to another one
    (lm_head to the embedding) and buffers that are not saved."""
    for field_name, what in (("missing_keys", "lack"), ("unexpected_keys", "hold tensors the model does not have:"),
                             ("mismatched_keys", "hold tensors of the wrong shape:")):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(field_name) or ())
        if keys:
            shown = ", ".join(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")
            verb = f"lack {len(keys)} tensor{'s' if len(keys) != 1 else ''} the model needs:" if what == "lack" else what
            raise ModelError(f"the weights in {folder} {verb} {shown}",
                             hint="the folder is incomplete or holds another model's weights; surgeon never fills "
                             "a missing weight with random values")


def inside_folder(folder: Path, roots: tuple = ()) -> None:
    """Every file the folder names (its *.safetensors, the shards its index lists, config.json) lies inside it
    (or, for a Hub snapshot, in the Hub cache's blobs): a link or an index entry must not read files elsewhere."""
    allowed = [folder.resolve(), *(Path(r).resolve() for r in roots)]

    def check(path: Path, named_by: str) -> None:
        real = path.resolve()
        if not any(real == root or root in real.parents for root in allowed):
            raise ModelError(f"{named_by}: {path.name} leads outside the model folder, to {real}",
                             hint="a model folder's files must lie inside it: copy the file in instead of linking to it")

    named = [(folder / "config.json", str(folder)), *((f, str(folder)) for f in sorted(folder.glob("*.safetensors")))]
    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        check(index_file, str(folder))
        try:
            shards = set(json.loads(index_file.read_text(encoding="utf-8"))["weight_map"].values())
            if not all(isinstance(shard, str) for shard in shards):
                raise TypeError
        except Exception:
            raise ModelError(f"cannot read {index_file}: it is not a safetensors index (a weight_map of file names)",
                             hint="write it again with save_pretrained(..., safe_serialization=True)") from None
        for shard in sorted(shards):
            if Path(shard).is_absolute() or Path(shard).name != shard or shard in (".", ".."):
                raise ModelError(f"{index_file}: the weight_map names {shard!r}, not a file of {folder}",
                                 hint="a shard is a file name inside the folder, never a path")
            named.append((folder / shard, str(index_file)))
    for path, named_by in named:
        if path.exists() or path.is_symlink():
            check(path, named_by)


def model_class_of(config, where: str):
    """The model class config.json's ``architectures`` names. Only transformers' model classes count (a
    PreTrainedModel subclass): a name such as "AutoModel" or "logging" is another attribute, never called."""
    import transformers

    field_name = f"{where}/config.json: \"architectures\""
    names = getattr(config, "architectures", None)
    if names is not None and (not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names)):
        raise ModelError(f"{field_name} must be a list of class names, not {json.dumps(names)[:60]}",
                         hint='e.g. "architectures": ["LlamaForCausalLM"]')
    for name in names or ():
        try:
            model_class = getattr(transformers, name, None)
        except Exception:  # a lazily imported class whose backend is missing
            model_class = None
        if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
            return model_class
    if names:
        found = names[0] in dir(transformers)
        raise ModelError(
            f"{field_name} names {names[0]!r}, which is not a model class of transformers" if found
            else f"{field_name}: transformers has no class {names[0]}",
            hint="name a model class such as LlamaForCausalLM; surgeon never runs remote code "
            "(upgrade transformers for a newer architecture)",
        )
    try:
        return transformers.AutoModel._model_mapping[type(config)]
    except Exception:
        raise ModelError(f"{field_name} is missing, and transformers has no model for {type(config).__name__}",
                         hint='add "architectures": ["<the model class>"] to config.json') from None
