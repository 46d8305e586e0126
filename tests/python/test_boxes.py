"""Manifest exactness on real FSDP2 (gloo, CPU): every checkpoint tensor is rebuilt bit for bit from the
manifest's boxes and the bytes each rank would send, for Shard(0) (uneven), Shard(1) and HSDP meshes."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

import models  # noqa: E402
from ws_helpers import run_dist  # noqa: E402

WIRE = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}


def check(result, checkpoints, world, expect_placements):
    for arch, r in result.items():
        sd = models.load_checkpoint(checkpoints[arch])
        names = [t[0] for t in r["manifest"]]
        assert sorted(names) == sorted(sd), arch
        assert any(expect_placements in p for p in r["placements"]), r["placements"]
        for name, shape, dtype, shards in r["manifest"]:
            ref = sd[name].to(WIRE[dtype])
            assert list(ref.shape) == shape, name
            covered = torch.zeros(ref.shape, dtype=torch.int32)
            rebuilt = torch.zeros_like(ref)
            nth = {}
            for rank, dim, start, length in shards:
                assert 0 <= rank < world
                k = nth[rank] = nth.get(rank, -1) + 1  # a rank's k-th shard of the tensor (FSDP1: up to two)
                bits = r["data"][f"{rank}:{name}:{k}"]
                piece = torch.tensor(bits, dtype=torch.int16 if ref.element_size() == 2 else torch.int32)
                piece = piece.view(ref.dtype).view(ref.narrow(dim, start, length).shape)
                prev = rebuilt.narrow(dim, start, length)
                seen = covered.narrow(dim, start, length)
                # replicas (HSDP) must agree exactly with what is already there
                assert bool(((seen == 0) | (prev == piece)).all()), name
                prev.copy_(piece)
                seen += 1
            assert bool((covered > 0).all()), f"{name}: not covered by the manifest"
            assert torch.equal(rebuilt.view(-1).view(torch.uint8), ref.contiguous().view(-1).view(torch.uint8)), name


@pytest.mark.parametrize("mode,world,placement", [("shard0", 4, "Shard(dim=0)"), ("shard0", 3, "Shard(dim=0)"),
                                                  ("shard1", 4, "Shard(dim=1)"), ("shard1", 3, "Shard(dim=1)"),
                                                  ("hsdp", 4, "Replicate()"), ("fsdp1", 3, "Piece"),
                                                  ("fsdp1", 2, "Piece")])
def test_manifest_rebuilds_checkpoint(checkpoints, mode, world, placement):
    results = run_dist("boxes", world, {"checkpoints": checkpoints, "mode": mode})
    check(results[0], checkpoints, world, placement)
