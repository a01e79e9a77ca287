"""Tiny Hugging Face models built from configs (random weights, no downloads) for tests.

``build(name)`` returns ``(model, example_inputs)`` with the model in eval mode; every
architecture family rarefy claims to capture is here: decoders (Llama with grouped-query
attention, Mistral, Qwen2, Phi-3, GPT-2, GPT-NeoX, OPT), encoders (BERT, RoBERTa,
DistilBERT) and ViT.
"""
from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)

CONFIGS = {
    "llama": lambda: (tf.LlamaConfig(**_COMMON, num_key_value_heads=2), tf.LlamaForCausalLM),
    "mistral": lambda: (tf.MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=None), tf.MistralForCausalLM),
    "qwen2": lambda: (tf.Qwen2Config(**_COMMON, num_key_value_heads=2), tf.Qwen2ForCausalLM),
    "phi3": lambda: (tf.Phi3Config(**_COMMON, num_key_value_heads=4, pad_token_id=0), tf.Phi3ForCausalLM),
    "gpt2": lambda: (tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=VOCAB, n_positions=64),
                     tf.GPT2LMHeadModel),
    "gpt_neox": lambda: (tf.GPTNeoXConfig(**_COMMON), tf.GPTNeoXForCausalLM),
    "opt": lambda: (tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=64),
                    tf.OPTForCausalLM),
    "bert": lambda: (tf.BertConfig(**_COMMON), tf.BertModel),
    "roberta": lambda: (tf.RobertaConfig(**_COMMON, pad_token_id=1), tf.RobertaModel),
    "distilbert": lambda: (tf.DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=VOCAB),
                           tf.DistilBertModel),
    "vit": lambda: (tf.ViTConfig(image_size=32, patch_size=8, num_channels=3, **{k: v for k, v in _COMMON.items()
                                                                                 if k != "vocab_size"}),
                    tf.ViTModel),
}
DECODERS = ("llama", "mistral", "qwen2", "phi3", "gpt2", "gpt_neox", "opt")
ENCODERS = ("bert", "roberta", "distilbert")
ALL = tuple(CONFIGS)


def build(name: str, seed: int = 0, batch: int = 2, seq: int = 8):
    torch.manual_seed(seed)
    config, cls = CONFIGS[name]()
    model = cls(config).eval()
    return model, example_inputs(name, batch, seq)


def example_inputs(name: str, batch: int = 2, seq: int = 8, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=gen)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    if batch > 1 and name in ENCODERS:
        mask[-1, seq - 2:] = 0  # padding in the last row: masks must matter
    return {"input_ids": ids, "attention_mask": mask}
