#!/usr/bin/env python3
"""End-to-end GPU runs of the real daemon and weightsyncctl: trainer ranks
(`push --device cuda:N`, one process per rank) and engine ranks
(`mock-engine --device cuda:M`, one process per rank) hold their bytes in
cudaMalloc'ed memory that the daemon opens through CUDA IPC handles.

  gpu_e2e.py arch  --build DIR --out DIR [--gpus N]
      every architecture of config/layouts (small example configs), trainer
      W=3 on cuda:0 -> engine TP=2 on cuda:0, and engine on cuda:1 when there
      are two or more GPUs; plus host<->device and dtype/shard-dim variants.
      Every engine dump is compared bit for bit with the independent numpy
      reference (tests/reference/check_dump.py).
  gpu_e2e.py bench --build DIR --out DIR [--layers L] [--repeat N]
      Llama-8B-shaped fp32 checkpoint, W=4 trainer processes -> bf16 engine
      TP=2, colocated on cuda:0; steady-state sync time (median of syncs
      2..N) against a device-to-device cudaMemcpy floor of the same source
      bytes measured in the same run.

Prints a markdown table; exits non-zero on any failure. Logs go under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = REPO / "config" / "layouts"
CHECK_DUMP = REPO / "tests" / "reference" / "check_dump.py"


def log(msg: str) -> None:
    print(msg, flush=True)


def find_binary(build: Path, name: str) -> Path:
    for cand in (build / name, build / "bench" / name, build / "tests" / name):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    sys.exit(f"{name} not found under {build}: build it first")


def env() -> dict:
    e = dict(os.environ)
    e["WEIGHTSYNC_LAYOUTS_DIR"] = str(LAYOUTS)
    e.pop("WEIGHTSYNC_DAEMON", None)
    e.pop("WEIGHTSYNC_PUSH_PROCESSES", None)
    return e


def run(argv, log_path: Path, timeout: float) -> tuple[int, str]:
    """Runs argv (own process group, killed whole on timeout); output to log_path."""
    argv = [str(a) for a in argv]
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(argv) + "\n")
        f.flush()
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env())
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            killpg(p)
            p.wait()
            f.write(f"\n[timed out after {timeout}s]\n")
            rc = 124
    return rc, log_path.read_text(errors="replace")


def killpg(p: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def tail(text: str, n: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


class Daemon:
    def __init__(self, build: Path, out: Path):
        self.sock = Path(f"/tmp/ws-gpu-{os.getpid()}.sock")  # short: sun_path limit
        self.addr = f"unix:{self.sock}"
        self.ctl = find_binary(build, "weightsyncctl")
        self.log_path = out / "weightsyncd.log"
        self.sock.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(find_binary(build, "weightsyncd")), "--listen", self.addr,
                                      "--layouts-dir", str(LAYOUTS)],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"weightsyncd exited with {self.proc.returncode}:\n{tail(self.log_path.read_text())}")
            cp = subprocess.run([str(self.ctl), "--daemon", self.addr, "health", "--timeout", "2"],
                                capture_output=True, text=True, env=env())
            if cp.returncode == 0 and cp.stdout.strip() == "SERVING":
                return
            time.sleep(0.1)
        self.stop()
        sys.exit(f"weightsyncd not SERVING after 60 s:\n{tail(self.log_path.read_text())}")

    def ctl_argv(self, *args) -> list:
        return [self.ctl, "--daemon", self.addr, *args]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                killpg(self.proc)
                self.proc.wait()
        self._log.close()
        self.sock.unlink(missing_ok=True)
        return self.proc.returncode


class Engine:
    """mock-engine in the background."""

    def __init__(self, d: Daemon, out: Path, model: str, ckpt: Path, tp: int, device: str, dtype: str,
                 syncs: int, no_dump: bool = False):
        self.tp, self.dump, self.log_path = tp, out / "dump", out / "engine.log"
        argv = d.ctl_argv("mock-engine", "--model", model, "--checkpoint", ckpt, "--tp", tp, "--replicas", 1,
                          "--dtype", dtype, "--dump", self.dump, "--syncs", syncs, "--device", device,
                          *(["--no-dump"] if no_dump else []))
        self._log = open(self.log_path, "w")
        self._log.write("$ " + " ".join(map(str, argv)) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen([str(a) for a in argv], stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env())

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_registered(self, timeout: float) -> str | None:
        """None once every rank registered, else what went wrong."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.output().count(" registered (") >= self.tp:
                return None
            if self.proc.poll() is not None:
                return f"mock-engine exited with {self.proc.returncode} before registering"
            time.sleep(0.05)
        return f"mock-engine ranks not registered after {timeout}s"

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            return 124

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        killpg(self.proc)
        self.proc.wait()
        self._log.close()


def gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([x for x in visible.split(",") if x.strip()])
    try:
        cp = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in cp.stdout.splitlines() if line.startswith("GPU "))


def gen_checkpoint(ctl: Path, arch: str, out: Path, log_path: Path, *flags) -> tuple[bool, str]:
    if (out / "config.json").exists() and (out / ".complete").exists():
        return True, ""
    shutil.rmtree(out, ignore_errors=True)
    rc, text = run([ctl, "gen-checkpoint", "--arch", arch, "--out", out, "--seed", 11, *flags], log_path, 3600)
    if rc == 0:
        (out / ".complete").write_text(" ".join(map(str, flags)) + "\n")
    return rc == 0, text


# --------------------------------------------------------------------------- arch

def architectures() -> list[str]:
    archs = []
    for f in sorted(LAYOUTS.glob("*.json")):
        archs += json.loads(f.read_text()).get("architectures", [])
    return archs


def pick_tp(ckpt: Path, want: int) -> int:
    sys.path.insert(0, str(REPO / "tests" / "reference"))
    import vllm_ref  # noqa: E402
    ok = [t for t in vllm_ref.allowed_tp_sizes(ckpt) if t <= want]
    return max(ok) if ok else 1


def sync_once(d: Daemon, out: Path, model: str, ckpt: Path, tp: int, trainer: str, engine: str,
              dtype: str = "bf16", world: int = 3, push_flags=()) -> tuple[bool, str]:
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "dump", ignore_errors=True)
    eng = Engine(d, out, model, ckpt, tp, engine, dtype, syncs=1)
    try:
        err = eng.wait_registered(180)
        if err:
            return False, err + "\n" + tail(eng.output())
        rc, text = run(d.ctl_argv("push", "--checkpoint", ckpt, "--model", model, "--world-size", world,
                                  "--version", 1, "--device", trainer, *push_flags), out / "push.log", 600)
        if rc != 0:
            return False, f"push exited {rc}:\n{tail(text)}\nengine:\n{tail(eng.output())}"
        rc = eng.wait(120)
        if rc != 0:
            return False, f"mock-engine exited {rc}:\n{tail(eng.output())}"
    finally:
        eng.stop()
    rc, text = run([sys.executable, CHECK_DUMP, "--checkpoint", ckpt, "--dump", out / "dump" / "v1", "--tp", tp,
                    "--replicas", 1, "--dtype", dtype], out / "check.log", 600)
    return rc == 0, tail(text, 4)


def cmd_arch(a) -> int:
    build, out = Path(a.build), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = a.gpus if a.gpus is not None else gpu_count()
    if gpus < 1:
        log("no CUDA device (nvidia-smi -L lists none): nothing to run")
        return 3
    d = Daemon(build, out)
    ctl = d.ctl
    # (label, trainer device, engine device)
    placements = [("cuda:0 -> cuda:0", "cuda:0", "cuda:0")]
    if gpus >= 2:
        placements.append(("cuda:0 -> cuda:1", "cuda:0", "cuda:1"))
    # (architecture, gen-checkpoint flags, engine dtype, push flags, placements, note)
    cases = [(arch, (), "bf16", (), placements, "") for arch in architectures()]
    medium = ("--hidden-size", 1024, "--intermediate-size", 2816, "--layers", 2, "--vocab-size", 32000,
              "--heads", 16, "--kv-heads", 8)
    cases += [
        ("LlamaForCausalLM", (), "bf16", ("--shard-dim", 1), placements, "dim-1 shards"),
        ("LlamaForCausalLM", (), "fp16", (), placements[:1], ""),
        ("LlamaForCausalLM", medium, "fp32", (), placements, "medium (copy engines)"),
        ("LlamaForCausalLM", medium, "bf16", (), placements, "medium"),
        ("LlamaForCausalLM", (), "bf16", (), [("host -> cuda:0", "host", "cuda:0"),
                                             ("cuda:0 -> host", "cuda:0", "host")], "pinned host side"),
    ]
    rows, failures = [], 0
    for i, (arch, gen_flags, dtype, push_flags, places, note) in enumerate(cases):
        ckpt = out / "ckpt" / (arch + ("-medium" if gen_flags else ""))
        ok, text = gen_checkpoint(ctl, arch, ckpt, out / f"gen-{ckpt.name}.log", *gen_flags)
        if not ok:
            if "no layout rules for architecture" in text:
                rows.append((arch, note, "-", "-", "skipped: no layout rules", ""))
                continue
            failures += 1
            rows.append((arch, note, "-", "-", "FAILED: gen-checkpoint", ""))
            log(f"gen-checkpoint {arch} failed:\n{tail(text)}")
            continue
        tp = pick_tp(ckpt, 2)
        for label, trainer, engine in places:
            case_dir = out / "runs" / f"{i:02d}-{arch}-{trainer}-{engine}".replace(":", "")
            t0 = time.monotonic()
            ok, detail = sync_once(d, case_dir, f"m{i}-{trainer}-{engine}".replace(":", ""), ckpt, tp, trainer, engine,
                                   dtype=dtype, push_flags=push_flags)
            secs = time.monotonic() - t0
            rows.append((arch, (note + "; " if note else "") + f"engine {dtype}", tp, label,
                         "pass" if ok else "FAILED", f"{secs:.1f}"))
            if not ok:
                failures += 1
                log(f"FAILED {arch} ({note or 'default'}) {label}: logs in {case_dir}\n{detail}")
            else:
                log(f"pass   {arch} ({note or 'default'}) {label}, TP={tp}: {detail.splitlines()[-1] if detail else ''}")
            if not d.alive():
                log("weightsyncd died; log:\n" + tail(d.log_path.read_text(errors="replace"), 40))
                return 1
    rc = d.stop()
    if rc != 0:
        failures += 1
        log(f"weightsyncd exited {rc} on SIGTERM (log: {d.log_path})")
    table = ["| architecture | variant | TP | trainer -> engine | result | seconds |", "|---|---|---|---|---|---|"]
    table += [f"| {' | '.join(map(str, r))} |" for r in rows]
    (out / "arch.md").write_text("\n".join(table) + "\n")
    log("\n" + "\n".join(table))
    log(f"\n{sum(r[4] == 'pass' for r in rows)} passed, {failures} failed (logs under {out})")
    return 1 if failures else 0


# --------------------------------------------------------------------------- bench

LLAMA_8B = dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256)


def fp32_bytes(layers: int) -> int:
    h, i, v, kv = LLAMA_8B["hidden"], LLAMA_8B["intermediate"], LLAMA_8B["vocab"], LLAMA_8B["kv_heads"]
    hd = h // LLAMA_8B["heads"]
    per_layer = h * h * 2 + 2 * (kv * hd) * h + 3 * h * i + 2 * h
    return 4 * (layers * per_layer + 2 * v * h + h)


def free_gpu_bytes(device: int) -> int | None:
    visible = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    try:
        cp = subprocess.run(["nvidia-smi", "-i", visible[device] if device < len(visible) else str(device),
                             "--query-gpu=memory.free",
                             "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
        return int(cp.stdout.strip().splitlines()[0]) << 20
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def cmd_bench(a) -> int:
    build, out = Path(a.build), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ctl, floor_bin = find_binary(build, "weightsyncctl"), find_binary(build, "gpu_floor")
    if gpu_count() < 1:
        log("no CUDA device (nvidia-smi -L lists none): nothing to run")
        return 3

    # Layers: 32 unless the disk (checkpoint) or the GPU (fp32 trainer + bf16
    # engine + the floor's two buffers are not resident together) is too small.
    layers, notes = a.layers or LLAMA_8B["layers"], []
    ckpt = out / "ckpt-llama8b"
    have = fp32_bytes(layers) if (ckpt / ".complete").exists() else 0
    disk = shutil.disk_usage(out).free + have
    gpu = free_gpu_bytes(0)
    while layers > 1 and (fp32_bytes(layers) + (8 << 30) > disk or
                          (gpu is not None and fp32_bytes(layers) * 1.5 + (6 << 30) > gpu)):
        layers -= 1
    if layers != (a.layers or LLAMA_8B["layers"]):
        notes.append(f"{layers} layers instead of {a.layers or LLAMA_8B['layers']}: free disk "
                     f"{disk / 1e9:.1f} GB, free GPU memory {gpu / 1e9 if gpu else float('nan'):.1f} GB")
    if (ckpt / ".complete").exists() and (ckpt / ".complete").read_text().split()[:2] != ["--layers", str(layers)]:
        shutil.rmtree(ckpt)
    m = LLAMA_8B
    t0 = time.monotonic()
    ok, text = gen_checkpoint(ctl, "LlamaForCausalLM", ckpt, out / "gen.log", "--layers", layers,
                              "--hidden-size", m["hidden"], "--heads", m["heads"], "--kv-heads", m["kv_heads"],
                              "--intermediate-size", m["intermediate"], "--vocab-size", m["vocab"], "--tie", 0)
    if not ok:
        log("gen-checkpoint failed:\n" + tail(text))
        return 1
    log(f"checkpoint: {ckpt} ({fp32_bytes(layers) / 1e9:.2f} GB fp32, {time.monotonic() - t0:.0f} s)")

    d = Daemon(build, out)
    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    eng = Engine(d, run_dir, "llama8b", ckpt, 2, "cuda:0", "bf16", syncs=a.repeat, no_dump=True)
    try:
        err = eng.wait_registered(600)
        if err:
            log(err + "\n" + tail(eng.output()))
            return 1
        rc, text = run(d.ctl_argv("push", "--checkpoint", ckpt, "--model", "llama8b", "--world-size", 4,
                                  "--version", 1, "--repeat", a.repeat, "--json", "--device", "cuda:0"),
                       run_dir / "push.log", 3600)
        if rc != 0:
            log(f"push exited {rc}:\n{tail(text)}\nengine:\n{tail(eng.output())}")
            return 1
        rc = eng.wait(300)
        if rc != 0:
            log(f"mock-engine exited {rc}:\n{tail(eng.output())}")
            return 1
    finally:
        eng.stop()
        d.stop()  # releases the daemon's IPC mappings before the floor runs
    syncs = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    if len(syncs) != a.repeat or any(s["state"] != "committed" for s in syncs):
        log(f"expected {a.repeat} committed syncs in {run_dir / 'push.log'}")
        return 1
    src_bytes = syncs[0]["bytes_read"]
    rc, ftext = run([floor_bin, "--bytes", src_bytes, "--device", 0, "--repeats", 5], run_dir / "floor.log", 600)
    floor = next((json.loads(x) for x in ftext.splitlines() if x.startswith("{")), None)
    if rc != 0 or floor is None or "seconds" not in floor:
        log(f"gpu_floor failed ({rc}):\n{tail(ftext)}")
        return 1

    steady = syncs[1:] or syncs
    secs = statistics.median(s["client_seconds"] for s in steady)
    dsecs = statistics.median(s["daemon_seconds"] for s in steady)
    ratio = floor["seconds"] / secs
    table = [
        "| GPU sync benchmark | |",
        "|---|---|",
        f"| device | {floor.get('device_name', '?')} (cuda:0; trainer, engine and floor colocated) |",
        f"| model | Llama-8B shape: {layers} layers, hidden {m['hidden']}, heads {m['heads']}/{m['kv_heads']}, "
        f"intermediate {m['intermediate']}, vocab {m['vocab']} |",
        f"| trainer | fp32, W=4 processes, FSDP dim-0 shards, {src_bytes / 1e9:.2f} GB source bytes |",
        f"| engine | bf16, TP=2 processes, {syncs[0]['bytes_written'] / 1e9:.2f} GB written per sync |",
        f"| syncs (trainer-side seconds; the first maps the IPC handles) | "
        + ", ".join(f"{s['client_seconds']:.4f}" for s in syncs) + " |",
        f"| steady-state sync (median of syncs 2..{len(syncs)}) | {secs:.4f} s "
        f"(daemon begin->commit {dsecs:.4f} s) |",
        f"| effective bandwidth (source bytes / sync time) | {src_bytes / secs / 1e9:.1f} GB/s |",
        f"| device-to-device cudaMemcpy floor, same bytes | {floor['seconds']:.4f} s ({floor['gbps']:.1f} GB/s"
        + (f", in {floor['chunk_bytes'] / 1e9:.1f} GB chunks" if floor["chunk_bytes"] < floor["bytes"] else "")
        + ") |",
        f"| ratio floor / sync (target >= 0.8 on an H100) | {ratio:.2f} |",
    ]
    table += [f"| note | {n} |" for n in notes]
    (out / "bench.md").write_text("\n".join(table) + "\n")
    (out / "bench.json").write_text(json.dumps({"layers": layers, "syncs": syncs, "floor": floor,
                                                "steady_seconds": secs, "ratio": ratio, "notes": notes},
                                               indent=1) + "\n")
    log("\n" + "\n".join(table))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pa = sub.add_parser("arch")
    pa.add_argument("--gpus", type=int, help="GPUs to use (default: as many as nvidia-smi lists, at most 2 used)")
    pb = sub.add_parser("bench")
    pb.add_argument("--layers", type=int, help="decoder layers (default 32, fewer if disk/GPU memory is short)")
    pb.add_argument("--repeat", type=int, default=5, help="syncs (the first is not steady state)")
    for p in (pa, pb):
        p.add_argument("--build", required=True, help="build directory with weightsyncd, weightsyncctl, gpu_floor")
        p.add_argument("--out", required=True, help="directory for checkpoints, dumps and logs")
    a = ap.parse_args()
    return cmd_arch(a) if a.cmd == "arch" else cmd_bench(a)


if __name__ == "__main__":
    sys.exit(main())
