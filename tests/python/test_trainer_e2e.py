"""End to end with the real daemon: FSDP2 trainer ranks (gloo, CPU) push real transformers models into
weightsync.Engine ranks holding vLLM's layout; every engine byte is checked against an independent
reference computed from the checkpoint (vllm_reference.py)."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

import models  # noqa: E402
from ws_helpers import run_dist  # noqa: E402
from engines import EngineSet  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DELTA = 0.25


def run_jobs(daemon, checkpoints, world, jobs):
    """jobs: (arch, mode, T, replicas, engine dtype, max_inflight_bytes)."""
    sets, args = {}, []
    try:
        for arch, mode, T, replicas, edtype, inflight in jobs:
            name = f"{arch}-{mode}-w{world}-t{T}"
            sd = models.load_checkpoint(checkpoints[arch])
            sets[name] = (arch, sd, EngineSet(daemon.address, name, arch, sd, models.config(arch), T, replicas,
                                              DTYPES[edtype]))
            args.append({"model": name, "checkpoint": checkpoints[arch], "mode": mode,
                         "max_inflight_bytes": inflight, "delta": DELTA})
        results = run_dist("push", world, {"daemon": daemon.address, "jobs": args})
        for name, (arch, sd, es) in sets.items():
            per_version = results[0][name]
            es.check(sd, 1)
            es.check({k: v + DELTA for k, v in sd.items()}, 2)
            for v in per_version:
                assert v["stats"]["state"] == "committed", v
                assert v["engines"] == len(es.engines)
                assert v["stats"]["bytes_written"] == es.bytes(), (name, v["stats"])
                assert sum(r["bytes"] for r in v["ranks"]) > 0
            # every rank reports the same committed stats
            assert all(r[name][1]["stats"] == per_version[1]["stats"] for r in results)
        return results
    except BaseException:
        print(daemon.log())
        raise
    finally:
        for _, _, es in sets.values():
            es.close()


def test_fsdp2_shard0_four_architectures(daemon, checkpoints):
    results = run_jobs(daemon, checkpoints, 4, [
        ("llama", "shard0", 2, 2, "bfloat16", 1 << 30),
        ("qwen2", "shard0", 4, 1, "bfloat16", 8 << 10),      # small in-flight bound
        ("gemma2", "shard0", 2, 1, "float16", 1 << 30),
        ("deepseek_v2", "shard0", 2, 1, "bfloat16", 1 << 30),
    ])
    qwen = results[0]["qwen2-shard0-w4-t4"][0]["ranks"]
    sd = models.load_checkpoint(checkpoints["qwen2"])
    biggest = max(-(-t.shape[0] // 4) * (t.numel() // t.shape[0]) * 4 for t in sd.values())
    assert all(r["peak_inflight_bytes"] <= max(8 << 10, biggest) for r in qwen), qwen
    assert all(r["staged_bytes"] == r["bytes"] and r["zero_copy_bytes"] == 0 for r in qwen)
    assert sum(r["messages"] for r in qwen) > 4 * (2 + 3)  # layers split to fit the bound


def test_fsdp2_uneven_three_ranks_and_shard1(daemon, checkpoints):
    run_jobs(daemon, checkpoints, 3, [
        ("deepseek_v2", "shard1", 2, 1, "bfloat16", 1 << 30),
        ("qwen2", "shard0", 2, 1, "bfloat16", 1 << 30),
    ])


def test_hsdp(daemon, checkpoints):
    run_jobs(daemon, checkpoints, 4, [
        ("llama", "hsdp", 2, 1, "bfloat16", 1 << 30),
        ("deepseek_v2", "hsdp", 4, 1, "bfloat16", 1 << 30),
    ])


def test_refused_push_raises_on_every_rank(daemon, checkpoints):
    sd = models.load_checkpoint(checkpoints["llama"])
    es = EngineSet(daemon.address, "llama-refused", "llama", sd, models.config("llama"), 1)
    try:
        results = run_dist("push_error", 2, {"daemon": daemon.address, "model": "llama-refused",
                                             "checkpoint": checkpoints["llama"]})
        assert results[0]["error"] and results[0]["error"] == results[1]["error"]
        assert "unknown source tensor model.bogus.weight" in results[0]["error"]
        assert es.engines[0].applied_version == 0
    finally:
        es.close()


def test_rank_failing_mid_stream_aborts_the_version(daemon, checkpoints):
    sd = models.load_checkpoint(checkpoints["llama"])
    es = EngineSet(daemon.address, "llama-fault", "llama", sd, models.config("llama"), 2)
    aborted = []
    for e in es.engines:
        e.on_abort(lambda v, reason: aborted.append((v, reason)))
    try:
        results = run_dist("push_fault", 2, {"daemon": daemon.address, "model": "llama-fault",
                                             "checkpoint": checkpoints["llama"]})
        for r in results:
            assert r["error"] and "rank 1: injected fault" in r["error"], r
            assert r["retry"] == "committed"
        assert sorted(v for v, _ in aborted) == [1, 1]
        assert all(1 not in seen for seen in es.commits)  # version 1 never committed
        es.check(sd, 2)
    finally:
        es.close()


def test_fsdp2_mixed_precision_pushes_the_stepped_masters(daemon, checkpoints, tmp_path):
    """backward, no_grad forward (the root stays unsharded), [unshard()], optimizer.step(), push: the engine
    gets bf16 of the stepped fp32 masters bit for bit, not the stale bf16 copies FSDP2 registered."""
    from safetensors.torch import load_file
    sd = models.load_checkpoint(checkpoints["llama"])
    variants = ("default", "no_reshard", "unshard")
    sets = {v: EngineSet(daemon.address, f"llama-mp-{v}", "llama", sd, models.config("llama"), 2)
            for v in variants}
    try:
        run_dist("push_trained", 2, {"daemon": daemon.address, "out": str(tmp_path),
                                     "jobs": [{"variant": v, "model": f"llama-mp-{v}",
                                               "checkpoint": checkpoints["llama"]} for v in variants]})
        for v, es in sets.items():
            master = load_file(str(tmp_path / f"{v}.safetensors"))
            assert sorted(master) == sorted(sd)
            assert any(not torch.equal(master[k], sd[k]) for k in sd)  # the step changed the weights
            es.check(master, 1)
    except BaseException:
        print(daemon.log())
        raise
    finally:
        for es in sets.values():
            es.close()


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp1_pushes_views_of_the_flat_parameters(daemon, checkpoints, world):
    """FSDP1: push reads the local shards of the flat parameters in place (no second copy of the rank's shards);
    only rows split between ranks are assembled, one row each; the engine gets the checkpoint bit for bit."""
    sd = models.load_checkpoint(checkpoints["llama"])
    name = f"llama-fsdp1-w{world}"
    es = EngineSet(daemon.address, name, "llama", sd, models.config("llama"), 2)
    try:
        results = run_dist("push_fsdp1", world, {"daemon": daemon.address, "model": name,
                                                 "checkpoint": checkpoints["llama"]})
        es.check(sd, 1)
        rows = {k: v.numel() // v.shape[0] for k, v in sd.items() if v.dim() >= 2}
        for r in results:
            assert r["state"] == "committed" and r["other"] == [], r
            assert r["views"] > 0 and r["views"] + r["assembled"] <= r["flat"] + len(rows) * max(rows.values())
            assert r["assembled"] <= 2 * len(rows) * max(rows.values())  # at most a row per tensor, not a copy
        assert sum(r["views"] + r["assembled"] for r in results) == sum(v.numel() for v in sd.values())
        if world == 3:
            assert any(r["assembled"] for r in results)  # rows split between ranks happen with these sizes
    except BaseException:
        print(daemon.log())
        raise
    finally:
        es.close()
