"""What the trainer keeps between pushes is re-derived when it changes: two gloo ranks push a module of DTensor
parameters after an in-place step, a parameter replaced, one resharded, one cast, and with a Trainer made anew
on one rank, then the other; every version is bit-exact in the engines, and a push with nothing changed sends
the daemon the manifest's fingerprint only."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

import models  # noqa: E402
from engines import EngineSet  # noqa: E402
from ws_helpers import run_dist  # noqa: E402


def test_changes_between_pushes_are_noticed(daemon, checkpoints, tmp_path):
    from safetensors.torch import load_file
    sd = models.load_checkpoint(checkpoints["llama"])
    es = EngineSet(daemon.address, "cache-llama", "llama", sd, models.config("llama"), 2)
    try:
        results = run_dist("push_changes", 2, {"daemon": daemon.address, "model": "cache-llama",
                                               "checkpoint": checkpoints["llama"], "out": str(tmp_path)})
        per = {r["version"]: r for r in results[0]}
        assert all(r["state"] == "committed" for r in results[0])
        for v in per:
            es.check(load_file(str(tmp_path / f"v{v}.safetensors")), v)
        b = {v: r["begin"] for v, r in per.items()}
        lean = {v for v in b if b[v]["reuse"] and b[v]["tensors"] == 0}
        # nothing changed on any rank (the weights moved in place): the walk is reused, the fingerprint sent
        assert per[2]["reused"] == [True, True] and per[6]["reused"] == [True, True]
        assert {2, 6} <= lean and b[2]["plan_reused"] and b[6]["plan_reused"]
        # a parameter replaced by another with the same boxes: walked again, the manifest is the same
        assert per[3]["reused"] == [False, False] and 3 in lean and b[3]["fingerprint"] == b[2]["fingerprint"]
        # resharded and cast: another manifest, sent in full
        for v in (4, 5):
            assert per[v]["reused"] == [False, False] and v not in lean and b[v]["tensors"] == len(sd), b[v]
            assert b[v]["fingerprint"] != b[v - 1]["fingerprint"]
        # a Trainer made anew on rank 1 (walks and sends its entries again), then on rank 0 (which asks the
        # ranks for theirs and sends the manifest again, in full): the same manifest, bit-exact bytes
        assert per[7]["reused"] == [True, False] and 7 in lean and b[7]["fingerprint"] == b[6]["fingerprint"]
        assert per[8]["reused"] == [False, True] and b[8]["tensors"] == len(sd) and b[8]["plan_reused"]
        assert all(r[v - 1]["messages"] > 0 for r in results for v in per)
    except BaseException:
        print(daemon.log())
        raise
    finally:
        es.close()


def test_every_change_of_the_walk_is_noticed():
    """FSDP2 parameters re-created, resized, cast, resharded (a swapped tensor, a spec replaced or changed in
    place), their storage moved, a module added, removed, a parameter renamed straight in its module's dict:
    each makes the trainer derive its walk again, exactly as a new Trainer does; in-place steps do not."""
    for rank, steps in enumerate(run_dist("walk_changes", 2, {})):
        for s in steps:
            assert s["new"] == s["changed"] and s["kept"] and s["as_new_trainer"], (rank, s)
