"""Test engines: weightsync.Engine ranks holding torch tensors in vLLM's layout."""
from __future__ import annotations

import torch

import vllm_reference as ref
import weightsync


class EngineSet:
    """replicas x T engine ranks of one model, every buffer pre-filled with 0xFF (NaN) bytes.

    Params are in `dtype` (the MoE router in fp32, see vllm_reference), or as `param_dtypes` {name: dtype} says.
    """

    def __init__(self, address, model, arch, sd, cfg, T, replicas=1, dtype=torch.bfloat16, param_dtypes=None):
        self.arch, self.cfg, self.T, self.dtype = arch, cfg, T, dtype
        self.param_dtypes = dict(param_dtypes or {})
        self.engines, self.commits = [], []
        self.early_writes, self.pauses = [], 0
        for rep in range(replicas):
            for r in range(T):
                eng = weightsync.Engine(address, model, cfg, tp_rank=r, tp_size=T, replica_id=rep, dtype=dtype)
                for name, t in self.expected(sd, r).items():
                    buf = eng.empty(name, t.shape, t.dtype)
                    buf.view(torch.uint8).fill_(0xFF)
                seen = {}  # version -> copy of every buffer when the version was committed

                def snapshot(version, eng=eng, seen=seen):
                    seen[version] = {n: t.clone() for n, t in eng.tensors.items()}
                eng.on_commit(snapshot)
                # The pause barrier: between a resume and the next pause the daemon writes nothing.
                resumed = {n: t.clone() for n, t in eng.tensors.items()}

                def paused(version, eng=eng, resumed=resumed):
                    moved = [n for n, t in eng.tensors.items()
                             if not torch.equal(t.view(-1).view(torch.uint8), resumed[n].view(-1).view(torch.uint8))]
                    if moved:
                        self.early_writes.append(f"tp {eng.tp_rank} v{version}: {moved[:3]} written before the pause")
                    self.pauses += 1

                def resume(version, eng=eng, resumed=resumed):
                    resumed.update({n: t.clone() for n, t in eng.tensors.items()})
                eng.on_pause(paused)
                eng.on_resume(resume)
                self.commits.append(seen)
                self.engines.append(eng)
        for eng in self.engines:
            eng.start()

    def check(self, sd, version):
        """Every engine applied `version` and holds the reference bit for bit; none was written unpaused."""
        assert not self.early_writes, self.early_writes
        assert self.pauses > 0, "no engine was asked to pause"
        for eng, seen in zip(self.engines, self.commits):
            eng.wait_for_version(version, timeout=30)
            assert version in seen, f"version {version} was never committed to this engine"
            exp = self.expected(sd, eng.tp_rank)
            assert sorted(exp) == sorted(eng.tensors)
            for name, want in exp.items():
                got = seen[version][name]
                ok = torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))
                if not ok:
                    bad = (got.float() != want.float()) | got.float().isnan()
                    raise AssertionError(f"{self.arch} v{version} replica {eng.replica_id} tp {eng.tp_rank} {name}: "
                                         f"{int(bad.sum())} of {got.numel()} elements differ")

    def expected(self, sd, r) -> dict:
        """{name: what tp rank r must hold, in its dtype}."""
        return {n: t.to(self.param_dtypes.get(n, ref.param_dtype(n, self.dtype))).contiguous()
                for n, t in ref.rank_params(self.arch, sd, self.cfg, self.T, r).items()}

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.engines for t in e.tensors.values())

    def close(self):
        for e in self.engines:
            e.close()
