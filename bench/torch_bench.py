"""Torch-side benchmark: weightsync vs the full_tensor() path it replaces, measured in one run.

    python bench/torch_bench.py [--ranks 4] [--tp 2] [--layers 10] [--repeats 3] [--json out.json]

Sets up, on this machine (CPU only):
  * weightsyncd ($WS_BUILD_DIR/weightsyncd, default build/weightsyncd);
  * one engine process holding `--tp` vLLM TP ranks of a Llama model in bf16,
    in vLLM's layout (qkv_proj, gate_up_proj, padded vocab), registered with
    the daemon as weightsync.Engine ranks;
  * `--ranks` trainer ranks (torch.distributed.run, gloo) with the model under
    FSDP2 fully_shard, fp32 (>= 1 GB of parameters by default).
Then alternates, `--repeats` times each:
  * weightsync: Trainer.push(model) on every rank (bf16 on the wire); the
    daemon writes straight into the engine buffers;
  * baseline (what verl did): every rank calls full_tensor() on each
    parameter; rank 0 hands the full tensor to the engine (one shared-memory
    buffer, as vLLM receives it in-process), whose loader slices each TP
    rank's part into its parameters (vLLM's weight_loader rules).
Reports wall time (barrier to barrier, slowest rank) and the peak RSS growth of
every trainer rank and of the engine process during each method, and checks
that both methods leave bit-identical engine buffers.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from multiprocessing.connection import Client, Listener
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "client" / "python"))

MODEL = "bench-llama"


def llama_config(layers: int):
    import transformers
    return transformers.LlamaConfig(
        vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=layers,
        num_attention_heads=12, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"])


class RssPeak:
    """Samples this process's RSS every few ms between start() and stop(); stop() returns the peak growth."""

    def __init__(self, period: float = 0.002):
        self.period, self._page = period, os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def start(self) -> None:
        self.base = self.peak = self.rss()
        self._stop.clear()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())
        return self.peak - self.base


# ---- vLLM's per-rank Llama layout (what its weight_loader does), used by the engine ----

class LlamaLayout:
    def __init__(self, cfg, T: int):
        self.cfg, self.T = cfg, T
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.hd, self.nh, self.nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.nh_l = self.nh // T
        self.nkv_l, self.rep = (1, T // self.nkv) if T >= self.nkv else (self.nkv // T, 1)
        self.V = cfg.vocab_size
        self.per = -(-self.V // 64) * 64 // T
        self.params = {"model.embed_tokens.weight": (self.per, H), "lm_head.weight": (self.per, H),
                       "model.norm.weight": (H,)}
        for L in range(cfg.num_hidden_layers):
            p = f"model.layers.{L}"
            self.params.update({
                f"{p}.self_attn.qkv_proj.weight": ((self.nh_l + 2 * self.nkv_l) * self.hd, H),
                f"{p}.self_attn.o_proj.weight": (H, self.nh_l * self.hd),
                f"{p}.mlp.gate_up_proj.weight": (2 * I // T, H),
                f"{p}.mlp.down_proj.weight": (H, I // T),
                f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,)})

    def load(self, params: dict, r: int, name: str, w) -> None:
        """Copies rank r's part of the full HF tensor `w` into its parameter (casting), like vLLM's loaders."""
        T, hd, I = self.T, self.hd, self.cfg.intermediate_size
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            dst = params[name]
            s, e = min(r * self.per, self.V), min((r + 1) * self.per, self.V)
            dst[:e - s].copy_(w[s:e])
            dst[e - s:].zero_()
            return
        prefix, _, leaf = name.rpartition(".")
        mod = prefix.rsplit(".", 1)[-1]
        base = prefix.rsplit(".", 1)[0]
        if mod in ("q_proj", "k_proj", "v_proj"):
            dst = params[f"{base}.qkv_proj.weight"]
            q_rows, kv_rows = self.nh_l * hd, self.nkv_l * hd
            g = r // self.rep
            if mod == "q_proj":
                dst[:q_rows].copy_(w[r * q_rows:(r + 1) * q_rows])
            else:
                off = q_rows + (0 if mod == "k_proj" else kv_rows)
                dst[off:off + kv_rows].copy_(w[g * kv_rows:(g + 1) * kv_rows])
        elif mod in ("gate_proj", "up_proj"):
            dst = params[f"{base}.gate_up_proj.weight"]
            n = I // T
            off = 0 if mod == "gate_proj" else n
            dst[off:off + n].copy_(w[r * n:(r + 1) * n])
        elif mod in ("o_proj", "down_proj"):
            dst = params[name]
            n = dst.shape[1]
            dst.copy_(w[:, r * n:(r + 1) * n])
        else:
            params[name].copy_(w)


# ---- engine process ----

def engine_main(args) -> None:
    import torch
    import weightsync
    cfg = llama_config(args.layers)
    layout = LlamaLayout(cfg, args.tp)
    engines = []
    for r in range(args.tp):
        eng = weightsync.Engine(args.daemon, MODEL, cfg, tp_rank=r, tp_size=args.tp, dtype=torch.bfloat16,
                                segment_bytes=1 << 30)
        for name, shape in layout.params.items():
            eng.empty(name, shape)
        eng.start()
        engines.append(eng)
    stage = weightsync.ShmSegment(max(4 * cfg.vocab_size * cfg.hidden_size, 1 << 20), prefix="ws-bench-full")
    stage.buf.zero_()  # touched up front: RSS growth below is what the loads add
    rss = RssPeak()
    listener = Listener(args.engine_socket, family="AF_UNIX")
    Path(args.engine_socket + ".ready").write_text(stage.path)
    conn = listener.accept()
    while True:
        cmd, *rest = conn.recv()
        if cmd == "quit":
            conn.send(None)
            break
        if cmd == "fill":  # poison every buffer so the next method must rewrite all of it
            for e in engines:
                for t in e.tensors.values():
                    t.view(torch.uint8).fill_(0xFF)
            conn.send(None)
        elif cmd == "start":
            rss.start()
            conn.send(None)
        elif cmd == "stop":
            conn.send(rss.stop())
        elif cmd == "load":  # baseline: the full tensor is in `stage`; every TP rank takes its part
            name, shape = rest
            n = 1
            for s in shape:
                n *= s
            full = stage.view(0, 4 * n, torch.float32, tuple(shape))
            for r, e in enumerate(engines):
                layout.load(e.tensors, r, name, full)
            conn.send(None)
        elif cmd == "wait":
            for e in engines:
                e.wait_for_version(rest[0], timeout=600)
            conn.send(None)
        elif cmd == "checksum":
            conn.send([[zlib.crc32(t.view(torch.uint8).numpy().data) for t in e.tensors.values()] for e in engines])
    for e in engines:
        e.close()
    stage.close()


# ---- trainer ranks ----

def trainer_main(args) -> None:
    import torch
    import torch.distributed as dist
    import transformers
    from torch.distributed.fsdp import fully_shard

    import weightsync
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    cfg = llama_config(args.layers)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(1234 + rank)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.to_local().normal_(0, 0.02, generator=gen)
    params = dict(model.named_parameters())
    n_bytes = sum(p.numel() * 4 for p in params.values())

    conn = None
    if rank == 0:
        ready = Path(args.engine_socket + ".ready")
        while not ready.exists():
            time.sleep(0.1)
        stage_path = ready.read_text()
        stage = torch.from_file(stage_path, shared=True, size=os.path.getsize(stage_path), dtype=torch.uint8)
        stage.zero_()
        conn = Client(args.engine_socket, family="AF_UNIX")

    def engine(*msg):
        if conn is None:
            return None
        conn.send(msg)
        return conn.recv()

    trainer = weightsync.Trainer(args.daemon, MODEL, max_inflight_bytes=args.inflight_mib << 20)
    rss = RssPeak()
    runs = []
    version = 0
    with torch.no_grad():
        for rep in range(args.repeats):
            for method in ("weightsync", "baseline"):
                engine("fill")
                dist.barrier()
                engine("start")
                rss.start()
                t0 = time.perf_counter()
                if method == "weightsync":
                    version += 1
                    res = trainer.push(model, version=version)
                    extra = {"daemon_seconds": res.stats["seconds"], "daemon_gbps": res.stats["gbps"],
                             "staged_bytes": res.ranks[rank].staged_bytes}
                else:
                    handoff = 0.0
                    for name, p in params.items():
                        full = p.full_tensor()  # all-gather on every rank
                        if rank == 0:
                            h0 = time.perf_counter()
                            stage[:full.numel() * 4].view(torch.float32).copy_(full.view(-1))
                            handoff += time.perf_counter() - h0
                            engine("load", name, tuple(full.shape))
                        del full
                    extra = {"handoff_copy_seconds": handoff}
                dist.barrier()
                seconds = time.perf_counter() - t0
                trainer_rss = rss.stop()
                engine_rss = engine("stop")
                crc = engine("checksum")
                rows = [None] * world
                dist.all_gather_object(rows, {"seconds": seconds, "rss": trainer_rss, **extra})
                if rank == 0:
                    runs.append({"method": method, "repeat": rep, "seconds": max(r["seconds"] for r in rows),
                                 "trainer_rss_peak": [r["rss"] for r in rows], "engine_rss_peak": engine_rss,
                                 "checksum": crc, **{k: v for k, v in rows[0].items() if k not in ("seconds", "rss")}})
    trainer.close()
    if rank == 0:
        engine("quit")
        report(args, runs, n_bytes, world)
    dist.destroy_process_group()


def report(args, runs, n_bytes, world) -> None:
    by = {m: [r for r in runs if r["method"] == m] for m in ("weightsync", "baseline")}
    same = all(r["checksum"] == runs[0]["checksum"] for r in runs)
    summary = {"model_bytes_fp32": n_bytes, "trainer_ranks": world, "engine_tp": args.tp, "layers": args.layers,
               "engine_buffers_identical": same, "runs": runs}
    print(f"\nmodel: Llama, {n_bytes / 1e9:.2f} GB fp32 parameters, FSDP2 over {world} CPU ranks (gloo); "
          f"engine: vLLM layout, TP={args.tp}, bf16\n")
    print(f"{'method':<11} {'seconds (median)':>17} {'trainer peak RSS growth, max rank':>34} "
          f"{'engine peak RSS growth':>23}")
    for m, rs in by.items():
        sec = statistics.median(r["seconds"] for r in rs)
        tr = max(max(r["trainer_rss_peak"]) for r in rs)
        en = max(r["engine_rss_peak"] for r in rs)
        summary[m] = {"seconds_median": sec, "seconds_all": [r["seconds"] for r in rs],
                      "trainer_rss_peak_max": tr, "engine_rss_peak_max": en}
        print(f"{m:<11} {sec:>17.3f} {tr / 2**20:>30.0f} MiB {en / 2**20:>19.0f} MiB")
    handoff = statistics.median(r["handoff_copy_seconds"] for r in by["baseline"])
    print(f"\nbaseline includes {handoff:.3f} s (median) of copying full tensors into the engine's shared buffer "
          "(colocated vLLM would read them in-process)")
    print(f"engine buffers identical after both methods: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if not same:
        sys.exit("the two methods left different engine bytes")


# ---- orchestration ----

def run_main(args) -> None:
    build = Path(os.environ.get("WS_BUILD_DIR", REPO / "build"))
    binary = build / "weightsyncd"
    if not binary.exists():
        sys.exit(f"{binary} not found: build the daemon or set WS_BUILD_DIR")
    tmp = tempfile.mkdtemp(prefix="ws-bench-")
    sock = os.path.join(tmp, "ws.sock")
    daemon = subprocess.Popen([str(binary), "--listen", f"unix:{sock}", "--layouts-dir",
                               str(REPO / "config" / "layouts"), "--log-level", "warn"])
    procs = [daemon]
    try:
        while not os.path.exists(sock):
            if daemon.poll() is not None:
                sys.exit("weightsyncd exited")
            time.sleep(0.1)
        common = ["--daemon", f"unix:{sock}", "--engine-socket", os.path.join(tmp, "engine.sock"),
                  "--layers", str(args.layers), "--tp", str(args.tp), "--repeats", str(args.repeats),
                  "--inflight-mib", str(args.inflight_mib)] + (["--json", args.json] if args.json else [])
        eng = subprocess.Popen([sys.executable, __file__, "engine"] + common)
        procs.append(eng)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        peak_anon = [0]
        done = threading.Event()

        def sample():  # the daemon's private memory (its mappings of shared buffers are not allocations)
            while not done.is_set():
                try:
                    with open(f"/proc/{daemon.pid}/status") as f:
                        for line in f:
                            if line.startswith("RssAnon"):
                                peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
                except OSError:
                    return
                time.sleep(0.005)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = subprocess.call([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}",
                              f"--master-port={port}", __file__, "trainer"] + common,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        eng.wait(timeout=120)
        done.set()
        sampler.join()
        print(f"daemon peak private memory (RssAnon, whole run): {peak_anon[0] / 2**20:.0f} MiB")
        sys.exit(rc or eng.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", nargs="?", default="run", choices=["run", "engine", "trainer"])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--layers", type=int, default=10, help="10 layers = 1.4 GB of fp32 parameters")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--inflight-mib", type=int, default=64, help="weightsync max_inflight_bytes per rank")
    ap.add_argument("--json")
    ap.add_argument("--daemon")
    ap.add_argument("--engine-socket")
    args = ap.parse_args()
    {"run": run_main, "engine": engine_main, "trainer": trainer_main}[args.role](args)


if __name__ == "__main__":
    main()
