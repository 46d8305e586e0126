"""One FSDP2 trainer rank (gloo, CPU) pushing a checkpoint through weightsyncd.

python push.py RANK WORLD PORT DAEMON MODEL CHECKPOINT VERSION [KILL_AT]
KILL_AT: this rank dies (os._exit) at its KILL_AT-th exported piece, mid-sync.
"""
import os
import tempfile
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import weightsync


def main():
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    daemon, model_name, ckpt, version = sys.argv[4], sys.argv[5], sys.argv[6], int(sys.argv[7])
    kill_at = int(sys.argv[8]) if len(sys.argv) > 8 else 0
    # The ranks meet through a file, not a TCP port (a port picked free can be taken before rank 0
    # listens on it); `port` is unique per push, the parent is shared by its ranks.
    store = os.path.join(tempfile.gettempdir(), f"ws-gloo-{os.getppid()}-{port}")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    with weightsync.Trainer(daemon, model=model_name, rank=rank, world_size=world) as tr:
        if kill_at:
            real, calls = tr._export, [0]

            def dying(*a, **kw):
                calls[0] += 1
                if calls[0] == kill_at:
                    os._exit(9)  # killed mid-sync: no goodbye to the daemon or the other ranks
                return real(*a, **kw)
            tr._export = dying
        res = tr.push(model, version=version)
        print("pushed", version, res.stats["state"], flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
