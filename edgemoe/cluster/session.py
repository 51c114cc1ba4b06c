"""Open an engine whose experts run on a cluster: local worker processes or workers started elsewhere."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from edgemoe.cluster.coordinator import ClusterExperts
from edgemoe.cluster.keys import KeyPair, ServerKeys, require_keys_or_insecure, server_keys
from edgemoe.cluster.local import LocalProcesses, LocalWorkers
from edgemoe.cluster.remote_shadow import RemoteShadowPredictor
from edgemoe.cluster.schedule import prefetch_depth
from edgemoe.errors import UserError
from edgemoe.format.shard import ExpertId
from edgemoe.model.engine import Engine
from edgemoe.model.kvcache import AttentionOptions
from edgemoe.predict import PredictorOptions, make_predictor, parse_predictor


@dataclass
class ClusterOptions:
    workers: int = 0  # local worker processes to spawn
    bind: str | None = None  # serve workers started elsewhere on this endpoint
    wait_workers: int = 0  # how many remote workers to wait for
    predictor: str = "lookahead"  # a name, or a spec such as shadow@T1KV4 (see edgemoe.predict.parse_predictor)
    align_token: int = 1  # shadow predictors: token alignment period (0 = never)
    align_kv: int = 1  # shadow predictors: KV alignment period (0 = never)
    shadow_trunk: bool = False  # the shadow runs the requantized trunk instead of sharing the main one
    reanchor_depth: int = 1
    shadow_threads: int = 1
    memory_budget: str | None = None
    worker_threads: int = 1
    shadow_node: str | None = None  # the shadow on its own node: "local" (spawned on loopback) or tcp://HOST:PORT to bind
    residency: str = "auto"  # "auto": workers keep residents under one placement; "off": the paper's cacheless mode
    join_timeout_s: float = 120.0
    request_timeout_s: float = 30.0
    key: str | None = None  # the coordinator's secret key file (edgemoe keygen)
    allow: str | None = None  # the allow-list of worker and shadow node public keys (a file or folder)
    insecure: bool = False  # allow binding a non-loopback address without keys

    @property
    def enabled(self) -> bool:
        return self.workers > 0 or self.bind is not None


def routing_counts(model: str | Path, moe_layers: list[int]) -> dict[ExpertId, float]:
    """Per-expert routing counts from the importance matrix the model's shadow was weighted by, when
    it lies next to the converted directory (NAME.imatrix.gguf with the manifest's sha256); else
    none (the placement then spreads residents evenly and learns the counts online)."""
    from edgemoe.cluster.placement import counts_from_imatrix
    from edgemoe.format.imatrix import read_imatrix
    from edgemoe.format.manifest import load_manifest, sha256_file

    want = (load_manifest(model).shadow or {}).get("imatrix_sha256")
    if not want:
        return {}
    for path in sorted(Path(model).resolve().parent.glob("*.imatrix.gguf")):
        if sha256_file(path) == want:
            return counts_from_imatrix(read_imatrix(path).counts, moe_layers)
    return {}


@contextlib.contextmanager
def open_engine(model: str | Path, opts: ClusterOptions, *, n_ctx: int, n_threads: int,
                resident_experts: bool = True, attention: AttentionOptions | None = None,
                repack: bool = False, on_cluster: Callable[[ClusterExperts], None] | None = None,
                n_seq: int = 1) -> Iterator[Engine]:
    """An Engine; with opts.enabled its experts are computed by cluster workers (they hold no KV cache:
    attention, the KV cache types and flash attention, is the coordinator's and the shadow's). on_cluster
    is handed the coordinator before the workers are waited for (a server reports who has joined).
    n_seq: sequences the engine holds at once (Engine.eval_batch)."""
    attention = attention or AttentionOptions()
    if not opts.enabled:
        with Engine(model, n_ctx=n_ctx, n_threads=n_threads, resident_experts=resident_experts,
                    attention=attention, repack=repack, n_seq=n_seq) as engine:
            yield engine
        return
    if not Path(model).is_dir():
        raise UserError(f"{model}: a cluster needs a converted model directory (edgemoe convert)")
    local: LocalWorkers | None = None
    local_shadow: LocalProcesses | None = None
    cluster: ClusterExperts | None = None
    remote_shadow = opts.shadow_node is not None
    if remote_shadow and parse_predictor(opts.predictor)[0] != "shadow":
        raise UserError(f"--shadow-node runs the shadow predictor elsewhere; it needs --predictor shadow, not {opts.predictor}")
    # workers spawned here talk over Unix sockets (ZeroMQ ipc://), the fastest transport it has on one host
    ipc_dir = tempfile.mkdtemp(prefix="edgemoe-ipc-") if opts.bind is None else None
    worker_bind = opts.bind or f"ipc://{ipc_dir}/workers"
    keys = cluster_keys(opts)

    def make_backend(engine: Engine) -> ClusterExperts:
        nonlocal cluster
        cfg = engine.cfg
        # how far ahead to predict: the groups of the workers expected; the coordinator re-sets it from
        # the groups of the live workers (edgemoe.cluster.schedule) whenever those change
        depth = prefetch_depth(opts.workers + opts.wait_workers, cfg.n_expert_used)
        popts = PredictorOptions(align_token=opts.align_token, align_kv=opts.align_kv, shadow_trunk=opts.shadow_trunk,
                                 reanchor_depth=opts.reanchor_depth, shadow_threads=opts.shadow_threads)
        if remote_shadow:
            bind = "tcp://127.0.0.1:0" if opts.shadow_node == "local" else opts.shadow_node
            predictor = RemoteShadowPredictor(engine, depth, bind=bind, keys=keys)
        else:
            predictor = make_predictor(opts.predictor, cfg, engine.weights, engine.moe_layers, depth=depth,
                                       main=engine, options=popts)
        try:
            cluster = ClusterExperts(model, n_embd=cfg.n_embd, n_expert=cfg.n_expert, k=cfg.n_expert_used,
                                     moe_layers=engine.moe_layers, bind=worker_bind, predictor=predictor,
                                     timeout_s=opts.request_timeout_s, residency=opts.residency,
                                     routing_counts=routing_counts(model, engine.moe_layers), keys=keys)
        except BaseException:
            predictor.close()
            raise
        return cluster

    engine = Engine(model, n_ctx=n_ctx, n_threads=n_threads, experts=make_backend, attention=attention, n_seq=n_seq)
    try:
        assert cluster is not None
        if on_cluster is not None:
            on_cluster(cluster)
        if opts.workers:
            local = LocalWorkers(model, opts.workers, cluster.endpoint, memory_budget=opts.memory_budget,
                                 threads=opts.worker_threads, auth=cluster.auth).start()
        if opts.shadow_node == "local":
            _, popts = parse_predictor(opts.predictor, PredictorOptions(align_token=opts.align_token, align_kv=opts.align_kv))
            local_shadow = LocalProcesses()
            local_shadow.spawn("local-shadow", [
                "shadow", "--connect", cluster.predictor.endpoint, "--model", str(model), "--name", "local-shadow",
                "--threads", str(opts.shadow_threads), "--align-token", str(popts.align_token),
                "--align-kv", str(popts.align_kv), *(["--shadow-trunk"] if opts.shadow_trunk else []),
                "-ctk", attention.cache_type_k, "-ctv", attention.cache_type_v, "-fa", attention.flash_attn,
                *local_shadow.key_args("local-shadow", [cluster.predictor.auth] if cluster.predictor.auth else [])])

        def check() -> None:
            failed = (local.failed() if local is not None else []) + (local_shadow.failed() if local_shadow else [])
            if failed:
                raise UserError("; ".join(failed))

        if local is not None:
            cluster.exited = local.exited
        cluster.wait_for_workers(opts.workers + opts.wait_workers, opts.join_timeout_s, check)
        if remote_shadow:
            cluster.predictor.wait_for_shadow(opts.join_timeout_s, check)
        engine.local_workers = local  # type: ignore[attr-defined]
        engine.local_shadow = local_shadow  # type: ignore[attr-defined]
        yield engine
    finally:
        if local is not None:
            local.stop()
        if local_shadow is not None:
            local_shadow.stop()
        if cluster is not None and cluster.predictor is not None:
            cluster.predictor.close()  # a shadow predictor's thread and engine
        engine.close()
        if ipc_dir is not None:
            shutil.rmtree(ipc_dir, ignore_errors=True)


def cluster_keys(opts: ClusterOptions) -> ServerKeys | None:
    """The coordinator's keys: --key/--allow when given; else, for a cluster of local daemons only,
    an ephemeral pair (each daemon gets one too: authenticated with no set-up); else none, which off
    loopback needs --insecure."""
    keys = server_keys(opts.key, opts.allow)
    if keys is not None:
        if not keys.allowed and (opts.wait_workers or (opts.shadow_node not in (None, "local"))):
            raise UserError("--key without --allow: no worker or shadow node started elsewhere could join "
                            "(give their public keys: --allow FILE|DIR)")
        return keys
    remote = [(what, e) for what, e in (("--bind", opts.bind), ("--shadow-node", opts.shadow_node))
              if e is not None and e != "local"]
    if not remote:
        return ServerKeys(KeyPair.generate())
    for what, endpoint in remote:
        require_keys_or_insecure(endpoint, False, opts.insecure, what)
    return None
