"""Independent reference of vLLM's per-rank parameters (CURRENT vLLM, TP only, no EP).

Computes, from a full HF checkpoint state dict, the tensor every vLLM TP rank
holds after model.load_weights(): names as in vLLM's named_parameters()
(tied parameters once), fused layouts, TP slices, zero vocab padding. Written
from the reference's rules (ColumnParallel, RowParallel, QKVParallel,
MergedColumnParallel, VocabParallelEmbedding with 64-padding, FusedMoE w13/w2,
DeepseekV2 MLA with fused_qkv_a_proj) with plain torch slicing; it shares no
code with the daemon or its rule files.
"""
from __future__ import annotations

import torch

FP32_PARAMS = ("mlp.gate.weight",)  # engines in these tests keep the MoE router in fp32


def col(x, T, r):
    n = x.shape[0]
    assert n % T == 0, (x.shape, T)
    s = n // T
    return x[r * s:(r + 1) * s]


def row(x, T, r):
    n = x.shape[1]
    assert n % T == 0, (x.shape, T)
    s = n // T
    return x[:, r * s:(r + 1) * s]


def qkv(q, k, v, nh, nkv, hd, T, r, v_hd=None):
    v_hd = v_hd or hd
    assert nh % T == 0
    nh_l = nh // T
    if T >= nkv:
        assert T % nkv == 0
        nkv_l, rep = 1, T // nkv
    else:
        assert nkv % T == 0
        nkv_l, rep = nkv // T, 1
    g = r // rep
    return torch.cat([q[r * nh_l * hd:(r + 1) * nh_l * hd], k[g * nkv_l * hd:(g + 1) * nkv_l * hd],
                      v[g * nkv_l * v_hd:(g + 1) * nkv_l * v_hd]], 0)


def merged(parts, T, r):
    return torch.cat([col(p, T, r) for p in parts], 0)


def vocab(w, T, r, pad_to=64):
    V = w.shape[0]
    Vp = (V + pad_to - 1) // pad_to * pad_to
    assert Vp % T == 0
    per = Vp // T
    s, e = min(r * per, V), min((r + 1) * per, V)
    out = torch.zeros((per,) + tuple(w.shape[1:]), dtype=w.dtype)
    out[:e - s] = w[s:e]
    return out


def _attn_llama(sd, p, cfg, T, r, hd, qkv_bias, o_bias):
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    out = {f"{p}.self_attn.qkv_proj.weight": qkv(sd[f"{p}.self_attn.q_proj.weight"], sd[f"{p}.self_attn.k_proj.weight"],
                                                 sd[f"{p}.self_attn.v_proj.weight"], nh, nkv, hd, T, r)}
    if qkv_bias:
        out[f"{p}.self_attn.qkv_proj.bias"] = qkv(sd[f"{p}.self_attn.q_proj.bias"], sd[f"{p}.self_attn.k_proj.bias"],
                                                  sd[f"{p}.self_attn.v_proj.bias"], nh, nkv, hd, T, r)
    out[f"{p}.self_attn.o_proj.weight"] = row(sd[f"{p}.self_attn.o_proj.weight"], T, r)
    if o_bias:
        out[f"{p}.self_attn.o_proj.bias"] = sd[f"{p}.self_attn.o_proj.bias"]
    return out


def _mlp(sd, p, T, r):
    return {f"{p}.gate_up_proj.weight": merged([sd[f"{p}.gate_proj.weight"], sd[f"{p}.up_proj.weight"]], T, r),
            f"{p}.down_proj.weight": row(sd[f"{p}.down_proj.weight"], T, r)}


def _llama_like(sd, cfg, T, r, hd, qkv_bias, o_bias, norms, tied):
    out = {"model.embed_tokens.weight": vocab(sd["model.embed_tokens.weight"], T, r)}
    for L in range(cfg.num_hidden_layers):
        p = f"model.layers.{L}"
        out.update(_attn_llama(sd, p, cfg, T, r, hd, qkv_bias, o_bias))
        out.update(_mlp(sd, f"{p}.mlp", T, r))
        for n in norms:
            out[f"{p}.{n}.weight"] = sd[f"{p}.{n}.weight"]
    out["model.norm.weight"] = sd["model.norm.weight"]
    if not tied:
        out["lm_head.weight"] = vocab(sd["lm_head.weight"], T, r)
    return out


def _deepseek_v2(sd, cfg, T, r):
    out = {"model.embed_tokens.weight": vocab(sd["model.embed_tokens.weight"], T, r)}
    E = cfg.n_routed_experts
    for L in range(cfg.num_hidden_layers):
        p = f"model.layers.{L}"
        a = f"{p}.self_attn"
        if cfg.q_lora_rank is not None:
            out[f"{a}.fused_qkv_a_proj.weight"] = torch.cat([sd[f"{a}.q_a_proj.weight"],
                                                             sd[f"{a}.kv_a_proj_with_mqa.weight"]], 0)
            out[f"{a}.q_a_layernorm.weight"] = sd[f"{a}.q_a_layernorm.weight"]
            out[f"{a}.q_b_proj.weight"] = col(sd[f"{a}.q_b_proj.weight"], T, r)
        else:
            out[f"{a}.q_proj.weight"] = col(sd[f"{a}.q_proj.weight"], T, r)
            out[f"{a}.kv_a_proj_with_mqa.weight"] = sd[f"{a}.kv_a_proj_with_mqa.weight"]
        out[f"{a}.kv_a_layernorm.weight"] = sd[f"{a}.kv_a_layernorm.weight"]
        out[f"{a}.kv_b_proj.weight"] = col(sd[f"{a}.kv_b_proj.weight"], T, r)
        out[f"{a}.o_proj.weight"] = row(sd[f"{a}.o_proj.weight"], T, r)
        moe = E is not None and L >= cfg.first_k_dense_replace and L % getattr(cfg, "moe_layer_freq", 1) == 0
        if not moe:
            out.update(_mlp(sd, f"{p}.mlp", T, r))
        else:
            m = f"{p}.mlp"
            out[f"{m}.gate.weight"] = sd[f"{m}.gate.weight"]
            out.update(_mlp(sd, f"{m}.shared_experts", T, r))
            out[f"{m}.experts.w13_weight"] = torch.stack([
                torch.cat([col(sd[f"{m}.experts.{e}.gate_proj.weight"], T, r),
                           col(sd[f"{m}.experts.{e}.up_proj.weight"], T, r)], 0) for e in range(E)])
            out[f"{m}.experts.w2_weight"] = torch.stack([row(sd[f"{m}.experts.{e}.down_proj.weight"], T, r)
                                                         for e in range(E)])
        for n in ("input_layernorm", "post_attention_layernorm"):
            out[f"{p}.{n}.weight"] = sd[f"{p}.{n}.weight"]
    out["model.norm.weight"] = sd["model.norm.weight"]
    out["lm_head.weight"] = vocab(sd["lm_head.weight"], T, r)
    return out


def rank_params(arch: str, sd: dict, cfg, T: int, r: int) -> dict:
    """{vLLM param name: fp32 tensor} of TP rank r of T."""
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    if arch == "llama":
        hd = getattr(cfg, "head_dim", None) or H // nh
        return _llama_like(sd, cfg, T, r, hd, cfg.attention_bias, cfg.attention_bias,
                           ("input_layernorm", "post_attention_layernorm"), cfg.tie_word_embeddings)
    if arch == "qwen2":
        return _llama_like(sd, cfg, T, r, H // nh, True, False, ("input_layernorm", "post_attention_layernorm"),
                           cfg.tie_word_embeddings)
    if arch == "gemma2":
        return _llama_like(sd, cfg, T, r, cfg.head_dim, cfg.attention_bias, cfg.attention_bias,
                           ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                            "post_feedforward_layernorm"), True)
    if arch == "deepseek_v2":
        return _deepseek_v2(sd, cfg, T, r)
    raise KeyError(arch)


def param_dtype(name: str, engine_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if name.endswith(FP32_PARAMS) else engine_dtype


def expected(arch: str, sd: dict, cfg, T: int, r: int, engine_dtype=torch.bfloat16) -> dict:
    """{name: tensor in the engine's dtype}: what the engine rank must hold, bit for bit."""
    return {n: t.to(param_dtype(n, engine_dtype)).contiguous() for n, t in rank_params(arch, sd, cfg, T, r).items()}
