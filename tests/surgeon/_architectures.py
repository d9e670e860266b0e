"""Tiny models of the architectures the role analysis is checked on, built from transformers configs.

Each entry: the model and, for every role, the module names that architecture gives it in its first
layer (what PEFT's per-architecture target tables spell out by hand).
"""

import torch

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)


def _decoder(config_class, model_class, **extra):
    def build():
        import transformers

        config = getattr(transformers, config_class)(**{**SMALL, "num_key_value_heads": 2, **extra})
        return getattr(transformers, model_class)(config)

    return build


def _build(config_class, model_class, **config):
    def build():
        import transformers

        return getattr(transformers, model_class)(getattr(transformers, config_class)(**config))

    return build


LLAMA_LAYER = {
    "attn.q": "model.layers.0.self_attn.q_proj", "attn.k": "model.layers.0.self_attn.k_proj",
    "attn.v": "model.layers.0.self_attn.v_proj", "attn.out": "model.layers.0.self_attn.o_proj",
    "mlp.gate": "model.layers.0.mlp.gate_proj", "mlp.up": "model.layers.0.mlp.up_proj", "mlp.down": "model.layers.0.mlp.down_proj",
    "embed": "model.embed_tokens", "lm_head": "lm_head",
}

ARCHITECTURES = {
    "llama": (_decoder("LlamaConfig", "LlamaForCausalLM"), LLAMA_LAYER),
    "qwen2": (_decoder("Qwen2Config", "Qwen2ForCausalLM"), LLAMA_LAYER),
    "mistral": (_decoder("MistralConfig", "MistralForCausalLM"), LLAMA_LAYER),
    "gemma": (_decoder("GemmaConfig", "GemmaForCausalLM", head_dim=8), LLAMA_LAYER),
    "phi3": (_decoder("Phi3Config", "Phi3ForCausalLM", pad_token_id=0), {
        "attn.qkv": "model.layers.0.self_attn.qkv_proj", "attn.out": "model.layers.0.self_attn.o_proj",
        "mlp.gate_up": "model.layers.0.mlp.gate_up_proj", "mlp.down": "model.layers.0.mlp.down_proj",
        "embed": "model.embed_tokens", "lm_head": "lm_head",
    }),
    "gpt2": (_build("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0), {
        "attn.qkv": "transformer.h.0.attn.c_attn", "attn.out": "transformer.h.0.attn.c_proj",
        "mlp.up": "transformer.h.0.mlp.c_fc", "mlp.down": "transformer.h.0.mlp.c_proj",
        "embed": "transformer.wte", "embed.extra": "transformer.wpe", "lm_head": "lm_head",
    }),
    "gpt_neox": (_build("GPTNeoXConfig", "GPTNeoXForCausalLM", **SMALL), {
        "attn.qkv": "gpt_neox.layers.0.attention.query_key_value", "attn.out": "gpt_neox.layers.0.attention.dense",
        "mlp.up": "gpt_neox.layers.0.mlp.dense_h_to_4h", "mlp.down": "gpt_neox.layers.0.mlp.dense_4h_to_h",
        "embed": "gpt_neox.embed_in", "lm_head": "lm_head",
    }),
    "bert": (_build("BertConfig", "BertForSequenceClassification", **SMALL), {
        "attn.q": "bert.encoder.layer.0.attention.self.query", "attn.k": "bert.encoder.layer.0.attention.self.key",
        "attn.v": "bert.encoder.layer.0.attention.self.value", "attn.out": "bert.encoder.layer.0.attention.output.dense",
        "mlp.up": "bert.encoder.layer.0.intermediate.dense", "mlp.down": "bert.encoder.layer.0.output.dense",
        "embed": "bert.embeddings.word_embeddings", "embed.extra": "bert.embeddings.position_embeddings",
        "head": "bert.pooler.dense",
    }),
    "t5": (_build("T5Config", "T5ForConditionalGeneration", d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                  vocab_size=128, decoder_start_token_id=0), {
        # roles per stack: the encoder's and the decoder's self-attention and MLP, the decoder's cross-attention
        "attn.q": ("encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.0.SelfAttention.q"),
        "attn.k": ("encoder.block.0.layer.0.SelfAttention.k", "decoder.block.0.layer.0.SelfAttention.k"),
        "attn.v": ("encoder.block.0.layer.0.SelfAttention.v", "decoder.block.0.layer.0.SelfAttention.v"),
        "attn.out": ("encoder.block.0.layer.0.SelfAttention.o", "decoder.block.0.layer.0.SelfAttention.o"),
        "mlp.up": ("encoder.block.0.layer.1.DenseReluDense.wi", "decoder.block.0.layer.2.DenseReluDense.wi"),
        "mlp.down": ("encoder.block.0.layer.1.DenseReluDense.wo", "decoder.block.0.layer.2.DenseReluDense.wo"),
        "cross_attn.q": "decoder.block.0.layer.1.EncDecAttention.q", "cross_attn.k": "decoder.block.0.layer.1.EncDecAttention.k",
        "cross_attn.v": "decoder.block.0.layer.1.EncDecAttention.v", "cross_attn.out": "decoder.block.0.layer.1.EncDecAttention.o",
        "embed": ("encoder.embed_tokens", "decoder.embed_tokens"),
        "embed.extra": ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
                        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias"),
        "lm_head": "lm_head",
    }),
    "vit": (_build("ViTConfig", "ViTForImageClassification", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, image_size=16, patch_size=8), {
        "attn.q": "vit.layers.0.attention.q_proj", "attn.k": "vit.layers.0.attention.k_proj",
        "attn.v": "vit.layers.0.attention.v_proj", "attn.out": "vit.layers.0.attention.o_proj",
        "mlp.up": "vit.layers.0.mlp.fc1", "mlp.down": "vit.layers.0.mlp.fc2",
        "embed": "vit.embeddings.patch_embeddings.projection", "head": "classifier",
    }),
}


LAYERS = 2


def named(name: str) -> dict:
    """Module path -> role, for the modules the table of architecture ``name`` names."""
    table = ARCHITECTURES[name][1]
    return {path: role for role, paths in table.items() for path in ((paths,) if isinstance(paths, str) else paths)}


def every_layer(paths) -> set:
    """The first layer's paths repeated for every layer (model.layers.0.x -> model.layers.1.x, ...)."""
    return {p.replace(".0.", f".{i}.", 1) for p in paths for i in range(LAYERS)} if paths else set()


def build(name: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ARCHITECTURES[name][0]().eval()
