"""A real vLLM (CPU) engine for tests/vllm: python engine_run.py ARGS_JSON OUT_JSON.

ARGS: model_dir, tp, prompts; optional weightsync: {daemon, model, pushes: [{checkpoint, version,
kill_at?}], trainer_world}. Generates greedily (tokens + logprobs) before and after each push;
a push is run by `trainer_world` FSDP2 trainer processes (push.py).
"""
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def generate(llm, prompts):
    from vllm import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, detokenize=False, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    res = []
    for o in outs:
        c = o.outputs[0]
        res.append({"tokens": list(c.token_ids),
                    "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]})
    return res


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_trainers(ws, push):
    world = ws.get("trainer_world", 2)
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "push.py"), str(r), str(world), port,
                               ws["daemon"], ws["model"], push["checkpoint"], str(push["version"]),
                               str(push.get("kill_at", 0) if r == world - 1 else 0)], env=env)
             for r in range(world)]
    deadline = time.time() + 300
    codes = []
    for p in procs:
        try:
            p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    if push.get("kill_at"):  # the surviving ranks may wait on the dead one: end them too
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p in procs:
        codes.append(p.wait())
    return codes


def main():
    args = json.loads(sys.argv[1])
    from vllm import LLM
    kw = {}
    ws = args.get("weightsync")
    if ws:
        kw["worker_extension_cls"] = "weightsync.vllm.WorkerExtension"
    llm = LLM(model=args["model_dir"], skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16",
              max_model_len=256, max_num_seqs=4, kv_cache_memory_bytes=64 << 20,
              tensor_parallel_size=args.get("tp", 1), seed=0, **kw)
    out = {"before": generate(llm, args["prompts"]), "after": []}
    if ws:
        import weightsync.vllm as wsv
        wsv.start(llm, ws["daemon"], ws["model"], **ws.get("start", {}))
        out["status"] = llm.collective_rpc("weightsync_status")
        for push in ws["pushes"]:
            codes = run_trainers(ws, push)
            step = {"codes": codes}
            if push.get("kill_at"):
                time.sleep(1.0)  # let the daemon see the dead rank and abort the version
            else:
                wsv.after_update(llm, push["version"], timeout=120)
            step["gen"] = generate(llm, args["prompts"])
            step["status"] = llm.collective_rpc("weightsync_status")
            out["after"].append(step)
        llm.collective_rpc("weightsync_stop")
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)
    os._exit(0)  # vLLM's background threads can hold a clean exit


if __name__ == "__main__":
    main()
