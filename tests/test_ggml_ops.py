"""edgemoe.ggml: every ggml op the engine builds graphs from, checked against float64 numpy.

Each test states its error bound and why. Notation: u32 = 2**-24 (unit roundoff of float32),
u16 = 2**-11 (of float16). "rel" is max|got - ref| / max|ref| unless said otherwise; where a
rounding-error bound can be written per element it is asserted per element, which is stronger.
Bounds are worst-case analyses (flash attention's F16 accumulator term is probabilistic, and
says so), so the measured errors (printed with `pytest -s`) mostly sit well below them.
Ops whose result is a copy or a single correctly rounded operation are checked bit for bit.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from edgemoe.ggml import Compute, Context, GGMLType, lib
from edgemoe.ggml.context import aligned_copy, aligned_empty, to_numpy
from edgemoe.ggml.lib import GGMLPrec

U32 = 2.0**-24
U16 = 2.0**-11
QBLOCK = 32  # Q8_0 / Q4_0 block size

QTYPES = {GGMLType.Q8_0: QT.Q8_0, GGMLType.Q4_0: QT.Q4_0}


# helpers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compute():
    c = Compute(2)
    yield c
    c.close()


@pytest.fixture(scope="module")
def compute1():
    c = Compute(1)
    yield c
    c.close()


@pytest.fixture
def ctx():
    with Context(16 << 20) as c:
        yield c


def run(compute: Compute, ctx: Context, *outs) -> None:
    g = ctx.graph(256)
    for o in outs:
        lib.ggml_build_forward_expand(g, o)
    compute.run(g)


def f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(f64(got) - ref)) / np.max(np.abs(ref)))


def check(name: str, err: float, tol: float) -> None:
    print(f"[{name}] max error {err:.3e} (bound {tol:.1e})")
    assert err <= tol, f"{name}: error {err:.3e} exceeds {tol:.1e}"


def check_elementwise(name: str, got: np.ndarray, ref: np.ndarray, bound: np.ndarray | float) -> float:
    """Assert |got - ref| <= bound element by element; report the largest fraction of the bound used."""
    err = np.abs(f64(got) - ref)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), err.shape)
    bad = err > bound
    assert not bad.any(), f"{name}: {bad.sum()} elements out of bound, worst {err[bad].max():.3e}"
    r = rel(got, ref)
    print(f"[{name}] rel {r:.3e}; max err/bound {np.max(err / np.maximum(bound, 1e-300)):.3f}")
    return r


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def quantize(w: np.ndarray, qtype: GGMLType) -> tuple[np.ndarray, np.ndarray]:
    """(aligned uint8 bytes ggml reads, their float32 dequantization) for float32 weights w."""
    q = gguf.quants.quantize(w.astype(np.float32), QTYPES[qtype])
    return aligned_copy(q), gguf.quants.dequantize(q, QTYPES[qtype])


def q8_act_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Bound on |ggml - x @ w.T| for a quantized mat-vec whose activations ggml rounds to Q8_0.

    ggml's CPU kernels for Q8_0/Q4_0 weights quantize each 32-value block of an activation row
    to Q8_0: q = round(x / d), d = amax/127, d stored as float16. Per element the rounding error
    is <= d/2 = amax/254 and the float16 scale adds <= 127 * d * u16 = amax * u16, so
    |dx_j| <= amax_b * (1/254 + u16) for j in block b, and the dot product moves by at most
    sum_b amax_b * (1/254 + u16) * sum_{j in b} |w_j|. The float32 accumulation adds
    K * u32 * sum_j |x_j w_j| on top (a loose worst case; 2x is a margin for the float32 products
    of the block scales). x: [..., K], w: [N, K] dequantized; returns [..., N].
    """
    k = x.shape[-1]
    xb = np.abs(f64(x)).reshape(*x.shape[:-1], k // QBLOCK, QBLOCK).max(axis=-1)  # [..., B]
    wb = np.abs(f64(w)).reshape(w.shape[0], k // QBLOCK, QBLOCK).sum(axis=-1)  # [N, B]
    act = xb @ wb.T * (1 / 254 + U16)
    acc = np.abs(f64(x)) @ np.abs(f64(w)).T * (k * U32)
    return 2.0 * (act + acc)


def q8_roundtrip(x: np.ndarray) -> np.ndarray:
    """x as ggml sees it after quantizing activations to Q8_0 (gguf's bit-exact reference)."""
    return gguf.quants.dequantize(gguf.quants.quantize(x.astype(np.float32), QT.Q8_0), QT.Q8_0)


# the binding itself ----------------------------------------------------------------------------
def test_import_and_version() -> None:
    import edgemoe.ggml as g

    assert g.lib is lib
    assert lib.ggml_version() == b"0.25.3"
    assert lib.ggml_type_size(GGMLType.Q8_0) == 34 and lib.ggml_blck_size(GGMLType.Q8_0) == 32
    assert lib.ggml_type_size(GGMLType.Q4_0) == 18 and lib.ggml_row_size(GGMLType.Q4_0, 64) == 36


def test_external_rejects_misaligned_address(ctx: Context) -> None:
    buf = aligned_empty(256, np.uint8)
    for off in (1, 4, 16):
        with pytest.raises(ValueError, match="aligned"):
            ctx.external(buf.ctypes.data + off, GGMLType.F32, 8)
    t = ctx.external(buf.ctypes.data + 32, GGMLType.F32, 8, owner=buf)
    assert t.contents.data == buf.ctypes.data + 32
    x = aligned_copy(np.arange(9, dtype=np.float32))
    with pytest.raises(ValueError):
        ctx.from_numpy(x[1:])  # contiguous but 4 bytes past an aligned address
    with pytest.raises(ValueError):
        ctx.from_numpy(aligned_copy(np.zeros((4, 4), np.float32))[:, ::2])  # not C-contiguous


def test_to_numpy_of_strided_views(ctx: Context) -> None:
    a = aligned_copy(np.arange(6 * 10, dtype=np.float32).reshape(6, 10))
    ta = ctx.from_numpy(a)
    nb1 = ta.contents.nb[1]
    # rows 1, 3, 5, columns 2..5: stride two rows, offset one row plus two elements
    v = ctx.view_2d(ta, 4, 3, 2 * nb1, nb1 + 2 * 4)
    assert not lib.ggml_is_contiguous(v)
    np.testing.assert_array_equal(to_numpy(v), a[1::2, 2:6])
    # a permuted (non-contiguous) 3-D view
    b = aligned_copy(np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4))
    p = ctx.permute(ctx.from_numpy(b), 0, 2, 1, 3)
    np.testing.assert_array_equal(to_numpy(p), b.transpose(1, 0, 2))
    # 1-dims are dropped at the end only (ggml_n_dims), kept in the middle
    c = aligned_copy(np.arange(5, dtype=np.float32).reshape(5, 1, 1))
    assert to_numpy(ctx.reshape_3d(ctx.from_numpy(c.reshape(5)), 1, 1, 5)).shape == (5, 1, 1)
    assert to_numpy(ctx.from_numpy(c.reshape(5, 1))).shape == (5, 1)
    # the argsort_top_k view (a strided result) is tested in test_argsort_top_k


# normalisation and element-wise ops ------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 256), (3, 4, 64)], ids=["rows", "per_head"])
def test_rms_norm_mul(ctx: Context, compute: Compute, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 30, shape[:-1] + (1,)).astype(np.float32)
    w = (1 + 0.5 * rng.standard_normal(shape[-1])).astype(np.float32)
    eps = 1e-6
    out = ctx.mul(ctx.rms_norm(ctx.from_numpy(aligned_copy(x)), eps), ctx.from_numpy(aligned_copy(w)))
    run(compute, ctx, out)
    xd = f64(x)
    ref = xd / np.sqrt(np.mean(xd * xd, axis=-1, keepdims=True) + eps) * f64(w)
    # ggml squares in float32 (u32 each), sums in double, then mean (u32), + eps (u32), sqrtf
    # (halves the argument's ~3 u32, adds u32), the reciprocal (u32), y = x * scale (u32) and
    # y * w (u32): <= 6.5 u32 relative per element; asserted 8 u32 * |ref| element-wise.
    check_elementwise("rms_norm*w", to_numpy(out), ref, 8 * U32 * np.abs(ref))


def test_silu(ctx: Context, compute: Compute) -> None:
    rng = np.random.default_rng(2)
    x = np.concatenate([np.linspace(-30, 30, 257), rng.standard_normal(511) * 4]).astype(np.float32)
    out = ctx.silu(ctx.from_numpy(aligned_copy(x)))
    run(compute, ctx, out)
    xd = f64(x)
    ref = xd / (1 + np.exp(-xd))
    # x / (1 + expf(-x)): ggml's vectorised expf is accurate to a few ulp; with the add and the
    # division the element-wise relative error stays below 1e-6 (~17 u32).
    check_elementwise("silu", to_numpy(out), ref, 1e-6 * np.abs(ref))


def test_swiglu_split(ctx: Context, compute: Compute) -> None:
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((3, 96)) * 3).astype(np.float32)  # gate
    b = rng.standard_normal((3, 96)).astype(np.float32)  # up
    out = ctx.swiglu_split(ctx.from_numpy(aligned_copy(a)), ctx.from_numpy(aligned_copy(b)))
    run(compute, ctx, out)
    ad = f64(a)
    ref = ad / (1 + np.exp(-ad)) * f64(b)  # silu(a) * b: the first argument is the gate
    # silu as above (1e-6) plus one more rounded product.
    check_elementwise("swiglu_split", to_numpy(out), ref, 1e-6 * np.abs(ref))


def test_add_and_mul_broadcast(ctx: Context, compute: Compute) -> None:
    rng = np.random.default_rng(4)
    n, k, t = 40, 3, 5
    h = aligned_copy(rng.standard_normal((t, n)).astype(np.float32))
    bias = aligned_copy(rng.standard_normal(n).astype(np.float32))
    experts = aligned_copy(rng.standard_normal((t, k, n)).astype(np.float32))  # ne [n, k, T]
    weights = aligned_copy(rng.uniform(0, 1, (t, k, 1)).astype(np.float32))  # ne [1, k, T]
    added = ctx.add(ctx.from_numpy(h), ctx.from_numpy(bias))  # [n, T] + [n]
    weighted = ctx.mul(ctx.from_numpy(experts), ctx.from_numpy(weights))  # [n,k,T] * [1,k,T]
    # moe_combine: slot views of `weighted` (row stride nb[2]) added in rank order
    c = weighted.contents
    views = [ctx.view_2d(weighted, n, t, c.nb[2], i * c.nb[1]) for i in range(k)]
    combined = ctx.add(ctx.add(views[0], views[1]), views[2])
    run(compute, ctx, added, weighted, combined)
    # one correctly rounded float32 add / mul per element: |err| <= u32 * |exact result|.
    ref_add = f64(h) + f64(bias)
    check_elementwise("add bcast", to_numpy(added), ref_add, U32 * np.abs(ref_add))
    ref_mul = f64(experts) * f64(weights)
    check_elementwise("mul bcast", to_numpy(weighted), ref_mul, U32 * np.abs(ref_mul))
    # the sum of three rounded products in two rounded adds: <= 2 u32 * sum |terms| (+ products).
    ref_comb = ref_mul.sum(axis=1)
    check_elementwise("add strided views", to_numpy(combined), ref_comb, 3 * U32 * np.abs(ref_mul).sum(axis=1))


def test_div_sum_rows_clamp(ctx: Context, compute: Compute) -> None:
    rng = np.random.default_rng(5)
    k, t = 6, 7
    w = rng.uniform(0, 1, (t, k)).astype(np.float32)
    w[3] = 1e-7  # a row whose sum falls below the clamp minimum
    w[4, :] = [1e-9, 0, 0, 0, 0, 0]
    lo = 6.103515625e-5  # trunk's _WEIGHT_SUM_MIN
    tw = ctx.from_numpy(aligned_copy(w))
    total = ctx.sum_rows(tw)  # [1, T]
    clamped = ctx.clamp(total, lo, float("inf"))
    normed = ctx.div(tw, clamped)  # [k, T] / [1, T]
    x = aligned_copy(np.linspace(-5, 5, 101).astype(np.float32))
    clamped2 = ctx.clamp(ctx.from_numpy(x), -1.5, 2.25)
    run(compute, ctx, total, normed, clamped2)
    wd = f64(w)
    ref_sum = wd.sum(axis=1, keepdims=True)
    # a sum of k non-negative terms in float32: |err| <= (k - 1) u32 * sum.
    check_elementwise("sum_rows", to_numpy(total), ref_sum, (k - 1) * U32 * ref_sum)
    got_sum = f64(to_numpy(total))
    # clamp is exact: max(min(x, hi), lo) of float32 values
    np.testing.assert_array_equal(to_numpy(clamped), np.clip(to_numpy(total), lo, np.inf))
    np.testing.assert_array_equal(to_numpy(clamped2), np.clip(x, -1.5, 2.25))
    assert to_numpy(clamped)[3, 0] == np.float32(lo) and to_numpy(clamped)[4, 0] == np.float32(lo)
    # division of float32 by the float32 clamped sum: one correctly rounded op, <= u32 relative;
    # measured against the float64 quotient of the same float32 operands.
    ref_div = wd / np.maximum(got_sum, np.float32(lo))
    check_elementwise("div bcast", to_numpy(normed), ref_div, U32 * np.abs(ref_div))


def test_scale(ctx: Context, compute: Compute) -> None:
    rng = np.random.default_rng(19)
    w = aligned_copy(rng.uniform(0, 1, (5, 4, 1)).astype(np.float32))  # router weights [1, k, T]
    out = ctx.scale(ctx.from_numpy(w), 2.5)
    run(compute, ctx, out)
    ref = f64(w) * 2.5
    # one correctly rounded float32 product per element
    check_elementwise("scale", to_numpy(out), ref, U32 * np.abs(ref))


def test_soft_max(ctx: Context, compute: Compute) -> None:
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((6, 64)) * 4).astype(np.float32)
    out = ctx.soft_max(ctx.from_numpy(aligned_copy(x)))
    run(compute, ctx, out)
    xd = f64(x)
    e = np.exp(xd - xd.max(axis=1, keepdims=True))
    ref = e / e.sum(axis=1, keepdims=True)
    # exp(x - max): the float32 subtraction rounds by <= u32 |x - max| (absolute), which exp turns
    # into a relative error of u32 |x - max|; expf adds a few ulp, the double sum and the scale
    # by 1/sum one u32 each. Per element: (|x - max| + 8) u32 relative.
    bound = (np.abs(xd - xd.max(axis=1, keepdims=True)) + 8) * U32 * ref
    check_elementwise("soft_max", to_numpy(out), ref, bound)
    np.testing.assert_allclose(to_numpy(out).sum(axis=1, dtype=np.float64), 1.0, rtol=1e-6)


def test_argsort_top_k(ctx: Context, compute: Compute) -> None:
    rng = np.random.default_rng(7)
    t, n_exp, k = 5, 16, 4
    x = np.stack([rng.permutation(n_exp) for _ in range(t)]).astype(np.float32)
    x += rng.uniform(0, 0.5, x.shape).astype(np.float32)  # distinct values: no ties
    tx = ctx.from_numpy(aligned_copy(x))
    top = ctx.argsort_top_k(tx, k)
    # trunk.router: the selected experts' probabilities gathered with get_rows over [1, E, T]
    picked = ctx.get_rows(ctx.reshape_3d(tx, 1, n_exp, t), top)
    run(compute, ctx, top, picked)
    c = top.contents
    assert c.type == GGMLType.I32 and tuple(c.ne)[:2] == (k, t)
    assert c.nb[1] == 4 * n_exp and not lib.ggml_is_contiguous(top)  # a strided view of the full sort
    ids = to_numpy(top)
    assert ids.shape == (t, k)
    ref = np.argsort(-x, axis=1, kind="stable")[:, :k]  # the k largest, descending
    np.testing.assert_array_equal(ids, ref)
    vals = np.take_along_axis(x, ids, axis=1)
    assert (np.diff(vals, axis=1) < 0).all()
    # get_rows of F32 is a copy: bit-exact
    np.testing.assert_array_equal(to_numpy(picked).reshape(t, k), vals)


# matrix products -------------------------------------------------------------------------------
def test_mul_mat_f32(ctx: Context, compute: Compute) -> None:
    rng = np.random.default_rng(8)
    n, kdim, t = 48, 256, 3
    w = rng.standard_normal((n, kdim)).astype(np.float32)  # ne [K, N]
    x = rng.standard_normal((t, kdim)).astype(np.float32)  # ne [K, T]
    out = ctx.mul_mat(ctx.from_numpy(aligned_copy(w)), ctx.from_numpy(aligned_copy(x)))
    run(compute, ctx, out)
    assert tuple(out.contents.ne)[:2] == (n, t)
    ref = f64(x) @ f64(w).T
    # float32 dot products of length K: |err| <= K u32 sum_j |x_j w_j| (Higham's gamma_K, to
    # first order); with SIMD partial sums the real error is far smaller. Norm-wise: <= 1e-6.
    r = check_elementwise("mul_mat f32", to_numpy(out), ref, kdim * U32 * (np.abs(f64(x)) @ np.abs(f64(w)).T))
    check("mul_mat f32 rel", r, 1e-6)


@pytest.mark.parametrize("qtype", [GGMLType.Q8_0, GGMLType.Q4_0], ids=["q8_0", "q4_0"])
def test_mul_mat_quantized(ctx: Context, compute: Compute, qtype: GGMLType) -> None:
    rng = np.random.default_rng(9)
    n, kdim, t = 64, 256, 3
    w = rng.standard_normal((n, kdim)).astype(np.float32)
    x = rng.standard_normal((t, kdim)).astype(np.float32)
    x[1] *= 50  # a differently scaled row: the Q8 activation scale is per 32-value block
    wq, wd = quantize(w, qtype)
    assert wq.shape == (n, lib.ggml_row_size(qtype, kdim))
    tw = ctx.external(wq.ctypes.data, qtype, kdim, n, owner=wq)
    out = ctx.mul_mat(tw, ctx.from_numpy(aligned_copy(x)))
    run(compute, ctx, out)
    got = to_numpy(out)
    # Reference: numpy on the dequantized weights (the weights are what they are; their own
    # quantization error is not ggml's). The remaining error comes from the Q8_0 rounding of the
    # activations, bounded per element by q8_act_bound (see there).
    ref = f64(x) @ f64(wd).T
    r = check_elementwise(f"mul_mat {qtype.name}", got, ref, q8_act_bound(x, wd))
    # Typical size: the rounding error of an element is ~uniform in +-d/2, std amax/(127 sqrt 12)
    # ~ 4.5e-3 sigma_x for a block of 32 normals, so the dot products err by ~4.5e-3 of their own
    # spread; max|err| / max|ref| comes out ~5e-3. Asserted: < 1e-2 (the brief's Q8 tolerance),
    # and > 1e-5: zero error would mean the kernel kept F32 activations and this model is wrong.
    check(f"mul_mat {qtype.name} rel", r, 1e-2)
    assert r > 1e-5
    # And the error is exactly the activation rounding: against numpy on Q8_0-rounded activations
    # only float32 accumulation remains (block sums are exact integers, scaled in float32):
    # K u32 sum |x w| element-wise, ~1e-6 norm-wise.
    ref_q = f64(q8_roundtrip(x)) @ f64(wd).T
    rq = check_elementwise(f"mul_mat {qtype.name} vs q8(x)", got, ref_q,
                           kdim * U32 * (np.abs(f64(x)) @ np.abs(f64(wd)).T))
    check(f"mul_mat {qtype.name} vs q8(x) rel", rq, 1e-5)


@pytest.mark.parametrize("qtype", [GGMLType.F32, GGMLType.Q8_0, GGMLType.Q4_0], ids=["f32", "q8_0", "q4_0"])
@pytest.mark.parametrize("per_slot", [False, True], ids=["b_bcast", "b_per_slot"])
def test_mul_mat_id(ctx: Context, compute: Compute, compute1: Compute, qtype: GGMLType, per_slot: bool) -> None:
    """Stacked experts [K, N, E] vs one expert at a time as a [K, N, 1] tensor with ids all zero.

    b_bcast: one input row per token shared by its k experts (gate/up: b is [K, 1, T]);
    b_per_slot: one input row per (token, slot) (down: b is [K, k, T]).
    """
    rng = np.random.default_rng(10 + int(per_slot))
    n_exp, kdim, n, t, k = 4, 64, 32, 6, 2
    w = rng.standard_normal((n_exp, n, kdim)).astype(np.float32)  # ne [K, N, E]
    if qtype == GGMLType.F32:
        wq, wd = aligned_copy(w), w
        row_bytes = 4 * kdim
    else:
        wq, wd = quantize(w, qtype)
        row_bytes = lib.ggml_row_size(qtype, kdim)
    assert wq.nbytes == n_exp * n * row_bytes
    x = rng.standard_normal((t, k if per_slot else 1, kdim)).astype(np.float32)  # ne [K, 1|k, T]
    ids = np.array([[0, 2], [1, 0], [2, 3], [2, 0], [3, 1], [0, 2]], dtype=np.int32)  # ne [k, T]
    assert ids.shape == (t, k)

    tw = ctx.external(wq.ctypes.data, qtype, kdim, n, n_exp, owner=wq)
    out = ctx.mul_mat_id(tw, ctx.from_numpy(aligned_copy(x)), ctx.from_numpy(aligned_copy(ids)))
    run(compute, ctx, out)
    stacked = to_numpy(out).copy()
    assert stacked.shape == (t, k, n)

    rows = lambda ti, s: x[ti, s if per_slot else 0]  # noqa: E731
    ref = np.stack([np.stack([f64(wd[ids[ti, s]]) @ f64(rows(ti, s)) for s in range(k)]) for ti in range(t)])
    xs = np.stack([np.stack([rows(ti, s) for s in range(k)]) for ti in range(t)])  # [T, k, K]
    if qtype == GGMLType.F32:
        bound = np.stack([[kdim * U32 * (np.abs(f64(wd[ids[ti, s]])) @ np.abs(f64(xs[ti, s])))
                           for s in range(k)] for ti in range(t)])
        r = check_elementwise("mul_mat_id f32", stacked, ref, bound)
        check("mul_mat_id f32 rel", r, 1e-6)
    else:  # same analysis as test_mul_mat_quantized
        bound = np.stack([[q8_act_bound(xs[ti, s][None], wd[ids[ti, s]])[0] for s in range(k)] for ti in range(t)])
        r = check_elementwise(f"mul_mat_id {qtype.name}", stacked, ref, bound)
        check(f"mul_mat_id {qtype.name} rel", r, 1e-2)
        assert r > 1e-5

    # One expert at a time, as edgemoe's expert workers run it: the expert's weights alone (its
    # own aligned buffer, like a shard file), the tokens routed to it, ids all zero, and another
    # thread count. The result must be the stacked result's rows, bit for bit.
    for e in range(n_exp):
        sel = np.argwhere(ids == e)  # (token, slot) pairs routed to e
        assert len(sel)
        we = aligned_copy(wq[e])
        xe = aligned_copy(np.stack([rows(ti, s) for ti, s in sel])[:, None, :])  # ne [K, 1, n_e]
        ide = aligned_copy(np.zeros((len(sel), 1), np.int32))  # ne [1, n_e]
        with Context(4 << 20) as c1:
            te = c1.external(we.ctypes.data, qtype, kdim, n, 1, owner=we)
            oe = c1.mul_mat_id(te, c1.from_numpy(xe), c1.from_numpy(ide))
            run(compute1, c1, oe)
            single = to_numpy(oe).reshape(len(sel), n).copy()
        expected = stacked[sel[:, 0], sel[:, 1]]
        assert np.array_equal(bits(single), bits(expected)), f"expert {e}: single-expert result differs"


# rows ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("src_type", [GGMLType.F32, GGMLType.Q8_0], ids=["f32", "q8_0"])
def test_get_rows(ctx: Context, compute: Compute, src_type: GGMLType) -> None:
    rng = np.random.default_rng(12)
    n_rows, kdim = 10, 64
    table = rng.standard_normal((n_rows, kdim)).astype(np.float32)  # ne [K, n_rows]
    idx = aligned_copy(np.array([3, 0, 9, 3, 7], dtype=np.int32))
    if src_type == GGMLType.F32:
        data, deq = aligned_copy(table), table
    else:
        data, deq = quantize(table, src_type)
    tt = ctx.external(data.ctypes.data, src_type, kdim, n_rows, owner=data)
    out = ctx.get_rows(tt, ctx.from_numpy(idx))
    run(compute, ctx, out)
    got = to_numpy(out)
    assert got.dtype == np.float32 and got.shape == (len(idx), kdim)
    # F32: a copy; Q8_0: each value is int8 * float(fp16 scale), one exact float32 product, the
    # same one gguf's dequantize computes. Both are bit-exact (tolerance 0).
    np.testing.assert_array_equal(got, deq[idx])
    if src_type != GGMLType.F32:  # and the Q8_0 rows are the table within Q8_0's own rounding
        amax = np.abs(table).reshape(n_rows, -1, QBLOCK).max(axis=-1).repeat(QBLOCK, axis=1)
        check_elementwise("get_rows q8_0 vs f32 table", got, f64(table[idx]), amax[idx] * (1 / 254 + U16))


def test_set_rows(ctx: Context, compute: Compute) -> None:
    rng = np.random.default_rng(13)
    hd, n_head_kv, t, n_ctx = 8, 3, 4, 16
    n_embd_kv = hd * n_head_kv
    cache = aligned_copy(np.full((n_ctx, n_embd_kv), -7.0, np.float32))
    before = cache.copy()
    k = aligned_copy(rng.standard_normal((t, n_head_kv, hd)).astype(np.float32))  # ne [hd, n_head_kv, T]
    idx = aligned_copy(np.array([5, 0, 11, 15], dtype=np.int64))
    tk = ctx.from_numpy(k)
    src = ctx.view_2d(tk, n_embd_kv, t, tk.contents.nb[2], 0)  # as trunk.attention does
    out = ctx.set_rows(ctx.from_numpy(cache), src, ctx.from_numpy(idx))
    run(compute, ctx, out)
    expected = before.copy()
    expected[idx] = k.reshape(t, n_embd_kv)
    np.testing.assert_array_equal(cache, expected)  # written in place, bit-exact, other rows untouched
    assert out.contents.data == cache.ctypes.data


# layout and type conversion --------------------------------------------------------------------
def test_cast_f32_to_f16(ctx: Context, compute: Compute) -> None:
    rng = np.random.default_rng(14)
    x = np.concatenate([
        rng.standard_normal(200) * 1000,
        rng.standard_normal(100) * 1e-6,  # float16 subnormals
        [0.0, -0.0, 65504.0, 65519.0, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 2**-25],  # max, rounding ties
    ]).astype(np.float32)
    out = ctx.cast(ctx.from_numpy(aligned_copy(x)), GGMLType.F16)
    run(compute, ctx, out)
    got = to_numpy(out)
    assert got.dtype == np.float16
    # round-to-nearest-even in both: bit-exact with numpy's conversion
    assert np.array_equal(bits(got), bits(x.astype(np.float16)))
    # and within float16 rounding of the float64 value (normal range): <= u16 relative
    normal = np.abs(x) >= 2**-14
    check_elementwise("cast f16 (normal range)", got[normal], f64(x[normal]), U16 * np.abs(f64(x[normal])))


def test_permute_cont_and_cast_of_permuted(ctx: Context, compute: Compute) -> None:
    rng = np.random.default_rng(15)
    a = aligned_copy(rng.standard_normal((5, 3, 8)).astype(np.float32))  # ne [8, 3, 5]
    ta = ctx.from_numpy(a)
    p = ctx.permute(ta, 0, 2, 1, 3)  # ne [8, 5, 3]
    assert tuple(p.contents.ne)[:3] == (8, 5, 3)
    cont = ctx.cont(p)
    kp = ctx.cast(p, GGMLType.F16)  # trunk: cast(permute(kview)) for flash attention
    run(compute, ctx, cont, kp)
    assert lib.ggml_is_contiguous(cont) and lib.ggml_is_contiguous(kp)
    np.testing.assert_array_equal(to_numpy(cont), a.transpose(1, 0, 2))
    assert np.array_equal(bits(to_numpy(kp)), bits(a.transpose(1, 0, 2).astype(np.float16)))


# rope ------------------------------------------------------------------------------------------
def rope_ref(x: np.ndarray, pos: np.ndarray, n_dims: int, mode: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """(rotated x, per-element error bound) for x [T, n_head, hd] at positions pos [T]."""
    xd = f64(x)
    out = xd.copy()
    bound = np.zeros_like(xd)
    half = n_dims // 2
    i = np.arange(half)
    theta = pos[:, None].astype(np.float64) * base ** (-2.0 * i / n_dims)  # [T, half]
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    if mode == 0:  # NORM: adjacent pairs (2i, 2i+1)
        j0, j1 = 2 * i, 2 * i + 1
    else:  # NEOX: halves (i, i + n_dims/2)
        j0, j1 = i, i + half
    x0, x1 = xd[..., j0], xd[..., j1]
    out[..., j0] = x0 * c - x1 * s
    out[..., j1] = x0 * s + x1 * c
    # ggml forms theta_i = pos * theta_scale^i by i float32 multiplications from
    # theta_scale = powf(base, -2/n_dims) (<= 1 ulp), so theta_i carries a relative error of at
    # most (2i + 2) u32, i.e. an absolute angle error of theta_i (2i + 2) u32; cosf/sinf and the
    # two products and one add cost a few u32 more. A rotation error of d radians moves the pair
    # by d * |(x0, x1)|. Bound (2x margin): |(x0, x1)| * (theta_i (2i + 2) + 6) u32 * 2.
    r = np.hypot(x0, x1)
    b = 2 * r * ((theta * (2 * i + 2))[:, None, :] + 6) * U32
    bound[..., j0] = b
    bound[..., j1] = b
    return out, bound


@pytest.mark.parametrize("mode", [0, 2], ids=["norm", "neox"])
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
def test_rope_ext(ctx: Context, compute: Compute, mode: int, partial: bool) -> None:
    rng = np.random.default_rng(16 + mode)
    hd, n_head = 64, 3
    n_dims = hd // 2 if partial else hd
    pos = aligned_copy(np.array([0, 1, 3, 17, 100, 513], dtype=np.int32))
    t = len(pos)
    x = aligned_copy(rng.standard_normal((t, n_head, hd)).astype(np.float32))  # ne [hd, n_head, T]
    base = 10000.0
    out = ctx.rope_ext(ctx.from_numpy(x), ctx.from_numpy(pos), None, n_dims, mode, 4096, base, 1.0, 0.0, 1.0, 32.0, 1.0)
    run(compute, ctx, out)
    got = to_numpy(out)
    ref, bound = rope_ref(x, pos, n_dims, mode, base)
    np.testing.assert_array_equal(got[..., n_dims:], x[..., n_dims:])  # dims past n_dims pass through
    np.testing.assert_array_equal(got[0], x[0])  # position 0: identity
    r = check_elementwise(f"rope mode {mode} n_dims {n_dims}", got, ref, bound)
    # norm-wise: the largest angles (513 rad) carry ~513 * u32 ~ 3e-5 of representation error.
    check(f"rope mode {mode} n_dims {n_dims} rel", r, 1e-4)
    if mode == 2:  # the two modes really differ (pairing matters)
        other, _ = rope_ref(x, pos, n_dims, 0, base)
        assert rel(got, other) > 0.1


# attention -------------------------------------------------------------------------------------
def attention_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float) -> np.ndarray:
    """softmax(q k^T * scale + mask) v in float64. q [T, H, D], k/v [n_kv, H_kv, D], mask [T, n_kv]."""
    t, n_head, _ = q.shape
    group = n_head // k.shape[1]  # GQA: query heads h share KV head h // group
    out = np.empty((t, n_head, v.shape[2]))
    for h in range(n_head):
        s = f64(q[:, h]) @ f64(k[:, h // group]).T * scale + mask
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ f64(v[:, h // group])
    return out


# ggml's CPU kernel has three paths: T >= 64 rows "tiled" (Q stays F32, F16 K/V widened to F32,
# F32 accumulation); otherwise one K/V row at a time ("vec": Q rounded to F16 for the F16 dot
# product, V*softmax accumulated in an F16 vector, ggml_prec_set_acc(F32) notwithstanding); and for
# decode (T = 1) over >= 512 cells the vec path on KV chunks per thread, merged in F32 ("split_kv").
@pytest.mark.parametrize("t,n_kv", [(5, 37), (1, 37), (1, 600), (64, 100)], ids=["vec", "decode", "split_kv", "tiled"])
def test_flash_attn_ext_gqa(ctx: Context, compute: Compute, t: int, n_kv: int) -> None:
    rng = np.random.default_rng(18 + t + n_kv)
    hd, n_head, n_head_kv = 64, 4, 2
    n_ctx = n_kv + 11  # the cache is longer than the attended window, as in trunk.attention
    n_embd_kv = hd * n_head_kv
    scale = 1.0 / np.sqrt(hd)
    q_np = aligned_copy((rng.standard_normal((t, n_head, hd)) * 1.5).astype(np.float32))  # ne [hd, n_head, T]
    kc = aligned_copy(np.zeros((n_ctx, n_embd_kv), np.float32))  # F32 caches, first n_kv rows used
    vc = aligned_copy(np.zeros((n_ctx, n_embd_kv), np.float32))
    kc[:n_kv] = rng.standard_normal((n_kv, n_embd_kv)) * 1.5
    vc[:n_kv] = rng.standard_normal((n_kv, n_embd_kv))
    # mask [T, n_kv]: causal for positions n_kv-T .. n_kv-1; cells 3 and 10 belong to another
    # sequence (masked for every token) and hold a huge V, so any leak through the mask would show.
    p = np.arange(n_kv - t, n_kv)
    visible = np.arange(n_kv)[None, :] <= p[:, None]
    visible[:, [3, 10]] = False
    vc[[3, 10]] = 1000.0
    mask = aligned_copy(np.where(visible, 0.0, -np.inf).astype(np.float16))

    # the graph exactly as trunk.attention builds it
    q = ctx.from_numpy(q_np)
    qc = q.contents
    q4 = ctx.permute(ctx.view_4d(q, hd, n_head, t, 1, qc.nb[1], qc.nb[2], qc.nb[2] * t, 0), 0, 2, 1, 3)
    row = 4 * hd
    tk, tv = ctx.from_numpy(kc), ctx.from_numpy(vc)
    kview = ctx.view_4d(tk, hd, n_head_kv, n_kv, 1, row, 4 * n_embd_kv, 4 * n_embd_kv * n_ctx, 0)
    vview = ctx.view_4d(tv, hd, n_head_kv, n_kv, 1, row, 4 * n_embd_kv, 4 * n_embd_kv * n_ctx, 0)
    kp = ctx.cast(ctx.permute(kview, 0, 2, 1, 3), GGMLType.F16)
    vp = ctx.cast(ctx.permute(vview, 0, 2, 1, 3), GGMLType.F16)
    att = ctx.flash_attn_ext(q4, kp, vp, ctx.from_numpy(mask), float(scale), 0.0, 0.0)
    lib.ggml_flash_attn_ext_set_n_kv_max(att, 0)
    assert lib.ggml_prec_set_acc(att, GGMLPrec.F32)
    run(compute, ctx, att)
    assert tuple(att.contents.ne) == (hd, n_head, t, 1)  # permuted result: [hd, n_head, T]
    got = to_numpy(att).reshape(t, n_head, hd)

    K = kc[:n_kv].reshape(n_kv, n_head_kv, hd)
    V = vc[:n_kv].reshape(n_kv, n_head_kv, hd)
    m64 = np.where(visible, 0.0, -np.inf)
    ref = attention_ref(q_np, K, V, m64, scale)
    name = f"flash_attn_ext T={t} n_kv={n_kv}"

    # Bound (per output row t, h). Q, K, V are rounded to F16 (relative u16 each), so every logit
    # moves by at most eps = scale * max_j sum_d |q_d k_jd| * (2 u16 + u16^2 + F32 dot rounding,
    # 2.1 u16 in all). Logit changes of at most eps change each softmax weight by a factor within
    # e^(+-2 eps), i.e. the weights move by <= e^(2 eps) - 1 in 1-norm, so the output moves by
    # <= (e^(2 eps) - 1) vmax; F16 V adds u16 vmax (vmax: the largest |v| among visible cells).
    # The vec paths round their F16 accumulator after every one of the <= 2 n_vis updates (add,
    # rescale); by Higham & Mary's probabilistic bound (lambda = 5: holds with probability
    # >= 1 - 1e-5 per element) that adds <= lambda sqrt(2 n_vis) u16 vmax.
    group = n_head // n_head_kv
    n_vis = visible.sum(axis=1)  # [T]
    vmax = np.abs(f64(V)[visible.any(axis=0)]).max()
    qk = np.stack([np.where(visible, np.abs(f64(q_np[:, h])) @ np.abs(f64(K[:, h // group])).T * scale, 0).max(axis=1)
                   for h in range(n_head)], axis=1)[:, :, None]  # [T, H, 1]: max_j scale sum_d |q_d k_jd|
    acc16 = 5 * np.sqrt(2 * n_vis)[:, None, None] * U16  # F16 accumulator (vec paths)
    bound = vmax * (np.expm1(2 * qk * 2.1 * U16) + U16 + acc16)
    r = check_elementwise(name, got, ref, bound)
    # Norm-wise that is ~1e-3: below 1e-2, and not zero (F16 K/V really are used; an all-F32
    # kernel would be ~1e-7 here).
    check(name + " rel", r, 1e-2)
    assert r > 1e-5
    # The F16 rounding accounts for the error. Tiled: against the reference on F16-rounded K/V
    # only F32 accumulation is left (~1e-6 norm-wise). Vec paths: against F16-rounded Q/K/V only
    # the F16 accumulator (acc16) and F32 rounding of the logits (<= (hd + 4) u32 relative to
    # scale sum |q k|, same softmax argument) and of exp/sum/scale (a few u32) are left.
    h16 = lambda a: a.astype(np.float16)  # noqa: E731
    if t >= 64:
        check(name + " vs f16 K/V rel", rel(got, attention_ref(q_np, h16(K), h16(V), m64, scale)), 1e-5)
    else:
        ref16 = attention_ref(h16(q_np), h16(K), h16(V), m64, scale)
        check_elementwise(name + " vs f16 Q/K/V", got, ref16,
                          vmax * (acc16 + np.expm1(2 * qk * (hd + 4) * U32) + 8 * U32))
