#!/usr/bin/env python3
"""Checks a mock-engine dump against the independent reference, bit for bit.

    check_dump.py --checkpoint DIR --dump OUT/v1 --tp T [--replicas R] [--dtype bf16]

Prints one line per engine rank and exits non-zero on the first mismatch.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import st_io  # noqa: E402
import vllm_ref  # noqa: E402


def bits(a):
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--dump", required=True)
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--dtype", default="bf16")
    a = ap.parse_args()
    for r in range(a.tp):
        want = vllm_ref.expected_rank_tensors(a.checkpoint, a.tp, r, dtype=a.dtype)
        for i in range(a.replicas):
            path = Path(a.dump) / f"replica{i}-rank{r}.safetensors"
            got = {k: np.array(v) for k, v in st_io.load(path).items()}
            if set(got) != set(want):
                sys.exit(f"{path}: parameters differ: missing {sorted(set(want) - set(got))[:5]}, "
                         f"unexpected {sorted(set(got) - set(want))[:5]}")
            for name, w in want.items():
                g = got[name]
                if g.shape != w.shape or not np.array_equal(bits(g), bits(w)):
                    sys.exit(f"{path}: {name} differs from the reference (shape {g.shape} vs {w.shape})")
            n = sum(v.nbytes for v in got.values())
            print(f"replica {i} rank {r}: {len(got)} params, {n} bytes, identical to the reference")


if __name__ == "__main__":
    main()
