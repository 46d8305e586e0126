"""Single-process tests: pieces of the client that need no second rank (some need the daemon)."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

import models  # noqa: E402
import weightsync  # noqa: E402
from engines import EngineSet  # noqa: E402
from weightsync.policy import DtypePolicy  # noqa: E402
from weightsync.shm import ShmIndex, StagingRing, shm_empty  # noqa: E402


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
    with pytest.warns(DeprecationWarning, match="engine_dtype='bfloat16' no longer decides") as w:
        weightsync.Trainer("unix:/nonexistent", "m", world_size=1, engine_dtype="bfloat16")
    assert w[0].filename == __file__
    with pytest.warns(DeprecationWarning, match="engine_dtype=None and keep_fp32 no longer decide") as w:
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
