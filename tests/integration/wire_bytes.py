"""What a node must receive from each other node in a sync across nodes, from the checkpoint and the
independent reference alone (no daemon code).

The checkpoint is rewritten with every element replaced by its own number (1, 2, ...; in fp32, so
in pieces of fewer than 2**24 numbers, the other tensors zero in each piece) and the reference
(tests/reference/vllm_ref.py) computes each engine rank's parameters from it in fp32: every engine element then names the checkpoint element it
holds, and padding (filled on the engine's node, never sent) is 0. A source element lives on the
trainer rank FSDP2 and `weightsyncctl push` give its dim-0 row (torch.chunk: ceil(rows / W) rows per
rank), so on that rank's node. A destination node needs each distinct element its engines read once
(two engine ranks reading a replicated norm get it once), in its engines' dtype; the elements whose
rank is on the node itself do not cross the network.

Only for architectures whose rules copy elements (slices, fusions, padding; no arithmetic on values):
`needed_from` fails when a reference value is not one of the numbers.
"""
from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))

import st_io  # noqa: E402
import vllm_ref  # noqa: E402

ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
EXACT = 1 << 24  # integers above it do not all have an fp32


class _Numbered:
    """ckpt's tensors (names sorted) numbered consecutively from 1. Saved as numbered checkpoints (each with
    ckpt's config.json) of fewer than 2**24 numbers each: checkpoint g holds the numbers of its tensors less
    base[g] and zeros in the others' places."""

    def __init__(self, ckpt: str):
        files = sorted(Path(ckpt).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors files in {ckpt}")
        shapes = {}
        for f in files:
            header, _ = st_io.read_header(f)
            shapes.update({n: tuple(v["shape"]) for n, v in header.items() if n != "__metadata__"})
        self.names = sorted(shapes)
        self.shapes = [shapes[n] for n in self.names]
        numel = np.array([int(np.prod(s, dtype=np.int64)) for s in self.shapes], dtype=np.int64)
        if numel.max(initial=0) >= EXACT:
            raise ValueError(f"{ckpt}: a tensor of {numel.max()} elements does not number exactly in fp32")
        self.start = np.concatenate([[1], 1 + np.cumsum(numel)[:-1]]).astype(np.int64)
        self.end = int(numel.sum()) + 1  # one past the last number
        self.rows = np.array([s[0] if s else 1 for s in self.shapes], dtype=np.int64)
        self.row_len = np.array([n // r if r else 1 for n, r in zip(numel, self.rows)], dtype=np.int64)
        groups, first = [], 0
        for i in range(len(self.names) + 1):
            if i == len(self.names) or self.start[i] + numel[i] - self.start[first] >= EXACT:
                groups.append((first, i))
                first = i
        self.root = Path(tempfile.mkdtemp(prefix="ws-numbered-"))
        atexit.register(shutil.rmtree, self.root, True)
        self.groups = []  # (directory, base)
        for g, (lo, hi) in enumerate(g for g in groups if g[0] < g[1]):
            d = self.root / f"g{g}"
            d.mkdir()
            shutil.copy(Path(ckpt) / "config.json", d / "config.json")
            base = int(self.start[lo]) - 1
            st_io.save(d / "model.safetensors", {
                n: (np.arange(s - base, s - base + k, dtype=np.float32) if lo <= i < hi else
                    np.zeros(k, dtype=np.float32)).reshape(shp)
                for i, (n, s, k, shp) in enumerate(zip(self.names, self.start, numel, self.shapes))})
            self.groups.append((d, base))

    def ranks(self, ids: np.ndarray, world: int) -> np.ndarray:
        """The trainer rank holding each numbered element (its tensor's dim-0 row, torch.chunk over world)."""
        t = np.searchsorted(self.start, ids, side="right") - 1
        row = (ids - self.start[t]) // self.row_len[t]
        chunk = -(-self.rows[t] // world)
        return row // chunk


@lru_cache(maxsize=16)
def _numbered(ckpt: str) -> _Numbered:
    return _Numbered(ckpt)


@lru_cache(maxsize=64)
def _engine_ids(ckpt: str, tp: int) -> np.ndarray:
    """The distinct checkpoint elements the TP-`tp` ranks of one replica hold (sorted numbers, padding left out)."""
    n = _numbered(ckpt)
    ids = []
    for d, base in n.groups:
        for r in range(tp):
            for name, a in vllm_ref.expected_rank_tensors(d, tp, r, dtype="fp32").items():
                v = a.reshape(-1)
                whole = v.astype(np.int64)
                if not (np.array_equal(whole, v) and whole.min(initial=0) >= 0 and whole.max(initial=0) < EXACT):
                    raise ValueError(f"{ckpt}: reference rank {r}/{tp} {name} holds values that are not checkpoint "
                                     "elements (its rules compute, not copy): per-node bytes cannot be derived so")
                ids.append(whole[whole > 0] + base)
    out = np.unique(np.concatenate(ids))
    assert out.size == 0 or out[-1] < n.end
    return out


def needed_from(ckpt, tp: int, rank_nodes: str | list, dest: str, dtype: str = "bf16") -> dict[str, int]:
    """{source node: bytes} that node `dest`, holding TP-`tp` replicas of ckpt's model in `dtype`, must receive
    from each other node when trainer rank r is on node rank_nodes[r] (one sync). Replicas on one node read
    the same elements, so their number does not change it."""
    n = _numbered(str(ckpt))
    ids = _engine_ids(str(ckpt), tp)
    nodes = np.array(list(rank_nodes))
    src = nodes[n.ranks(ids, len(rank_nodes))]
    return {s: int((src == s).sum()) * ITEMSIZE[dtype] for s in sorted(set(rank_nodes)) if s != dest}
