"""One trainer rank of a multi-process test: python dist_worker.py SCENARIO RANK WORLD PORT OUTDIR ARGS_JSON.

Runs torch.distributed (gloo, CPU), FSDP2 over real transformers models, and
writes the scenario's JSON result to OUTDIR/rank{RANK}.json. A failure exits
non-zero with the traceback on stderr. Rank 0 listens on $WS_DIST_MASTER_ADDR
(default 127.0.0.1) at PORT.
"""
from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard

import weightsync
from weightsync import pieces as P
from ws_helpers import fail_nth_export, walk_facts


def load(path: str):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def shard_model(model, mode: str, world: int):
    """FSDP2 over the decoder layers and the root: shard0 | shard1 | hsdp (2 x world/2); or fsdp1."""
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        layer_cls = type(model.model.layers[0])
        return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({layer_cls}), device_id=torch.device("cpu"),
                    use_orig_params=True)
    if mode == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    kw = {}
    if mode == "shard1":
        # FSDP2 shards dim != 0 only evenly: Shard(1) where dim 1 divides, Shard(0) elsewhere.
        kw["shard_placement_fn"] = lambda p: Shard(1) if p.ndim >= 2 and p.shape[1] % world == 0 else Shard(0)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


def scenario_boxes(rank, world, args):
    """Manifest exactness: rebuild every checkpoint tensor from the manifest boxes and the ranks' bytes."""
    out = {}
    for arch, path in args["checkpoints"].items():
        model = shard_model(load(path), args["mode"], world)
        tr = weightsync.Trainer("unix:/nonexistent", model=arch, rank=rank, world_size=world)
        prep = tr._prepare(model, None)
        gathered = tr.comm.all_gather((prep.entries, prep.dropped))
        man = tr._manifest(gathered)
        local = {}  # name -> this rank's pieces of it, in manifest order (FSDP1: up to two)
        for p, w, pos in prep.held:
            if man.index[rank][pos] >= 0:
                local.setdefault(p.name, []).append(p.local.to(w).contiguous())
        datas = tr.comm.all_gather(local)
        placements = sorted({str(tuple(v.placements)) if hasattr(v, "placements") else type(v).__name__
                             for _, v in P.collect(model)[0]})  # FSDP1: Piece (read from the flat parameters)
        if rank == 0:
            req = man.req
            out[arch] = {"manifest": [[t.name, list(t.shape), t.dtype,
                                       [[s.rank, s.dim, s.start, s.length] for s in t.shards]] for t in req.tensors],
                         "data": {f"{r}:{n}:{k}": v.view(torch.int16 if v.element_size() == 2 else torch.int32)
                                  .flatten().tolist() for r, d in enumerate(datas) for n, vs in d.items()
                                  for k, v in enumerate(vs)},
                         "placements": placements}
    return out


def scenario_push(rank, world, args):
    """Push checkpoints (FSDP2) into engines registered by the test process; two versions."""
    out = {}
    for job in args["jobs"]:
        model = shard_model(load(job["checkpoint"]), job["mode"], world)
        if job.get("config_dtype"):  # what the HF config claims; the masters stay fp32
            model.config.dtype = getattr(torch, job["config_dtype"])
        with weightsync.Trainer(args["daemon"], model=job["model"], rank=rank, world_size=world,
                                max_inflight_bytes=job.get("max_inflight_bytes", 1 << 30)) as tr:
            results = []
            for version in (1, 2):
                if version == 2:
                    with torch.no_grad():
                        for _, p in model.named_parameters():
                            p.to_local().add_(job["delta"])
                results.append(tr.push(model, version=version))
        out[job["model"]] = [{"stats": r.stats, "engines": r.engines, "ranks": [vars(s) for s in r.ranks]}
                             for r in results]
    return out


def scenario_push_error(rank, world, args):
    """A push the daemon must refuse (an unknown tensor): every rank raises the same error."""
    model = shard_model(load(args["checkpoint"]), "shard0", world)
    items = list(P.collect(model)[0]) + [("model.bogus.weight", torch.zeros(4, 4))]
    tr = weightsync.Trainer(args["daemon"], model=args["model"], rank=rank, world_size=world)
    try:
        tr.push(items, version=7, hf_model=model)
    except weightsync.WeightSyncError as e:
        return {"error": str(e)}
    return {"error": None}


def scenario_push_fault(rank, world, args):
    """Rank 1 fails in the middle of its stream: every rank raises, the version is aborted; a retry commits."""
    model = shard_model(load(args["checkpoint"]), "shard0", world)
    tr = weightsync.Trainer(args["daemon"], model=args["model"], rank=rank, world_size=world)
    if rank == 1:
        real = fail_nth_export(tr, 3)
    try:
        tr.push(model, version=1)
        first = None
    except weightsync.WeightSyncError as e:
        first = str(e)
    if rank == 1:
        tr._export = real
    retry = tr.push(model, version=2)
    return {"error": first, "retry": retry.stats["state"]}


def scenario_push_trained(rank, world, args):
    """FSDP2 with bf16 mixed precision after training steps that leave modules unsharded (a no_grad
    forward; reshard_after_forward=False; an explicit unshard()): push sends the stepped masters.
    Rank 0 saves the full fp32 masters to args["out"]/<variant>.safetensors."""
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
    for job in args["jobs"]:
        variant = job["variant"]
        torch.manual_seed(1)
        model = load(job["checkpoint"]).train()
        mesh = init_device_mesh("cpu", (world,))
        kw = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                              reduce_dtype=torch.float32)}
        if variant == "no_reshard":
            kw["reshard_after_forward"] = False
        for layer in model.model.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        names = {id(p): n for n, p in model.named_parameters()}
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        ids = torch.randint(0, model.config.vocab_size, (2, 8))
        model(ids, labels=ids).loss.backward()
        with torch.no_grad():
            model(ids)
        if variant == "unshard":
            for m in model.modules():
                if isinstance(m, FSDPModule):
                    m.unshard()
        opt.step()
        master = {names[id(p)]: p.full_tensor().contiguous() for p in opt.param_groups[0]["params"]}
        with weightsync.Trainer(args["daemon"], model=job["model"], rank=rank, world_size=world) as tr:
            res = tr.push(model, version=1)
        if rank == 0:
            save_file(master, os.path.join(args["out"], f"{variant}.safetensors"))
        # the push resharded every module: the model trains on
        model(ids, labels=ids).loss.backward()
        opt.step()
        assert res.stats["state"] == "committed", res.stats
    return {}


def scenario_push_fsdp1(rank, world, args):
    """FSDP1 (use_orig_params): the pieces push reads are views of the flat parameters' local shards, except
    single rows split between ranks (assembled); then a push."""
    model = shard_model(load(args["checkpoint"]), "fsdp1", world)
    shards = [getattr(m._handle.flat_param, "_local_shard", m._handle.flat_param) for m in model.modules()
              if getattr(m, "_handle", None) is not None]
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in shards]
    views, assembled, other = 0, 0, []
    for name, v in P.collect(model)[0]:
        p = P.piece_of(name, v)
        if not p.held or name.endswith("inv_freq"):
            continue
        lo = p.local.data_ptr()
        hi = lo + p.local.numel() * p.local.element_size()
        if any(a <= lo and hi <= b for a, b in spans):
            views += p.local.numel()
        elif p.dim == 0 and p.length == 1 and p.local.dim() >= 2:
            assembled += p.local.numel()
        else:
            other.append(name)
    with weightsync.Trainer(args["daemon"], model=args["model"], rank=rank, world_size=world) as tr:
        res = tr.push(model, version=1)
    return {"views": views, "assembled": assembled, "other": other, "state": res.stats["state"],
            "flat": sum(t.numel() for t in shards)}


class _RecordingStub:
    """The daemon stub, recording what each BeginSync sent and got."""

    def __init__(self, stub):
        self._stub, self.begins = stub, []

    def BeginSync(self, req, **kw):
        resp = self._stub.BeginSync(req, **kw)
        self.begins.append({"tensors": len(req.tensors), "reuse": req.reuse_manifest,
                            "fingerprint": req.manifest_fingerprint, "manifest_reused": resp.manifest_reused,
                            "plan_reused": resp.plan_reused})
        return resp

    def __getattr__(self, name):
        return getattr(self._stub, name)


def scenario_push_changes(rank, world, args):
    """A module of DTensor parameters (Shard(0) over the ranks) pushed after each change the trainer's caches
    must notice: an in-place step (reused), a parameter replaced, one resharded (Shard(1)), one cast to bf16,
    rank 1's and then rank 0's Trainer made anew. Rank 0 saves each version's full tensors to
    args["out"]/v<version>.safetensors."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import distribute_tensor
    model = load(args["checkpoint"])
    mesh = init_device_mesh("cpu", (world,))
    with torch.no_grad():
        for _, mod in list(model.named_modules()):
            for n, p in list(mod.named_parameters(recurse=False)):
                setattr(mod, n, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))

    def module(name):
        return model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]

    def replace(name, fn):
        mod, attr = module(name)
        setattr(mod, attr, torch.nn.Parameter(fn(getattr(mod, attr).detach())))

    def make_trainer():
        tr = weightsync.Trainer(args["daemon"], model=args["model"], rank=rank, world_size=world)
        tr.daemon.stub = _RecordingStub(tr.daemon.stub)
        return tr

    steps = {
        1: lambda: None,
        2: lambda: [p.to_local().add_(0.5) for p in model.parameters()],
        3: lambda: replace("model.layers.0.mlp.up_proj.weight", lambda d: d * 3 + 1),
        4: lambda: replace("model.layers.1.self_attn.o_proj.weight",
                           lambda d: distribute_tensor(d.full_tensor() - 1, mesh, [Shard(1)])),
        5: lambda: replace("model.norm.weight", lambda d: d.to(torch.bfloat16)),
        6: lambda: [p.to_local().mul_(-1) for p in model.parameters()],
        7: lambda: None,   # rank 1's trainer made anew
        8: lambda: None,   # rank 0's trainer made anew
    }
    trainers = [make_trainer()]
    out = []
    for v, step in steps.items():
        with torch.no_grad():
            step()
        if (v == 7 and rank == 1) or (v == 8 and rank == 0):
            trainers.append(make_trainer())
        tr = trainers[-1]
        res = tr.push(model, version=v)
        full = {n: p.full_tensor().contiguous() for n, p in model.named_parameters()}
        if rank == 0:
            save_file(full, os.path.join(args["out"], f"v{v}.safetensors"))
        out.append({"version": v, "state": res.stats["state"], "reused": [r.reused for r in res.ranks],
                    "begin": tr.daemon.stub.begins[-1] if rank == 0 else None,
                    "messages": res.ranks[rank].messages, "bytes": res.ranks[rank].bytes})
    for tr in trainers:
        tr.close()
    return out


def scenario_push_nodes(rank, world, args):
    """Trainer ranks on several nodes, each pushing to its own node's daemon (args["daemons"][rank], with the
    token file). First, when args["wrong"] ({rank: address}) is given, a push with those ranks pointed at those
    daemons, which must fail on every rank; then versions 1 and 2 (every parameter + args["delta"]) with one
    Trainer. Rank 0 saves each version's full tensors with the checkpoint's config.json as a checkpoint in
    args["out"]/v<version>."""
    import shutil
    from safetensors.torch import save_file
    model = shard_model(load(args["checkpoint"]), "shard0", world)
    kw = dict(model=args["model"], rank=rank, world_size=world, token_file=args["token_file"])
    out = {"wrong": None, "pushes": []}
    if args.get("wrong"):
        with weightsync.Trainer(args["wrong"].get(str(rank), args["daemons"][rank]), **kw) as tr:
            try:
                tr.push(model, version=1)
                out["wrong"] = "pushed"
            except weightsync.WeightSyncError as e:
                out["wrong"] = f"WeightSyncError: {e}"
    with weightsync.Trainer(args["daemons"][rank], **kw) as tr:
        for version in (1, 2):
            if version == 2:
                with torch.no_grad():
                    for _, p in model.named_parameters():
                        p.to_local().add_(args["delta"])
            res = tr.push(model, version=version)
            full = {n: p.full_tensor().contiguous() for n, p in model.named_parameters()}
            if rank == 0:
                d = os.path.join(args["out"], f"v{version}")
                os.makedirs(d, exist_ok=True)
                shutil.copy(os.path.join(args["checkpoint"], "config.json"), d)
                save_file(full, os.path.join(d, "model.safetensors"))
            out["pushes"].append({"state": res.stats["state"], "engines": res.engines,
                                  "bytes_written": res.stats["bytes_written"],
                                  "ranks": [vars(s) for s in res.ranks]})
    return out


def scenario_walk_changes(rank, world, args):
    """Every change to FSDP2 (DTensor) parameters and the module tree that the trainer's kept walk must notice,
    without a daemon: after each, Trainer._prepare gives a new walk (re-derived, so the stream plan is made
    again) whose pieces and entries equal a new Trainer's, and the next _prepare keeps it; after an in-place
    step (and when nothing changed) the same walk."""
    import copy
    import models
    from torch.distributed.tensor import Replicate, distribute_tensor
    model = shard_model(models.make_model("llama"), "shard0", world)
    mesh = model.model.norm.weight.device_mesh

    def trainer():
        return weightsync.Trainer("unix:/nonexistent", model="walk", rank=rank, world_size=world)

    def param(name):
        return model.get_parameter(name)

    def replace(name, fn):
        mod, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        setattr(mod, attr, torch.nn.Parameter(fn(getattr(mod, attr).detach())))

    def swap_placement(name):  # the same parameter object, replicated (torch.utils.swap_tensors)
        p = param(name)
        torch.utils.swap_tensors(p, torch.nn.Parameter(distribute_tensor(p.full_tensor().detach(), mesh,
                                                                         [Replicate()])))

    def spec_in_place(name):  # the same spec object, its placements set (and the local tensor to match)
        p = param(name)
        full = p.full_tensor().detach()
        p._spec.placements = (Replicate(),)
        p._local_tensor = full

    def move_storage(name):  # the same local tensor object, another storage
        t = param(name)._local_tensor
        t.set_(t.clone())

    def rename(module, old, new):  # straight in the dict: no module hook sees it
        ps = model.get_submodule(module)._parameters
        ps[new] = ps.pop(old)

    steps = [
        ("nothing", False, lambda: None),
        ("step in place", False, lambda: [p.to_local().add_(0.5) for p in model.parameters()]),
        ("re-created", True, lambda: replace("model.layers.0.mlp.up_proj.weight",
                                             lambda d: distribute_tensor(d.full_tensor() + 1, mesh, [Shard(0)]))),
        ("resized", True, lambda: replace("model.norm.weight",
                                          lambda d: distribute_tensor(torch.cat([d.full_tensor()] * 2), mesh,
                                                                      [Shard(0)]))),
        ("re-dtyped", True, lambda: model.model.layers[1].input_layernorm.to(torch.bfloat16)),
        ("placement swapped", True, lambda: swap_placement("model.layers.1.mlp.down_proj.weight")),
        ("spec replaced", True, lambda: setattr(param("model.layers.0.mlp.gate_proj.weight"), "_spec",
                                                copy.copy(param("model.layers.0.mlp.gate_proj.weight")._spec))),
        ("placement in place", True, lambda: spec_in_place("model.layers.0.mlp.gate_proj.weight")),
        ("storage moved", True, lambda: move_storage("model.layers.1.self_attn.q_proj.weight")),
        ("module added", True, lambda: model.model.layers[0].add_module("extra", torch.nn.Linear(4, 4))),
        ("module removed", True, lambda: delattr(model.model.layers[0], "extra")),
        ("parameter renamed", True, lambda: rename("model.layers.1.post_attention_layernorm", "weight", "scale")),
        ("step in place", False, lambda: [p.to_local().mul_(-1) for p in model.parameters()]),
    ]
    tr = trainer()
    prev = tr._prepare(model, None)
    out = []
    for what, changed, step in steps:
        with torch.no_grad():
            step()
        prep = tr._prepare(model, None)
        out.append({"what": what, "changed": changed, "new": prep is not prev,
                    "kept": tr._prepare(model, None) is prep,
                    "as_new_trainer": walk_facts(prep) == walk_facts(trainer()._prepare(model, None))})
        prev = prep
    return out


SCENARIOS = {"walk_changes": scenario_walk_changes, "push_nodes": scenario_push_nodes, "push_changes": scenario_push_changes, "push_trained": scenario_push_trained, "push_fsdp1": scenario_push_fsdp1, "boxes": scenario_boxes, "push": scenario_push, "push_error": scenario_push_error,
             "push_fault": scenario_push_fault}


def main():
    scenario, rank, world, port, outdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    args = json.loads(sys.argv[6])
    os.environ.update(MASTER_ADDR=os.environ.get("WS_DIST_MASTER_ADDR", "127.0.0.1"), MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        result = SCENARIOS[scenario](rank, world, args)
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        # Leave gloo together: a rank tearing its group down while a peer is
        # still using it can abort in gloo's threads ("terminate called ...").
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
