"""End to end: gen-checkpoint -> push (W FSDP ranks) -> weightsyncd -> mock-engine
(R replicas x T TP ranks), every rank's memory compared bit for bit with the
independent reference (tests/reference/vllm_ref.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import check_version, load_dump, reference

ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM"]
# heads 4 / kv heads 2: KV heads replicated at T=4; vocab 100: padded to 128, so
# zero rows at T=1,2,4; intermediate 160 and vocab 100 split unevenly over W=3.
SMALL = dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=160, vocab_size=100)


def small(gen, arch, seed=1, **kw):
    return gen(arch, **dict(SMALL, seed=seed, **kw))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("W", [1, 3])
@pytest.mark.parametrize("T", [1, 2, 4])
def test_push_two_versions(ctl, engines, checkpoint_cache, arch, W, T):
    a = small(checkpoint_cache, arch, seed=1)
    b = small(checkpoint_cache, arch, seed=2)
    eng = engines("m", a, tp=T, replicas=2, dtype="bf16", syncs=2)
    ctl.push(a, "m", W, "--version", 1)
    ctl.push(b, "m", W, "--version", 2)
    assert eng.wait() == 0, eng.output()
    assert eng.versions() == [1, 2] and eng.aborted() == []
    check_version(eng, "v1", a)
    check_version(eng, "v2", b)
    st = ctl.status_json()
    assert int(st["syncs_committed"]) == 2 and int(st["syncs_aborted"]) == 0


def test_initial_dump_is_garbage_and_matches_reference_params(ctl, engines, checkpoint_cache):
    """The harness itself: registration-time memory is 0x5A everywhere, and the engine
    registered exactly the parameters (names, shapes) the reference expects."""
    a = small(checkpoint_cache, "Qwen2ForCausalLM")
    eng = engines("m", a, tp=4, replicas=1)
    for r in range(4):
        got = load_dump(eng.rank_file("initial", 0, r))
        want = reference(a, 4, r)
        assert {n: t.shape for n, t in got.items()} == {n: t.shape for n, t in want.items()}
        for n, t in got.items():
            assert (t.view(np.uint8) == 0x5A).all(), n
    eng.stop()


def test_vocab_padding_and_kv_replication_are_visible(ctl, engines, checkpoint_cache):
    """Spot checks independent of the full comparison: padded rows are zero and
    ranks 0/1 and 2/3 share KV heads at T=4."""
    a = small(checkpoint_cache, "LlamaForCausalLM")
    eng = engines("m", a, tp=4, replicas=1, dtype="fp32")
    ctl.push(a, "m", 3, "--version", 1)
    assert eng.wait() == 0, eng.output()
    ranks = [load_dump(eng.rank_file("v1", 0, r)) for r in range(4)]
    emb = ranks[3]["model.embed_tokens.weight"]
    assert emb.shape == (32, 64) and emb[4:].tobytes() == bytes(28 * 64 * 4) and emb[:4].any()
    hd = 16
    k = [rk["model.layers.0.self_attn.qkv_proj.weight"][hd:2 * hd] for rk in ranks]
    assert np.array_equal(k[0], k[1]) and np.array_equal(k[2], k[3]) and not np.array_equal(k[0], k[2])
    check_version(eng, "v1", a)


def test_repeat(ctl, engines, checkpoint_cache):
    a = small(checkpoint_cache, "Qwen2ForCausalLM")
    eng = engines("m", a, tp=2, replicas=2, syncs=2)
    cp = ctl.push(a, "m", 3, "--version", 5, "--repeat", 2, "--json")
    lines = [json.loads(x) for x in cp.stdout.splitlines() if x.strip()]
    assert [x["version"] for x in lines] == [5, 6] and all(x["state"] == "committed" for x in lines)
    assert all(x["bytes_written"] > 0 for x in lines)
    assert eng.wait() == 0, eng.output()
    assert eng.versions() == [5, 6]
    check_version(eng, "v5", a)
    check_version(eng, "v6", a)


@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_checkpoint(ctl, engines, checkpoint_cache, arch):
    a = small(checkpoint_cache, arch, seed=7, shard_mb=0.02)
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (a / "model.safetensors").exists()
    eng = engines("m", a, tp=2, replicas=2)
    ctl.push(a, "m", 3, "--version", 1)
    assert eng.wait() == 0, eng.output()
    check_version(eng, "v1", a)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_engine_dtypes(ctl, engines, checkpoint_cache, dtype):
    a = small(checkpoint_cache, "LlamaForCausalLM")
    eng = engines("m", a, tp=2, replicas=2, dtype=dtype)
    ctl.push(a, "m", 3, "--version", 1)
    assert eng.wait() == 0, eng.output()
    check_version(eng, "v1", a)


@pytest.mark.parametrize("arch", ARCHS)
def test_shard_dim_1(ctl, engines, checkpoint_cache, arch):
    a = small(checkpoint_cache, arch)
    eng = engines("m", a, tp=4, replicas=2)
    ctl.push(a, "m", 3, "--version", 1, "--shard-dim", 1)
    assert eng.wait() == 0, eng.output()
    check_version(eng, "v1", a)


def test_tied_embeddings(ctl, engines, checkpoint_cache):
    a = small(checkpoint_cache, "LlamaForCausalLM", tie=1)
    assert "lm_head.weight" not in reference(a, 2, 0)
    eng = engines("m", a, tp=2, replicas=1)
    ctl.push(a, "m", 2, "--version", 1)
    assert eng.wait() == 0, eng.output()
    check_version(eng, "v1", a)


def test_two_models_one_daemon(ctl, engines, checkpoint_cache):
    a = small(checkpoint_cache, "LlamaForCausalLM")
    b = small(checkpoint_cache, "Qwen2ForCausalLM", seed=3)
    ea = engines("llama", a, tp=2, replicas=1)
    eb = engines("qwen", b, tp=4, replicas=2)
    ctl.push(b, "qwen", 2, "--version", 1)
    ctl.push(a, "llama", 3, "--version", 1)
    assert ea.wait() == 0 and eb.wait() == 0, ea.output() + eb.output()
    check_version(ea, "v1", a)
    check_version(eb, "v1", b)
