"""One FSDP2 trainer rank (gloo, CPU) pushing through vLLM's trainer-side weight-transfer API.

python backend_push.py RANK WORLD KILL_AT SPEC_JSON
SPEC: daemon, model, proxy (the engine process's RPC proxy, backend_run.py) or http (a vllm serve
base URL), worker_init, init
(rank 0 calls init_weight_transfer_engine), port, pushes: [{checkpoint, version?}].
Every rank builds the trainer engine with WeightTransferTrainerFactory.trainer_init (backend
"weightsync") and calls send_weights() once per push; rank 0 then asks the engine for a snapshot.
KILL_AT: this rank dies (os._exit) at its KILL_AT-th exported piece, mid-sync.
"""
import json
import os
import tempfile
import sys
import time
from datetime import timedelta
from multiprocessing.connection import Client

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

AUTHKEY = b"weightsync-tests"


class ProxyClient:
    """vLLM's VLLMWeightSyncClient protocol, over the engine process's proxy."""

    def __init__(self, address):
        self.address = address

    def _call(self, method, *args, **kwargs):
        with Client(self.address, family="AF_UNIX", authkey=AUTHKEY) as c:
            c.send((method, args, kwargs))
            status, value = c.recv()
        if status != "ok":
            raise RuntimeError(f"{method}: {value}")
        return value

    def init_weight_transfer_engine(self, init_info):
        self._call("init_weight_transfer_engine", init_info)

    def start_weight_update(self):
        self._call("start_weight_update")

    def update_weights(self, update_info):
        self._call("update_weights", update_info)

    def finish_weight_update(self, weight_version=None):
        self._call("finish_weight_update", weight_version)

    def snapshot(self):
        self._call("snapshot")

    # bench/vllm_bench.py's extras
    def reset_peak(self):
        self._call("reset_peak")

    def peak(self):
        return self._call("peak")

    def reload(self, path):
        return self._call("reload", path)

    def status(self):
        return self._call("status")


def load_into(model, ckpt):
    """Copies a checkpoint into the (sharded) model: each rank's DTensor shards, no gather."""
    src = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).state_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = src[name]
            if hasattr(p, "to_local"):
                from torch.distributed.tensor import distribute_tensor
                p.copy_(distribute_tensor(full, p.device_mesh, p.placements))
            else:
                p.copy_(full)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def full_tensor_push(model, client, rank, ckpt_dir):
    """What RL frameworks do today: every rank all-gathers each parameter (full_tensor()), rank 0
    hands the full checkpoint to vLLM's own loader (reload_weights; a safetensors file in /dev/shm)."""
    import tempfile

    from safetensors.torch import save_file
    full = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        if rank == 0:
            full[name] = t.to(torch.bfloat16).contiguous()
        del t
    reload_s = 0.0
    if rank == 0:
        d = tempfile.mkdtemp(prefix="ws-bench-ckpt-", dir="/dev/shm")
        try:
            save_file(full, os.path.join(d, "model.safetensors"))
            del full
            reload_s = client.reload(d)
        finally:
            import shutil
            shutil.rmtree(d, ignore_errors=True)
    return reload_s


def main():
    rank, world, kill_at = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    spec = json.loads(sys.argv[4])
    # The ranks meet through a file, not a TCP port: a port picked free can be taken (by gloo's own
    # connections, say) before rank 0 listens on it. spec["port"] is unique per round; the parent
    # (backend_run.py) is shared by the round's ranks.
    store = os.path.join(tempfile.gettempdir(), f"ws-gloo-{os.getppid()}-{spec['port']}")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    import weightsync.vllm_plugin
    from weightsync.vllm_trainer import WeightsyncTrainerInitInfo
    weightsync.vllm_plugin.register()  # the trainer process loads no vLLM plugins by itself

    first = spec["pushes"][0]["checkpoint"]
    model = transformers.AutoModelForCausalLM.from_pretrained(first, dtype=torch.float32).eval()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if "http" in spec:  # vllm serve: vLLM's HTTP client plus /pause and /resume
        from weightsync.vllm_trainer import HTTPClient
        client = HTTPClient(spec["http"])
    else:
        client = ProxyClient(spec["proxy"])
    info = WeightsyncTrainerInitInfo(daemon=spec["daemon"], model=spec["model"], rank=rank, world_size=world,
                                     worker_init=spec["worker_init"] if spec["init"] else None)
    mode = spec.get("mode", "weightsync")
    engine = (WeightTransferTrainerFactory.trainer_init(info, client=client, source=model)
              if mode == "weightsync" else None)
    if kill_at:
        real, calls = engine.trainer._export, [0]

        def dying(*a, **kw):
            calls[0] += 1
            if calls[0] == kill_at:
                os._exit(9)  # killed mid-sync: no goodbye to the daemon or the other ranks
            return real(*a, **kw)
        engine.trainer._export = dying
    results = []
    for i, push in enumerate(spec["pushes"]):
        if i > 0:
            load_into(model, push["checkpoint"])
        measure = push.get("measure", False)
        if measure:
            dist.barrier()
            _reset_peak()
            if rank == 0:
                client.reset_peak()
            dist.barrier()
        t0 = time.perf_counter()
        if mode == "weightsync":
            engine.send_weights(push.get("version"))
            print("pushed", push, engine.last_result.summary() if engine.last_result else "", flush=True)
            blocked = None
        else:
            blocked = full_tensor_push(model, client, rank, push["checkpoint"])
        seconds = time.perf_counter() - t0
        if measure:
            peaks = [None] * world
            dist.all_gather_object(peaks, _peak_bytes())
            if rank == 0:
                res = {"sync_seconds": seconds, "trainer_peak_bytes": peaks, "engine_peak": client.peak()}
                res["blocked_seconds"] = (blocked if blocked is not None else
                                          max(s["last_parked_seconds"] for s in client.status()))
                results.append(res)
        if rank == 0 and isinstance(client, ProxyClient):
            client.snapshot()
        dist.barrier()
    if rank == 0 and spec.get("result"):
        with open(spec["result"], "w") as f:
            json.dump(results, f)
    if engine is not None:
        engine.shutdown()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
