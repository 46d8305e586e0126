"""Hostile requests over gRPC against a real daemon (daemon/core/limits.h).

Each is refused with an error that names the limit and reaches a client with
gRPC's default settings intact; afterwards the daemon is still SERVING, its
memory stayed bounded and its log did not balloon.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import grpc
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "client" / "python"))
from weightsync._proto import weightsync_pb2 as pb  # noqa: E402
from weightsync._proto import weightsync_pb2_grpc as pb_grpc  # noqa: E402

MAPPING = json.dumps({"sources": [{"name": "w", "shape": [4, 4]}], "parts": [{"src": "w"}]})


# Under ASan (scripts/sanitize.sh sets WS_SANITIZED) shadow memory and the
# quarantine of freed blocks add to every resident figure: the bounds below
# still catch memory proportional to hostile input, with room for the runtime.
MEM_SCALE = 3.0 if os.environ.get("WS_SANITIZED") else 1.0


def vm_mb(pid: int, key: str = "VmRSS") -> float:
    """VmRSS (resident now) or VmHWM (peak) of a process, in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} for pid {pid}")


def assert_rss_below(pid: int, mb: float, what: str, wait: float = 5) -> None:
    """Freed memory may take a moment to leave the process: poll briefly."""
    mb *= MEM_SCALE
    deadline = time.monotonic() + wait
    while vm_mb(pid) >= mb and time.monotonic() < deadline:
        time.sleep(0.2)
    assert vm_mb(pid) < mb, f"daemon RSS {vm_mb(pid):.0f} MB {what}"


@pytest.fixture
def stub(daemon):
    """A stub on a channel with gRPC's defaults (8 KiB metadata limit, 4 MB receive)."""
    ch = grpc.insecure_channel(daemon.addr)
    yield pb_grpc.WeightSyncStub(ch)
    ch.close()


@pytest.fixture
def engine_shm():
    """A 32-byte shm object for one [4, 4] bf16 engine parameter."""
    name = f"ws-{os.getpid()}-limits"
    path = f"/dev/shm/{name}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, 32)
    os.close(fd)
    yield "/" + name
    os.unlink(path)


def engine_request(config: str, shm: str = "/ws-none", arch: str = "LimitsTestModel",
                   mapping: str = MAPPING) -> pb.RegisterEngineRequest:
    param = pb.EngineParam(name="w", shape=[4, 4], dtype=pb.DTYPE_BF16, mapping_json=mapping,
                           memory=pb.MemoryRef(host_shm=pb.HostShmRef(name=shm, offset=0, length=32)))
    return pb.RegisterEngineRequest(model="limits", architecture=arch, hf_config_json=config, tp_size=1,
                                    dtype=pb.DTYPE_BF16, params=[param], engine_label="test_limits")


def llama_config() -> dict:
    with open(REPO / "config" / "layouts" / "llama.json") as f:
        return json.load(f)["example_config"]


def refused(call, *args, **kw) -> grpc.RpcError:
    try:
        call(*args, **kw)
    except grpc.RpcError as e:
        return e
    pytest.fail("the request was accepted")


def register_error(stub, req) -> grpc.RpcError:
    return refused(lambda: next(stub.RegisterEngine(req, timeout=60)))


def manifest(names, model="limits") -> pb.BeginSyncRequest:
    tensors = [pb.SourceTensor(name="w", shape=[4, 4], dtype=pb.DTYPE_F32,
                               shards=[pb.ShardSpec(rank=0, dim=0, start=0, length=4)])]
    tensors += [pb.SourceTensor(name=n, shape=[2], dtype=pb.DTYPE_F32) for n in names]
    return pb.BeginSyncRequest(model=model, version=1, world_size=1, tensors=tensors)


def test_hostile_requests_are_refused_and_bounded(daemon, ctl, stub, engine_shm):
    pid = daemon.proc.pid
    log_before = daemon.log_path.stat().st_size
    t0 = time.monotonic()

    # 1. An hf_config_json nesting arrays 100,000 deep (it used to overflow the stack).
    deep = '{"a": ' + "[" * 100000 + "]" * 100000 + "}"
    e = register_error(stub, engine_request(deep))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert "limit max_json_depth = 64" in e.details(), e.details()

    # 2. num_hidden_layers = 1e6 for a real architecture (a minute of CPU and 10 GB before).
    cfg = llama_config()
    cfg["num_hidden_layers"] = 1000000
    t = time.monotonic()
    e = register_error(stub, engine_request(json.dumps(cfg), arch="LlamaForCausalLM", mapping=""))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert "num_hidden_layers = 1000000" in e.details() and "limit max_layout_entries" in e.details(), e.details()
    assert time.monotonic() - t < 10

    # 3. 1e6 tensors in one 32 MB BeginSync: refused by their count.
    names = [f"model.layers.{i % 1000}.unknown.{i}" for i in range(1000000)]
    big = manifest(names)
    assert big.ByteSize() > 30 << 20
    e = refused(stub.BeginSync, big, timeout=120)
    del big, names
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert "limit max_tensors_per_manifest = 262144" in e.details(), e.details()
    # Parsing the 32 MB message costs what it costs (about 250 MB at the peak);
    # nothing proportional to it is built after that (it peaked at 877 MB).
    assert vm_mb(pid, "VmHWM") < 400 * MEM_SCALE, f"daemon peak RSS {vm_mb(pid, 'VmHWM'):.0f} MB"
    assert_rss_below(pid, 300, "after the 1e6-tensor manifest")

    # 4. A 100 MB tensor name: refused by its length; the error quotes a little of it.
    e = refused(stub.BeginSync, manifest(["n" * (100 << 20)]), timeout=120)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert "limit max_name_bytes = 1024" in e.details() and len(e.details()) < 400, e.details()[:500]

    # 5. A registered model (an explicit mapping; the llama rules lend their
    # skip patterns), then 60 unknown tensors with realistic names: the refusal
    # lists 20 and counts the rest, small enough for default metadata limits.
    call = stub.RegisterEngine(engine_request(json.dumps(llama_config()), shm=engine_shm, arch="LlamaForCausalLM"),
                               timeout=120)
    first = next(call)
    assert first.HasField("registered"), first
    try:
        unknown = [f"model.layers.{i}.mlp.experts.{i}.down_proj.weight_scale_inv" for i in range(60)]
        e = refused(stub.BeginSync, manifest(unknown), timeout=60)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{e.code()}: {e.details()}"
        msg = e.details()
        assert msg.startswith("model limits version 1: unknown source tensor model.layers.0.mlp"), msg
        assert msg.count("unknown source tensor") == 20 and msg.endswith("... and 40 more"), msg
        assert len(msg.encode()) < 4096
        # Tensors a skip pattern matches are still checked (they were accepted whatever they said).
        bad = manifest([])
        bad.tensors.append(pb.SourceTensor(name="model.layers.0.self_attn.rotary_emb.inv_freq",
                                           shape=[1 << 32, 3, 1 << 32], dtype=pb.DTYPE_F32))
        bad.tensors.append(pb.SourceTensor(name="model.layers.1.self_attn.rotary_emb.inv_freq", shape=[8],
                                           dtype=pb.DTYPE_F32, shards=[pb.ShardSpec(rank=7, start=0, length=8)]))
        e = refused(stub.BeginSync, bad, timeout=60)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
        assert "layers.0.self_attn.rotary_emb.inv_freq: shape [4294967296, 3, 4294967296] has a negative dim " \
               "or more than 2^50 elements" in e.details(), e.details()
        assert "rank 7 is not below world_size 1" in e.details(), e.details()
        # The model itself is fine: a good manifest begins (then a 1 MB abort reason).
        ok = stub.BeginSync(manifest([]), timeout=60)
        assert ok.sync_id > 0
        stub.Abort(pb.AbortRequest(sync_id=ok.sync_id, reason="x" * (1 << 20)), timeout=60)
    finally:
        call.cancel()

    # The daemon is up and serving, with bounded memory and log.
    assert daemon.alive(), daemon.log()
    health = ctl.health()
    assert health.returncode == 0 and health.stdout.strip() == "SERVING", health.stdout + health.stderr
    assert_rss_below(pid, 300, "at the end")
    grown = daemon.log_path.stat().st_size - log_before
    assert grown < 1 << 20, f"log grew by {grown} bytes"
    assert time.monotonic() - t0 < 300


def test_python_client_sees_long_refusals(daemon, engine_shm):
    """The weightsync package's channel accepts metadata past the 8 KiB default."""
    from weightsync.daemon import _CHANNEL_OPTIONS
    assert ("grpc.max_metadata_size", 64 * 1024) in _CHANNEL_OPTIONS
    ch = grpc.insecure_channel(daemon.addr, options=_CHANNEL_OPTIONS)
    stub = pb_grpc.WeightSyncStub(ch)
    call = stub.RegisterEngine(engine_request("{}", shm=engine_shm), timeout=60)
    assert next(call).HasField("registered")
    try:
        names = ["\u00e9" * 400 + f".{i}" for i in range(60)]  # non-ASCII: 3 bytes each on the wire
        e = refused(stub.BeginSync, manifest(names), timeout=60)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{e.code()}: {e.details()}"
        assert e.details().startswith("model limits version 1: unknown source tensor \u00e9"), e.details()
        assert e.details().endswith(" more bytes)"), e.details()
    finally:
        call.cancel()
        ch.close()
