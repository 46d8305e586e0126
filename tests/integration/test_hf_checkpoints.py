"""Checkpoints written by transformers' save_pretrained (tests/reference/hf_fixtures.py,
committed under tests/reference/hf_checkpoints): real HF names, configs with all
of transformers' keys, tied weights dropped, a bf16 checkpoint. Each is pushed
and compared bit for bit with the reference."""
from __future__ import annotations

import pytest

import vllm_ref
from conftest import REPO, check_version

HF_DIR = REPO / "tests" / "reference" / "hf_checkpoints"
VARIANTS = sorted(p.name for p in HF_DIR.iterdir() if (p / "config.json").exists()) if HF_DIR.is_dir() else []


def test_fixtures_present():
    assert len(VARIANTS) >= 10, f"expected the committed HF checkpoints under {HF_DIR}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("T", [1, 2, 4])
def test_hf_checkpoint(ctl, engines, layout_covers, variant, T):
    d = HF_DIR / variant
    cfg = vllm_ref.load_config(d)
    arch = cfg["architectures"][0]
    if not layout_covers(arch):
        pytest.skip(f"the layout rules do not cover {arch}")
    assert T in vllm_ref.allowed_tp_sizes(cfg)
    dtype = "fp16" if "bf16" in variant and T == 2 else "bf16"
    eng = engines("m", d, tp=T, replicas=1, dtype=dtype)
    ctl.push(d, "m", 3, "--version", 1, *(["--shard-dim", 1] if T == 2 else []))
    assert eng.wait() == 0, eng.output()
    check_version(eng, "v1", d)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.startswith("deepseek")])
def test_hf_deepseek_expert_parallel(ctl, engines, layout_covers, variant):
    if not layout_covers("DeepseekV2ForCausalLM"):
        pytest.skip("the layout rules do not cover DeepseekV2ForCausalLM")
    d = HF_DIR / variant
    opts = {"enable_expert_parallel": 1}
    eng = engines("m", d, tp=4, replicas=1, extra=["--option", "enable_expert_parallel=1"])
    ctl.push(d, "m", 2, "--version", 1)
    assert eng.wait() == 0, eng.output()
    check_version(eng, "v1", d, options=opts)
