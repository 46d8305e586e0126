"""One unprivileged client action against a weightsyncd, for test_security.py.

Runs as another Unix user (setpriv), with Debian's python3-grpcio and a copy of
the weightsync package on PYTHONPATH. Prints one JSON line per outcome:
{"ok": bool, "code": "PERMISSION_DENIED", "message": "...", ...}.

The "model" is one explicit-mapping parameter `w` ([4, 4] bf16 engine param
filled from the f32 source tensor `w`), so no layout rule file is involved.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import grpc

from weightsync._proto import weightsync_pb2 as pb
from weightsync._proto import weightsync_pb2_grpc as pb_grpc

MAPPING = json.dumps({"sources": [{"name": "w", "shape": [4, 4]}], "parts": [{"src": "w"}]})


def out(**kw) -> None:
    print(json.dumps(kw), flush=True)


def err(e: grpc.RpcError) -> dict:
    return {"ok": False, "code": e.code().name, "message": e.details() or ""}


def register_request(a) -> pb.RegisterEngineRequest:
    params = []
    for i, name in enumerate(a.name):
        params.append(pb.EngineParam(
            name="w" if i == 0 else f"w{i}", shape=[4, 4], dtype=pb.DTYPE_BF16, mapping_json=MAPPING,
            memory=pb.MemoryRef(host_shm=pb.HostShmRef(name=name, offset=a.offset, length=32))))
    return pb.RegisterEngineRequest(model=a.model, architecture="SecurityTestModel", hf_config_json="{}",
                                    replica_id=a.replica, tp_rank=0, tp_size=1, dtype=pb.DTYPE_BF16,
                                    params=params, engine_label="sec_actor")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--daemon", required=True)
    p.add_argument("action", choices=["register", "hold", "unregister", "ack", "begin", "abort", "commit",
                                      "push-nothing", "status"])
    p.add_argument("--model", default="m")
    p.add_argument("--name", action="append", default=[], help="shm name of a param (repeatable)")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--replica", type=int, default=0)
    p.add_argument("--engine-id", default="")
    p.add_argument("--sync-id", type=int, default=0)
    p.add_argument("--version", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1)
    a = p.parse_args()
    stub = pb_grpc.WeightSyncStub(grpc.insecure_channel(a.daemon))

    if a.action in ("register", "hold"):
        # register: report how registration went, then leave. hold: stay
        # registered (the stream open) until stdin closes.
        for _ in range(a.repeat):
            t0 = time.monotonic()
            stream = stub.RegisterEngine(register_request(a), timeout=None if a.action == "hold" else 30)
            try:
                first = next(stream)
                out(ok=True, engine_id=first.registered.engine_id, seconds=time.monotonic() - t0)
                if a.action == "hold":
                    sys.stdin.read()
                stream.cancel()
            except grpc.RpcError as e:
                out(**err(e), seconds=time.monotonic() - t0)
        return 0
    try:
        if a.action == "unregister":
            stub.UnregisterEngine(pb.UnregisterEngineRequest(engine_id=a.engine_id), timeout=30)
            out(ok=True)
        elif a.action == "ack":
            stub.AckVersion(pb.AckVersionRequest(engine_id=a.engine_id, version=a.version, ok=True), timeout=30)
            out(ok=True)
        elif a.action == "begin":
            t = pb.SourceTensor(name="w", shape=[4, 4], dtype=pb.DTYPE_F32,
                                shards=[pb.ShardSpec(rank=0, dim=0, start=0, length=4)])
            r = stub.BeginSync(pb.BeginSyncRequest(model=a.model, version=a.version, world_size=1, tensors=[t]),
                               timeout=30)
            out(ok=True, sync_id=r.sync_id)
        elif a.action == "abort":
            stub.Abort(pb.AbortRequest(sync_id=a.sync_id, reason="sec_actor"), timeout=30)
            out(ok=True)
        elif a.action == "commit":
            stub.Commit(pb.CommitRequest(sync_id=a.sync_id), timeout=30)
            out(ok=True)
        elif a.action == "push-nothing":
            # Opens a Push stream and never sends a layer (a trainer that hangs
            # or dies right after opening its streams).
            it = stub.Push(iter(lambda: time.sleep(3600), None), timeout=None)
            out(ok=True, opened=True)
            sys.stdin.read()
            it.cancel()
        elif a.action == "status":
            r = stub.GetStatus(pb.StatusRequest(), timeout=30)
            out(ok=True, engines=[e.engine_id for e in r.engines])
    except grpc.RpcError as e:
        out(**err(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
