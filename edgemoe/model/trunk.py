"""The trunk's ggml graph: everything but the routed experts, op for op as llama.cpp builds it.

Each function adds the nodes of one block to a graph context, mirroring llama.cpp's
llm_graph_context (build_norm, build_qkv, build_attn with flash attention, build_ffn); the MoE
FFN's router, experts and combine are edgemoe.model.moe's (build_moe_ffn). Matching the op
sequence, shapes and types is what makes the results equal to llama.cpp's: the same ggml kernels
run on the same inputs.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from edgemoe.format.schema import MODEL_TENSOR, T, parse_expert_tensor, tensor_name
from edgemoe.ggml import Context, GGMLType, TensorPtr, lib
from edgemoe.ggml.columns import mul_mat_limit, row_chunks
from edgemoe.ggml.context import aligned_empty
from edgemoe.ggml.lib import GGMLPrec
from edgemoe.ggml.repack import Repacker
from edgemoe.model import moe
from edgemoe.model.config import ModelConfig
from edgemoe.model.kvcache import KVCache, hadamard
from edgemoe.model.mla import mla_attention, mla_legacy_attention
from edgemoe.model.weights import GGUFTensors

_TOKEN_EMBD = tensor_name(T.TOKEN_EMBD)
GGML_HINT_SRC0_IS_HADAMARD = 1  # ggml_mul_mat_set_hint: the CPU runs a fast Walsh-Hadamard transform


@dataclass
class StepInputs:
    """Per-eval inputs shared by every segment, as numpy arrays the graphs view."""

    tokens: np.ndarray  # int32 [T]
    pos: np.ndarray  # int32 [T]
    kv_idx: np.ndarray  # int64 [T]: cache rows the new K/V go to
    mask: np.ndarray  # [T, n_kv]: 0 where visible, -inf elsewhere (float16 for flash attention, else float32)
    out_ids: np.ndarray  # int32 [n_out]: rows whose output is needed after the last layer
    v_idx: np.ndarray | None = None  # int64 [T * n_embd_kv]: element indices into a transposed V cache
    # rows of each sequence in a batch of several, (first row, rows); None: one sequence
    groups: list[tuple[int, int]] | None = None
    out_groups: list[tuple[int, int]] | None = None  # the same for the output rows (after out_ids)
    mask_swa: np.ndarray | None = None  # like mask, also hiding cells n_swa or more positions back (gpt-oss)

    @property
    def n_kv(self) -> int:
        return self.mask.shape[1]


def split_rows(ctx: Context, x: TensorPtr, groups: list[tuple[int, int]], limit: int) -> list[TensorPtr]:
    """Views of x's rows (dim 1; of every head where x is [d, T, n_head]) in runs that keep each
    sequence on its own kernels (row_chunks)."""
    c = x.contents
    runs = row_chunks(groups, limit)
    if len(runs) == 1:
        return [x]
    if c.ne[2] > 1:
        return [ctx.view_3d(x, c.ne[0], n, c.ne[2], c.nb[1], c.nb[2], lo * c.nb[1]) for lo, n in runs]
    return [ctx.view_2d(x, c.ne[0], n, c.nb[1], lo * c.nb[1]) for lo, n in runs]


def concat_rows(ctx: Context, parts: list[TensorPtr], dim: int = 1) -> TensorPtr:
    """The runs' results side by side again."""
    out = parts[0]
    for p in parts[1:]:
        out = ctx.concat(out, p, dim)
    return out


class Trunk:
    """Graph builders over the trunk's weights; one instance per loaded model."""

    def __init__(self, cfg: ModelConfig, weights: GGUFTensors, kv: KVCache, repacker: Repacker | None = None) -> None:
        """repacker: copy the matrix-product weights llama.cpp would repack into CPU_REPACK buffers."""
        self.cfg = cfg
        self.w = weights
        self.kv = kv
        self._packed: dict[str, TensorPtr] = {}
        if repacker is not None:
            for name in weights.names():
                t = weights.get(name).contents
                ne = (int(t.ne[0]), int(t.ne[1]))
                # token_embd feeds get_rows (also as a tied output head), norms feed mul: not repacked
                if name == _TOKEN_EMBD or int(t.ne[2]) != 1 or int(t.ne[1]) == 1 or parse_expert_tensor(name) is not None:
                    continue
                if repacker.supports(t.type, ne):
                    self._packed[name] = repacker.repack(t.type, ne, t.data)
        out = tensor_name(T.OUTPUT)
        self.output = self._packed.get(out) or weights.get(out) or weights.require(_TOKEN_EMBD)
        self._packed_addrs = {ctypes.addressof(t.contents) for t in self._packed.values()}
        self._rot: dict[int, np.ndarray] = {}  # Walsh-Hadamard matrices by size: graph inputs, kept alive here

    def matmul(self, ctx: Context, w: TensorPtr, cur: TensorPtr, groups: list[tuple[int, int]] | None) -> TensorPtr:
        """w x cur; with rows of several sequences (groups: (first row, rows) each), one product per
        run of rows that keeps each sequence on the kernels it gets alone (edgemoe.ggml.columns)."""
        if not groups or len(groups) < 2:
            return ctx.mul_mat(w, cur)
        return concat_rows(ctx, [ctx.mul_mat(w, part) for part in split_rows(ctx, cur, groups, self._limit(w))])

    def _limit(self, w: TensorPtr) -> int:
        return mul_mat_limit(int(w.contents.type), repacked=ctypes.addressof(w.contents) in self._packed_addrs)

    def is_moe_layer(self, il: int) -> bool:
        return tensor_name(T.FFN_GATE_INP, il) in self.w

    def _lw(self, il: int, t: MODEL_TENSOR, suffix: str = "weight") -> TensorPtr | None:
        """Layer il's tensor t (its repacked copy where there is one), or None."""
        key = tensor_name(t, il, suffix)
        return self._packed.get(key) or self.w.get(key)

    # building blocks -------------------------------------------------------------------------
    def norm(self, ctx: Context, x: TensorPtr, weight: TensorPtr) -> TensorPtr:
        return ctx.mul(ctx.rms_norm(x, self.cfg.rms_eps), weight)

    def embed(self, ctx: Context, inp: StepInputs) -> TensorPtr:
        x = ctx.get_rows(self.w.require(_TOKEN_EMBD), ctx.from_numpy(inp.tokens))
        if self.cfg.embedding_scale:  # granite (llama.cpp's build_inp_embd; get_rows' output is contiguous)
            x = ctx.scale(x, self.cfg.embedding_scale)
        return x

    def residual(self, ctx: Context, out: TensorPtr, skip: TensorPtr) -> TensorPtr:
        """A block's output added to the residual stream: out + skip, out scaled first where granite's
        residual multiplier asks (after the attention and after the FFN, as granite.cpp does)."""
        if self.cfg.residual_scale:
            out = ctx.scale(out, self.cfg.residual_scale)
        return ctx.add(out, skip)

    def rope(self, ctx: Context, x: TensorPtr, pos: TensorPtr, il: int) -> TensorPtr:
        """ggml_rope_ext with the model's rotary dims, type, base (the SWA base on sliding-window
        layers) and (YaRN) scaling."""
        cfg, r = self.cfg, self.cfg.rope
        base = cfg.rope_freq_base_swa if cfg.is_swa(il) else cfg.rope_freq_base
        return ctx.rope_ext(x, pos, None, cfg.rope_dims, cfg.traits.rope_type, r.n_ctx_orig, base,
                            cfg.rope_freq_scale, r.ext_factor, r.attn_factor, r.beta_fast, r.beta_slow)

    def ffn_norm(self, ctx: Context, il: int, x: TensorPtr) -> TensorPtr:
        """The norm before the layer's FFN: ffn_norm, or gpt-oss's post_attention_norm."""
        return self.norm(ctx, x, self._lw(il, T.FFN_NORM) or self.w.require(tensor_name(T.ATTN_POST_NORM, il)))

    def attention(self, ctx: Context, graph, il: int, x: TensorPtr, inp: StepInputs) -> TensorPtr:
        """attn_norm -> q/k/v (+bias, q/k norm) -> RoPE -> KV store -> flash attention -> wo."""
        cfg, tr = self.cfg, self.cfg.traits
        if cfg.mla is not None:
            if cfg.mla.absorbed:
                return mla_attention(self, ctx, graph, il, x, inp)
            return mla_legacy_attention(self, ctx, graph, il, x, inp)
        n_tok = x.contents.ne[1]
        cur = self.norm(ctx, x, self._lw(il, T.ATTN_NORM))

        def proj(w: MODEL_TENSOR) -> TensorPtr:
            t = self.matmul(ctx, self._lw(il, w), cur, inp.groups)
            b = self._lw(il, w, "bias")
            return ctx.add(t, b) if b is not None else t

        q, k, v = proj(T.ATTN_Q), proj(T.ATTN_K), proj(T.ATTN_V)
        if tr.qk_norm == "full":  # olmoe: norm over the whole projection, before the head split
            q = self.norm(ctx, q, self._lw(il, T.ATTN_Q_NORM))
            k = self.norm(ctx, k, self._lw(il, T.ATTN_K_NORM))
        q = ctx.reshape_3d(q, cfg.head_dim, cfg.n_head, n_tok)
        k = ctx.reshape_3d(k, cfg.head_dim, cfg.n_head_kv, n_tok)
        v = ctx.reshape_3d(v, cfg.head_dim, cfg.n_head_kv, n_tok)
        if tr.qk_norm == "head":  # qwen3moe: norm per head
            q = self.norm(ctx, q, self._lw(il, T.ATTN_Q_NORM))
            k = self.norm(ctx, k, self._lw(il, T.ATTN_K_NORM))
        pos = ctx.from_numpy(inp.pos)
        q = self.rope(ctx, q, pos, il)
        k = self.rope(ctx, k, pos, il)
        cur = self.attend_qkv(ctx, graph, il, q, k, v, inp)
        wo_b = self._lw(il, T.ATTN_OUT, "bias") if tr.attn_out_bias else None
        return ctx.add(cur, wo_b) if wo_b is not None else cur

    def attend_qkv(self, ctx: Context, graph, il: int, q: TensorPtr, k: TensorPtr, v: TensorPtr,
                   inp: StepInputs) -> TensorPtr:
        """llama.cpp's build_attn from the roped Q/K and V ([head, heads, T] each): the quantized
        cache's Hadamard rotations, the KV store, attention, attn_output (without its bias)."""
        attn = self.kv.attn
        if attn.rot_k:  # quantized K: rotate Q and K alike (their dot products are unchanged)
            q, k = self._rotate(ctx, q, attn.rot_k), self._rotate(ctx, k, attn.rot_k)
        if attn.rot_v:
            v = self._rotate(ctx, v, attn.rot_v)
        for t in (q, v, k):  # llama.cpp's expansion order
            lib.ggml_build_forward_expand(graph, t)
        cur = self._attend(ctx, graph, il, q, k, v, inp)
        if attn.rot_v:  # rotate the output back (the matrix is its own inverse)
            cur = self._rotate(ctx, cur, attn.rot_v)
        return self.matmul(ctx, self._lw(il, T.ATTN_OUT), cur, inp.groups)

    def _rotate(self, ctx: Context, x: TensorPtr, n: int) -> TensorPtr:
        """llama_mul_mat_hadamard: x viewed as rows of n, times the Walsh-Hadamard matrix."""
        c = x.contents
        ne = tuple(int(d) for d in c.ne)
        n_el = ne[0] * ne[1] * ne[2] * ne[3]
        rows = ctx.reshape_2d(x, n, n_el // n) if lib.ggml_is_contiguous(x) else ctx.cont_2d(x, n, n_el // n)
        if n not in self._rot:
            self._rot[n] = hadamard(n)
        res = ctx.mul_mat(ctx.from_numpy(self._rot[n]), rows)
        lib.ggml_mul_mat_set_hint(res, GGML_HINT_SRC0_IS_HADAMARD)
        return ctx.reshape_4d(res, *ne)

    def _attend(self, ctx: Context, graph, il: int, q: TensorPtr, k: TensorPtr, v: TensorPtr,
                inp: StepInputs) -> TensorPtr:
        """Store this step's K/V into the cache, then attend over its first n_kv cells (llama.cpp's
        cpy_k/cpy_v, get_k/get_v and build_attn_mha): [n_embd_q, T]."""
        cfg, kv = self.cfg, self.kv
        attn = kv.attn
        n_tok = int(k.contents.ne[2])
        n_kv, n_ctx, d, h_kv = inp.n_kv, kv.n_ctx, cfg.head_dim, cfg.n_head_kv
        dv, n_v = cfg.head_v, cfg.n_embd_v  # V heads may be narrower than K's (deepseek2's legacy layout)
        kc, vc = kv.tensor(ctx, il, "k"), kv.tensor(ctx, il, "v")
        idx = ctx.from_numpy(inp.kv_idx)
        lib.ggml_build_forward_expand(graph, ctx.set_rows(kc, ctx.view_2d(k, cfg.n_embd_kv, n_tok, k.contents.nb[2], 0), idx))
        if attn.v_trans:  # one cache row per element: v_idx addresses channel j of cell c at j*n_ctx + c
            merged = v.contents.nb[2] == 4 * n_v  # dims 0-2 mergeable (llama.cpp's cpy_v test)
            v2 = ctx.reshape_2d(v, n_v, n_tok) if merged else ctx.cont_2d(v, n_v, n_tok)
            store = ctx.set_rows(ctx.reshape_2d(vc, 1, n_v * n_ctx), ctx.reshape_2d(v2, 1, n_v * n_tok),
                                 ctx.from_numpy(inp.v_idx))
        else:
            store = ctx.set_rows(vc, ctx.view_2d(v, n_v, n_tok, v.contents.nb[2], 0), idx)
        lib.ggml_build_forward_expand(graph, store)

        rs_k = lambda n: int(lib.ggml_row_size(int(attn.type_k), n))  # noqa: E731
        rs_v = lambda n: int(lib.ggml_row_size(int(attn.type_v), n))  # noqa: E731
        kview = ctx.view_4d(kc, d, h_kv, n_kv, 1, rs_k(d), rs_k(cfg.n_embd_kv), rs_k(cfg.n_embd_kv * n_ctx), 0)
        if attn.v_trans:
            vview = ctx.view_4d(vc, n_kv, h_kv, dv, 1, rs_v(n_ctx * dv), rs_v(n_ctx), rs_v(n_ctx * n_v), 0)
        else:
            vview = ctx.view_4d(vc, dv, h_kv, n_kv, 1, rs_v(dv), rs_v(n_v), rs_v(n_v * n_ctx), 0)
        return self.attend_mha(ctx, q, kview, vview, inp, il=il)

    def attend_mha(self, ctx: Context, q: TensorPtr, kview: TensorPtr, vview: TensorPtr, inp: StepInputs,
                   v_mla: TensorPtr | None = None, il: int = 0) -> TensorPtr:
        """llama.cpp's build_attn_mha over cache views: flash attention, or kq -> softmax -> kqv;
        v_mla (deepseek2's attn_v_b) decompresses each head's latent output: [n_embd_v_out, T].
        Sliding-window layers attend through the SWA mask; attn_sinks (gpt-oss) join the softmax."""
        cfg, attn = self.cfg, self.kv.attn
        sinks = self._lw(il, T.ATTN_SINKS)
        v_trans = vview.contents.nb[1] > vview.contents.nb[2]
        qc = q.contents
        q = ctx.view_4d(q, qc.ne[0], qc.ne[1], qc.ne[2], 1, qc.nb[1], qc.nb[2], qc.nb[2] * qc.ne[2], 0)
        q = ctx.permute(q, 0, 2, 1, 3)
        kp = ctx.permute(kview, 0, 2, 1, 3)
        vp = ctx.permute(vview, 0, 2, 1, 3)
        mask = ctx.from_numpy(inp.mask_swa if cfg.is_swa(il) else inp.mask)
        if attn.flash:
            if attn.type_k == GGMLType.F32:  # llama.cpp casts an F32 cache for flash attention
                kp = ctx.cast(kp, GGMLType.F16)
            if int(vp.contents.type) == GGMLType.F32:
                vp = ctx.cast(vp, GGMLType.F16)
            att = ctx.flash_attn_ext(q, kp, vp, mask, cfg.kq_scale, 0.0, 0.0)
            if sinks is not None:
                lib.ggml_flash_attn_ext_add_sinks(att, sinks)
            lib.ggml_flash_attn_ext_set_n_kv_max(att, 0)
            lib.ggml_prec_set_acc(att, GGMLPrec.F32)
            if v_mla is not None:  # as a matrix-matrix product with the tokens in dimension 1
                att = ctx.cont(ctx.permute(self.matmul(ctx, v_mla, ctx.permute(att, 0, 2, 1, 3), inp.groups), 0, 2, 1, 3))
            ac = att.contents
            return ctx.reshape_2d(att, ac.ne[0] * ac.ne[1], ac.ne[2] * ac.ne[3])
        if not v_trans:  # MLA's V is a view of the K cache: transposed once for V*kq
            vp = ctx.cont(ctx.transpose(vp))
        limit = min(mul_mat_limit(int(attn.type_k)), mul_mat_limit(int(vp.contents.type)))
        if v_mla is not None:  # attn_v_b decompresses the rows of every sequence as one product
            limit = min(limit, self._limit(v_mla))
        if inp.groups and len(inp.groups) > 1 and len(row_chunks(inp.groups, limit)) > 1:
            # several sequences: K*Q and V*kq per run of rows, as each sequence's alone (a one-row
            # K*Q of an F16 cache is a mat-vec, a wider one tinyBLAS: see edgemoe.ggml.columns)
            qc, mc = q.contents, mask.contents
            parts = []
            for lo, n in row_chunks(inp.groups, limit):
                q_part = ctx.view_3d(q, qc.ne[0], n, qc.ne[2], qc.nb[1], qc.nb[2], lo * qc.nb[1])
                m_part = ctx.view_2d(mask, mc.ne[0], n, mc.nb[1], lo * mc.nb[1])
                parts.append(self._kq_v(ctx, kp, vp, q_part, m_part, sinks, v_mla))
            kqv = concat_rows(ctx, parts)
        else:
            kqv = self._kq_v(ctx, kp, vp, q, mask, sinks, v_mla)
        cur = ctx.permute(kqv, 0, 2, 1, 3)
        c = cur.contents
        return ctx.cont_2d(cur, c.ne[0] * c.ne[1], c.ne[2] * c.ne[3])

    def _kq_v(self, ctx: Context, kp: TensorPtr, vp: TensorPtr, q: TensorPtr, mask: TensorPtr,
              sinks: TensorPtr | None = None, v_mla: TensorPtr | None = None) -> TensorPtr:
        """Attention without flash attention: softmax(K*Q * scale + mask) (with gpt-oss's sinks), times
        V, then MLA's attn_v_b where given: [d, T, n_head]."""
        kq = ctx.mul_mat(kp, q)  # [n_kv, T, n_head]
        lib.ggml_prec_set_acc(kq, GGMLPrec.F32)
        kq = ctx.soft_max_ext(kq, mask, self.cfg.kq_scale, 0.0)
        if sinks is not None:
            lib.ggml_soft_max_add_sinks(kq, sinks)
        kqv = ctx.mul_mat(vp, kq)  # [d, T, n_head]
        return ctx.mul_mat(v_mla, kqv) if v_mla is not None else kqv

    def router(self, ctx: Context, il: int, cur: TensorPtr,
               groups: list[tuple[int, int]] | None = None) -> tuple[TensorPtr, TensorPtr]:
        """Layer il's router over its weights (edgemoe.model.moe.router): (selected [k,T] i32, weights [1,k,T])."""
        return moe.router(ctx, self.cfg, cur, self._lw(il, T.FFN_GATE_INP), self._lw(il, T.FFN_GATE_INP, "bias"),
                          self._lw(il, T.FFN_EXP_PROBS_B, "bias"), il, lambda w, x: self.matmul(ctx, w, x, groups))

    def ffn(self, ctx: Context, cur: TensorPtr, up: TensorPtr, gate: TensorPtr, down: TensorPtr,
            biases: tuple[TensorPtr | None, ...] = (None, None, None),
            groups: list[tuple[int, int]] | None = None) -> TensorPtr:
        """SwiGLU FFN with parallel gate (llama.cpp build_ffn, LLM_FFN_SILU + LLM_FFN_PAR)."""
        up_b, gate_b, down_b = biases
        tmp = self.matmul(ctx, up, cur, groups)
        if up_b is not None:
            tmp = ctx.add(tmp, up_b)
        g = self.matmul(ctx, gate, cur, groups)
        if gate_b is not None:
            g = ctx.add(g, gate_b)
        out = self.matmul(ctx, down, ctx.swiglu_split(g, tmp), groups)
        return ctx.add(out, down_b) if down_b is not None else out

    def dense_ffn(self, ctx: Context, il: int, cur: TensorPtr, groups: list[tuple[int, int]] | None = None) -> TensorPtr:
        lw = lambda t, suffix="weight": self._lw(il, t, suffix)  # noqa: E731
        return self.ffn(ctx, cur, lw(T.FFN_UP), lw(T.FFN_GATE), lw(T.FFN_DOWN),
                        (lw(T.FFN_UP, "bias"), lw(T.FFN_GATE, "bias"), lw(T.FFN_DOWN, "bias")), groups)

    def shared_expert(self, ctx: Context, il: int, cur: TensorPtr, groups: list[tuple[int, int]] | None = None) -> TensorPtr:
        """FFN_shexp(x); qwen2moe gates it: sigmoid(gate_inp_shexp . x) * FFN_shexp(x), the sigmoid
        computed as silu(g)/g like llama.cpp (deepseek2's shared experts have no gate)."""
        ffn = self.ffn(ctx, cur, self._lw(il, T.FFN_UP_SHEXP), self._lw(il, T.FFN_GATE_SHEXP),
                       self._lw(il, T.FFN_DOWN_SHEXP), groups=groups)
        gate_w = self._lw(il, T.FFN_GATE_INP_SHEXP)
        if gate_w is None:
            return ffn
        g = self.matmul(ctx, gate_w, cur, groups)
        gate = ctx.div(ctx.silu(g), g)
        return ctx.mul(ffn, gate)

    def head(self, ctx: Context, x: TensorPtr, groups: list[tuple[int, int]] | None = None) -> TensorPtr:
        logits = self.matmul(ctx, self.output, self.norm(ctx, x, self.w.require(tensor_name(T.OUTPUT_NORM))), groups)
        if self.cfg.logit_scale:  # granite: 1.0f / f_logit_scale, in float32 as llama.cpp computes it
            logits = ctx.scale(logits, float(np.float32(1.0) / np.float32(self.cfg.logit_scale)))
        return logits

    def activation_bytes(self, n_tok: int, n_kv: int, n_out: int) -> int:
        """A safe upper bound on one segment's context memory (ggml aborts if it runs out)."""
        c = self.cfg
        wide = max(c.n_embd, c.n_embd_q)
        per_tok = 4 * (32 * wide + 6 * max(c.n_ff, c.n_ff_exp, c.n_ff_shexp, 1) + 8 * max(c.n_expert, 1) + 3 * max(c.n_expert_used, 1) * c.n_embd)
        fa = 2 * 2 * n_kv * c.n_embd_kv + 4 * c.n_head * n_tok * 64  # f16 K/V copies, FA scratch
        return int(1.5 * (n_tok * per_tok + fa + 4 * n_out * (c.n_vocab + c.n_embd))) + (1 << 20)
