"""X6: resume at 8 ranks a node x {10, 80} GB x {2, 64, 1024} nodes x {local NVMe, NFS, S3},
projected from per-byte costs measured here and stated hardware figures (make bench).

Measured in this process (one core): reading a checkpoint file from this machine's disk (cold: its
pages dropped first) and from the page cache, its checksum (xxh3), its decoding (safetensors into
tensors) and the copy into the model; and, from M3, the wire between two processes on loopback
(gloo, the stream's chunks). The hardware figures are assumptions, written in ``HARDWARE``: change
them for your cluster and run ``python tests/bench/projection.py`` again.

The model of one restart, every node resuming the same checkpoint of B bytes:

- today (before issue 23): every rank reads the whole checkpoint itself. From shared storage (NFS,
  S3) that is R reads a node; from a node's own NVMe the page cache serves all but the first.
  Every rank holds the whole file and its decoded copy: R x B of host memory at the peak.
- now: one rank a node (its leader) reads, checksumming while it reads. When its copy is on the
  node's own disk the node's other R-1 ranks read the same file at the same time (the page cache
  holds each page once: the disk is read once), every rank, the leader too, straight into the
  tensors that keep the bytes; from shared storage or the network the leader reads its copy into
  its own tensors (from a bucket through 5 ranged reads' buffers of 16 MiB), and the others get
  the bytes from it over the node's group, each chunk built from the leader's tensors, and decode
  as they land. gloo's broadcast is a binomial tree (gloo/broadcast.cc: whoever has a chunk sends
  it on, so the leader sends ceil(log2 R) copies, not R-1), cut into the stream's 16 MiB chunks.
  Host memory at the peak beyond the tensors the ranks keep: a few chunks per rank (the leader's
  read buffers and its send ring, 4 chunks each other rank), never a whole file.

Storage is shared by N nodes: a node reads at min(its own link, the aggregate / the nodes reading
at once). The local NVMe case assumes every node holds its own copy (replicas, the node-local
tier); K nodes that lost theirs receive it from one sender over the same kind of tree, so the
sender's link carries ceil(log2(K+1)) copies (``receive_table``; NCCL's broadcast, the GPU path,
is a pipelined ring: about one).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GB = 1e9
RANKS = 8
HARDWARE = {  # GB/s; assumptions, not measurements
    "nvme_node": 3.0,  # one NVMe drive per node
    "nfs_node": 1.25,  # a 10 GbE client
    "nfs_total": 20.0,  # the NFS server(s), all clients together
    "s3_node": 2.5,  # parallel ranged GETs, per node
    "s3_total": 1000.0,  # an object store's aggregate: rarely the limit
    "nic": 25.0,  # 200 Gb/s between nodes
}


def measure(mb: int = 256) -> dict[str, float]:
    """Per-byte costs on this machine, GB/s (one core)."""
    sys.path.insert(0, str(REPO))
    import numpy as np
    import safetensors.torch
    import torch
    import xxhash

    from train.ckpt.codec import deserialize

    torch.set_num_threads(1)
    tensors = {f"w{i}": torch.randn(mb * (1 << 20) // 4 // 16) for i in range(16)}
    data = safetensors.torch.save(tensors)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=REPO / "runs") as where:
        path = Path(where) / "model.safetensors"
        path.write_bytes(data)
        from ckpt_bench import drop_cache

        drop_cache([path])  # its pages out of the cache: a cold read
        for kind in ("read_cold", "read_warm"):
            buf = np.empty(len(data), dtype=np.uint8)
            t0 = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                f.readinto(memoryview(buf))
            out[kind] = len(data) / (time.perf_counter() - t0) / GB
    t0 = time.perf_counter()
    xxhash.xxh3_64_hexdigest(data)
    out["checksum"] = len(data) / (time.perf_counter() - t0) / GB
    t0 = time.perf_counter()
    decoded = deserialize("model.safetensors", data)
    out["decode"] = len(data) / (time.perf_counter() - t0) / GB
    targets = {k: torch.empty_like(v) for k, v in tensors.items()}
    t0 = time.perf_counter()
    for k, v in decoded.items():
        targets[k].copy_(v)
    out["copy"] = len(data) / (time.perf_counter() - t0) / GB
    return out


def _resume(b: float, n: int, storage: str, rates: dict[str, float], hw: dict[str, float], new: bool) -> dict:
    """Seconds, bytes pulled a node, host memory a node at the peak (bytes), for one restart."""
    cpu = b / (rates["decode"] * GB) + b / (rates["copy"] * GB)  # after the read, on each reader
    if storage == "nvme":
        link, pulled = hw["nvme_node"], b  # every node its own disk; the page cache shares it
    else:
        node, total = hw[f"{storage}_node"], hw[f"{storage}_total"]
        readers = n * (1 if new else RANKS)
        link = min(node, total * (1 if new else RANKS) / readers)  # this node's share
        pulled = b * (1 if new else RANKS)
    read = pulled / (link * GB)
    read = max(read, b / (rates["checksum"] * GB))  # the checksum runs beside the read
    if new and storage == "nvme":  # every rank reads the file at once, into place: the page cache serves it
        seconds = read
        memory = RANKS * 4 * (1 << 20)  # a buffer for the header each
    elif new:
        spread = _tree(RANKS - 1) * b / (rates["wire"] * GB)  # leader -> the node's other ranks, loopback
        seconds = read + cpu + spread
        memory = (5 + 4) * 16 * (1 << 20) + (RANKS - 1) * 4 * 16 * (1 << 20)  # chunks, whatever b
    else:
        seconds = read + cpu  # the ranks read at once: the link's share is in ``read``
        memory = RANKS * 2 * b  # each rank: the file and its decoded copy
    return {"seconds": seconds, "pulled": pulled, "memory": memory}


def _tree(receivers: int) -> int:
    """Copies the root of gloo's binomial-tree broadcast sends to reach ``receivers`` others."""
    return math.ceil(math.log2(receivers + 1))


def receive_table(rates: dict[str, float], hw: dict[str, float] = HARDWARE) -> str:
    """K nodes without a copy (replaced nodes, or lost local disks) and one node that holds it,
    on its NVMe: the sender reads and verifies, then the tree carries the bytes to the K leaders,
    each of which spreads them on its node as they land (that and the decoding overlap the wire)."""
    lines = [
        "| state | nodes receiving | sender's link carries | resume of a receiving node |",
        "|---|---|---|---|",
    ]
    for gb in (10, 80):
        b = gb * GB
        read = max(b / (hw["nvme_node"] * GB), b / (rates["checksum"] * GB))
        cpu = b / (rates["decode"] * GB) + b / (rates["copy"] * GB)
        for k in (1, 8, 64, 1023):
            wire = _tree(k) * b / (hw["nic"] * GB)
            seconds = read + cpu + max(wire, _tree(RANKS - 1) * b / (rates["wire"] * GB))
            lines.append(f"| {gb} GB | {k} | {_tree(k)} x {gb} GB | {seconds:.0f} s |")
    return "\n".join(lines)


def table(rates: dict[str, float], hw: dict[str, float] = HARDWARE) -> str:
    head = "| state | nodes | storage | resume today | resume now | pulled a node, today / now | "
    lines = [head + "host memory a node, today / now |", "|---|---|---|---|---|---|---|"]
    for gb in (10, 80):
        for n in (2, 64, 1024):
            for storage in ("nvme", "nfs", "s3"):
                old, new = (_resume(gb * GB, n, storage, rates, hw, flag) for flag in (False, True))
                lines.append(
                    f"| {gb} GB | {n} | {storage} | {old['seconds']:.0f} s | {new['seconds']:.0f} s | "
                    f"{old['pulled'] / GB:.0f} / {new['pulled'] / GB:.0f} GB | "
                    f"{old['memory'] / GB:.0f} / {new['memory'] / GB:.1f} GB |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    measured = measure()
    measured.setdefault("wire", float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)
    print(json.dumps(measured))
    print(table(measured))
    print(receive_table(measured))
