"""Dtype negotiation end to end: FSDP2 trainer ranks (gloo, CPU) with fp32 masters under a bf16 HF config push
into engines whose registered dtypes the config does not tell; each engine byte is the single rounding of the
master (torch's cast) or the master itself."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

import models  # noqa: E402
from engines import EngineSet  # noqa: E402
from ws_helpers import run_dist  # noqa: E402

DELTA = 0.25


def push_and_check(daemon, checkpoints, name, arch, dtype, param_dtypes=None, world=2, T=2):
    sd = models.load_checkpoint(checkpoints[arch])
    es = EngineSet(daemon.address, name, arch, sd, models.config(arch), T, 1, dtype, param_dtypes)
    try:
        job = {"model": name, "checkpoint": checkpoints[arch], "mode": "shard0", "delta": DELTA,
               "config_dtype": "bfloat16"}
        results = run_dist("push", world, {"daemon": daemon.address, "jobs": [job]})
        es.check(sd, 1)
        es.check({k: v + DELTA for k, v in sd.items()}, 2)
        return sd, results[0][name]
    except BaseException:
        print(daemon.log())
        raise
    finally:
        es.close()


def test_fp16_engine_under_bf16_config_gets_one_rounding(daemon, checkpoints):
    # The config's bf16 would round twice (f32 -> bf16 -> f16); the wire carries f16(master).
    sd, per_version = push_and_check(daemon, checkpoints, "dtypes-fp16", "llama", torch.float16)
    for v in per_version:
        assert sum(r["bytes"] for r in v["ranks"]) == sum(t.numel() * 2 for t in sd.values())


def test_fp32_engine_param_gets_the_fp32_master(daemon, checkpoints):
    # lm_head kept in fp32 by the engine, the rest bf16: no glob names it, the daemon knows it.
    sd, per_version = push_and_check(daemon, checkpoints, "dtypes-fp32-head", "llama", torch.bfloat16,
                                     {"lm_head.weight": torch.float32})
    for v in per_version:  # lm_head travels in f32, everything else narrowed to bf16
        want = sum(t.numel() * (4 if n == "lm_head.weight" else 2) for n, t in sd.items())
        assert sum(r["bytes"] for r in v["ranks"]) == want
