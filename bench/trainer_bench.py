"""Python trainer overhead: weightsync.Trainer.push of a DeepSeek-named MoE module under FSDP2 (gloo, CPU).

    python bench/trainer_bench.py [--daemon fake|real] [--world 2] [--layers 26] [--experts 256] [--pushes 4]

The module's names and shapes are those of `weightsyncctl gen-checkpoint --arch DeepseekV2ForCausalLM`
(hidden 64, intermediate 32; 26 layers x 256 experts: 20,3xx tensors), fp32, with each decoder layer and the
root under FSDP2 fully_shard on `--world` gloo ranks (subprocesses of this script).

--daemon fake: each rank talks to an in-process gRPC server that answers like the daemon without moving bytes
    (BeginSync negotiates bf16 for fp32 tensors and reuses a manifest by fingerprint, Push acknowledges every
    layer at once, Commit commits): what is left is the trainer's own overhead.
--daemon real: weightsyncd and `weightsyncctl mock-engine --tp 1` (bf16, host shm) from $WS_BUILD_DIR
    (default build/), end to end.

Reports for rank 0 the seconds of every push (and its process's CPU seconds, less sensitive to other load on
the machine) and, for the steady state (median of pushes 2..), microseconds
per parameter split into phases (RankStats.seconds_*), against floors measured in the same run on the same
rank: one memcpy of the rank's shard bytes, and a per-tensor torch copy (with the fp32 -> bf16 cast) of each of
its shards into a preallocated buffer. The module's weights change between pushes (in place, as an optimizer
step does). $WS_BENCH_PKG points at another client/python tree (e.g. an older checkout) to measure it instead.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = Path(os.environ.get("WS_BENCH_PKG", REPO / "client" / "python"))
sys.path.insert(0, str(PKG))
BUILD = Path(os.environ.get("WS_BUILD_DIR", REPO / "build"))
MODEL = "bench-moe"


# ---- the module ----

def checkpoint_shapes(ckpt: str) -> dict:
    """{name: shape} from the safetensors header of a gen-checkpoint directory."""
    out = {}
    for f in sorted(os.listdir(ckpt)):
        if f.endswith(".safetensors"):
            with open(os.path.join(ckpt, f), "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            out.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return out


def build_module(shapes: dict):
    """A module tree with one fp32 parameter per checkpoint name (random values)."""
    import torch
    root = torch.nn.Module()
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            child = getattr(m, part, None) if part in m._modules else None
            if child is None:
                child = torch.nn.Module()
                m.add_module(part, child)
            m = child
        m.register_parameter(leaf, torch.nn.Parameter(torch.randn(shape, generator=g)))
    return root


# ---- the fake daemon ----

def fake_daemon(address: str):
    import grpc
    from concurrent import futures
    from weightsync._proto import weightsync_pb2 as pb
    from weightsync._proto import weightsync_pb2_grpc as pb_grpc

    class Servicer(pb_grpc.WeightSyncServicer):
        def __init__(self):
            self.kept, self.sync = None, 0

        def BeginSync(self, req, context):
            self.sync += 1
            if req.reuse_manifest:
                if self.kept is None or self.kept[0] != req.manifest_fingerprint:
                    context.abort(grpc.StatusCode.NOT_FOUND, "no manifest kept under that fingerprint")
                return pb.BeginSyncResponse(sync_id=self.sync, engines=1, manifest_reused=True, plan_reused=True)
            self.kept = (req.manifest_fingerprint, len(req.tensors))
            bf16 = pb.DType.Value("DTYPE_BF16")
            f32 = pb.DType.Value("DTYPE_F32")
            dtypes = [pb.TensorDtypes(wire=bf16 if t.dtype == f32 else t.dtype,
                                      destinations=[bf16 if t.dtype == f32 else t.dtype]) for t in req.tensors]
            return pb.BeginSyncResponse(sync_id=self.sync, engines=1, dtypes=dtypes)

        def Push(self, request_iterator, context):
            for msg in request_iterator:
                yield pb.LayerAck(layer=msg.layer)

        def GetStatus(self, req, context):
            return pb.StatusResponse()  # no node name: every rank talks to one node's daemon

        def Commit(self, req, context):
            return pb.CommitResponse(stats=pb.SyncStats(sync_id=req.sync_id, state="committed"))

        def Abort(self, req, context):
            return pb.AbortResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_WeightSyncServicer_to_server(Servicer(), server)
    server.add_insecure_port(address)
    server.start()
    return server


# ---- one rank ----

def floors(tr_held, torch) -> dict:
    """Same-rank floors for the bytes this rank sends: one memcpy, and one torch copy (cast) per shard."""
    locs = [p.local for p in tr_held]
    n = sum(t.numel() * t.element_size() for t in locs)
    src = torch.empty(n, dtype=torch.uint8)
    dst = torch.empty(n, dtype=torch.uint8)
    src.fill_(1)
    dsts = [torch.empty(t.shape, dtype=torch.bfloat16 if t.dtype == torch.float32 else t.dtype) for t in locs]
    out = {"memcpy": [], "per_tensor_copy": [], "per_tensor_copy_cpu": []}
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        out["memcpy"].append(time.perf_counter() - t0)
        t0, c0 = time.perf_counter(), time.process_time()
        for d, s in zip(dsts, locs):
            d.copy_(s)
        out["per_tensor_copy"].append(time.perf_counter() - t0)
        out["per_tensor_copy_cpu"].append(time.process_time() - c0)
    return {k: min(v) for k, v in out.items()} | {"bytes": n, "tensors": len(locs)}


def rank_main(rank: int, world: int, a: dict) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import weightsync
    from weightsync import pieces as P

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + a["store"], rank=rank, world_size=world)
    server = None
    if a["daemon"] == "fake":
        address = f"unix:{a['dir']}/fake-{rank}.sock"
        server = fake_daemon(address)
    else:
        address = a["address"]
    shapes = checkpoint_shapes(a["ckpt"])
    model = build_module(shapes)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers.children():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    held = [P.piece_of(n, v) for n, v in model.named_parameters()]
    held = [p for p in held if p.held]
    fl = floors(held, torch)
    pushes = []
    with weightsync.Trainer(address, model=MODEL, rank=rank, world_size=world) as tr:
        for v in range(1, a["pushes"] + 1):
            with torch.no_grad():
                for p in model.parameters():
                    p.to_local().add_(0.5)
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            res = tr.push(model, version=v)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            st = res.ranks[rank]
            pushes.append({"seconds": wall, "cpu": cpu, "phases": {k[8:]: getattr(st, k) for k in vars(st)
                                                       if k.startswith("seconds_")},
                           "tensors": st.tensors, "bytes": st.bytes, "messages": st.messages,
                           "state": res.stats.get("state")})
    with open(os.path.join(a["dir"], f"rank{rank}.json"), "w") as f:
        json.dump({"pushes": pushes, "floors": fl, "params": len(shapes)}, f)
    dist.barrier()
    dist.destroy_process_group()
    if server is not None:
        server.stop(0)


# ---- the driver ----

def wait_for(pred, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--daemon", choices=("fake", "real"), default="fake")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--pushes", type=int, default=4)
    ap.add_argument("--json", help="write the per-rank results here")
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--args", help=argparse.SUPPRESS)
    o = ap.parse_args()
    if o.rank is not None:
        rank_main(o.rank, o.world, json.loads(o.args))
        return
    work = tempfile.mkdtemp(prefix="ws-trainer-bench-")
    procs = []
    try:
        ckpt = os.path.join(work, "ckpt")
        subprocess.run([str(BUILD / "weightsyncctl"), "gen-checkpoint", "--arch", "DeepseekV2ForCausalLM",
                        "--out", ckpt, "--layers", str(o.layers), "--experts", str(o.experts), "--hidden-size",
                        "64", "--intermediate-size", "32", "--heads", "8", "--kv-heads", "8", "--vocab-size", "512"],
                       check=True, stdout=subprocess.DEVNULL)
        a = {"daemon": o.daemon, "dir": work, "ckpt": ckpt, "pushes": o.pushes, "store": os.path.join(work, "store")}
        if o.daemon == "real":
            sock = os.path.join(work, "ws.sock")
            a["address"] = "unix:" + sock
            dlog = open(os.path.join(work, "daemon.log"), "w")
            procs.append(subprocess.Popen([str(BUILD / "weightsyncd"), "--listen", a["address"], "--layouts-dir",
                                           str(REPO / "config" / "layouts")], stdout=dlog, stderr=subprocess.STDOUT))
            wait_for(lambda: os.path.exists(sock), "weightsyncd")
            elog_path = os.path.join(work, "engine.log")
            elog = open(elog_path, "w")
            procs.append(subprocess.Popen([str(BUILD / "weightsyncctl"), "--daemon", a["address"], "mock-engine",
                                           "--model", MODEL, "--checkpoint", ckpt, "--tp", "1", "--dtype", "bf16",
                                           "--dump", os.path.join(work, "dump"), "--no-dump"],
                                          stdout=elog, stderr=subprocess.STDOUT))
            wait_for(lambda: " registered" in Path(elog_path).read_text(), "the mock engine to register")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        ranks = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(o.world),
                                   "--args", json.dumps(a)], env=env) for r in range(o.world)]
        rcs = [p.wait() for p in ranks]
        if any(rcs):
            raise SystemExit(f"trainer ranks exited with {rcs}")
        results = [json.loads(Path(work, f"rank{r}.json").read_text()) for r in range(o.world)]
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)
    if o.json:
        Path(o.json).write_text(json.dumps(results))
    report(results[0], o, os.getloadavg())


def report(r: dict, o, load) -> None:
    pushes, fl = r["pushes"], r["floors"]
    steady = pushes[1:] or pushes
    n = pushes[0]["tensors"]
    med = statistics.median(p["seconds"] for p in steady)
    print(f"| figure ({o.daemon} daemon, W={o.world}, rank 0; load {load[0]:.1f}) | value |\n|---|---|")
    print(f"| parameters in the module / held by rank 0 | {r['params']} / {n} |")
    secs = ", ".join(f"{p['seconds']:.3f}" for p in pushes)
    print(f"| push seconds (first, then steady) | {secs} |")
    print(f"| steady-state push (median) | {med:.3f} s = {med / n * 1e6:.1f} us per param |")
    if "cpu" in steady[0]:
        cpu = statistics.median(p["cpu"] for p in steady)
        print(f"| steady-state push, CPU time of rank 0's process (median) | {cpu:.3f} s = "
              f"{cpu / n * 1e6:.1f} us per param; minus the per-shard copies' CPU: "
              f"{(cpu - fl['per_tensor_copy_cpu']) / n * 1e6:.1f} us per param |")
    for k in steady[0]["phases"]:
        v = statistics.median(p["phases"][k] for p in steady)
        print(f"| phase {k} (median) | {v * 1e6 / n:.1f} us per param |")
    print(f"| floor: memcpy of rank 0's {fl['bytes'] / 1e6:.1f} MB | {fl['memcpy'] * 1e3:.1f} ms "
          f"(push / floor = {med / fl['memcpy']:.0f}x) |")
    print(f"| floor: one torch copy (cast) per shard | {fl['per_tensor_copy'] * 1e3:.1f} ms = "
          f"{fl['per_tensor_copy'] / n * 1e6:.1f} us per param (push / floor = {med / fl['per_tensor_copy']:.1f}x) |")
    print(f"| overhead per param: (push - per-shard copies) / params | "
          f"{(med - fl['per_tensor_copy']) / n * 1e6:.1f} us |")


if __name__ == "__main__":
    main()
