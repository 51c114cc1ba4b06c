"""How fast this machine's storage delivers expert shards, and what that allows a dropping cluster.

OD-MoE workers keep no expert cache: every routed expert of every token is read from storage,
computed and dropped (page cache included). Decode can then go no faster than

    storage read rate / bytes of the experts one token routes to

whatever the predictor and the network do. This module measures the read rate the way workers
read (drop the file's page cache, mmap with MAP_POPULATE, several loaders at once) and computes
that bound from the manifest.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgemoe.format.manifest import Manifest, expert_file_name, load_manifest
from edgemoe.model.expert_ffn import MappedShard, ShardLayout
from edgemoe.util.files import cached_share, drop_page_cache


# More than this share of the shards still cached after the drop: the "cold" read was not cold.
COLD_CACHED_MAX = 0.1


def page_cache_kept(cached_share: float | None) -> bool:
    """Whether a cold read's cached share (StorageRate.cached_share) says the kernel ignored the drop."""
    return cached_share is not None and cached_share > COLD_CACHED_MAX


@dataclass
class StorageRate:
    files: int
    bytes: int
    seconds: float
    streams: int
    cached_share: float | None = None  # of the shards' bytes in the page cache as the reads began (None: unknown)

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else float("inf")

    @property
    def from_page_cache(self) -> bool:
        """The kernel kept the pages the drop asked it to forget: this rate is the page cache's."""
        return page_cache_kept(self.cached_share)


def expert_bytes_per_token(manifest: Manifest) -> float:
    """Bytes of routed experts one decode token reads: k times the mean shard size, over MoE layers."""
    total = 0.0
    for layer in manifest.moe_layers:
        sizes = [manifest.files[expert_file_name(layer, e)].size for e in range(manifest.n_experts)]
        total += manifest.n_experts_used * sum(sizes) / len(sizes)
    return total


def shard_read_rate(model_dir: str | Path, *, n_files: int | None = None, streams: int = 4,
                    cold: bool = True) -> StorageRate:
    """Map n_files expert shards (default: all of them; else spread over the model) with MAP_POPULATE
    from `streams` threads, after dropping their page cache when cold; wall time for all of them."""
    model_dir = Path(model_dir)
    m = load_manifest(model_dir)
    rels = [rel for _, _, rel in m.expert_files()]
    n_files = len(rels) if n_files is None else min(n_files, len(rels))
    stride = max(1, len(rels) // n_files)
    layouts = [ShardLayout.read(model_dir / rel) for rel in rels[::stride][:n_files]]
    for lay in layouts:
        if cold:
            drop_page_cache(lay.path)
        else:  # bring it into the page cache first
            MappedShard(lay, populate=True).close()

    def load(part: list[ShardLayout]) -> None:
        for lay in part:
            MappedShard(lay, populate=True).close()

    share = cached_share([lay.path for lay in layouts])
    parts = [layouts[i::streams] for i in range(streams)]
    threads = [threading.Thread(target=load, args=(p,)) for p in parts if p]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    for lay in layouts:  # leave nothing cached: a worker's cgroup is charged only for pages it faults in itself
        drop_page_cache(lay.path)
    return StorageRate(len(layouts), sum(lay.size for lay in layouts), seconds, len(threads), share)
