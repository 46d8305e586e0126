"""Single-process tests: pieces of the client that need no second rank (some need the daemon)."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

import models  # noqa: E402
import weightsync  # noqa: E402
from engines import EngineSet  # noqa: E402
from weightsync.policy import DtypePolicy  # noqa: E402
from weightsync.shm import ShmIndex, StagingRing, align_up, shm_empty  # noqa: E402


# ---- no daemon ----

def test_staging_ring_wraps_and_releases_in_order():
    r = StagingRing(1024)
    assert r.alloc(300, 1) == 0 and r.alloc(300, 2) == 512 and r.alloc(10, 3) is None
    r.release_through(1)
    assert r.alloc(256, 3) == 0 and r.alloc(256, 3) == 256 and r.alloc(1, 4) is None
    r.release_through(2)
    assert r.alloc(512, 4) == 512 and r.used == 1024
    r.release_through(4)
    assert r.used == 0 and r.alloc(1024, 5) == 0 and r.alloc(2048, 6) is None


def test_staging_ring_wraps_to_the_start_only_when_the_tail_is_too_short():
    r = StagingRing(1024)
    assert r.alloc(256, 1) == 0 and r.alloc(512, 2) == 256 and r.alloc(256, 3) == 768 and r.used == 1024
    r.release_through(2)
    assert r.used == 256
    assert r.alloc(512, 4) == 0        # the tail [1024, 1024) is empty: wraps
    assert r.alloc(257, 5) is None      # [512, 768) is free but 257 bytes take 512
    assert r.alloc(256, 5) == 512       # exactly up to the oldest live span
    assert r.alloc(1, 6) is None
    r.release_through(3)                # frees [768, 1024): the live spans are [0, 768)
    assert r.alloc(256, 6) == 768 and r.used == 1024


def test_staging_ring_releases_in_ticket_order_and_counts_aligned_bytes():
    r = StagingRing(4096)
    assert r.alloc(4, 0) == 0 and r.used == 256
    assert r.alloc(3584 + 508, 1) is None  # one message's span: 4096 bytes, only 3840 free
    r.release_through(0)
    assert r.used == 0 and r.alloc(4092, 1) == 0 and r.used == 4096
    r2 = StagingRing(2048)
    for t in (1, 1, 2, 3):
        r2.alloc(300, t)
    assert r2.used == 4 * 512
    r2.release_through(0)
    assert r2.used == 2048
    r2.release_through(1)               # both ticket-1 spans
    assert r2.used == 1024 and r2.alloc(1024, 4) == 0 and r2.alloc(1, 5) is None
    r2.release_through(9)
    assert r2.used == 0 and r2.alloc(2048, 10) == 0


class FakePush:
    """The daemon's side of one Push stream: acknowledges each message when the trainer waits for an ack,
    reading the message's bytes then (so a span reused while still in flight shows as wrong bytes)."""

    def __init__(self, reader, expected):
        self.reader, self.expected = reader, expected
        self.acked, self.cancelled = [], False

    def __call__(self, requests, timeout=None):
        self.requests = iter(requests)
        return self

    def __iter__(self):
        return self

    def __next__(self):
        from weightsync._proto import weightsync_pb2 as pb
        msg = next(self.requests)
        for sh in msg.shards:
            got = self.reader(sh.memory)
            assert got == self.expected[sh.tensor], f"{sh.tensor}: bytes changed while in flight"
        self.acked.append(msg.layer)
        return pb.LayerAck(layer=msg.layer, bytes_written=sum(len(self.expected[s.tensor]) for s in msg.shards))

    def cancel(self):
        self.cancelled = True


def read_shm(ref):
    with open(ref.host_shm.name, "rb") as f:
        f.seek(ref.host_shm.offset)
        return f.read(ref.host_shm.length)


def stream_with_fake_daemon(tr, tensors, reader=read_shm):
    import types
    from weightsync import pieces as P
    from weightsync.trainer import RankStats
    held = [(P.full_piece(n, t), t.dtype, None) for n, t in tensors.items()]
    fake = FakePush(reader, {n: t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                             for n, t in tensors.items()})
    tr.daemon = types.SimpleNamespace(stub=types.SimpleNamespace(Push=fake))
    stats = RankStats()
    tr._stream(7, tr._plan_for(held), stats)  # no manifest index: shards go by name, as FakePush reads them
    return fake, stats


def test_a_message_that_fits_max_inflight_bytes_always_fits_the_ring():
    # 4 B + (3584 B + 508 B) with a 4096-byte bound: the second message takes 256 + 3584 + 512 aligned bytes
    tensors = {"model.layers.0.w": torch.randn(1), "model.layers.1.a": torch.randn(896),
               "model.layers.1.b": torch.randn(127)}
    tr = weightsync.Trainer("unix:/nonexistent", "m", world_size=1, max_inflight_bytes=4096)
    fake, stats = stream_with_fake_daemon(tr, tensors)
    assert fake.acked == ["model.layers.0", "model.layers.1"] and not fake.cancelled
    assert stats.staged_bytes == stats.bytes == 4 + 3584 + 508
    assert stats.peak_inflight_bytes == 4096  # the 256 B of layer 0 was acknowledged first
    tr.close()


def test_staged_spans_are_not_reused_while_in_flight():
    torch.manual_seed(0)
    tensors = {f"model.layers.{i}.w{j}": torch.randn(n) for i in range(6) for j, n in enumerate((37, 300, 5))}
    tensors["model.layers.3.big"] = torch.randn(3000)   # alone larger than the bound: sent alone
    tr = weightsync.Trainer("unix:/nonexistent", "m", world_size=1, max_inflight_bytes=3000)
    fake, stats = stream_with_fake_daemon(tr, tensors)
    assert len(fake.acked) == stats.messages and stats.messages > 6
    assert stats.peak_inflight_bytes <= align_up(3000 * 4) and stats.staged_bytes == sum(t.numel() * 4 for t in tensors.values())
    tr.close()


def test_cuda_staging_ring_is_freed_after_each_push(monkeypatch):
    """The CUDA ring's lifetime, on CPU: the 'device' is the CPU (CUDA calls and the IPC export faked); after
    each push nothing references the ring and the freed memory went back to the driver (empty_cache)."""
    import types
    import weakref
    from weightsync import trainer as T
    from weightsync.cuda_ipc import IpcRef
    rings, emptied, exported = [], [], {}

    def export(t, what):
        exported[t.data_ptr()] = t
        return IpcRef(b"h" * 64, "GPU-fake", t.data_ptr(), t.numel() * t.element_size())

    def read(ref):
        return exported[ref.cuda_ipc.offset].contiguous().view(-1).view(torch.uint8).numpy().tobytes()

    class Torch:  # the trainer's torch, recording the buffers it allocates
        def __getattr__(self, name):
            return getattr(torch, name)

        def empty(self, *a, **kw):
            t = torch.empty(*a, **kw)
            rings.append(weakref.ref(t))
            return t

    monkeypatch.setattr(T, "torch", Torch())
    monkeypatch.setattr(T.Trainer, "_needs_staging", lambda self, p, wire, index: True)
    monkeypatch.setattr(T.Trainer, "_staging_place", lambda self, t: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(synchronize=lambda: None))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    monkeypatch.setattr(T, "IpcExporter", lambda: types.SimpleNamespace(export=export))
    tensors = {f"model.layers.{i}.w": torch.randn(100) for i in range(3)}
    tr = weightsync.Trainer("unix:/nonexistent", "m", world_size=1, max_inflight_bytes=1024)
    for push in range(2):
        fake, stats = stream_with_fake_daemon(tr, tensors, read)
        exported.clear()
        assert stats.staged_bytes == 3 * 400 and fake.acked == [f"model.layers.{i}" for i in range(3)]
        assert len(rings) == push + 1 and all(r() is None for r in rings)  # nothing keeps a ring alive
        assert len(emptied) == push + 1
    tr.close()


def test_shm_index_finds_shm_tensors_only():
    t = shm_empty((4, 8), torch.float32)
    idx = ShmIndex()
    loc = idx.locate_tensor(t[2:])
    assert loc.name == t._ws_segment.path and loc.offset == 2 * 8 * 4
    assert idx.locate_tensor(torch.zeros(4)) is None
    assert idx.locate_tensor(t.t()) is None  # not contiguous


def test_shm_index_skips_subdirectories():
    import os
    import tempfile
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="ws-test-dir-")
    try:
        path = os.path.join(d, "x")
        with open(path, "wb") as f:
            f.write(bytes(64))
        t = torch.from_file(path, shared=True, size=16, dtype=torch.float32)
        assert ShmIndex().locate_tensor(t) is None  # the daemon would refuse the name
    finally:
        os.unlink(os.path.join(d, "x"))
        os.rmdir(d)


def test_dtype_policy():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = DtypePolicy(overrides={"*norm*": "float16"})  # the defaults do not warn
        weightsync.Trainer("unix:/nonexistent", "m", world_size=1, engine_dtype="auto")
    assert p.source_dtype("model.layers.0.mlp.up_proj.weight", torch.float32) == torch.float32
    assert p.source_dtype("model.norm.weight", torch.float32) == torch.float16
    assert p.source_dtype("x", torch.bfloat16) == torch.bfloat16
    with pytest.raises(weightsync.WeightSyncError, match="cannot be sent"):
        p.source_dtype("pos_ids", torch.int64)
    # The guesses of old are ignored, saying so, where the caller passed them.
    with pytest.warns(DeprecationWarning, match="engine_dtype='bfloat16': ignored") as w:
        weightsync.Trainer("unix:/nonexistent", "m", world_size=1, engine_dtype="bfloat16")
    assert w[0].filename == __file__
    with pytest.warns(DeprecationWarning, match="engine_dtype=None and keep_fp32: ignored") as w:
        DtypePolicy(None, keep_fp32=())
    assert w[0].filename == __file__


def test_world_size_needs_a_process_group():
    with pytest.raises(weightsync.WeightSyncError, match="not initialised"):
        weightsync.Trainer("unix:/nonexistent", "m", rank=0, world_size=2)


# ---- with the daemon ----

def engines_for(daemon, name, arch, cfg, sd, T=2, dtype=torch.bfloat16):
    return EngineSet(daemon.address, name, arch, sd, cfg, T, 1, dtype)


def test_zero_copy_from_shared_memory(daemon, checkpoints):
    sd = models.load_checkpoint(checkpoints["llama"])
    cfg = models.config("llama")
    es = engines_for(daemon, "local-zero-copy", "llama", cfg, sd, dtype=torch.float32)  # f32 on the wire
    try:
        shm = []
        for k, v in sd.items():
            t = shm_empty(v.shape, v.dtype)
            t.copy_(v)
            shm.append((k, t))
        with weightsync.Trainer(daemon.address, "local-zero-copy", world_size=1) as tr:
            res = tr.push(shm, version=1)
        es.check(sd, 1)
        total = sum(t.numel() * t.element_size() for _, t in shm)
        assert res.ranks[0].zero_copy_bytes == total and res.ranks[0].staged_bytes == 0
        assert res.stats["bytes_written"] == es.bytes()
    finally:
        es.close()


def test_state_dict_with_tied_weights_and_bounded_ring(daemon):
    cfg = models.config("llama")
    cfg.tie_word_embeddings = True
    import transformers
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in sd  # the state dict names the tied tensor twice
    es = engines_for(daemon, "local-tied", "llama", cfg, {k: v for k, v in sd.items() if k != "lm_head.weight"})
    try:
        bound = 16 << 10
        with weightsync.Trainer(daemon.address, "local-tied", world_size=1, max_inflight_bytes=bound) as tr:
            r1 = tr.push(model.state_dict(), version=1, hf_model=model)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(-2)
            r2 = tr.push(model.state_dict(), version=2, hf_model=model)
        es.check({k: v * -2 for k, v in sd.items() if k != "lm_head.weight"}, 2)
        for r in (r1, r2):
            assert r.ranks[0].peak_inflight_bytes <= max(bound, 100 * 64 * 2)
            assert r.ranks[0].messages > 2 * 3
    finally:
        es.close()


def test_refused_manifest_names_the_tensor_and_daemon_recovers(daemon, checkpoints):
    sd = models.load_checkpoint(checkpoints["qwen2"])
    cfg = models.config("qwen2")
    es = engines_for(daemon, "local-refused", "qwen2", cfg, sd)
    try:
        tr = weightsync.Trainer(daemon.address, "local-refused", world_size=1)
        bad = list(sd.items()) + [("model.bogus.weight", torch.zeros(3, 3))]
        with pytest.raises(weightsync.WeightSyncError, match="unknown source tensor model.bogus.weight"):
            tr.push(bad, version=1)
        wrong = [(k, v[:-1] if k == "model.norm.weight" else v) for k, v in sd.items()]
        with pytest.raises(weightsync.WeightSyncError, match="model.norm.weight"):
            tr.push(wrong, version=1)
        assert es.engines[0].applied_version == 0
        tr.push(sd, version=1)
        es.check(sd, 1)
    finally:
        es.close()


def test_engine_error_fails_the_push(daemon, checkpoints):
    sd = models.load_checkpoint(checkpoints["llama"])
    cfg = models.config("llama")
    es = engines_for(daemon, "local-engine-error", "llama", cfg, sd, T=1)
    try:
        def boom(version):
            raise RuntimeError("post-load step exploded")
        es.engines[0]._on_commit.insert(0, boom)
        with pytest.raises(weightsync.WeightSyncError, match="post-load step exploded"):
            with weightsync.Trainer(daemon.address, "local-engine-error", world_size=1) as tr:
                tr.push(sd, version=1)
    finally:
        es.close()


def test_registration_refused_with_the_daemons_reason(daemon):
    cfg = models.config("llama")
    eng = weightsync.Engine(daemon.address, "local-bad-engine", cfg, tp_rank=0, tp_size=1)
    eng.empty("model.layers.0.self_attn.qkv_proj.weight", (3, 3))
    try:
        with pytest.raises(weightsync.WeightSyncError, match="qkv_proj"):
            eng.start(timeout=10)
    finally:
        eng.close()


class _NonNegotiatingStub:
    """A daemon from before dtype negotiation: it ignores negotiate_dtypes and returns no dtypes."""

    def __init__(self, stub):
        self._stub = stub

    def BeginSync(self, req, **kw):
        old = type(req)()
        old.CopyFrom(req)
        old.negotiate_dtypes = False
        return self._stub.BeginSync(old, **kw)

    def __getattr__(self, name):
        return getattr(self._stub, name)


def test_daemon_without_negotiation_gets_source_dtypes(daemon, checkpoints):
    """An fp16 engine, a bf16 config: an older daemon is sent f32 and casts once (no bf16 guess)."""
    sd = models.load_checkpoint(checkpoints["llama"])
    cfg = models.config("llama")
    es = engines_for(daemon, "local-old-daemon", "llama", cfg, sd, T=1, dtype=torch.float16)
    try:
        model = models.make_model("llama")
        model.load_state_dict(sd)
        model.config.dtype = torch.bfloat16
        with weightsync.Trainer(daemon.address, "local-old-daemon", world_size=1) as tr:
            tr.daemon.stub = _NonNegotiatingStub(tr.daemon.stub)
            res = tr.push(model, version=1)
        es.check(sd, 1)
        assert res.ranks[0].bytes == sum(t.numel() * 4 for t in sd.values())  # every tensor sent in f32
    finally:
        es.close()


def test_a_tensor_cast_in_place_is_walked_again(daemon, checkpoints):
    """Plain tensors whose .data is swapped for a bf16 copy (same tensor objects): the next push walks them
    again, sends a new manifest, and the engines get the new bytes; a push with nothing changed reuses it all."""
    sd = models.load_checkpoint(checkpoints["llama"])
    es = engines_for(daemon, "local-cast", "llama", models.config("llama"), sd)
    try:
        params = {k: torch.nn.Parameter(v.clone()) for k, v in sd.items()}
        with weightsync.Trainer(daemon.address, "local-cast", world_size=1) as tr:
            r1 = tr.push(params, version=1)
            with torch.no_grad():
                for p in params.values():
                    p.add_(1)
            r2 = tr.push(params, version=2)
            with torch.no_grad():
                params["model.norm.weight"].data = (sd["model.norm.weight"] * 3).to(torch.bfloat16)
            r3 = tr.push(params, version=3)
        assert [r.ranks[0].reused for r in (r1, r2, r3)] == [False, True, False]
        es.check({k: v + 1 for k, v in sd.items()}, 2)
        es.check({k: (v + 1 if k != "model.norm.weight" else (v * 3).to(torch.bfloat16)) for k, v in sd.items()}, 3)
    finally:
        es.close()


def test_ipc_exporter_asks_the_driver_once_per_allocation(monkeypatch):
    """Tensors in one CUDA allocation share its handle: one set of driver calls per allocation (faked driver)."""
    import contextlib
    import ctypes
    from weightsync import cuda_ipc
    allocs = {0x10000: 0x1000, 0x20000: 0x800}   # base -> size
    calls = []

    class Driver:
        def cuPointerGetAttribute(self, out, attr, ptr):
            calls.append(("attr", ptr))
            out._obj.value = 1
            return 0

        def cuMemGetAddressRange_v2(self, base, size, ptr):
            calls.append(("range", ptr))
            b = next(b for b, n in allocs.items() if b <= ptr < b + n)
            base._obj.value, size._obj.value = b, allocs[b]
            return 0

        def cuIpcGetMemHandle(self, handle, base):
            calls.append(("handle", base))
            ctypes.memmove(handle, base.to_bytes(8, "little") * 8, 64)
            return 0

    monkeypatch.setattr(cuda_ipc, "_driver", lambda: Driver())
    monkeypatch.setattr(cuda_ipc, "device_uuid", lambda i: f"GPU-{i}")
    monkeypatch.setattr(torch.cuda, "device", lambda i: contextlib.nullcontext())
    ex = cuda_ipc.IpcExporter()
    a = ex.export_range(0, 0x10000, 256, "a")
    b = ex.export_range(0, 0x10100, 512, "b")
    c = ex.export_range(0, 0x20010, 16, "c")
    d = ex.export_range(1, 0x10100, 16, "d")   # another device: another allocation
    assert [x[0] for x in calls] == ["attr", "range", "handle"] * 3
    assert a.handle == b.handle != c.handle and (a.offset, b.offset, c.offset) == (0, 0x100, 0x10)
    assert (b.length, c.length, d.device_uuid) == (512, 16, "GPU-1")
    with pytest.raises(weightsync.WeightSyncError, match="run past their CUDA allocation"):
        ex.export_range(0, 0x20700, 0x200, "e")


def test_module_walk_is_kept_until_the_module_changes():
    """collect() with a ModuleWalk: the same pairs while nothing changed; a replaced parameter, a new module,
    a new buffer, changes straight in a module's dicts (no module hook sees them: a parameter replaced or
    renamed or moved to the buffers, a child moved to another module), a layer deleted from its ModuleList
    (which replaces the dict), a buffer made non-persistent each make it read the module again, in
    named_parameters() order, tied parameters once."""
    from weightsync import pieces as P
    m = models.make_model("llama")
    walk = P.ModuleWalk()

    def expected():
        return [n for n, _ in m.named_parameters()] + \
            [f"{prefix}.{b}" if prefix else b for prefix, mod in m.named_modules()
             for b, t in mod._buffers.items() if t is not None and b not in mod._non_persistent_buffers_set]

    def move_child(src, dst, name):
        dst._modules[name] = src._modules.pop(name)

    def rename(mod, old, new):
        mod._parameters[new] = mod._parameters.pop(old)

    def to_buffers(mod, name):  # the same names and tensors in the same sequence, in another of its dicts
        mod._buffers[name] = mod._parameters.pop(name)

    first = P.collect(m, walk)[0]
    assert [n for n, _ in first] == expected()
    assert P.collect(m, walk)[0] is first
    layers = m.model.layers
    changes = [
        lambda: setattr(m.model.norm, "weight", torch.nn.Parameter(torch.ones(64))),
        lambda: layers[0].add_module("extra", torch.nn.Linear(2, 2)),
        lambda: layers[1].register_buffer("counter", torch.zeros(3)),
        lambda: setattr(m, "lm_head", m.model.embed_tokens),   # tied: its weight once
        lambda: layers[0].mlp.up_proj._parameters.__setitem__("weight", torch.nn.Parameter(torch.zeros(1))),
        lambda: rename(layers[1].post_attention_layernorm, "weight", "scale"),
        lambda: move_child(layers[0], layers[1], "extra"),
        lambda: layers[1].register_buffer("counter", layers[1].counter, persistent=False),
        lambda: to_buffers(layers[1].input_layernorm, "weight"),
        lambda: layers.__delitem__(0),
    ]
    for change in changes:
        change()
        got = P.collect(m, walk)[0]
        assert got is not first and [n for n, _ in got] == expected()
        assert all(v is dict(m.named_parameters()).get(n, v) for n, v in got)
        first = got
        assert P.collect(m, walk)[0] is first


def test_kept_walk_notices_every_change_of_a_tensor():
    """A rank's walk of plain tensors is kept through in-place steps; a parameter re-created, its storage moved
    (.data, set_), resized, cast, or its strides changed in place (same storage and shape) makes the trainer
    derive it again, exactly as a new Trainer does."""
    from ws_helpers import walk_facts
    m = models.make_model("llama")

    def trainer():
        return weightsync.Trainer("unix:/nonexistent", model="walk", rank=0, world_size=1)

    q = m.model.layers[0].self_attn.q_proj   # square: its transpose has its shape
    steps = [
        ("step in place", False, lambda: [p.add_(0.5) for p in m.parameters()]),
        ("re-created", True, lambda: setattr(q, "weight", torch.nn.Parameter(q.weight.detach() + 1))),
        ("storage moved (.data)", True, lambda: setattr(q.weight, "data", q.weight.data.clone())),
        ("storage moved (set_)", True, lambda: m.model.norm.weight.set_(m.model.norm.weight.detach().clone())),
        ("resized", True, lambda: setattr(m.model.norm.weight, "data", torch.ones(128))),
        ("re-dtyped", True, lambda: setattr(m.lm_head.weight, "data", m.lm_head.weight.data.to(torch.bfloat16))),
        ("strides in place", True, lambda: setattr(q.weight, "data", q.weight.data.t())),
        ("nothing", False, lambda: None),
    ]
    tr = trainer()
    prev = tr._prepare(m, None)
    for what, changed, step in steps:
        with torch.no_grad():
            step()
        prep = tr._prepare(m, None)
        assert (prep is not prev) == changed, what
        assert tr._prepare(m, None) is prep, what
        assert walk_facts(prep) == walk_facts(trainer()._prepare(m, None)), what
        prev = prep


def test_rank_nodes_from_the_daemons_node_names():
    from weightsync.trainer import _rank_nodes
    assert _rank_nodes(["a", "a", "a"]) == []  # one daemon's node: today's protocol, no placement sent
    assert _rank_nodes([""]) == []
    assert _rank_nodes(["a", "a", "b", "b"]) == ["a", "a", "b", "b"]
    with pytest.raises(weightsync.WeightSyncError, match=r"daemon of rank 1 has no node name"):
        _rank_nodes(["a", "", "b"])
