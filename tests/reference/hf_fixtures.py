"""Builds tiny real Hugging Face transformers models (random weights, one or more
per architecture vLLM's reference covers) and saves them with save_pretrained,
so that integration tests push checkpoints exactly as transformers writes them
(names, config keys, tied weights dropped), not only the ones weightsyncctl
gen-checkpoint makes.

The configs allow tensor parallelism up to 8 (8 attention heads, intermediate
sizes divisible by 8, kv heads 1, 2, 4 or 8 so that T=8 replicates them) and
use vocab sizes that are not multiples of 64, so the padded rows show.
InternLM, Aquila and LLaMA checkpoints are llama-format and have no
transformers class: a LlamaForCausalLM is saved and config.json's
"architectures" (and InternLM's bias key) rewritten.

The checkpoints (about 100 KB each) are committed under hf_checkpoints/ for
machines without torch + transformers (tests/requirements-hf.txt); the
integration tests regenerate them into a temporary directory when transformers
is importable and check that names, shapes and configs did not drift.

    python tests/reference/hf_fixtures.py [--out DIR] [--only NAME ...] [--check]

--check also verifies that every checkpoint's tensor names and shapes equal
synth.hf_shapes(config) and that the reference accepts it at every TP size.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "hf_checkpoints"
TP_SIZES = (1, 2, 4, 8)

# 8 heads of head_dim 4, intermediate 48 (6 per rank at T=8), vocab 100 (padded to 128);
# special token ids inside the tiny vocab (transformers warns otherwise).
TOKENS = dict(bos_token_id=1, eos_token_id=2)
DECODER = dict(hidden_size=32, intermediate_size=48, num_attention_heads=8, num_key_value_heads=2,
               num_hidden_layers=2, vocab_size=100, **TOKENS)
GPT = dict(n_embd=32, n_head=8, n_layer=2, n_positions=16, vocab_size=100, **TOKENS)
DEEPSEEK = dict(TOKENS, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_attention_heads=8,
                num_key_value_heads=8, num_hidden_layers=2, vocab_size=100, num_experts_per_tok=2,
                first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                v_head_dim=6, n_group=1, topk_group=1)


@dataclass(frozen=True)
class Variant:
    model_class: str            # transformers class that builds the model
    config_class: str
    config: dict
    dtype: str = "float32"      # torch dtype the checkpoint is saved in
    architecture: str = ""      # config.json "architectures"[0] when not model_class
    config_edits: dict = field(default_factory=dict)  # keys set (None: removed) after saving

    @property
    def arch(self) -> str:
        return self.architecture or self.model_class


def _llama_format(arch: str, **cfg) -> Variant:
    return Variant("LlamaForCausalLM", "LlamaConfig", dict(DECODER, **cfg), architecture=arch)


VARIANTS: dict[str, Variant] = {
    "llama": Variant("LlamaForCausalLM", "LlamaConfig", DECODER),
    "llama-bias-tied": Variant("LlamaForCausalLM", "LlamaConfig", dict(
        DECODER, num_key_value_heads=4, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "LLaMA-mha": _llama_format("LLaMAForCausalLM", num_key_value_heads=8, vocab_size=131),
    # InternLM configs say "bias": true (q/k/v/o biases) and have no attention_bias.
    "internlm": Variant("LlamaForCausalLM", "LlamaConfig", dict(
        DECODER, num_key_value_heads=8, attention_bias=True, vocab_size=103),
        architecture="InternLMForCausalLM", config_edits={"bias": True, "attention_bias": None}),
    "aquila-model": _llama_format("AquilaModel", num_key_value_heads=4, vocab_size=90),
    "aquila": _llama_format("AquilaForCausalLM", vocab_size=90),
    "mistral": Variant("MistralForCausalLM", "MistralConfig", dict(DECODER, head_dim=8)),
    "qwen2": Variant("Qwen2ForCausalLM", "Qwen2Config", dict(DECODER, vocab_size=131)),
    "qwen2-tied-bf16": Variant("Qwen2ForCausalLM", "Qwen2Config", dict(
        DECODER, num_key_value_heads=4, tie_word_embeddings=True), dtype="bfloat16"),
    "phi3": Variant("Phi3ForCausalLM", "Phi3Config", dict(DECODER, num_key_value_heads=4, pad_token_id=0)),
    "gemma": Variant("GemmaForCausalLM", "GemmaConfig", dict(DECODER, num_key_value_heads=1, head_dim=16)),
    "gemma2": Variant("Gemma2ForCausalLM", "Gemma2Config", dict(
        DECODER, num_key_value_heads=4, head_dim=16, vocab_size=77)),
    "starcoder2": Variant("Starcoder2ForCausalLM", "Starcoder2Config", DECODER),
    "gpt2": Variant("GPT2LMHeadModel", "GPT2Config", GPT),
    "gpt2-untied": Variant("GPT2LMHeadModel", "GPT2Config", dict(GPT, tie_word_embeddings=False)),
    "gpt_bigcode": Variant("GPTBigCodeForCausalLM", "GPTBigCodeConfig", dict(GPT, n_inner=48, multi_query=True)),
    "gpt_bigcode-mha": Variant("GPTBigCodeForCausalLM", "GPTBigCodeConfig", dict(
        GPT, n_inner=48, multi_query=False, tie_word_embeddings=False, vocab_size=131)),
    # 10 / 9 routed experts: uneven expert-parallel placement at T=4 and T=8.
    "deepseek_v2": Variant("DeepseekV2ForCausalLM", "DeepseekV2Config", dict(
        DEEPSEEK, q_lora_rank=12, n_routed_experts=10, n_shared_experts=2)),
    "deepseek_v2-lite": Variant("DeepseekV2ForCausalLM", "DeepseekV2Config", dict(
        DEEPSEEK, q_lora_rank=None, n_routed_experts=9, n_shared_experts=1)),
    # 9 experts: uneven expert-parallel placement at T=2, 4 and 8; experts stacked 3-D in memory.
    "mixtral": Variant("MixtralForCausalLM", "MixtralConfig", dict(
        DECODER, intermediate_size=16, num_local_experts=9, num_experts_per_tok=2, vocab_size=131)),
}


def architectures() -> set[str]:
    return {v.arch for v in VARIANTS.values()}


def build(out: Path, names=None) -> list[Path]:
    """Saves the variants (all, or those in `names`) under out/<name>; returns their dirs."""
    import torch
    import transformers as T

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(names or ()) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
    written = []
    for name, v in sorted(VARIANTS.items()):
        if names and name not in names:
            continue
        torch.manual_seed(zlib.crc32(name.encode()))
        model = getattr(T, v.model_class)(getattr(T, v.config_class)(**v.config))
        # HF init leaves biases at 0 and norms at 1 (Gemma: 0): randomize every
        # parameter so that each tensor's placement is visible in a comparison.
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.5)
        model = model.to(getattr(torch, v.dtype))
        d = out / name
        shutil.rmtree(d, ignore_errors=True)
        model.save_pretrained(d)
        (d / "generation_config.json").unlink(missing_ok=True)
        cfg_path = d / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["architectures"] = [v.arch]
        for k, val in v.config_edits.items():
            if val is None:
                cfg.pop(k, None)
            else:
                cfg[k] = val
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        written.append(d)
    (out / "VERSIONS.json").write_text(json.dumps(
        {"torch": torch.__version__, "transformers": T.__version__}, indent=2) + "\n")
    return written


def summary(d) -> dict:
    """What must not drift between transformers runs: config.json (less the
    transformers version) and every tensor's name, dtype and shape."""
    sys.path.insert(0, str(HERE))
    import st_io
    d = Path(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("transformers_version", None)
    tensors = {}
    for f in sorted(d.glob("*.safetensors")):
        header, _ = st_io.read_header(f)
        tensors.update({n: (h["dtype"], tuple(h["shape"])) for n, h in header.items()})
    return {"config": cfg, "tensors": tensors}


def check(dirs) -> None:
    sys.path.insert(0, str(HERE))
    import synth
    import vllm_ref
    for d in dirs:
        cfg = vllm_ref.load_config(d)
        ck = vllm_ref.Checkpoint(d)
        got = {n: ck.shape(n) for n in ck.names()}
        want = synth.hf_shapes(cfg)
        if got != want:
            raise SystemExit(f"{d.name}: names/shapes differ from synth.hf_shapes: "
                             f"extra {sorted(set(got) - set(want))[:5]}, missing {sorted(set(want) - set(got))[:5]}, "
                             f"shape {[n for n in got if n in want and got[n] != want[n]][:5]}")
        sizes = vllm_ref.allowed_tp_sizes(cfg)
        if 8 not in sizes:
            raise SystemExit(f"{d.name}: TP sizes {sizes} do not include 8")
        moe = "n_routed_experts" in cfg or "num_local_experts" in cfg
        opts = [{}] + ([{"enable_expert_parallel": 1}] if moe else [])
        for o in opts:
            for T_ in vllm_ref.allowed_tp_sizes(cfg, o):
                for r in range(T_):
                    vllm_ref.expected_rank_tensors(d, T_, r, options=o)
        size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
        print(f"{d.name}: {cfg['architectures'][0]}, {len(got)} tensors, {size // 1024} KB, TP sizes {sizes}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", nargs="*", help="variant names")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    dirs = build(args.out, set(args.only or []))
    if args.check:
        check(dirs)


if __name__ == "__main__":
    main()
