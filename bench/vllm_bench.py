"""Weight sync into a real vLLM (CPU build), three ways side by side in one run.

  .venv-vllm/bin/python bench/vllm_bench.py [--build build] [--hidden 1024 --layers 8 --vocab 32000]
                                           [--trainers 4] [--tp 2] [--out bench-vllm.json]

(a) what RL frameworks do today: FSDP2 full_tensor() of every parameter on every rank, rank 0 hands
    the full checkpoint to vLLM's own loader (reload_weights: load_weights + post-load, from a
    safetensors file in /dev/shm);
(b) weightsync in place (staging "never"): every rank's shards copied straight into the engines'
    live parameters, behind the pause barrier;
(c) weightsync staged (staging "always"): copied into staging buffers while the engine generates,
    applied (copy + vLLM's post-load step) at commit.
(b) and (c) go through the `weightsync` weight-transfer backend (send_weights on every trainer rank).

Each method gets a fresh engine (vllm.LLM, TP ranks as processes) and fresh FSDP2 trainer ranks
(gloo, CPU); one warm-up push of B, then the measured push of A. Reported: sync seconds (rank 0,
send_weights or gather + save + reload), seconds generation is blocked (the workers are inside
update_weights, or inside reload_weights), and peak RSS during the measured push (VmHWM reset
before it) of the trainer ranks and of the engine (engine-core process and each TP worker).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "tests" / "vllm"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests" / "python"))


def make_checkpoint(path, seed, hidden, layers, vocab):
    import torch
    import transformers
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                                   num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                                   vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(1.0 if "norm" in n else 0.0, 0.02 if p.ndim > 1 else 0.1)
    model.to(torch.bfloat16).save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=str(REPO / "build"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--trainers", type=int, default=4)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--methods", default="full_tensor,in_place,staged")
    ap.add_argument("--out", default="bench-vllm.json")
    args = ap.parse_args()
    os.environ.setdefault("WS_BUILD_DIR", args.build)
    import test_real_vllm as t  # the tests' engine environment (plugin entry point, PYTHONPATH)
    from ws_helpers import DaemonProcess

    tmp = tempfile.mkdtemp(prefix="ws-vllm-bench-")
    t0 = time.time()
    a, n = make_checkpoint(os.path.join(tmp, "A"), 1, args.hidden, args.layers, args.vocab)
    b, _ = make_checkpoint(os.path.join(tmp, "B"), 2, args.hidden, args.layers, args.vocab)
    print(f"checkpoints: {n / 1e6:.0f} M params, {2 * n / 1e6:.0f} MB bf16 ({time.time() - t0:.0f} s)", flush=True)
    results = {"params": n, "bytes_bf16": 2 * n, "trainers": args.trainers, "tp": args.tp,
               "cpus": os.cpu_count(), "load_before": os.getloadavg(), "machine": platform.platform(), "runs": {}}
    for method in args.methods.split(","):
        d = tempfile.mkdtemp(prefix=method + "-", dir=tmp)
        daemon = DaemonProcess(d)
        ws = {"daemon": daemon.address, "model": "bench-" + method, "trainer_world": args.trainers,
              "rounds": [{"pushes": [{"checkpoint": b}, {"checkpoint": a, "measure": True}]}]}
        if method == "full_tensor":
            ws.update(mode="full_tensor", no_backend=True)
        else:
            ws["worker_init"] = {"staging": "never" if method == "in_place" else "always"}
        t1 = time.time()
        try:
            run = t.run_engine({"model_dir": a, "tp": args.tp, "prompts": t.PROMPTS, "weightsync": ws}, d,
                               "engine", timeout=3600)
        finally:
            daemon.stop()
        rnd = run["rounds"][0]
        assert rnd["codes"] == [0] * args.trainers, rnd["codes"]
        res = rnd["trainer"][0]
        res["restored_A"] = rnd["after"][-1]["checksums"] == run["start"]["checksums"] if rnd["after"] else None
        res["wall_seconds"] = time.time() - t1
        results["runs"][method] = res
        print(method, json.dumps(res), flush=True)
    results["load_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=1))
    mb = 1 << 20
    print("\n| method | sync s | generation blocked s | trainer peak RSS per rank (MiB) | engine peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for method, r in results["runs"].items():
        eng = r["engine_peak"]
        print(f"| {method} | {r['sync_seconds']:.2f} | {r['blocked_seconds']:.2f} | "
              f"{max(r['trainer_peak_bytes']) / mb:.0f} | core {eng['engine'] / mb:.0f}, workers "
              f"{', '.join(f'{w / mb:.0f}' for w in eng['workers'])} |")


if __name__ == "__main__":
    main()
