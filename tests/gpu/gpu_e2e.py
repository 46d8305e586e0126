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
  gpu_e2e.py torch --build DIR --out DIR [--device cuda:0|cpu]
      the Python trainer: a Llama-shaped torch module sharded with FSDP2 over
      W=2 gloo ranks pushes two versions into a bf16 engine (TP=2); with
      cuda:0 once with its shards as CUDA tensors (CUDA IPC, in place) and
      once CPU-offloaded to pinned host memory (CPUOffloadPolicy), engine on
      cuda:0; with cpu (runs without a GPU) host shards into a host engine.
      Checked bit for bit against the numpy reference.
  gpu_e2e.py bench --build DIR --out DIR [--layers L] [--repeat N]
      Llama-8B-shaped fp32 FSDP2 shards built on the meta device and filled
      on cuda:0 by W=4 trainer processes (no checkpoint on disk), pushed N
      times into a bf16 engine TP=2 on cuda:0; steady-state sync time (median
      of syncs 2..N) against a device-to-device copy floor of the same bytes,
      timed with CUDA events in the same run.

Prints a markdown table; exits non-zero on any failure. Logs go under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = REPO / "config" / "layouts"
CHECK_DUMP = REPO / "tests" / "reference" / "check_dump.py"
WORKER = Path(__file__).resolve().parent / "torch_worker.py"


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


def write_table(path: Path, header: str, rows: list) -> None:
    """A markdown table (header, separator, one line per row) into `path` and the log."""
    table = [header, "|" + "---|" * (header.count(" | ") + 1)]
    table += [f"| {' | '.join(map(str, r))} |" for r in rows]
    path.write_text("\n".join(table) + "\n")
    log("\n" + "\n".join(table))


def tail(text: str, n: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def start_daemon(argv: list, log_path: Path, environ: dict):
    """weightsyncd with `argv`, its output appended to log_path, in its own
    process group. Returns (process, open log file)."""
    log_file = open(log_path, "ab")
    proc = subprocess.Popen([str(a) for a in argv], stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True, env=environ)
    return proc, log_file


def stop_daemon(proc: subprocess.Popen, log_file, sock: Path) -> int:
    """SIGTERM, then SIGKILL to the group after 30 s; closes the log and removes the socket."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            killpg(proc)
            proc.wait()
    log_file.close()
    sock.unlink(missing_ok=True)
    return proc.returncode


class Daemon:
    def __init__(self, build: Path, out: Path):
        self.sock = Path(f"/tmp/ws-gpu-{os.getpid()}.sock")  # short: sun_path limit
        self.addr = f"unix:{self.sock}"
        self.ctl = find_binary(build, "weightsyncctl")
        self.log_path = out / "weightsyncd.log"
        self.sock.unlink(missing_ok=True)
        self.proc, self._log = start_daemon([find_binary(build, "weightsyncd"), "--listen", self.addr,
                                             "--layouts-dir", LAYOUTS], self.log_path, env())
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
        return stop_daemon(self.proc, self._log, self.sock)


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
    write_table(out / "arch.md", "| architecture | variant | TP | trainer -> engine | result | seconds |", rows)
    log(f"\n{sum(r[4] == 'pass' for r in rows)} passed, {failures} failed (logs under {out})")
    return 1 if failures else 0


# --------------------------------------------------------------------------- torch trainer

def example_config(arch: str) -> dict:
    for f in sorted(LAYOUTS.glob("*.json")):
        rules = json.loads(f.read_text())
        if arch in rules.get("architectures", []):
            return dict(rules["example_config"])
    sys.exit(f"no layout rules for {arch} in {LAYOUTS}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_trainers(world: int, args: dict, out: Path, timeout: float) -> tuple[dict | None, str]:
    """Runs torch_worker.py as `world` processes; (rank 0's result, None) or (None, what went wrong)."""
    out.mkdir(parents=True, exist_ok=True)
    port, result = free_port(), out / "trainer.json"
    result.unlink(missing_ok=True)
    procs, logs = [], []
    e = env()
    e["PYTHONPATH"] = str(REPO / "client" / "python")
    for r in range(world):
        logs.append(open(out / f"trainer{r}.log", "w"))
        procs.append(subprocess.Popen([sys.executable, WORKER, str(r), str(world), str(port), str(result),
                                       json.dumps(args)], stdout=logs[-1], stderr=subprocess.STDOUT,
                                      start_new_session=True, env=e))
    deadline, err = time.monotonic() + timeout, None
    for r, p in enumerate(procs):
        try:
            rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rc = 124
        if rc != 0 and err is None:
            err = f"trainer rank {r} exited {rc}"
    for p in procs:
        killpg(p)
        p.wait()
    for f in logs:
        f.close()
    if err:
        return None, err + ":\n" + "\n".join(f"-- rank {r}:\n" + tail((out / f"trainer{r}.log").read_text(errors="replace"))
                                         for r in range(world))
    return json.loads(result.read_text()), ""


def cmd_torch(a) -> int:
    build, out = Path(a.build), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = a.device.startswith("cuda")
    if on_gpu and gpu_count() < 1:
        log("no CUDA device (nvidia-smi -L lists none): nothing to run")
        return 3
    d = Daemon(build, out)
    cfg = example_config("LlamaForCausalLM")
    cfg.update(hidden_size=256, intermediate_size=704, num_attention_heads=8, num_key_value_heads=4,
               num_hidden_layers=3, vocab_size=1000, tie_word_embeddings=False)
    ckpt = out / "ckpt"
    ok, text = gen_checkpoint(d.ctl, "LlamaForCausalLM", ckpt, out / "gen.log", "--hidden-size", 256,
                              "--intermediate-size", 704, "--heads", 8, "--kv-heads", 4, "--layers", 3,
                              "--vocab-size", 1000, "--tie", 0)
    if not ok:
        d.stop()
        log("gen-checkpoint failed:\n" + tail(text))
        return 1
    cfg = json.loads((ckpt / "config.json").read_text())
    # (label, trainer placement, engine device)
    cases = [("FSDP2 shards on cuda:0 (CUDA IPC)", "cuda", a.device), ("FSDP2 CPU offload, pinned host", "offload", a.device)] \
        if on_gpu else [("FSDP2 shards in host memory", "cpu", "host")]
    rows, failures = [], 0
    for i, (label, place, engine) in enumerate(cases):
        case = out / f"{i}-{place}"
        case.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(case / "dump", ignore_errors=True)
        model = f"torch-{place}"
        t0 = time.monotonic()
        eng = Engine(d, case, model, ckpt, 2, engine, "bf16", syncs=2)
        res, err = None, eng.wait_registered(180)
        try:
            if not err:
                res, err = run_trainers(2, {"daemon": d.addr, "model": model, "config": cfg, "place": place,
                                            "init": "checkpoint", "checkpoint": str(ckpt), "versions": 2,
                                            "engine_dtype": None}, case, 300)
            if not err:
                rc = eng.wait(120)
                if rc != 0:
                    err = f"mock-engine exited {rc}:\n{tail(eng.output())}"
        finally:
            eng.stop()
        detail = ""
        if not err:
            ranks = res["ranks"]
            want_dev = "cuda" if place == "cuda" else "cpu"
            if not all(all(dv.startswith(want_dev) for dv in r["devices"]) for r in ranks):
                err = f"trainer shards are on {[r['devices'] for r in ranks]}, expected {want_dev}"
            elif place == "offload" and not all(r["pinned"] for r in ranks):
                err = "CPU-offloaded shards are not pinned"
            elif any(p["stats"]["state"] != "committed" for p in res["pushes"]):
                err = f"not committed: {[p['stats'] for p in res['pushes']]}"
        if not err:
            rc, text = run([sys.executable, CHECK_DUMP, "--checkpoint", ckpt, "--dump", case / "dump" / "v2",
                            "--tp", 2, "--replicas", 1, "--dtype", "bf16"], case / "check.log", 600)
            if rc != 0:
                err = "engine bytes differ from the reference:\n" + tail(text)
            else:
                last = res["pushes"][-1]["ranks"]
                detail = (f"zero-copy {sum(r['zero_copy_bytes'] for r in last)} B, "
                          f"staged {sum(r['staged_bytes'] for r in last)} B")
        secs = time.monotonic() - t0
        rows.append((label, f"engine {engine} bf16 TP=2", "pass" if not err else "FAILED", detail, f"{secs:.1f}"))
        if err:
            failures += 1
            log(f"FAILED {label}: logs in {case}\n{err}")
        else:
            log(f"pass   {label}: {detail}")
    if d.stop() != 0:
        failures += 1
        log(f"weightsyncd exited non-zero on SIGTERM (log: {d.log_path})")
    write_table(out / "torch.md", "| Python trainer (W=2, 2 versions) | engine | result | bytes | seconds |", rows)
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
    if gpu_count() < 1:
        log("no CUDA device (nvidia-smi -L lists none): nothing to run")
        return 3
    # 32 layers unless the GPU cannot hold the fp32 trainer shards, the bf16
    # engine (half of that), the floor's two 4 GiB buffers and the contexts.
    want = a.layers or LLAMA_8B["layers"]
    layers, notes, gpu = want, [], free_gpu_bytes(0)
    while layers > 1 and gpu is not None and fp32_bytes(layers) * 1.5 + (14 << 30) > gpu:
        layers -= 1
    if layers != want:
        notes.append(f"{layers} layers instead of {want}: free GPU memory {gpu / 1e9:.1f} GB")
    m = LLAMA_8B
    cfg = example_config("LlamaForCausalLM")
    cfg.update(hidden_size=m["hidden"], num_hidden_layers=layers, num_attention_heads=m["heads"],
               num_key_value_heads=m["kv_heads"], intermediate_size=m["intermediate"], vocab_size=m["vocab"],
               tie_word_embeddings=False)
    ckpt = out / "config-llama8b"  # config.json only: the engine derives its params from it
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")

    d = Daemon(build, out)
    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    eng = Engine(d, run_dir, "llama8b", ckpt, 2, "cuda:0", "bf16", syncs=a.repeat, no_dump=True)
    try:
        err = eng.wait_registered(300)
        if err:
            log(err + "\n" + tail(eng.output()))
            return 1
        res, err = run_trainers(4, {"daemon": d.addr, "model": "llama8b", "config": cfg, "place": "cuda",
                                    "init": "random", "versions": a.repeat, "engine_dtype": None,
                                    "max_inflight_bytes": 64 << 30, "floor": True, "floor_repeats": 5},
                                run_dir, 1800)
        if err:
            log(f"trainers failed: {err}\nengine:\n{tail(eng.output())}")
            return 1
        rc = eng.wait(120)
        if rc != 0:
            log(f"mock-engine exited {rc}:\n{tail(eng.output())}")
            return 1
    finally:
        eng.stop()
        d.stop()
    pushes, floor = res["pushes"], res["floor"]
    if len(pushes) != a.repeat or any(p["stats"]["state"] != "committed" for p in pushes):
        log(f"expected {a.repeat} committed syncs: {[p['stats'] for p in pushes]}")
        return 1
    src_bytes = pushes[0]["stats"]["bytes_read"]
    steady = pushes[1:] or pushes
    secs = statistics.median(p["seconds"] for p in steady)
    dsecs = statistics.median(p["stats"]["seconds"] for p in steady)
    ratio = floor["seconds"] / secs
    zc = sum(r["zero_copy_bytes"] for r in pushes[-1]["ranks"])
    table = [
        "| GPU sync benchmark | |",
        "|---|---|",
        f"| device | {floor.get('device_name', '?')} (cuda:0; trainer, engine and floor colocated) |",
        f"| model | Llama-8B shape: {layers} layers, hidden {m['hidden']}, heads {m['heads']}/{m['kv_heads']}, "
        f"intermediate {m['intermediate']}, vocab {m['vocab']} |",
        f"| trainer | fp32 FSDP2 (fully_shard), W=4 processes, {src_bytes / 1e9:.2f} GB source bytes, "
        f"{zc / 1e9:.2f} GB of them read in place (CUDA IPC) |",
        f"| engine | bf16, TP=2 processes, {pushes[0]['stats']['bytes_written'] / 1e9:.2f} GB written per sync |",
        "| syncs (Trainer.push seconds, rank 0; the first opens the IPC handles) | "
        + ", ".join(f"{p['seconds']:.4f}" for p in pushes) + " |",
        f"| steady-state sync (median of syncs 2..{len(pushes)}) | {secs:.4f} s "
        f"(daemon begin->commit {dsecs:.4f} s) |",
        f"| effective bandwidth (source bytes / sync time) | {src_bytes / secs / 1e9:.1f} GB/s |",
        f"| device-to-device copy floor, same bytes (CUDA events) | {floor['seconds']:.4f} s "
        f"({floor['gbps']:.1f} GB/s" + (f", in {floor['chunk_bytes'] / 1e9:.1f} GB chunks"
                                       if floor["chunk_bytes"] < floor["bytes"] else "") + ") |",
        f"| ratio floor / sync (target >= 0.8 on an H100) | {ratio:.2f} |",
    ]
    table += [f"| note | {n} |" for n in notes]
    (out / "bench.md").write_text("\n".join(table) + "\n")
    (out / "bench.json").write_text(json.dumps({"layers": layers, "pushes": pushes, "floor": floor,
                                                "steady_seconds": secs, "ratio": ratio, "notes": notes},
                                               indent=1) + "\n")
    log("\n" + "\n".join(table))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pa = sub.add_parser("arch")
    pa.add_argument("--gpus", type=int, help="GPUs to use (default: as many as nvidia-smi lists, at most 2 used)")
    pt = sub.add_parser("torch")
    pt.add_argument("--device", default="cuda:0", help="cuda:N (CUDA IPC and pinned host) or cpu (no GPU)")
    pb = sub.add_parser("bench")
    pb.add_argument("--layers", type=int, help="decoder layers (default 32, fewer if GPU memory is short)")
    pb.add_argument("--repeat", type=int, default=5, help="syncs (the first is not steady state)")
    for p in (pa, pt, pb):
        p.add_argument("--build", required=True, help="folder with weightsyncd and weightsyncctl (a build or bundle bin/)")
        p.add_argument("--out", required=True, help="directory for checkpoints, dumps and logs")
    a = ap.parse_args()
    return {"arch": cmd_arch, "torch": cmd_torch, "bench": cmd_bench}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
