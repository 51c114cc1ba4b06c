"""deepseek2's multi-head latent attention (MLA), op for op as llama.cpp's src/models/deepseek2.cpp.

With the absorbed layout current converters write (attn_k_b / attn_v_b), MLA is multi-query
attention over one cached "head" per token: the RMS-normed kv_lora latent followed by the roped
shared k_pe. Each query head is projected into the latent space by attn_k_b (q_nope absorbed) and
joined with its own roped q_pe; the attention output, a latent per head, is decompressed by
attn_v_b before attn_output. V is a view of the K cache's first kv_lora_rank values (no V cache).

Files from older converters carry attn_kv_b instead (mla_legacy_attention): the latent is
decompressed before attention, which is then ordinary multi-head attention with K heads of
nope + rope values and V heads of head_v values, each in a cache of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgemoe.format.schema import T
from edgemoe.ggml import Context, TensorPtr, lib

if TYPE_CHECKING:
    from edgemoe.model.trunk import StepInputs, Trunk


def _row(t: TensorPtr, n: int) -> int:
    return int(lib.ggml_row_size(int(t.contents.type), n))


def _q_and_latent(trunk: "Trunk", ctx: Context, il: int, x: TensorPtr,
                  inp: "StepInputs") -> tuple[TensorPtr, TensorPtr, TensorPtr, TensorPtr]:
    """What both layouts share: attn_norm -> q [head_k, n_head, T] (q_lora or plain), the normed
    latent kv_cmpr [kv_lora, T] and the roped shared k_pe [n_rot, 1, T]; also the positions."""
    cfg, mla = trunk.cfg, trunk.cfg.mla
    assert mla is not None
    lw = lambda t, suffix="weight": trunk._lw(il, t, suffix)  # noqa: E731
    n_tok = int(x.contents.ne[1])
    g = inp.groups  # several sequences: each one's rows keep the kernels they get alone
    n_head, n_rot, kv_lora = cfg.n_head, cfg.rope_dims, mla.kv_lora_rank
    cur = trunk.norm(ctx, x, lw(T.ATTN_NORM))

    if lw(T.ATTN_Q) is not None:  # V2-Lite: no q compression
        q = trunk.matmul(ctx, lw(T.ATTN_Q), cur, g)
    else:
        q = trunk.norm(ctx, trunk.matmul(ctx, lw(T.ATTN_Q_A), cur, g), lw(T.ATTN_Q_A_NORM))
        q = trunk.matmul(ctx, lw(T.ATTN_Q_B), q, g)
    q = ctx.reshape_3d(q, mla.head_k, n_head, n_tok)  # [head_k, n_head, T]

    kv_cmpr_pe = trunk.matmul(ctx, lw(T.ATTN_KV_A_MQA), cur, g)  # [kv_lora + n_rot, T]
    stride = _row(kv_cmpr_pe, kv_lora + n_rot)
    kv_cmpr = ctx.view_2d(kv_cmpr_pe, kv_lora, n_tok, stride, 0)
    k_pe = ctx.view_3d(kv_cmpr_pe, n_rot, 1, n_tok, stride, stride, _row(kv_cmpr_pe, kv_lora))
    pos = ctx.from_numpy(inp.pos)
    k_pe = trunk.rope(ctx, k_pe, pos, il)
    kv_cmpr = trunk.norm(ctx, kv_cmpr, lw(T.ATTN_KV_A_NORM))
    return q, kv_cmpr, k_pe, pos


def mla_attention(trunk: "Trunk", ctx: Context, graph, il: int, x: TensorPtr, inp: "StepInputs") -> TensorPtr:
    """attn_norm -> q (q_lora or plain) and the compressed kv -> split RoPE -> absorbed MQA -> wo."""
    cfg, mla = trunk.cfg, trunk.cfg.mla
    assert mla is not None
    lw = lambda t, suffix="weight": trunk._lw(il, t, suffix)  # noqa: E731
    n_tok = int(x.contents.ne[1])
    g = inp.groups
    n_head, n_rot, kv_lora = cfg.n_head, cfg.rope_dims, mla.kv_lora_rank
    nope = mla.head_k - n_rot
    q, kv_cmpr, k_pe, pos = _q_and_latent(trunk, ctx, il, x, inp)

    qc = q.contents
    q_nope = ctx.view_3d(q, nope, n_head, n_tok, qc.nb[1], qc.nb[2], 0)
    q_pe = ctx.view_3d(q, n_rot, n_head, n_tok, qc.nb[1], qc.nb[2], _row(q, nope))
    q_pe = trunk.rope(ctx, q_pe, pos, il)
    q_nope = ctx.permute(q_nope, 0, 2, 1, 3)  # [nope, T, n_head]
    q_absorbed = ctx.permute(trunk.matmul(ctx, lw(T.ATTN_K_B), q_nope, g), 0, 2, 1, 3)  # [kv_lora, n_head, T]
    q_cur = ctx.concat(q_absorbed, q_pe, 0)  # rope last, as llama.cpp (its context shift ropes in place)
    kv_cmpr = ctx.reshape_3d(kv_cmpr, kv_lora, 1, n_tok)
    k_cur = ctx.concat(kv_cmpr, k_pe, 0)  # [kv_lora + n_rot, 1, T]
    v_cur = kv_cmpr

    for t in (q_cur, v_cur, k_cur):  # llama.cpp's expansion order
        lib.ggml_build_forward_expand(graph, t)
    kv = trunk.kv
    kc = kv.tensor(ctx, il, "k")
    row = cfg.n_embd_kv
    lib.ggml_build_forward_expand(graph, ctx.set_rows(kc, ctx.view_2d(k_cur, row, n_tok, k_cur.contents.nb[2], 0),
                                                      ctx.from_numpy(inp.kv_idx)))
    rs = lambda n: int(lib.ggml_row_size(int(kv.attn.type_k), n))  # noqa: E731
    kview = ctx.view_4d(kc, cfg.head_dim, 1, inp.n_kv, 1, rs(cfg.head_dim), rs(row), rs(row * kv.n_ctx), 0)
    kvc = kview.contents
    vview = ctx.view_4d(kc, kv_lora, 1, inp.n_kv, 1, kvc.nb[1], kvc.nb[2], kvc.nb[3], 0)
    out = trunk.attend_mha(ctx, q_cur, kview, vview, inp, v_mla=lw(T.ATTN_V_B), il=il)
    return trunk.matmul(ctx, lw(T.ATTN_OUT), out, g)


def mla_legacy_attention(trunk: "Trunk", ctx: Context, graph, il: int, x: TensorPtr, inp: "StepInputs") -> TensorPtr:
    """The legacy attn_kv_b layout (deepseek2.cpp's non-MLA branch): the latent is decompressed by
    attn_kv_b into per-head k_nope and V; K = k_nope + the shared k_pe repeated over the heads; Q
    roped on its trailing n_rot dims in place (ggml_rope_set_offset); then plain multi-head
    attention through the K and V caches (Trunk.attend_qkv), K heads nope + rope, V heads head_v wide."""
    cfg, mla = trunk.cfg, trunk.cfg.mla
    assert mla is not None
    n_tok = int(x.contents.ne[1])
    n_head, n_rot, head_v = cfg.n_head, cfg.rope_dims, mla.head_v
    nope = mla.head_k - n_rot
    q, kv_cmpr, k_pe, pos = _q_and_latent(trunk, ctx, il, x, inp)
    kv = trunk.matmul(ctx, trunk._lw(il, T.ATTN_KV_B), kv_cmpr, inp.groups)  # [n_head * (nope + v), T]
    head_row = _row(kv, nope + head_v)
    k_nope = ctx.view_3d(kv, nope, n_head, n_tok, head_row, head_row * n_head, 0)
    v_cur = ctx.cont(ctx.view_3d(kv, head_v, n_head, n_tok, head_row, head_row * n_head, _row(kv, nope)))
    q_cur = lib.ggml_rope_set_offset(trunk.rope(ctx, q, pos, il), nope)  # rope the trailing dims only
    k_cur = ctx.concat(k_nope, ctx.repeat_4d(k_pe, n_rot, n_head, n_tok, 1), 0)  # [nope + rope, n_head, T]
    return trunk.attend_qkv(ctx, graph, il, q_cur, k_cur, v_cur, inp)
