"""A real vLLM (CPU) engine with the `weightsync` weight-transfer backend: python backend_run.py ARGS_JSON OUT_JSON.

ARGS: model_dir, tp, prompts; optional weightsync: {daemon, model, worker_init, trainer_world,
rounds: [{pushes: [{checkpoint, version?}], kill_at?}]}. The engine is an offline vllm.LLM
started with weight_transfer_config={"backend": "weightsync"}; each round starts `trainer_world`
FSDP2 trainer ranks (backend_push.py) whose rank 0 drives the LLM's weight-transfer methods
through a small RPC proxy served here (init/start/update/finish, plus "snapshot": greedy
generation and vLLM's own weight checksums). Without weightsync: generates and checksums once.
"""
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Listener

HERE = os.path.dirname(os.path.abspath(__file__))
AUTHKEY = b"weightsync-tests"


def generate(llm, prompts):
    from vllm import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [{"tokens": list(o.outputs[0].token_ids),
             "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
            for o in outs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checksums(llm) -> dict:
    """vLLM's own per-tensor digests of the live model (what /weight_checker compares), all workers."""
    out = {}
    for d in llm.collective_rpc("compute_weight_checksums"):
        out.update(d)
    return out


def snapshot(llm, prompts) -> dict:
    return {"gen": generate(llm, prompts), "checksums": checksums(llm)}


def _reset_peak(_self=None) -> None:
    """Resets this process's peak RSS (VmHWM), so that the next reading is the peak from now on."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_bytes(_self=None) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reload(llm, path: str) -> float:
    """vLLM's own load path: every worker reloads the checkpoint at `path` (load_weights + post-load)."""
    t0 = time.perf_counter()
    llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
    return time.perf_counter() - t0


def serve_proxy(llm, prompts, listener, calls: "queue.Queue", snaps: list, stop: threading.Event):
    """Answers the trainer's rank 0: one request per connection, in order."""
    workers = lambda fn: llm.collective_rpc(fn)  # noqa: E731
    methods = {"reset_peak": lambda: (_reset_peak(), workers(_reset_peak)),
               "peak": lambda: {"engine": _peak_bytes(), "workers": workers(_peak_bytes)},
               "reload": lambda path: _reload(llm, path),
               "status": lambda: workers(lambda self: self.weight_transfer_engine.status()),"init_weight_transfer_engine": lambda info: llm.init_weight_transfer_engine({"init_info": info}),
               "start_weight_update": llm.start_weight_update,
               "update_weights": lambda info: llm.update_weights({"update_info": info}),
               "finish_weight_update": llm.finish_weight_update,
               "snapshot": lambda: snaps.append(snapshot(llm, prompts))}
    while not stop.is_set():
        try:
            conn = listener.accept()
        except OSError:
            return
        with conn:
            method, args, kwargs = conn.recv()
            calls.put(method)
            try:
                res = ("ok", methods[method](*args, **kwargs))
            except Exception as e:
                res = ("err", f"{type(e).__name__}: {e}")
            conn.send(res)


def run_round(ws, rnd, proxy_addr, tmp):
    world = ws.get("trainer_world", 2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    spec = json.dumps({"daemon": ws["daemon"], "model": ws["model"], "proxy": proxy_addr,
                       "worker_init": ws.get("worker_init", {}), "pushes": rnd["pushes"],
                       "init": rnd.get("init", False), "port": rnd["port"], "mode": ws.get("mode", "weightsync"),
                       "result": os.path.join(tmp, f"result-{rnd['port']}.json"), "layers": ws.get("layers")})
    procs = []
    for r in range(world):
        kill = rnd.get("kill_at", 0) if r == world - 1 else 0
        log = open(os.path.join(tmp, f"trainer-{rnd['port']}-{r}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "backend_push.py"), str(r), str(world),
                                       str(kill), spec], env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.time() + 300
    for p in procs:
        try:
            p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    if rnd.get("kill_at"):  # the surviving ranks may wait on the dead one
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.wait() for p in procs]


def main():
    args = json.loads(sys.argv[1])
    from vllm import LLM
    ws = args.get("weightsync")
    kw = {"weight_transfer_config": {"backend": "weightsync"}} if ws and not ws.get("no_backend") else {}
    llm = LLM(model=args["model_dir"], skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16",
              max_model_len=256, max_num_seqs=4, kv_cache_memory_bytes=64 << 20,
              tensor_parallel_size=args.get("tp", 1), seed=0, **kw)
    prompts = args["prompts"]
    out = {"start": snapshot(llm, prompts), "rounds": []}
    if ws:
        tmp = os.path.dirname(os.path.abspath(sys.argv[2]))
        proxy = os.path.join(tmp, "proxy.sock")
        listener = Listener(proxy, family="AF_UNIX", authkey=AUTHKEY)
        calls, snaps, stop = queue.Queue(), [], threading.Event()
        # The proxy runs on its own thread (the LLM's only user meanwhile); the main thread waits
        # for the trainers.
        t = threading.Thread(target=serve_proxy, args=(llm, prompts, listener, calls, snaps, stop), daemon=True)
        t.start()
        for i, rnd in enumerate(ws["rounds"]):
            rnd = dict(rnd, init=(i == 0), port=free_port())
            n = len(snaps)
            codes = run_round(ws, rnd, proxy, tmp)
            time.sleep(0.5)
            methods = []
            while not calls.empty():
                methods.append(calls.get())
            if rnd.get("kill_at"):
                time.sleep(1.0)  # the daemon sees the dead rank and aborts the version
                after = [snapshot(llm, prompts)]
            else:
                after = snaps[n:]
            res = os.path.join(tmp, f"result-{rnd['port']}.json")
            out["rounds"].append({"codes": codes, "calls": methods, "after": after,
                                  "trainer": json.load(open(res)) if os.path.exists(res) else None})
        stop.set()
        listener.close()
        if not ws.get("no_backend"):
            out["status"] = llm.collective_rpc(lambda self: self.weight_transfer_engine.status())
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)
    os._exit(0)  # vLLM's background threads can hold a clean exit


if __name__ == "__main__":
    main()
