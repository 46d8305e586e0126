"""Every architecture the reference covers, beyond the Llama/Qwen2 core: when the
layout rules support it, gen-checkpoint must produce exactly the HF tensor names
and shapes (an independent spec in tests/reference/synth.py) and a sync must land
bit-exactly as the reference says. An architecture the reference covers but no
rule file in config/layouts does fails: a missing or renamed rule file must not
pass as a skip."""
from __future__ import annotations

import json

import pytest

import synth
import vllm_ref
import st_io
from conftest import Ctl, check_version, describe

OTHER = sorted(set(vllm_ref.ARCHITECTURES) - {"LlamaForCausalLM", "Qwen2ForCausalLM"})


@pytest.fixture(scope="module")
def gen_any(binaries, tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    cache = {}

    def gen(arch, *flags):
        key = (arch,) + flags
        if key not in cache:
            out = root / f"{arch}-{len(cache)}"
            cp = Ctl(binaries["weightsyncctl"], None)("gen-checkpoint", "--arch", arch, "--out", out,
                                                      "--seed", 11, *flags)
            cache[key] = (out, cp)
        out, cp = cache[key]
        if cp.returncode != 0:
            if "no layout rules for architecture" in cp.stderr:
                pytest.fail(f"no layout rule file in config/layouts covers {arch}, which the reference "
                            f"covers: {cp.stderr.strip()}")
            pytest.fail("gen-checkpoint failed:\n" + describe(cp))
        return out
    return gen


def _checkpoint_shapes(d):
    shapes = {}
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    for f in files:
        header, _ = st_io.read_header(d / f)
        shapes.update({n: tuple(v["shape"]) for n, v in header.items()})
    return shapes


@pytest.mark.parametrize("arch", OTHER)
def test_gen_checkpoint_has_hf_names(gen_any, arch):
    d = gen_any(arch)
    cfg = vllm_ref.load_config(d)
    assert _checkpoint_shapes(d) == synth.hf_shapes(cfg)


@pytest.mark.parametrize("arch", OTHER)
def test_sync_other_architecture(ctl, engines, gen_any, arch):
    d = gen_any(arch)
    cfg = vllm_ref.load_config(d)
    sizes = [t for t in vllm_ref.allowed_tp_sizes(cfg) if t <= 4]
    for T in sorted({1, sizes[-1]}):
        eng = engines(f"m{T}", d, tp=T, replicas=1)
        ctl.push(d, f"m{T}", 2, "--version", 1)
        assert eng.wait() == 0, eng.output()
        check_version(eng, "v1", d)


@pytest.mark.parametrize("arch,tie", [("GPT2LMHeadModel", 0), ("GPTBigCodeForCausalLM", 0),
                                      ("Starcoder2ForCausalLM", 0), ("Qwen2ForCausalLM", 1),
                                      ("MistralForCausalLM", 1)])
def test_flipped_tie(ctl, engines, gen_any, arch, tie):
    d = gen_any(arch, "--tie", tie)
    assert vllm_ref.load_config(d)["tie_word_embeddings"] == bool(tie)
    has_head = "lm_head.weight" in vllm_ref.expected_rank_tensors(d, 2, 0)
    assert has_head == (not tie)
    eng = engines("m", d, tp=2, replicas=1)
    ctl.push(d, "m", 3, "--version", 1, "--shard-dim", 1)
    assert eng.wait() == 0, eng.output()
    check_version(eng, "v1", d)


def test_deepseek_expert_parallel(ctl, engines, gen_any):
    d = gen_any("DeepseekV2ForCausalLM")
    cfg = vllm_ref.load_config(d)
    T = max(t for t in vllm_ref.allowed_tp_sizes(cfg, {"enable_expert_parallel": 1}) if t <= 4)
    if T == 1:
        pytest.skip("the example DeepseekV2 config allows no TP > 1")
    eng = engines("ep", d, tp=T, replicas=1, extra=["--option", "enable_expert_parallel=1"])
    ctl.push(d, "ep", 3, "--version", 1)
    assert eng.wait() == 0, eng.output()
    check_version(eng, "v1", d, options={"enable_expert_parallel": 1})


@pytest.mark.parametrize("arch,name", [("MixtralForCausalLM", "model.layers.0.block_sparse_moe.experts"),
                                       ("DeepseekV2ForCausalLM", "model.layers.1.mlp.experts")])
def test_routed_experts_names(ctl, engines, gen_any, arch, name):
    """vLLM versions whose FusedMoE keeps the experts in a child module (engine option
    vllm_routed_experts = 1, sent by the Python vLLM adapter) name them experts.routed_experts.*."""
    d = gen_any(arch)
    opts = {"vllm_routed_experts": 1, "enable_expert_parallel": 1}
    want = vllm_ref.expected_rank_tensors(d, 2, 0, options=opts)
    assert f"{name}.routed_experts.w13_weight" in want and f"{name}.w13_weight" not in want
    eng = engines("routed", d, tp=2, replicas=1,
                  extra=[a for k, v in opts.items() for a in ("--option", f"{k}={v}")])
    ctl.push(d, "routed", 3, "--version", 1)
    assert eng.wait() == 0, eng.output()
    check_version(eng, "v1", d, options=opts)
