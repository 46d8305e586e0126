"""Builds tiny real Hugging Face transformers models (random weights, one or more
per architecture) and saves them with save_pretrained, so that integration tests
push checkpoints exactly as transformers writes them (names, config keys, tied
weights dropped), not only the ones weightsyncctl gen-checkpoint makes.

torch + transformers are heavy (torch's PyPI wheels pull the CUDA libraries,
about 5-6 GB), so they are not test requirements: the generated checkpoints
(about 100 KB each) are committed under hf_checkpoints/ and this script only
regenerates them:

    python -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch transformers ml_dtypes
    /tmp/hfvenv/bin/python tests/reference/hf_fixtures.py [--out DIR] [--check]

--check also verifies that every checkpoint's tensor names and shapes equal
synth.hf_shapes(config) and that the reference accepts it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "hf_checkpoints"

# heads 4 / kv heads 2 (KV replication at T=4), vocab 100 (padded to 128).
DECODER = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=2, vocab_size=100)
GPT = dict(n_embd=32, n_head=4, n_layer=2, n_positions=16, vocab_size=100)


def variants(T):
    """name -> (architecture class name, config, save dtype)."""
    return {
        "llama": ("LlamaForCausalLM", T.LlamaConfig(**DECODER), "float32"),
        "llama-bias-tied": ("LlamaForCausalLM", T.LlamaConfig(**DECODER, attention_bias=True, mlp_bias=True,
                                                             tie_word_embeddings=True), "float32"),
        "mistral": ("MistralForCausalLM", T.MistralConfig(**DECODER, head_dim=8), "float32"),
        "qwen2": ("Qwen2ForCausalLM", T.Qwen2Config(**DECODER), "float32"),
        "qwen2-tied-bf16": ("Qwen2ForCausalLM", T.Qwen2Config(**DECODER, tie_word_embeddings=True), "bfloat16"),
        "phi3": ("Phi3ForCausalLM", T.Phi3Config(**DECODER, pad_token_id=0), "float32"),
        "gemma": ("GemmaForCausalLM", T.GemmaConfig(**DECODER, head_dim=16), "float32"),
        "gemma2": ("Gemma2ForCausalLM", T.Gemma2Config(**DECODER, head_dim=16), "float32"),
        "starcoder2": ("Starcoder2ForCausalLM", T.Starcoder2Config(**DECODER), "float32"),
        "gpt2": ("GPT2LMHeadModel", T.GPT2Config(**GPT), "float32"),
        "gpt2-untied": ("GPT2LMHeadModel", T.GPT2Config(**GPT, tie_word_embeddings=False), "float32"),
        "gpt_bigcode": ("GPTBigCodeForCausalLM", T.GPTBigCodeConfig(**GPT, n_inner=48, multi_query=True), "float32"),
        "deepseek_v2": ("DeepseekV2ForCausalLM", T.DeepseekV2Config(
            hidden_size=32, intermediate_size=48, moe_intermediate_size=8, num_attention_heads=4,
            num_key_value_heads=4, num_hidden_layers=2, vocab_size=100, n_routed_experts=5,
            n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=12,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, n_group=1,
            topk_group=1), "float32"),
        "deepseek_v2-lite": ("DeepseekV2ForCausalLM", T.DeepseekV2Config(
            hidden_size=32, intermediate_size=48, moe_intermediate_size=8, num_attention_heads=4,
            num_key_value_heads=4, num_hidden_layers=2, vocab_size=100, n_routed_experts=4,
            n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, n_group=1,
            topk_group=1), "float32"),
    }


def build(out: Path, names=None) -> list[Path]:
    import torch
    import transformers as T

    written = []
    for i, (name, (arch, cfg, dtype)) in enumerate(sorted(variants(T).items())):
        if names and name not in names:
            continue
        torch.manual_seed(1000 + i)
        model = getattr(T, arch)(cfg)
        # HF init leaves biases at 0 and norms at 1 (Gemma: 0): randomize every
        # parameter so that each tensor's placement is visible in a comparison.
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.5)
        model = model.to(getattr(torch, dtype))
        d = out / name
        shutil.rmtree(d, ignore_errors=True)
        model.save_pretrained(d)
        for extra in ("generation_config.json",):
            (d / extra).unlink(missing_ok=True)
        written.append(d)
    (out / "VERSIONS.json").write_text(json.dumps(
        {"torch": torch.__version__, "transformers": T.__version__}, indent=2) + "\n")
    return written


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
        for T_ in vllm_ref.allowed_tp_sizes(cfg):
            for r in range(T_):
                vllm_ref.expected_rank_tensors(d, T_, r)
        print(f"{d.name}: {cfg['architectures'][0]}, {len(got)} tensors, TP sizes {vllm_ref.allowed_tp_sizes(cfg)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", nargs="*", help="variant names")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dirs = build(args.out, set(args.only or []))
    if args.check:
        check(dirs)


if __name__ == "__main__":
    main()
