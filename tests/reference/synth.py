"""Synthetic Hugging Face checkpoints (names and shapes as HF saves them) for
every architecture the reference covers. Used by the reference self-tests and
by integration tests that want checkpoints not produced by weightsyncctl."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import st_io

# Tiny configs: heads 4, kv heads 2 (replicated at T=4), vocab 100 (padded to 128).
BASE = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 48, "num_hidden_layers": 2, "vocab_size": 100}

CONFIGS = {
    "LlamaForCausalLM": dict(BASE, model_type="llama", tie_word_embeddings=False),
    "MistralForCausalLM": dict(BASE, model_type="mistral", tie_word_embeddings=False),
    "Phi3ForCausalLM": dict(BASE, model_type="phi3", tie_word_embeddings=False),
    "Qwen2ForCausalLM": dict(BASE, model_type="qwen2", tie_word_embeddings=False),
    "GemmaForCausalLM": dict(BASE, model_type="gemma", head_dim=16, tie_word_embeddings=True),
    "Gemma2ForCausalLM": dict(BASE, model_type="gemma2", head_dim=16, tie_word_embeddings=True),
    "Starcoder2ForCausalLM": dict(BASE, model_type="starcoder2", use_bias=True, tie_word_embeddings=True),
    "GPT2LMHeadModel": {"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 2,
                        "n_positions": 16, "vocab_size": 100, "tie_word_embeddings": True},
    "GPTBigCodeForCausalLM": {"model_type": "gpt_bigcode", "n_embd": 32, "n_head": 4, "n_layer": 2,
                              "n_positions": 16, "n_inner": 48, "vocab_size": 100,
                              "multi_query": True, "tie_word_embeddings": False},
    "DeepseekV2ForCausalLM": {"model_type": "deepseek_v2", "hidden_size": 32, "num_attention_heads": 4,
                              "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 100,
                              "intermediate_size": 48, "moe_intermediate_size": 8,
                              "n_routed_experts": 5, "n_shared_experts": 2, "num_experts_per_tok": 2,
                              "first_k_dense_replace": 1, "moe_layer_freq": 1,
                              "q_lora_rank": 12, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                              "qk_rope_head_dim": 4, "v_head_dim": 6, "tie_word_embeddings": False},
    "MixtralForCausalLM": dict(BASE, model_type="mixtral", intermediate_size=16, num_local_experts=3,
                               num_experts_per_tok=2, tie_word_embeddings=False),
}


def hf_shapes(cfg: dict) -> dict[str, tuple]:
    """HF checkpoint tensor names and shapes of `cfg` (first architecture)."""
    arch = cfg["architectures"][0]
    s: dict[str, tuple] = {}
    if arch in ("GPT2LMHeadModel", "GPTBigCodeForCausalLM"):
        H, nh, V = cfg["n_embd"], cfg["n_head"], cfg["vocab_size"]
        I = cfg.get("n_inner") or 4 * H
        hd = H // nh
        gpt2 = arch == "GPT2LMHeadModel"
        kv = H if gpt2 or not cfg.get("multi_query", True) else hd
        s["transformer.wte.weight"] = (V, H)
        s["transformer.wpe.weight"] = (cfg["n_positions"], H)
        for L in range(cfg["n_layer"]):
            p = f"transformer.h.{L}"
            for n in ("ln_1", "ln_2"):
                s[f"{p}.{n}.weight"] = s[f"{p}.{n}.bias"] = (H,)
            lin = {"attn.c_attn": (H + 2 * kv, H), "attn.c_proj": (H, H),
                   "mlp.c_fc": (I, H), "mlp.c_proj": (H, I)}
            for n, (o, i) in lin.items():
                s[f"{p}.{n}.weight"] = (i, o) if gpt2 else (o, i)  # Conv1D is [in, out]
                s[f"{p}.{n}.bias"] = (o,)
        s["transformer.ln_f.weight"] = s["transformer.ln_f.bias"] = (H,)
        if not cfg.get("tie_word_embeddings", True):
            s["lm_head.weight"] = (V, H)
        return s

    H, nh, V = cfg["hidden_size"], cfg["num_attention_heads"], cfg["vocab_size"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or H // nh
    s["model.embed_tokens.weight"] = (V, H)
    s["model.norm.weight"] = (H,)
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}"
        a = f"{p}.self_attn"
        s[f"{p}.input_layernorm.weight"] = s[f"{p}.post_attention_layernorm.weight"] = (H,)
        if arch == "DeepseekV2ForCausalLM":
            _deepseek_layer(cfg, L, s)
            continue
        if arch == "MixtralForCausalLM":
            _mixtral_layer(cfg, L, s, nh, nkv, hd)
            continue
        I = cfg["intermediate_size"]
        if arch == "Phi3ForCausalLM":
            s[f"{a}.qkv_proj.weight"] = ((nh + 2 * nkv) * hd, H)
            s[f"{p}.mlp.gate_up_proj.weight"] = (2 * I, H)
        else:
            s[f"{a}.q_proj.weight"] = (nh * hd, H)
            s[f"{a}.k_proj.weight"] = s[f"{a}.v_proj.weight"] = (nkv * hd, H)
        s[f"{a}.o_proj.weight"] = (H, nh * hd)
        llama_like = arch not in ("Qwen2ForCausalLM", "Starcoder2ForCausalLM", "GemmaForCausalLM")
        attn_bias = llama_like and bool(cfg.get("attention_bias") or cfg.get("bias"))
        if attn_bias or arch == "Qwen2ForCausalLM" or (arch == "Starcoder2ForCausalLM" and cfg.get("use_bias", True)):
            if arch == "Phi3ForCausalLM":
                s[f"{a}.qkv_proj.bias"] = ((nh + 2 * nkv) * hd,)
            else:
                s[f"{a}.q_proj.bias"] = (nh * hd,)
                s[f"{a}.k_proj.bias"] = s[f"{a}.v_proj.bias"] = (nkv * hd,)
        if attn_bias:
            s[f"{a}.o_proj.bias"] = (H,)
        if llama_like and arch not in ("Gemma2ForCausalLM", "Phi3ForCausalLM") and cfg.get("mlp_bias"):
            s[f"{p}.mlp.gate_proj.bias"] = s[f"{p}.mlp.up_proj.bias"] = (I,)
            s[f"{p}.mlp.down_proj.bias"] = (H,)
        if arch == "Starcoder2ForCausalLM":
            if cfg.get("use_bias", True):
                s[f"{a}.o_proj.bias"] = (H,)
                s[f"{p}.mlp.c_fc.bias"] = (I,)
                s[f"{p}.mlp.c_proj.bias"] = (H,)
            s[f"{p}.mlp.c_fc.weight"] = (I, H)
            s[f"{p}.mlp.c_proj.weight"] = (H, I)
            s[f"{p}.input_layernorm.bias"] = s[f"{p}.post_attention_layernorm.bias"] = (H,)
        elif arch != "Phi3ForCausalLM":
            s[f"{p}.mlp.gate_proj.weight"] = s[f"{p}.mlp.up_proj.weight"] = (I, H)
        if arch != "Starcoder2ForCausalLM":
            s[f"{p}.mlp.down_proj.weight"] = (H, I)
        if arch == "Gemma2ForCausalLM":
            s[f"{p}.pre_feedforward_layernorm.weight"] = s[f"{p}.post_feedforward_layernorm.weight"] = (H,)
    if arch == "Starcoder2ForCausalLM":
        s["model.norm.bias"] = (H,)
    if not cfg.get("tie_word_embeddings", False) and arch not in ("GemmaForCausalLM", "Gemma2ForCausalLM"):
        s["lm_head.weight"] = (V, H)
    return s


def _mixtral_layer(cfg, L, s, nh, nkv, hd):
    H, I, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    a = f"model.layers.{L}.self_attn"
    s[f"{a}.q_proj.weight"] = (nh * hd, H)
    s[f"{a}.k_proj.weight"] = s[f"{a}.v_proj.weight"] = (nkv * hd, H)
    s[f"{a}.o_proj.weight"] = (H, nh * hd)
    m = f"model.layers.{L}.block_sparse_moe"
    s[f"{m}.gate.weight"] = (E, H)
    for e in range(E):
        s[f"{m}.experts.{e}.w1.weight"] = s[f"{m}.experts.{e}.w3.weight"] = (I, H)
        s[f"{m}.experts.{e}.w2.weight"] = (H, I)


def _deepseek_layer(cfg, L, s):
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    kvr, qr = cfg["kv_lora_rank"], cfg.get("q_lora_rank")
    a = f"model.layers.{L}.self_attn"
    if qr is not None:
        s[f"{a}.q_a_proj.weight"] = (qr, H)
        s[f"{a}.q_a_layernorm.weight"] = (qr,)
        s[f"{a}.q_b_proj.weight"] = (nh * (nope + rope), qr)
    else:
        s[f"{a}.q_proj.weight"] = (nh * (nope + rope), H)
    s[f"{a}.kv_a_proj_with_mqa.weight"] = (kvr + rope, H)
    s[f"{a}.kv_a_layernorm.weight"] = (kvr,)
    s[f"{a}.kv_b_proj.weight"] = (nh * (nope + vd), kvr)
    s[f"{a}.o_proj.weight"] = (H, nh * vd)
    m = f"model.layers.{L}.mlp"
    moe = (cfg.get("n_routed_experts") is not None and L >= cfg.get("first_k_dense_replace", 0)
           and L % cfg.get("moe_layer_freq", 1) == 0)
    if not moe:
        I = cfg["intermediate_size"]
        s[f"{m}.gate_proj.weight"] = s[f"{m}.up_proj.weight"] = (I, H)
        s[f"{m}.down_proj.weight"] = (H, I)
        return
    Im, E = cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    s[f"{m}.gate.weight"] = (E, H)
    if cfg.get("n_shared_experts"):
        Is = Im * cfg["n_shared_experts"]
        s[f"{m}.shared_experts.gate_proj.weight"] = s[f"{m}.shared_experts.up_proj.weight"] = (Is, H)
        s[f"{m}.shared_experts.down_proj.weight"] = (H, Is)
    for e in range(E):
        s[f"{m}.experts.{e}.gate_proj.weight"] = s[f"{m}.experts.{e}.up_proj.weight"] = (Im, H)
        s[f"{m}.experts.{e}.down_proj.weight"] = (H, Im)


def config_for(arch: str, **overrides) -> dict:
    cfg = dict(CONFIGS[arch], architectures=[arch])
    cfg.update(overrides)
    return cfg


def random_tensors(shapes: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(shp, dtype=np.float32).astype(dtype) for n, shp in sorted(shapes.items())}


def write_checkpoint(directory, cfg: dict, tensors: dict | None = None, seed: int = 0,
                     shard_bytes: int | None = None, dtype=np.float32) -> dict[str, np.ndarray]:
    """Writes config.json + model.safetensors (or a sharded set with an index).
    Returns the tensors written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = random_tensors(hf_shapes(cfg), seed, dtype)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    if shard_bytes:
        st_io.save_sharded(directory, tensors, shard_bytes)
    else:
        st_io.save(directory / "model.safetensors", tensors, {"format": "pt"})
    return tensors
