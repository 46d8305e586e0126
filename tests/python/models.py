"""Tiny real transformers models (random weights) used by the tests."""
from __future__ import annotations

import os

import torch
import transformers

# Sizes are small but not degenerate: uneven FSDP chunks over 3 and 4 ranks,
# vocab that needs padding, GQA with KV replication at T=4, MoE experts.
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, attention_bias=False,
        architectures=["LlamaForCausalLM"]),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=130, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"]),
    "gemma2": lambda: transformers.Gemma2Config(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, architectures=["Gemma2ForCausalLM"]),
    "deepseek_v2": lambda: transformers.DeepseekV2Config(
        vocab_size=100, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=5, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1, tie_word_embeddings=False,
        architectures=["DeepseekV2ForCausalLM"]),
}


def config(arch: str):
    return CONFIGS[arch]()


def make_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(config(arch), dtype=torch.float32)
    with torch.no_grad():  # norms start at exactly 1 (0 for Gemma): give them random values too
        for n, p in m.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p))
    return m.eval()


def save_checkpoint(arch: str, path: str, seed: int = 0) -> str:
    """Writes a checkpoint the way users get one (save_pretrained); returns the path."""
    m = make_model(arch, seed)
    m.save_pretrained(path)
    return path


def load_checkpoint(path: str) -> dict:
    """The full HF state dict on disk (the independent reference's input)."""
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out
