"""The inference engine: runs the trunk with ggml, layer by layer, and hands routed experts to a backend.

One eval() call runs a batch of tokens (the whole prompt, or one decode token) through the model:
for every MoE layer the trunk graph stops after the router, the expert backend computes the selected
experts, and the next layer's graph starts by combining their outputs, exactly as llama.cpp's
build_moe_ffn does inside one graph.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgemoe.errors import UserError
from edgemoe.format.manifest import TRUNK_NAME, Manifest, check_file_hash, check_model_files, load_manifest
from edgemoe.ggml import Compute, Context, lib
from edgemoe.ggml.context import aligned_copy, aligned_empty, to_numpy
from edgemoe.model.config import ModelConfig
from edgemoe.model.experts import ExpertBackend, LocalExperts
from edgemoe.model.trunk import KVCache, StepInputs, Trunk
from edgemoe.model.weights import GGUFTensors

KV_PAD = 256  # llama.cpp pads the attended KV length to a multiple of 256


@dataclass
class EvalStats:
    trunk_s: float = 0.0
    experts_s: float = 0.0
    evals: int = 0
    tokens: int = 0


@dataclass
class _MoEPending:
    """A MoE layer's state between its router and the combine that opens the next segment."""

    ffn_inp: np.ndarray  # [T, n_embd] residual
    experts: np.ndarray  # [T, k, n_embd] expert outputs
    weights: np.ndarray  # [T, k, 1]
    shared: np.ndarray | None  # [T, n_embd] shared-expert output (qwen2moe)


def resolve_model(path: str | Path) -> tuple[Path, Manifest | None]:
    """(trunk GGUF, manifest or None) for a converted model directory or a plain dense GGUF.

    A model directory is checked on load: every file present with its size, the trunk's sha256;
    expert shards are hashed when first used (see LocalExperts).
    """
    p = Path(path)
    if p.is_dir():
        manifest = load_manifest(p)
        check_model_files(p, manifest)
        check_file_hash(p, manifest, TRUNK_NAME)
        return p / TRUNK_NAME, manifest
    if p.is_file():
        return p, None
    raise UserError(f"{p}: no such model directory or GGUF file")


class Engine:
    """A model loaded for inference: trunk weights mapped, KV cache allocated, experts behind a backend."""

    def __init__(self, model: str | Path, *, n_ctx: int | None = None, n_threads: int = 2,
                 experts: ExpertBackend | None = None, compute: Compute | None = None) -> None:
        trunk_path, self.manifest = resolve_model(model)
        self.model_dir = Path(model) if self.manifest is not None else None
        self.weights = GGUFTensors(trunk_path)
        self.cfg = ModelConfig.from_metadata(self.weights.meta, str(trunk_path))
        self.n_ctx = min(n_ctx or self.cfg.n_ctx_train, self.cfg.n_ctx_train)
        self.compute = compute or Compute(n_threads)
        self.kv = KVCache(self.cfg, self.n_ctx)
        self.trunk = Trunk(self.cfg, self.weights, self.kv)
        self.moe_layers = [il for il in range(self.cfg.n_layer) if self.trunk.is_moe_layer(il)]
        if self.moe_layers and experts is None:
            if self.model_dir is None:
                raise UserError(f"{trunk_path}: a MoE GGUF must be converted first: edgemoe convert {trunk_path} OUT_DIR")
            experts = LocalExperts(self.model_dir, self.compute, self.manifest)
        self.experts = experts
        self.n_past = 0
        self.stats = EvalStats()
        self.routing: list[np.ndarray | None] = [None] * self.cfg.n_layer  # last eval's top-k per layer
        self._arena = aligned_empty(1 << 20, np.uint8)

    # ------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.n_past = 0
        self.kv.clear()

    def close(self) -> None:
        if self.experts is not None:
            self.experts.close()
        self.weights.close()
        self.compute.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _inputs(self, tokens: np.ndarray, logits_all: bool) -> StepInputs:
        n_tok = len(tokens)
        p0 = self.n_past
        pos = np.arange(p0, p0 + n_tok, dtype=np.int32)
        n_kv = min(self.n_ctx, max(KV_PAD, -(-(p0 + n_tok) // KV_PAD) * KV_PAD))
        visible = np.arange(n_kv)[None, :] <= pos[:, None]
        mask = np.where(visible, np.float16(0), np.float16(-np.inf)).astype(np.float16)
        out_ids = np.arange(n_tok, dtype=np.int32) if logits_all else np.array([n_tok - 1], dtype=np.int32)
        return StepInputs(
            tokens=aligned_copy(tokens.astype(np.int32)),
            pos=aligned_copy(pos),
            kv_idx=aligned_copy(pos.astype(np.int64)),
            mask=aligned_copy(mask),
            out_ids=aligned_copy(out_ids),
        )

    def _context(self, inp: StepInputs) -> Context:
        n_bytes = Context.overhead(4096) + self.trunk.activation_bytes(len(inp.tokens), inp.n_kv, len(inp.out_ids))
        if self._arena.nbytes < n_bytes:
            self._arena = aligned_empty(n_bytes, np.uint8)
        return Context(n_bytes, arena=self._arena)

    def eval(self, tokens: list[int] | np.ndarray, *, logits_all: bool = False) -> np.ndarray:
        """Run tokens at the next positions; returns float32 logits [n_out, n_vocab] (last token, or all)."""
        tokens = np.asarray(tokens, dtype=np.int32)
        n_tok = len(tokens)
        if n_tok == 0:
            raise UserError("nothing to evaluate (empty token list)")
        if self.n_past + n_tok > self.n_ctx:
            raise UserError(f"{self.n_past + n_tok} tokens do not fit the context of {self.n_ctx} tokens")
        if tokens.min() < 0 or tokens.max() >= self.cfg.n_vocab:
            raise UserError(f"token id out of range [0, {self.cfg.n_vocab})")
        inp = self._inputs(tokens, logits_all)
        trunk, cfg = self.trunk, self.cfg
        pending: _MoEPending | None = None
        resid: np.ndarray | None = None
        self.routing = [None] * cfg.n_layer

        for il in range(cfg.n_layer + 1):
            t0 = time.perf_counter()
            with self._context(inp) as ctx:
                graph = ctx.graph()
                # the residual stream entering this segment
                if il == 0:
                    x = trunk.embed(ctx, inp)
                elif pending is not None:
                    moe = trunk.moe_combine(ctx, graph, ctx.from_numpy(pending.experts), ctx.from_numpy(pending.weights))
                    if pending.shared is not None:
                        moe = ctx.add(moe, ctx.from_numpy(pending.shared))
                    x = ctx.add(moe, ctx.from_numpy(pending.ffn_inp))
                else:
                    x = ctx.from_numpy(resid)
                pending = None
                if il == cfg.n_layer:  # final norm and output head
                    logits = trunk.head(ctx, x)
                    lib.ggml_build_forward_expand(graph, logits)
                    self.compute.run(graph)
                    out = to_numpy(logits).reshape(len(inp.out_ids), cfg.n_vocab).copy()
                    self.stats.trunk_s += time.perf_counter() - t0
                    break

                cur = trunk.attention(ctx, graph, il, x, inp)
                if il == cfg.n_layer - 1:  # only the output rows continue past the last attention
                    ids = ctx.from_numpy(inp.out_ids)
                    cur, x = ctx.get_rows(cur, ids), ctx.get_rows(x, ids)
                ffn_inp = ctx.add(cur, x)
                normed = trunk.norm(ctx, ffn_inp, trunk._lw(il, "ffn_norm.weight"))
                if not trunk.is_moe_layer(il):
                    y = ctx.add(trunk.dense_ffn(ctx, il, normed), ffn_inp)
                    lib.ggml_build_forward_expand(graph, y)
                    self.compute.run(graph)
                    resid = aligned_copy(to_numpy(y).reshape(-1, cfg.n_embd))
                    self.stats.trunk_s += time.perf_counter() - t0
                    continue

                selected, weights = trunk.router(ctx, il, normed)
                shared = trunk.shared_expert(ctx, il, normed) if cfg.traits.shared_expert else None
                for t in (ffn_inp, normed, selected, weights, *([shared] if shared is not None else [])):
                    lib.ggml_build_forward_expand(graph, t)
                self.compute.run(graph)
                n_rows = ffn_inp.contents.ne[1]
                sel = np.array(to_numpy(selected).reshape(n_rows, cfg.n_expert_used), dtype=np.int32)
                hidden = np.array(to_numpy(normed).reshape(n_rows, cfg.n_embd), dtype=np.float32)
                pending = _MoEPending(
                    ffn_inp=aligned_copy(to_numpy(ffn_inp).reshape(n_rows, cfg.n_embd)),
                    experts=np.empty(0),
                    weights=aligned_copy(to_numpy(weights).reshape(n_rows, cfg.n_expert_used, 1)),
                    shared=aligned_copy(to_numpy(shared).reshape(n_rows, cfg.n_embd)) if shared is not None else None,
                )
            t1 = time.perf_counter()
            self.routing[il] = sel
            pending.experts = aligned_copy(self.experts.compute_layer(il, hidden, sel))
            self.stats.trunk_s += t1 - t0
            self.stats.experts_s += time.perf_counter() - t1

        self.n_past += n_tok
        self.stats.evals += 1
        self.stats.tokens += n_tok
        return out
