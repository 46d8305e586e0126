"""Independent numpy reference of the tensors each vLLM tensor-parallel rank holds
after loading a Hugging Face checkpoint (vLLM CURRENT, see the project's layout
reference: generic layers, per-architecture rules, reference algorithm).

It shares no code or rule files with the daemon on purpose: integration tests
compare the daemon's output bit for bit against this. Everything is computed in
float32 and cast once at the end with ml_dtypes / numpy (round to nearest even).

Public API:
    expected_rank_tensors(ckpt_dir, tp_size, tp_rank, dtype="bf16", options=None)
        -> {vLLM parameter name: np.ndarray}
    allowed_tp_sizes(config) -> list[int]
    VllmRefused: raised for configurations vLLM would refuse.
"""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

import st_io

VOCAB_PAD = 64
ROTARY_SKIPS = ("rotary_pos_emb.inv_freq", "rotary_emb.inv_freq",
                "rotary_emb.cos_cached", "rotary_emb.sin_cached")
KNOWN_OPTIONS = {"enable_expert_parallel", "vllm_routed_experts"}


class VllmRefused(ValueError):
    """The configuration (or checkpoint) is one vLLM would refuse to load."""


# --------------------------------------------------------------------------
# Generic layer rules

def divide(a: int, b: int, what: str) -> int:
    if b <= 0 or a % b != 0:
        raise VllmRefused(f"{what} ({a}) is not divisible by {b}")
    return a // b


def col(X: np.ndarray, T: int, r: int, what="output dim") -> np.ndarray:
    """ColumnParallelLinear weight/bias: split dim 0."""
    s = divide(X.shape[0], T, what)
    return X[r * s:(r + 1) * s]


def row(X: np.ndarray, T: int, r: int, what="input dim") -> np.ndarray:
    """RowParallelLinear weight: split dim 1."""
    s = divide(X.shape[1], T, what)
    return X[:, r * s:(r + 1) * s]


def kv_partition(nkv: int, T: int) -> tuple[int, int]:
    """(local kv heads, kv head replicas) of QKVParallelLinear."""
    if T >= nkv:
        return 1, divide(T, nkv, f"tp_size vs num_key_value_heads={nkv}")
    return divide(nkv, T, "num_key_value_heads"), 1


def kv_head_group(nkv: int, T: int, r: int) -> int:
    """Index g of the block of kv heads rank r holds (heads [g*nkv_l, (g+1)*nkv_l))."""
    _, rep = kv_partition(nkv, T)
    return r // rep


def qkv(Wq, Wk, Wv, nh, nkv, hd, T, r, v_hd=None) -> np.ndarray:
    """QKVParallelLinear: [q_r; k_g; v_g] (works for weights and 1-D biases)."""
    v_hd = v_hd or hd
    nh_l = divide(nh, T, "num_attention_heads")
    nkv_l, rep = kv_partition(nkv, T)
    g = r // rep
    if Wq.shape[0] != nh * hd or Wk.shape[0] != nkv * hd or Wv.shape[0] != nkv * v_hd:
        raise VllmRefused(f"q/k/v rows {Wq.shape[0]}/{Wk.shape[0]}/{Wv.shape[0]} do not match "
                          f"heads {nh}/{nkv} x head_dim {hd}")
    return np.concatenate([Wq[r * nh_l * hd:(r + 1) * nh_l * hd],
                           Wk[g * nkv_l * hd:(g + 1) * nkv_l * hd],
                           Wv[g * nkv_l * v_hd:(g + 1) * nkv_l * v_hd]], axis=0)


def split_fused_qkv(X, nh, nkv, hd, v_hd=None):
    """Pre-fused [Q; K; V] on disk (Phi-3 qkv_proj, GPT-2/GPTBigCode c_attn), cut at global sizes."""
    v_hd = v_hd or hd
    if X.shape[0] != (nh + nkv) * hd + nkv * v_hd:
        raise VllmRefused(f"fused qkv has {X.shape[0]} rows, expected {(nh + nkv) * hd + nkv * v_hd}")
    return X[:nh * hd], X[nh * hd:(nh + nkv) * hd], X[(nh + nkv) * hd:]


def merged(parts, T: int, r: int) -> np.ndarray:
    """MergedColumnParallelLinear: concatenation of each part's rank chunk."""
    return np.concatenate([col(p, T, r, "merged output size") for p in parts], axis=0)


def split_fused(X, sizes):
    """Pre-fused merged tensor on disk (Phi-3 gate_up_proj), cut at global sizes."""
    if X.shape[0] != sum(sizes):
        raise VllmRefused(f"fused tensor has {X.shape[0]} rows, expected {sum(sizes)}")
    offs = np.cumsum([0] + list(sizes))
    return [X[offs[i]:offs[i + 1]] for i in range(len(sizes))]


def padded_vocab(V: int, pad_to: int = VOCAB_PAD) -> int:
    return (V + pad_to - 1) // pad_to * pad_to


def vocab_range(V: int, T: int, r: int) -> tuple[int, int, int]:
    """(first id, end id, rows per rank) of VocabParallelEmbedding rank r (no LoRA vocab)."""
    per = divide(padded_vocab(V), T, f"padded vocab size (vocab_size {V})")
    return min(r * per, V), min((r + 1) * per, V), per


def vocab(W: np.ndarray, T: int, r: int, V: int | None = None) -> np.ndarray:
    """VocabParallelEmbedding / ParallelLMHead: real rows of the rank's range, then zero rows."""
    V = W.shape[0] if V is None else V
    if W.shape[0] != V:
        raise VllmRefused(f"embedding has {W.shape[0]} rows but vocab_size is {V}")
    s, e, per = vocab_range(V, T, r)
    out = np.zeros((per,) + W.shape[1:], dtype=W.dtype)
    out[:e - s] = W[s:e]
    return out


def expert_placement(E: int, ep: int, ep_rank: int) -> list[int]:
    """determine_expert_map, 'linear': the first E % ep ranks get one extra expert."""
    base, rem = divmod(E, ep)
    local = base + 1 if ep_rank < rem else base
    start = ep_rank * base + min(ep_rank, rem)
    return list(range(start, start + local))


def moe_experts(gates, ups, downs, t, k, experts):
    w13 = np.stack([np.concatenate([col(gates[e], t, k, "moe_intermediate_size"),
                                    col(ups[e], t, k, "moe_intermediate_size")], axis=0)
                    for e in experts])
    w2 = np.stack([row(downs[e], t, k, "moe_intermediate_size") for e in experts])
    return w13, w2


# --------------------------------------------------------------------------
# Checkpoint access

class Checkpoint:
    """Lazy name -> float32 array view of a (possibly sharded) safetensors checkpoint.
    Records which names were consumed so that leftovers can be reported."""

    def __init__(self, directory):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors files in {self.dir}")
        self._where: dict[str, tuple] = {}
        for fname in files:
            path = self.dir / fname
            header, start = st_io.read_header(path)
            mm = np.memmap(path, dtype=np.uint8, mode="r")
            for name in header:
                if name in self._where:
                    raise ValueError(f"tensor {name} appears in two checkpoint files")
                self._where[name] = (path, header, start, mm)
        self.used: set[str] = set()

    def names(self):
        return set(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str):
        return tuple(self._where[name][1][name]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise VllmRefused(f"Some weights are not initialized from checkpoint: {name} is missing")
        self.used.add(name)
        path, header, start, mm = self._where[name]
        return st_io.read_tensor(path, header, start, name, mm).astype(np.float32)

    def check_all_used(self, ignorable) -> None:
        left = sorted(n for n in self.names() - self.used if not ignorable(n))
        if left:
            raise VllmRefused(f"checkpoint tensors vLLM has no parameter for: {left[:5]}"
                              + (f" (+{len(left) - 5} more)" if len(left) > 5 else ""))


def _rotary_skip(name: str) -> bool:
    return any(s in name for s in ROTARY_SKIPS)


def _cfg_int(cfg: dict, key: str, default=None) -> int:
    v = cfg.get(key)
    if v is None:
        if default is None:
            raise VllmRefused(f"config.json has no {key!r}")
        return default
    return int(v)


def _tied(cfg: dict, default: bool) -> bool:
    v = cfg.get("tie_word_embeddings")
    return default if v is None else bool(v)


# --------------------------------------------------------------------------
# Architecture families

def _decoder_common(cfg, head_dim_default=None):
    H = _cfg_int(cfg, "hidden_size")
    nh = _cfg_int(cfg, "num_attention_heads")
    nkv = _cfg_int(cfg, "num_key_value_heads", nh)
    hd = cfg.get("head_dim") or head_dim_default or H // nh
    return H, nh, nkv, int(hd), _cfg_int(cfg, "num_hidden_layers"), _cfg_int(cfg, "vocab_size")


def _qkv_from_separate(ck, p, nh, nkv, hd, T, r, bias: bool, out):
    """q_proj/k_proj/v_proj (+bias) under prefix p -> p.qkv_proj.*"""
    out[f"{p}.qkv_proj.weight"] = qkv(ck[f"{p}.q_proj.weight"], ck[f"{p}.k_proj.weight"],
                                      ck[f"{p}.v_proj.weight"], nh, nkv, hd, T, r)
    if bias:
        out[f"{p}.qkv_proj.bias"] = qkv(ck[f"{p}.q_proj.bias"], ck[f"{p}.k_proj.bias"],
                                        ck[f"{p}.v_proj.bias"], nh, nkv, hd, T, r)


def _row_linear(ck, name, T, r, bias: bool, out):
    """RowParallelLinear: weight split on dim 1, bias full."""
    out[f"{name}.weight"] = row(ck[f"{name}.weight"], T, r)
    if bias:
        out[f"{name}.bias"] = ck[f"{name}.bias"]


def _col_linear(ck, name, T, r, bias: bool, out):
    out[f"{name}.weight"] = col(ck[f"{name}.weight"], T, r)
    if bias:
        out[f"{name}.bias"] = col(ck[f"{name}.bias"], T, r)


def _gated_mlp(ck, p, T, r, bias: bool, out, fused_on_disk=False, I=None):
    """gate_proj/up_proj -> p.gate_up_proj (merged), down_proj row."""
    for kind in ("weight", "bias") if bias else ("weight",):
        if fused_on_disk:
            parts = split_fused(ck[f"{p}.gate_up_proj.{kind}"], [I, I])
        else:
            parts = [ck[f"{p}.gate_proj.{kind}"], ck[f"{p}.up_proj.{kind}"]]
        out[f"{p}.gate_up_proj.{kind}"] = merged(parts, T, r)
    _row_linear(ck, f"{p}.down_proj", T, r, bias, out)


def _full(ck, names, out):
    for n in names:
        out[n] = ck[n]


def _embeddings(ck, T, r, V, tied, out, embed="model.embed_tokens.weight", has_lm_head=True):
    out[embed] = vocab(ck[embed], T, r, V)
    if has_lm_head and not tied:
        out["lm_head.weight"] = vocab(ck["lm_head.weight"], T, r, V)


def llama_family(cfg, ck, T, r, opts, fused_on_disk=False):
    """Llama / LLaMA / Mistral / InternLM / Aquila, and Phi-3 (fused_on_disk)."""
    H, nh, nkv, hd, NL, V = _decoder_common(cfg)
    attn_bias = bool(cfg.get("attention_bias") or cfg.get("bias"))
    qkv_bias = bool(cfg["qkv_bias"]) if cfg.get("qkv_bias") is not None else attn_bias
    mlp_bias = bool(cfg.get("mlp_bias"))
    I = _cfg_int(cfg, "intermediate_size")
    tied = _tied(cfg, False)
    out: dict = {}
    _embeddings(ck, T, r, V, tied, out)
    for L in range(NL):
        p = f"model.layers.{L}"
        a = f"{p}.self_attn"
        if fused_on_disk:
            for kind in ("weight", "bias") if qkv_bias else ("weight",):
                q, k, v = split_fused_qkv(ck[f"{a}.qkv_proj.{kind}"], nh, nkv, hd)
                out[f"{a}.qkv_proj.{kind}"] = qkv(q, k, v, nh, nkv, hd, T, r)
        else:
            _qkv_from_separate(ck, a, nh, nkv, hd, T, r, qkv_bias, out)
        _row_linear(ck, f"{a}.o_proj", T, r, attn_bias, out)
        _gated_mlp(ck, f"{p}.mlp", T, r, mlp_bias, out, fused_on_disk, I)
        _full(ck, [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"], out)
    _full(ck, ["model.norm.weight"], out)

    def ignorable(n):
        return (_rotary_skip(n) or (tied and n.startswith("lm_head."))
                or n.endswith(".bias"))  # "extra bias for GPTQ models"
    ck.check_all_used(ignorable)
    return out


def phi3(cfg, ck, T, r, opts):
    return llama_family(cfg, ck, T, r, opts, fused_on_disk=True)


def gemma_family(cfg, ck, T, r, opts, gemma2=False):
    """Gemma / Gemma2: always tied (no lm_head module), raw norm weights (+1 at runtime)."""
    H, nh, nkv, hd, NL, V = _decoder_common(cfg, head_dim_default=256)
    if not _tied(cfg, True):
        raise VllmRefused("Gemma requires tie_word_embeddings")
    bias = gemma2 and bool(cfg.get("attention_bias"))
    norms = ["input_layernorm", "post_attention_layernorm"]
    if gemma2:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    out: dict = {}
    _embeddings(ck, T, r, V, True, out, has_lm_head=False)
    for L in range(NL):
        p = f"model.layers.{L}"
        _qkv_from_separate(ck, f"{p}.self_attn", nh, nkv, hd, T, r, bias, out)
        _row_linear(ck, f"{p}.self_attn.o_proj", T, r, bias, out)
        _gated_mlp(ck, f"{p}.mlp", T, r, False, out)
        _full(ck, [f"{p}.{n}.weight" for n in norms], out)
    _full(ck, ["model.norm.weight"], out)
    ck.check_all_used(lambda n: _rotary_skip(n) or n.startswith("lm_head.") or n.endswith(".bias"))
    return out


def qwen2(cfg, ck, T, r, opts):
    """Qwen2: qkv with bias, o_proj without; head_dim always H/nh."""
    H = _cfg_int(cfg, "hidden_size")
    nh = _cfg_int(cfg, "num_attention_heads")
    nkv = _cfg_int(cfg, "num_key_value_heads", nh)
    hd = H // nh
    NL, V = _cfg_int(cfg, "num_hidden_layers"), _cfg_int(cfg, "vocab_size")
    tied = _tied(cfg, False)
    out: dict = {}
    _embeddings(ck, T, r, V, tied, out)
    for L in range(NL):
        p = f"model.layers.{L}"
        a = f"{p}.self_attn"
        _qkv_from_separate(ck, a, nh, nkv, hd, T, r, True, out)
        _row_linear(ck, f"{a}.o_proj", T, r, False, out)
        if cfg.get("qk_norm"):
            _full(ck, [f"{a}.q_norm.weight", f"{a}.k_norm.weight"], out)
        _gated_mlp(ck, f"{p}.mlp", T, r, False, out)
        _full(ck, [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"], out)
    _full(ck, ["model.norm.weight"], out)
    # CURRENT Qwen2 silently skips names it has no parameter for.
    ck.check_all_used(lambda n: True)
    return out


def starcoder2(cfg, ck, T, r, opts):
    """Starcoder2: separate q/k/v, plain c_fc/c_proj MLP, LayerNorms with bias."""
    H = _cfg_int(cfg, "hidden_size")
    nh = _cfg_int(cfg, "num_attention_heads")
    nkv = _cfg_int(cfg, "num_key_value_heads", nh)
    hd = H // nh
    NL, V = _cfg_int(cfg, "num_hidden_layers"), _cfg_int(cfg, "vocab_size")
    bias = bool(cfg.get("use_bias", True))
    tied = _tied(cfg, True)
    out: dict = {}
    _embeddings(ck, T, r, V, tied, out)
    for L in range(NL):
        p = f"model.layers.{L}"
        _qkv_from_separate(ck, f"{p}.self_attn", nh, nkv, hd, T, r, bias, out)
        _row_linear(ck, f"{p}.self_attn.o_proj", T, r, bias, out)
        _col_linear(ck, f"{p}.mlp.c_fc", T, r, bias, out)
        _row_linear(ck, f"{p}.mlp.c_proj", T, r, bias, out)
        _full(ck, [f"{p}.{n}.{k}" for n in ("input_layernorm", "post_attention_layernorm")
                   for k in ("weight", "bias")], out)
    _full(ck, ["model.norm.weight", "model.norm.bias"], out)
    ck.check_all_used(lambda n: _rotary_skip(n) or (tied and n == "lm_head.weight"))
    return out


class _Prefixed:
    """GPT-2 checkpoints may omit the 'transformer.' prefix (GPT2Model state dicts)."""

    def __init__(self, ck):
        self.ck = ck
        self.map = {}
        for n in ck.names():
            key = n if n.startswith(("transformer.", "lm_head")) else "transformer." + n
            self.map[key] = n

    def __getitem__(self, name):
        if name not in self.map:
            raise VllmRefused(f"Some weights are not initialized from checkpoint: {name} is missing")
        return self.ck[self.map[name]]


def gpt2(cfg, ck, T, r, opts):
    """GPT-2: Conv1D weights are [in, out] and transposed; c_attn is pre-fused [Q;K;V]."""
    H = _cfg_int(cfg, "n_embd")
    nh = _cfg_int(cfg, "n_head")
    NL, V = _cfg_int(cfg, "n_layer"), _cfg_int(cfg, "vocab_size")
    hd = divide(H, nh, "n_embd by n_head")
    for flag in ("add_cross_attention", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if cfg.get(flag):
            raise VllmRefused(f"GPT-2 with {flag} is not supported by vLLM")
    tied = _tied(cfg, True)
    pk = _Prefixed(ck)
    out: dict = {}
    out["transformer.wte.weight"] = vocab(pk["transformer.wte.weight"], T, r, V)
    if not tied:
        out["lm_head.weight"] = vocab(pk["lm_head.weight"], T, r, V)
    out["transformer.wpe.weight"] = pk["transformer.wpe.weight"]
    for L in range(NL):
        p = f"transformer.h.{L}"
        for kind in ("weight", "bias"):
            X = pk[f"{p}.attn.c_attn.{kind}"]
            q, k, v = split_fused_qkv(X.T if kind == "weight" else X, nh, nh, hd)
            out[f"{p}.attn.c_attn.{kind}"] = qkv(q, k, v, nh, nh, hd, T, r)
        out[f"{p}.attn.c_proj.weight"] = row(pk[f"{p}.attn.c_proj.weight"].T, T, r)
        out[f"{p}.attn.c_proj.bias"] = pk[f"{p}.attn.c_proj.bias"]
        out[f"{p}.mlp.c_fc.weight"] = col(pk[f"{p}.mlp.c_fc.weight"].T, T, r)
        out[f"{p}.mlp.c_fc.bias"] = col(pk[f"{p}.mlp.c_fc.bias"], T, r)
        out[f"{p}.mlp.c_proj.weight"] = row(pk[f"{p}.mlp.c_proj.weight"].T, T, r)
        out[f"{p}.mlp.c_proj.bias"] = pk[f"{p}.mlp.c_proj.bias"]
        for n in ("ln_1", "ln_2"):
            for kind in ("weight", "bias"):
                out[f"{p}.{n}.{kind}"] = pk[f"{p}.{n}.{kind}"]
    for kind in ("weight", "bias"):
        out[f"transformer.ln_f.{kind}"] = pk[f"transformer.ln_f.{kind}"]
    ck.check_all_used(lambda n: ".attn.bias" in n or ".attn.masked_bias" in n
                      or (tied and n.startswith("lm_head.")))
    return out


def gpt_bigcode(cfg, ck, T, r, opts):
    """GPTBigCode: nn.Linear (no transpose), pre-fused c_attn with MQA kv (replicated)."""
    H = _cfg_int(cfg, "n_embd")
    nh = _cfg_int(cfg, "n_head")
    NL, V = _cfg_int(cfg, "n_layer"), _cfg_int(cfg, "vocab_size")
    hd = divide(H, nh, "n_embd by n_head")
    nkv = 1 if cfg.get("multi_query", True) else nh
    tied = _tied(cfg, True)
    out: dict = {}
    _embeddings(ck, T, r, V, tied, out, embed="transformer.wte.weight")
    out["transformer.wpe.weight"] = ck["transformer.wpe.weight"]
    for L in range(NL):
        p = f"transformer.h.{L}"
        for kind in ("weight", "bias"):
            q, k, v = split_fused_qkv(ck[f"{p}.attn.c_attn.{kind}"], nh, nkv, hd)
            out[f"{p}.attn.c_attn.{kind}"] = qkv(q, k, v, nh, nkv, hd, T, r)
        _row_linear(ck, f"{p}.attn.c_proj", T, r, True, out)
        _col_linear(ck, f"{p}.mlp.c_fc", T, r, True, out)
        _row_linear(ck, f"{p}.mlp.c_proj", T, r, True, out)
        _full(ck, [f"{p}.{n}.{k}" for n in ("ln_1", "ln_2") for k in ("weight", "bias")], out)
    _full(ck, ["transformer.ln_f.weight", "transformer.ln_f.bias"], out)
    ck.check_all_used(lambda n: ".attn.bias" in n or (tied and n.startswith("lm_head.")))
    return out


def _deepseek_is_moe(cfg, L: int) -> bool:
    return (cfg.get("n_routed_experts") is not None
            and L >= _cfg_int(cfg, "first_k_dense_replace", 0)
            and L % _cfg_int(cfg, "moe_layer_freq", 1) == 0)


def deepseek_v2(cfg, ck, T, r, opts):
    """DeepseekV2 with CURRENT's MLA attention and FusedMoE (EP off or on)."""
    NL, V = _cfg_int(cfg, "num_hidden_layers"), _cfg_int(cfg, "vocab_size")
    nh = _cfg_int(cfg, "num_attention_heads")
    divide(nh, T, "num_attention_heads")
    q_lora = cfg.get("q_lora_rank")
    ep = bool(opts.get("enable_expert_parallel")) and T > 1
    t_moe, k_moe = (1, 0) if ep else (T, r)
    out: dict = {}
    _embeddings(ck, T, r, V, False, out)
    for L in range(NL):
        p = f"model.layers.{L}"
        a = f"{p}.self_attn"
        if q_lora is not None:
            out[f"{a}.fused_qkv_a_proj.weight"] = np.concatenate(
                [ck[f"{a}.q_a_proj.weight"], ck[f"{a}.kv_a_proj_with_mqa.weight"]], axis=0)
            _full(ck, [f"{a}.q_a_layernorm.weight"], out)
            _col_linear(ck, f"{a}.q_b_proj", T, r, False, out)
        else:
            _col_linear(ck, f"{a}.q_proj", T, r, False, out)
            _full(ck, [f"{a}.kv_a_proj_with_mqa.weight"], out)
        _full(ck, [f"{a}.kv_a_layernorm.weight"], out)
        _col_linear(ck, f"{a}.kv_b_proj", T, r, False, out)
        _row_linear(ck, f"{a}.o_proj", T, r, False, out)
        _full(ck, [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"], out)
        m = f"{p}.mlp"
        if not _deepseek_is_moe(cfg, L):
            _gated_mlp(ck, m, T, r, False, out)
        else:
            E = _cfg_int(cfg, "n_routed_experts")
            _full(ck, [f"{m}.gate.weight"], out)
            if cfg.get("topk_method") == "noaux_tc":
                _full(ck, [f"{m}.gate.e_score_correction_bias"], out)
            if cfg.get("n_shared_experts"):
                _gated_mlp(ck, f"{m}.shared_experts", T, r, False, out)
            experts = expert_placement(E, T, r) if ep else list(range(E))
            gates = {e: ck[f"{m}.experts.{e}.gate_proj.weight"] for e in experts}
            ups = {e: ck[f"{m}.experts.{e}.up_proj.weight"] for e in experts}
            downs = {e: ck[f"{m}.experts.{e}.down_proj.weight"] for e in experts}
            fused = f"{m}.experts.routed_experts" if opts.get("vllm_routed_experts") else f"{m}.experts"
            out[f"{fused}.w13_weight"], out[f"{fused}.w2_weight"] = \
                moe_experts(gates, ups, downs, t_moe, k_moe, experts)
    _full(ck, ["model.norm.weight"], out)

    def ignorable(n):
        if _rotary_skip(n) or n.endswith(".bias"):
            return True
        parts = n.split(".")
        if n.startswith("model.layers.") and parts[2].isdigit() and int(parts[2]) >= NL:
            return True  # MTP / speculative layers
        # routed experts of other EP ranks are skipped by the loader
        return ep and ".mlp.experts." in n and parts[5].isdigit()
    ck.check_all_used(ignorable)
    return out


def mixtral(cfg, ck, T, r, opts):
    """Mixtral: Llama attention without biases; every layer MoE (router + FusedMoE, EP off or on).
    Experts on disk: block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) / w2 (down)."""
    H, nh, nkv, hd, NL, V = _decoder_common(cfg)
    E = _cfg_int(cfg, "num_local_experts")
    ep = bool(opts.get("enable_expert_parallel")) and T > 1
    t_moe, k_moe = (1, 0) if ep else (T, r)
    experts = expert_placement(E, T, r) if ep else list(range(E))
    # vLLM >= 0.3x keeps the expert weights in the FusedMoE's child module routed_experts
    fused = "experts.routed_experts" if opts.get("vllm_routed_experts") else "experts"
    tied = _tied(cfg, False)
    out: dict = {}
    _embeddings(ck, T, r, V, tied, out)
    for L in range(NL):
        p = f"model.layers.{L}"
        a = f"{p}.self_attn"
        _qkv_from_separate(ck, a, nh, nkv, hd, T, r, False, out)
        _row_linear(ck, f"{a}.o_proj", T, r, False, out)
        m = f"{p}.block_sparse_moe"
        _full(ck, [f"{m}.gate.weight"], out)
        gates = {e: ck[f"{m}.experts.{e}.w1.weight"] for e in experts}
        ups = {e: ck[f"{m}.experts.{e}.w3.weight"] for e in experts}
        downs = {e: ck[f"{m}.experts.{e}.w2.weight"] for e in experts}
        out[f"{m}.{fused}.w13_weight"], out[f"{m}.{fused}.w2_weight"] = \
            moe_experts(gates, ups, downs, t_moe, k_moe, experts)
        _full(ck, [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"], out)
    _full(ck, ["model.norm.weight"], out)

    def ignorable(n):
        if _rotary_skip(n) or (tied and n.startswith("lm_head.")):
            return True
        parts = n.split(".")  # routed experts of other EP ranks are skipped by the loader
        return ep and ".block_sparse_moe.experts." in n and parts[5].isdigit()
    ck.check_all_used(ignorable)
    return out


ARCHITECTURES = {
    "GPT2LMHeadModel": gpt2,
    "LlamaForCausalLM": llama_family,
    "LLaMAForCausalLM": llama_family,
    "MistralForCausalLM": llama_family,
    "InternLMForCausalLM": llama_family,
    "AquilaModel": llama_family,
    "AquilaForCausalLM": llama_family,
    "Phi3ForCausalLM": phi3,
    "GemmaForCausalLM": gemma_family,
    "Gemma2ForCausalLM": lambda c, k, T, r, o: gemma_family(c, k, T, r, o, gemma2=True),
    "GPTBigCodeForCausalLM": gpt_bigcode,
    "Starcoder2ForCausalLM": starcoder2,
    "Qwen2ForCausalLM": qwen2,
    "DeepseekV2ForCausalLM": deepseek_v2,
    "MixtralForCausalLM": mixtral,
}


# --------------------------------------------------------------------------
# TP-size checks (the divisibility asserts vLLM makes, without loading tensors)

def check_tp(cfg: dict, T: int, options: dict | None = None) -> None:
    """Raises VllmRefused if vLLM would refuse tp_size T for this config."""
    options = options or {}
    arch = architecture(cfg)
    if T < 1:
        raise VllmRefused(f"tp_size must be >= 1, got {T}")
    if arch in ("GPT2LMHeadModel", "GPTBigCodeForCausalLM"):
        nh = _cfg_int(cfg, "n_head")
        H = _cfg_int(cfg, "n_embd")
        divide(nh, T, "n_head")
        divide(_cfg_int(cfg, "n_inner", 4 * H), T, "n_inner")
        nkv = 1 if arch == "GPTBigCodeForCausalLM" and cfg.get("multi_query", True) else nh
        kv_partition(nkv, T)
    elif arch == "DeepseekV2ForCausalLM":
        divide(_cfg_int(cfg, "num_attention_heads"), T, "num_attention_heads")
        NL = _cfg_int(cfg, "num_hidden_layers")
        moe_layers = [L for L in range(NL) if _deepseek_is_moe(cfg, L)]
        if len(moe_layers) < NL:
            divide(_cfg_int(cfg, "intermediate_size"), T, "intermediate_size")
        if moe_layers:
            I_m = _cfg_int(cfg, "moe_intermediate_size")
            if not (options.get("enable_expert_parallel") and T > 1):
                divide(I_m, T, "moe_intermediate_size")
            if cfg.get("n_shared_experts"):
                divide(I_m * int(cfg["n_shared_experts"]), T, "shared experts intermediate size")
    else:
        nh = _cfg_int(cfg, "num_attention_heads")
        divide(nh, T, "num_attention_heads")
        kv_partition(_cfg_int(cfg, "num_key_value_heads", nh), T)
        ep = arch == "MixtralForCausalLM" and bool(options.get("enable_expert_parallel")) and T > 1
        if not ep:
            divide(_cfg_int(cfg, "intermediate_size"), T, "intermediate_size")
    vocab_range(_cfg_int(cfg, "vocab_size"), T, 0)


def allowed_tp_sizes(config, options: dict | None = None, max_tp: int | None = None) -> list[int]:
    """TP sizes vLLM accepts for this config (config: dict or path to a checkpoint dir)."""
    cfg = load_config(config) if not isinstance(config, dict) else config
    if max_tp is None:
        max_tp = _cfg_int(cfg, "n_head" if "n_head" in cfg else "num_attention_heads")
    ok = []
    for T in range(1, max_tp + 1):
        try:
            check_tp(cfg, T, options)
        except VllmRefused:
            continue
        ok.append(T)
    return ok


# --------------------------------------------------------------------------
# Entry point

def load_config(path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    return json.loads(path.read_text())


def architecture(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    if not archs:
        raise VllmRefused("config.json has no 'architectures'")
    if archs[0] not in ARCHITECTURES:
        raise VllmRefused(f"architecture {archs[0]} is not covered by the reference")
    return archs[0]


def cast(a: np.ndarray, dtype: str) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype in ("bf16", "bfloat16"):
        return a.astype(ml_dtypes.bfloat16)
    if dtype in ("fp16", "f16", "float16"):
        with np.errstate(over="ignore"):  # out of range -> inf, as torch's cast
            return a.astype(np.float16)
    if dtype in ("fp32", "f32", "float32"):
        return a.copy()
    raise ValueError(f"unknown dtype {dtype!r}")


def expected_rank_tensors(ckpt_dir, tp_size: int, tp_rank: int, dtype: str = "bf16",
                          options: dict | None = None) -> dict[str, np.ndarray]:
    """The tensors vLLM TP rank `tp_rank` of `tp_size` holds after loading ckpt_dir,
    keyed by vLLM parameter name (tied parameters appear once), cast to `dtype`."""
    options = dict(options or {})
    unknown = set(options) - KNOWN_OPTIONS
    if unknown:
        raise ValueError(f"unknown engine options {sorted(unknown)}")
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp_size {tp_size}")
    cfg = load_config(ckpt_dir)
    arch = architecture(cfg)
    check_tp(cfg, tp_size, options)
    ck = Checkpoint(ckpt_dir)
    out = ARCHITECTURES[arch](cfg, ck, tp_size, tp_rank, options)
    return {k: cast(v, dtype) for k, v in out.items()}


def describe_kv_heads(cfg: dict, T: int) -> list[list[int]]:
    """For each rank, the global kv head indices it holds (QKVParallelLinear)."""
    nh = _cfg_int(cfg, "num_attention_heads")
    nkv = _cfg_int(cfg, "num_key_value_heads", nh)
    nkv_l, _ = kv_partition(nkv, T)
    return [[kv_head_group(nkv, T, r) * nkv_l + i for i in range(nkv_l)] for r in range(T)]
