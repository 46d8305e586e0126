"""One trainer rank for gpu_e2e.py's `torch` and `bench` runs:
python torch_worker.py RANK WORLD PORT OUT_JSON ARGS_JSON

A Llama-shaped torch module (Hugging Face parameter names, plain torch: no
transformers), sharded with FSDP2 (fully_shard per decoder layer and at the
root) over a gloo group, pushed with weightsync.Trainer:
  place "cuda":    shards on cuda:0, sent in place through CUDA IPC;
  place "offload": FSDP2 CPUOffloadPolicy(pin_memory=True), shards in pinned
                   host memory;
  place "cpu":     shards in ordinary host memory (runs without a GPU).
init "checkpoint": every rank loads ARGS.checkpoint (safetensors) and shards
it; init "random": built on the meta device, each rank fills only its own
shards on the device (the benchmark: no full model anywhere, nothing on disk).
Rank 0 writes OUT_JSON; with ARGS.floor it also times a device-to-device copy
of the bytes a push read, with CUDA events, after the pushes.
"""
from __future__ import annotations

import glob
import json
import os
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "client", "python"))
import weightsync  # noqa: E402


class Norm(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))


class Attention(nn.Module):
    def __init__(self, h, heads, kv, hd):
        super().__init__()
        self.q_proj = nn.Linear(h, heads * hd, bias=False)
        self.k_proj = nn.Linear(h, kv * hd, bias=False)
        self.v_proj = nn.Linear(h, kv * hd, bias=False)
        self.o_proj = nn.Linear(heads * hd, h, bias=False)


class Mlp(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        h = c["hidden_size"]
        hd = c.get("head_dim") or h // c["num_attention_heads"]
        self.self_attn = Attention(h, c["num_attention_heads"], c["num_key_value_heads"], hd)
        self.mlp = Mlp(h, c["intermediate_size"])
        self.input_layernorm = Norm(h)
        self.post_attention_layernorm = Norm(h)


class Inner(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = Norm(c["hidden_size"])


class LlamaLike(nn.Module):
    def __init__(self, c):
        super().__init__()
        if c.get("tie_word_embeddings"):
            raise ValueError("LlamaLike: tied embeddings are not modelled")
        self.model = Inner(c)
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)


def load_safetensors(path: str) -> dict:
    from safetensors.torch import load_file
    sd = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        sd.update(load_file(f))
    if not sd:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    return sd


def build(args, rank, world):
    cfg, place = args["config"], args["place"]
    mesh = init_device_mesh("cuda" if place == "cuda" else "cpu", (world,))
    kw = {"mesh": mesh}
    if place == "offload":
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    if args["init"] == "checkpoint":
        model = LlamaLike(cfg)
        model.load_state_dict(load_safetensors(args["checkpoint"]), strict=True)
    else:
        with torch.device("meta"):
            model = LlamaLike(cfg)
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    if args["init"] == "random":
        device = torch.device("cuda", torch.cuda.current_device()) if place == "cuda" else torch.device("cpu")
        model.to_empty(device=device)
        g = torch.Generator(device=device)
        with torch.no_grad():
            for i, (_, p) in enumerate(sorted(model.named_parameters())):
                g.manual_seed(args.get("seed", 7) * 1_000_003 + rank * 10_007 + i)
                p.to_local().normal_(generator=g)
    return model


def floor_seconds(nbytes: int, repeats: int) -> dict:
    """Device-to-device copy of nbytes on cuda:0, in chunks of at most 4 GiB, timed with CUDA events."""
    chunk = min(nbytes, 4 << 30)
    src = torch.empty(chunk, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    src.random_(0, 255)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        left = nbytes
        while left > 0:
            n = min(left, chunk)
            dst[:n].copy_(src[:n])
            left -= n
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    secs = statistics.median(times[1:])
    return {"bytes": nbytes, "chunk_bytes": chunk, "seconds": secs, "gbps": nbytes / secs / 1e9,
            "all_seconds": times[1:], "device_name": torch.cuda.get_device_name(0)}


def main():
    rank, world, port, out_json = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    args = json.loads(sys.argv[5])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    if args["place"] == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    try:
        t0 = time.perf_counter()
        model = build(args, rank, world)
        locals_ = [p.to_local() for p in model.parameters()]
        facts = {"build_seconds": time.perf_counter() - t0,
                 "devices": sorted({str(t.device) for t in locals_}),
                 "pinned": all(t.is_pinned() for t in locals_) if args["place"] != "cuda" else None,
                 "local_bytes": sum(t.numel() * t.element_size() for t in locals_)}
        pushes = []
        with weightsync.Trainer(args["daemon"], model=args["model"], rank=rank, world_size=world,
                                engine_dtype=args.get("engine_dtype"),
                                max_inflight_bytes=args.get("max_inflight_bytes", 1 << 30)) as tr:
            for v in range(1, args["versions"] + 1):
                if args["place"] == "cuda":
                    torch.cuda.synchronize()
                r = tr.push(model, version=v)
                pushes.append({"seconds": r.seconds, "stats": r.stats, "ranks": [vars(s) for s in r.ranks]})
        facts_all = [None] * world
        dist.all_gather_object(facts_all, facts)
        floor = None
        if args.get("floor") and rank == 0:
            # the same bytes as a sync reads
            floor = floor_seconds(pushes[-1]["stats"]["bytes_read"], args.get("floor_repeats", 5))
        dist.barrier()  # the other ranks keep their memory until the floor is measured
        if rank == 0:
            with open(out_json, "w") as f:
                json.dump({"pushes": pushes, "ranks": facts_all, "floor": floor}, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
