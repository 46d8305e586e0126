"""Self-tests of the independent vLLM layout reference: the worked examples of
the layout spec, reassembly properties, equivalences between architectures that
must agree (Llama vs Phi-3 pre-fused, GPT-2 Conv1D vs nn.Linear), refusals, and
the casts/IO the integration tests rely on."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import st_io
import synth
import vllm_ref as ref
from vllm_ref import VllmRefused


def rows_idx(n: int, cols: int = 1) -> np.ndarray:
    """Each row holds its own index: makes 'which source rows landed here' visible."""
    return np.repeat(np.arange(n, dtype=np.float32)[:, None], cols, axis=1)


def row_ids(a: np.ndarray) -> list[int]:
    return [int(x) for x in a[:, 0]]


# --------------------------------------------------------------------------
# Worked examples

def test_llama3_8b_tp16_q_rows_and_kv_heads():
    nh, nkv, hd, T = 32, 8, 128, 16
    Wq, Wk, Wv = rows_idx(nh * hd), rows_idx(nkv * hd) + 10000, rows_idx(nkv * hd) + 20000
    for r in range(T):
        local = ref.qkv(Wq, Wk, Wv, nh, nkv, hd, T, r)
        assert local.shape == (512, 1)  # [512, 4096] with H=4096
        assert row_ids(local[:256]) == list(range(256 * r, 256 * (r + 1)))
        g = r // 2
        assert row_ids(local[256:384]) == [10000 + i for i in range(128 * g, 128 * (g + 1))]
        assert row_ids(local[384:]) == [20000 + i for i in range(128 * g, 128 * (g + 1))]
    cfg = {"num_attention_heads": nh, "num_key_value_heads": nkv}
    assert ref.describe_kv_heads(cfg, T) == [[r // 2] for r in range(T)]


def test_llama3_8b_vocab_no_padding():
    V, T = 128256, 16
    W = rows_idx(V)
    for r in (0, 7, 15):
        local = ref.vocab(W, T, r)
        assert local.shape == (8016, 1)
        assert row_ids(local) == list(range(8016 * r, 8016 * (r + 1)))


def test_starcoder_mqa_every_rank_holds_full_kv():
    nh, H, hd, T = 48, 6144, 128, 4
    X = rows_idx(H + 2 * hd)  # c_attn rows [Q(6144); K(128); V(128)]
    q, k, v = ref.split_fused_qkv(X, nh, 1, hd)
    for r in range(T):
        local = ref.qkv(q, k, v, nh, 1, hd, T, r)
        assert local.shape[0] == 1792
        assert row_ids(local) == (list(range(1536 * r, 1536 * (r + 1)))
                                  + list(range(H, H + 2 * hd)))


def test_gpt2_small_c_attn_transposed_and_sliced():
    nh, hd, H, T = 12, 64, 768, 4
    conv = np.tile(np.arange(3 * H, dtype=np.float32), (H, 1))  # Conv1D [in, out]: column j = out j
    q, k, v = ref.split_fused_qkv(conv.T, nh, nh, hd)
    assert conv.T.shape == (2304, 768)
    for r in range(T):
        local = ref.qkv(q, k, v, nh, nh, hd, T, r)
        assert local.shape == (576, 768)
        want = [o + i for o in (0, H, 2 * H) for i in range(192 * r, 192 * (r + 1))]
        assert row_ids(local) == want


def test_gpt2_small_vocab_rank3_padding():
    V, T = 50257, 4
    assert ref.padded_vocab(V) == 50304
    local = ref.vocab(rows_idx(V) + 1, T, 3)  # +1 so that real row 0 is not zero
    assert local.shape == (12576, 1)
    assert row_ids(local[:12529]) == list(range(37729, 50258))
    assert not local[12529:].any() and local[12529:].shape[0] == 47


def test_vocab_padding_spanning_ranks():
    W = rows_idx(70) + 1
    r0, r1 = ref.vocab(W, 2, 0), ref.vocab(W, 2, 1)
    assert r0.shape == r1.shape == (64, 1)
    assert row_ids(r0) == list(range(1, 65))
    assert row_ids(r1[:6]) == list(range(65, 71)) and not r1[6:].any()

    W = rows_idx(10) + 1
    parts = [ref.vocab(W, 4, r) for r in range(4)]
    assert all(p.shape == (16, 1) for p in parts)
    assert row_ids(parts[0][:10]) == list(range(1, 11)) and not parts[0][10:].any()
    assert all(not p.any() for p in parts[1:])


def test_qwen2_1_5b_kv_replication_and_bias():
    nh, nkv, hd, T = 12, 2, 128, 4
    assert ref.describe_kv_heads({"num_attention_heads": nh, "num_key_value_heads": nkv}, T) == \
        [[0], [0], [1], [1]]
    bq, bk, bv = np.arange(nh * hd), np.arange(nkv * hd) + 5000, np.arange(nkv * hd) + 9000
    for r in range(T):
        b = ref.qkv(bq.astype(np.float32), bk.astype(np.float32), bv.astype(np.float32),
                    nh, nkv, hd, T, r)
        assert b.shape == (640,)
        g = r // 2
        assert list(b[:384]) == list(range(384 * r, 384 * (r + 1)))
        assert list(b[384:512]) == list(range(5000 + 128 * g, 5000 + 128 * (g + 1)))
        assert list(b[512:]) == list(range(9000 + 128 * g, 9000 + 128 * (g + 1)))


def test_deepseek_v2_lite_shapes_tp4(tmp_path):
    H = 8
    cfg = {"architectures": ["DeepseekV2ForCausalLM"], "hidden_size": H, "num_attention_heads": 16,
           "num_hidden_layers": 2, "vocab_size": 100, "intermediate_size": 10944,
           "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_shared_experts": 2,
           "first_k_dense_replace": 1, "moe_layer_freq": 1, "q_lora_rank": None,
           "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}
    synth.write_checkpoint(tmp_path, cfg, seed=1)
    out = ref.expected_rank_tensors(tmp_path, 4, 2, dtype="fp32")
    a = "model.layers.{}.self_attn."
    assert out[a.format(1) + "q_proj.weight"].shape == (768, H)
    assert out[a.format(1) + "kv_b_proj.weight"].shape == (1024, 512)
    assert out[a.format(1) + "o_proj.weight"].shape == (H, 512)
    assert out[a.format(1) + "kv_a_proj_with_mqa.weight"].shape == (512 + 64, H)
    assert out["model.layers.1.mlp.experts.w13_weight"].shape == (64, 704, H)
    assert out["model.layers.1.mlp.experts.w2_weight"].shape == (64, H, 352)
    assert out["model.layers.1.mlp.shared_experts.gate_up_proj.weight"].shape == (1408, H)
    assert out["model.layers.1.mlp.gate.weight"].shape == (64, H)
    assert out["model.layers.0.mlp.gate_up_proj.weight"].shape == (5472, H)
    assert "model.layers.0.mlp.experts.w13_weight" not in out
    assert not any("fused_qkv_a_proj" in n for n in out)


# --------------------------------------------------------------------------
# Whole-architecture behaviour on synthetic checkpoints

def make(tmp_path, arch, seed=0, **over):
    cfg = synth.config_for(arch, **over)
    d = tmp_path / f"{arch}-{seed}"
    tensors = synth.write_checkpoint(d, cfg, seed=seed)
    return d, cfg, tensors


@pytest.mark.parametrize("arch", sorted(synth.CONFIGS))
@pytest.mark.parametrize("T", [1, 2, 4])
def test_every_architecture_loads(tmp_path, arch, T):
    d, cfg, _ = make(tmp_path, arch)
    assert T in ref.allowed_tp_sizes(cfg)
    ranks = [ref.expected_rank_tensors(d, T, r, dtype="fp32") for r in range(T)]
    assert all(rk.keys() == ranks[0].keys() for rk in ranks)
    for name in ranks[0]:
        assert all(rk[name].shape == ranks[0][name].shape for rk in ranks), name
        assert all(rk[name].dtype == np.float32 for rk in ranks)


@pytest.mark.parametrize("T", [2, 4])
def test_llama_reassembles_to_tp1(tmp_path, T):
    d, cfg, hf = make(tmp_path, "LlamaForCausalLM")
    full = ref.expected_rank_tensors(d, 1, 0, dtype="fp32")
    ranks = [ref.expected_rank_tensors(d, T, r, dtype="fp32") for r in range(T)]
    V, H, I = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    p = "model.layers.1"
    # TP=1 is the HF tensors, fused and vocab-padded to 128 with zero rows.
    qkv1 = full[f"{p}.self_attn.qkv_proj.weight"]
    assert np.array_equal(qkv1, np.concatenate([hf[f"{p}.self_attn.{x}_proj.weight"] for x in "qkv"]))
    emb1 = full["model.embed_tokens.weight"]
    assert emb1.shape == (128, H) and np.array_equal(emb1[:V], hf["model.embed_tokens.weight"])
    assert not emb1[V:].any()
    # TP=T reassembles: row-parallel along dim 1, vocab along dim 0, gate/up per part.
    o = np.concatenate([rk[f"{p}.self_attn.o_proj.weight"] for rk in ranks], axis=1)
    assert np.array_equal(o, full[f"{p}.self_attn.o_proj.weight"])
    emb = np.concatenate([rk["lm_head.weight"] for rk in ranks])
    assert np.array_equal(emb, full["lm_head.weight"])
    gu = [rk[f"{p}.mlp.gate_up_proj.weight"] for rk in ranks]
    gate = np.concatenate([x[:I // T] for x in gu])
    up = np.concatenate([x[I // T:] for x in gu])
    assert np.array_equal(gate, hf[f"{p}.mlp.gate_proj.weight"])
    assert np.array_equal(up, hf[f"{p}.mlp.up_proj.weight"])
    for rk in ranks:
        assert np.array_equal(rk["model.norm.weight"], hf["model.norm.weight"])


def test_llama_tp4_replicates_kv(tmp_path):
    d, cfg, hf = make(tmp_path, "LlamaForCausalLM")
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    k = hf["model.layers.0.self_attn.k_proj.weight"]
    for r in range(4):
        local = ref.expected_rank_tensors(d, 4, r, dtype="fp32")["model.layers.0.self_attn.qkv_proj.weight"]
        assert local.shape == (3 * hd, cfg["hidden_size"])
        g = r // 2
        assert np.array_equal(local[hd:2 * hd], k[g * hd:(g + 1) * hd])


def _llama_to_phi3(hf, cfg):
    out = {}
    for n, t in hf.items():
        if ".self_attn.q_proj." in n:
            base = n.replace(".q_proj.", ".{}_proj.")
            out[n.replace(".q_proj.", ".qkv_proj.")] = np.concatenate([hf[base.format(x)] for x in "qkv"])
        elif ".mlp.gate_proj." in n:
            out[n.replace("gate_proj", "gate_up_proj")] = np.concatenate(
                [t, hf[n.replace("gate_proj", "up_proj")]])
        elif not any(s in n for s in (".k_proj.", ".v_proj.", ".up_proj.")):
            out[n] = t
    return out


@pytest.mark.parametrize("T", [1, 2, 4])
def test_phi3_prefused_equals_llama(tmp_path, T):
    d, cfg, hf = make(tmp_path, "LlamaForCausalLM")
    pcfg = dict(cfg, architectures=["Phi3ForCausalLM"])
    pd = tmp_path / "phi3"
    synth.write_checkpoint(pd, pcfg, tensors=_llama_to_phi3(hf, cfg))
    for r in range(T):
        a = ref.expected_rank_tensors(d, T, r)
        b = ref.expected_rank_tensors(pd, T, r)
        assert a.keys() == b.keys()
        for n in a:
            assert np.array_equal(a[n].view(np.uint16), b[n].view(np.uint16)), n


@pytest.mark.parametrize("arch", ["LLaMAForCausalLM", "MistralForCausalLM", "InternLMForCausalLM",
                                  "AquilaModel", "AquilaForCausalLM"])
def test_llama_aliases(tmp_path, arch):
    d, cfg, hf = make(tmp_path, "LlamaForCausalLM")
    ad = tmp_path / arch
    synth.write_checkpoint(ad, dict(cfg, architectures=[arch]), tensors=hf)
    a, b = ref.expected_rank_tensors(d, 2, 1, "fp32"), ref.expected_rank_tensors(ad, 2, 1, "fp32")
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("T", [1, 2, 4])
def test_gpt2_conv1d_equals_bigcode_mha(tmp_path, T):
    """GPT-2's transposed Conv1D weights must land exactly like nn.Linear ones (MHA GPTBigCode)."""
    cfg = synth.config_for("GPTBigCodeForCausalLM", multi_query=False, tie_word_embeddings=True)
    bd = tmp_path / "bigcode"
    hf = synth.write_checkpoint(bd, cfg)
    g = {n: (t.T.copy() if n.endswith(".weight") and ("c_" in n) else t) for n, t in hf.items()}
    g = {n.removeprefix("transformer."): t for n, t in g.items()}  # GPT2Model-style names
    gcfg = dict(cfg, architectures=["GPT2LMHeadModel"])
    gd = tmp_path / "gpt2"
    synth.write_checkpoint(gd, gcfg, tensors=g)
    for r in range(T):
        a, b = ref.expected_rank_tensors(bd, T, r, "fp32"), ref.expected_rank_tensors(gd, T, r, "fp32")
        assert a.keys() == b.keys()
        for n in a:
            assert np.array_equal(a[n], b[n]), n


def test_gpt2_biases(tmp_path):
    d, cfg, hf = make(tmp_path, "GPT2LMHeadModel")
    T = 4
    for r in range(T):
        out = ref.expected_rank_tensors(d, T, r, "fp32")
        p = "transformer.h.0"
        assert np.array_equal(out[f"{p}.attn.c_proj.bias"], hf[f"{p}.attn.c_proj.bias"])
        assert np.array_equal(out[f"{p}.mlp.c_fc.bias"], ref.col(hf[f"{p}.mlp.c_fc.bias"], T, r))
        assert out[f"{p}.attn.c_attn.bias"].shape == (3 * 32 // T,)
        assert "lm_head.weight" not in out  # tied: one parameter, wte


def test_bigcode_mqa_kv_everywhere(tmp_path):
    d, cfg, hf = make(tmp_path, "GPTBigCodeForCausalLM")
    H, hd = 32, 8
    c = hf["transformer.h.0.attn.c_attn.weight"]
    for r in range(4):
        out = ref.expected_rank_tensors(d, 4, r, "fp32")
        local = out["transformer.h.0.attn.c_attn.weight"]
        assert local.shape == (H // 4 + 2 * hd, H)
        assert np.array_equal(local[H // 4:], c[H:])
        assert "lm_head.weight" in out  # untied in this config


def test_starcoder2_biases(tmp_path):
    d, cfg, hf = make(tmp_path, "Starcoder2ForCausalLM")
    out = ref.expected_rank_tensors(d, 2, 1, "fp32")
    p = "model.layers.0"
    assert np.array_equal(out[f"{p}.self_attn.o_proj.bias"], hf[f"{p}.self_attn.o_proj.bias"])
    assert np.array_equal(out[f"{p}.mlp.c_fc.bias"], hf[f"{p}.mlp.c_fc.bias"][24:])
    assert np.array_equal(out[f"{p}.mlp.c_proj.bias"], hf[f"{p}.mlp.c_proj.bias"])
    assert np.array_equal(out["model.norm.bias"], hf["model.norm.bias"])
    assert "lm_head.weight" not in out


def test_gemma_is_tied_and_keeps_raw_norms(tmp_path):
    d, cfg, hf = make(tmp_path, "Gemma2ForCausalLM")
    out = ref.expected_rank_tensors(d, 2, 0, "fp32")
    assert "lm_head.weight" not in out
    n = "model.layers.1.pre_feedforward_layernorm.weight"
    assert np.array_equal(out[n], hf[n])  # no +1 baked in
    assert out["model.layers.0.self_attn.qkv_proj.weight"].shape == ((2 + 1 + 1) * 16, 32)
    bad = tmp_path / "untied"
    synth.write_checkpoint(bad, dict(cfg, tie_word_embeddings=False), tensors=hf)
    with pytest.raises(VllmRefused, match="tie_word_embeddings"):
        ref.expected_rank_tensors(bad, 1, 0)


def test_deepseek_mla_fused_qkv_a_and_moe_tp(tmp_path):
    d, cfg, hf = make(tmp_path, "DeepseekV2ForCausalLM")
    T, Im = 2, 8
    for r in range(T):
        out = ref.expected_rank_tensors(d, T, r, "fp32")
        a = "model.layers.1.self_attn"
        fused = out[f"{a}.fused_qkv_a_proj.weight"]
        assert np.array_equal(fused, np.concatenate([hf[f"{a}.q_a_proj.weight"],
                                                     hf[f"{a}.kv_a_proj_with_mqa.weight"]]))
        assert f"{a}.kv_a_proj_with_mqa.weight" not in out
        m = "model.layers.1.mlp"
        w13, w2 = out[f"{m}.experts.w13_weight"], out[f"{m}.experts.w2_weight"]
        assert w13.shape == (5, 2 * Im // T, 32) and w2.shape == (5, 32, Im // T)
        e = 3
        s = slice(r * Im // T, (r + 1) * Im // T)
        assert np.array_equal(w13[e, :Im // T], hf[f"{m}.experts.{e}.gate_proj.weight"][s])
        assert np.array_equal(w13[e, Im // T:], hf[f"{m}.experts.{e}.up_proj.weight"][s])
        assert np.array_equal(w2[e], hf[f"{m}.experts.{e}.down_proj.weight"][:, s])
        assert np.array_equal(out[f"{m}.gate.weight"], hf[f"{m}.gate.weight"])
        assert out[f"{m}.shared_experts.gate_up_proj.weight"].shape == (2 * 16 // T, 32)
        assert out["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 48 // T, 32)


def test_deepseek_expert_parallel_linear_placement(tmp_path):
    d, cfg, hf = make(tmp_path, "DeepseekV2ForCausalLM")
    assert ref.expert_placement(5, 2, 0) == [0, 1, 2]
    assert ref.expert_placement(5, 2, 1) == [3, 4]
    assert ref.expert_placement(5, 4, 0) == [0, 1] and ref.expert_placement(5, 4, 3) == [4]
    m = "model.layers.1.mlp"
    for r, experts in enumerate([[0, 1, 2], [3, 4]]):
        out = ref.expected_rank_tensors(d, 2, r, "fp32", options={"enable_expert_parallel": 1})
        w13, w2 = out[f"{m}.experts.w13_weight"], out[f"{m}.experts.w2_weight"]
        assert w13.shape == (len(experts), 16, 32) and w2.shape == (len(experts), 32, 8)
        for i, e in enumerate(experts):
            assert np.array_equal(w13[i], np.concatenate([hf[f"{m}.experts.{e}.gate_proj.weight"],
                                                          hf[f"{m}.experts.{e}.up_proj.weight"]]))
            assert np.array_equal(w2[i], hf[f"{m}.experts.{e}.down_proj.weight"])
        # shared experts stay TP-split under EP
        assert out[f"{m}.shared_experts.gate_up_proj.weight"].shape == (16, 32)
    one = ref.expected_rank_tensors(d, 1, 0, "fp32", options={"enable_expert_parallel": 1})
    assert one[f"{m}.experts.w13_weight"].shape == (5, 16, 32)


def test_deepseek_without_q_lora(tmp_path):
    d, cfg, hf = make(tmp_path, "DeepseekV2ForCausalLM", q_lora_rank=None)
    out = ref.expected_rank_tensors(d, 2, 1, "fp32")
    a = "model.layers.0.self_attn"
    assert np.array_equal(out[f"{a}.kv_a_proj_with_mqa.weight"], hf[f"{a}.kv_a_proj_with_mqa.weight"])
    assert np.array_equal(out[f"{a}.q_proj.weight"], hf[f"{a}.q_proj.weight"][2 * 12:])
    assert not any("fused_qkv_a" in n or "q_a_" in n for n in out)


# --------------------------------------------------------------------------
# Ties, refusals, strictness

def test_tied_llama_ignores_lm_head(tmp_path):
    d, cfg, hf = make(tmp_path, "LlamaForCausalLM", tie_word_embeddings=True)
    out = ref.expected_rank_tensors(d, 2, 0)
    assert "lm_head.weight" not in out  # present on disk, skipped


def test_untied_without_lm_head_refused(tmp_path):
    d, cfg, hf = make(tmp_path, "Qwen2ForCausalLM")
    hf.pop("lm_head.weight")
    synth.write_checkpoint(d, cfg, tensors=hf)
    with pytest.raises(VllmRefused, match="lm_head.weight"):
        ref.expected_rank_tensors(d, 1, 0)


def test_refused_tp_sizes(tmp_path):
    cfg = synth.config_for("LlamaForCausalLM")
    assert ref.allowed_tp_sizes(cfg) == [1, 2, 4]
    d, *_ = make(tmp_path, "LlamaForCausalLM")
    with pytest.raises(VllmRefused, match="num_attention_heads"):
        ref.expected_rank_tensors(d, 3, 0)
    # heads 6, kv 3, vocab 100: T=3 passes heads/kv but 128 % 3 != 0 on the padded vocab
    cfg6 = synth.config_for("LlamaForCausalLM", num_attention_heads=6, num_key_value_heads=3,
                            hidden_size=36, intermediate_size=48)
    with pytest.raises(VllmRefused, match="padded vocab"):
        ref.check_tp(cfg6, 3)
    assert ref.allowed_tp_sizes(cfg6) == [1]  # T=2: 3 kv heads; T=3, 6: padded vocab 128
    with pytest.raises(VllmRefused, match="intermediate_size"):
        ref.check_tp(synth.config_for("LlamaForCausalLM", intermediate_size=50), 4)


def test_unknown_checkpoint_tensor_refused(tmp_path):
    d, cfg, hf = make(tmp_path, "LlamaForCausalLM")
    hf["model.layers.0.mlp.bogus.weight"] = np.zeros((2, 2), np.float32)
    synth.write_checkpoint(d, cfg, tensors=hf)
    with pytest.raises(VllmRefused, match="bogus"):
        ref.expected_rank_tensors(d, 1, 0)


def test_wrong_vocab_rows_refused(tmp_path):
    d, cfg, hf = make(tmp_path, "LlamaForCausalLM")
    synth.write_checkpoint(d, dict(cfg, vocab_size=99), tensors=hf)
    with pytest.raises(VllmRefused, match="vocab_size is 99"):
        ref.expected_rank_tensors(d, 1, 0)


# --------------------------------------------------------------------------
# Casts and file IO

def _bf16_bits_rne(x: np.ndarray) -> np.ndarray:
    """Integer-only fp32 -> bf16 (round to nearest even; NaN stays NaN)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(x)
    out = rounded.astype(np.uint16)
    out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def test_bf16_cast_is_round_to_nearest_even():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(100000, dtype=np.float32) * 10.0 ** rng.integers(-30, 30, 100000),
        np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3.4028235e38, 1e-45, 0.0, -0.0,
                  np.inf, -np.inf], np.float32)]).astype(np.float32)
    got = ref.cast(x, "bf16").view(np.uint16)
    assert np.array_equal(got, _bf16_bits_rne(x))
    assert ref.cast(np.float32([1 + 2 ** -8]), "bf16")[0] == 1.0  # tie -> even
    assert float(ref.cast(np.float32([1 + 3 * 2 ** -8]), "bf16")[0]) == 1 + 2 ** -6
    assert np.isnan(ref.cast(np.float32([np.nan]), "bf16")[0])


def test_fp16_cast():
    x = np.float32([1.0, 65504.0, 70000.0, 1 + 2 ** -11, 2 ** -25])
    got = ref.cast(x, "fp16")
    assert got.dtype == np.float16
    assert list(got[:4]) == [1.0, 65504.0, np.inf, 1.0] and got[4] == 0.0


def test_st_io_matches_safetensors(tmp_path):
    t = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float16)}
    safetensors.numpy.save_file(t, str(tmp_path / "x.safetensors"))
    got = st_io.load(tmp_path / "x.safetensors")
    assert got.keys() == t.keys() and all(np.array_equal(got[k], t[k]) and got[k].dtype == t[k].dtype
                                          for k in t)
    st_io.save(tmp_path / "y.safetensors", t)
    back = safetensors.numpy.load_file(str(tmp_path / "y.safetensors"))
    assert all(np.array_equal(back[k], t[k]) for k in t)
    bf = {"c": np.float32([1.5, -2.25, 3e38]).astype(ml_dtypes.bfloat16)}
    st_io.save(tmp_path / "z.safetensors", bf)
    z = st_io.load(tmp_path / "z.safetensors")["c"]
    assert z.dtype == ml_dtypes.bfloat16 and np.array_equal(z.view(np.uint16), bf["c"].view(np.uint16))


def test_sharded_checkpoint_equals_single(tmp_path):
    cfg = synth.config_for("Qwen2ForCausalLM")
    one, many = tmp_path / "one", tmp_path / "many"
    hf = synth.write_checkpoint(one, cfg, seed=3)
    synth.write_checkpoint(many, cfg, tensors=hf, shard_bytes=20000)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    a, b = ref.expected_rank_tensors(one, 2, 1), ref.expected_rank_tensors(many, 2, 1)
    assert a.keys() == b.keys() and all(np.array_equal(a[n].view(np.uint16), b[n].view(np.uint16))
                                        for n in a)


def test_bf16_checkpoint_reads_exactly(tmp_path):
    cfg = synth.config_for("LlamaForCausalLM")
    hf = synth.random_tensors(synth.hf_shapes(cfg), seed=5, dtype=ml_dtypes.bfloat16)
    synth.write_checkpoint(tmp_path, cfg, tensors=hf)
    out = ref.expected_rank_tensors(tmp_path, 1, 0, dtype="bf16")
    assert np.array_equal(out["model.norm.weight"].view(np.uint16), hf["model.norm.weight"].view(np.uint16))
