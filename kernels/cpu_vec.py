"""LLVM vector IR for the CPU stats pass: the fused per-sub-block reductions of ``kernels.cpu``.

Numba's loop vectorizer refuses a float reduction without ``reassoc`` (which would let the
summation order depend on the target's vector width) and its SLP vectorizer is off, so the
sums are written here as explicit ``<8 x double>`` IR with a fixed order: 16 lanes, two
registers per sum, folded in halves. ``_fused`` adds the integer fields in the same pass.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

#: interleaved float accumulators in a sub-block (two 8-wide vectors per sum)
LANES = 16


def _vec_sums_codegen(context, builder, sig, args):
    """IR of ``_vsums``: 16 lanes in two ``<8 x double>`` registers per sum, no fast-math flags."""
    arrs = [context.make_array(ty)(context, builder, a) for ty, a in zip(sig.args, args)]
    vec = ir.VectorType(ir.DoubleType(), 8)
    pb, pt = (builder.bitcast(a.data, vec.as_pointer()) for a in arrs)
    accs = [cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(8)]
    nitems = arrs[0].nitems
    groups = builder.sdiv(nitems, ir.Constant(nitems.type, LANES))
    with cgutils.for_range(builder, groups) as loop:
        first = builder.mul(loop.index, ir.Constant(loop.index.type, 2))
        for half in range(2):   # elements 16g .. 16g+7 in register 0, 16g+8 .. 16g+15 in register 1
            at = builder.add(first, ir.Constant(first.type, half))
            x = builder.load(builder.gep(pb, [at]), align=8)
            y = builder.load(builder.gep(pt, [at]), align=8)
            d = builder.fsub(y, x)
            terms = (builder.fmul(x, x), builder.fmul(y, y), builder.fmul(d, d), builder.fmul(x, y))
            for k, term in enumerate(terms):
                acc = accs[2 * k + half]
                builder.store(builder.fadd(builder.load(acc), term), acc)
    out = _fold_sums(builder, accs)
    return context.make_tuple(builder, sig.return_type, out)


def _fold_sums(builder, accs) -> list:
    """The four sums out of their 16 lanes (two <8 x double> registers each), in the fixed
    order: register 0 + register 1, then lane j += lane j + 4, j + 2, j + 1."""
    out = []
    for k in range(4):
        v = builder.fadd(builder.load(accs[2 * k]), builder.load(accs[2 * k + 1]))
        width = 8
        while width > 1:
            width //= 2
            idx = ir.VectorType(ir.IntType(32), width)
            lo = builder.shuffle_vector(v, v, ir.Constant(idx, list(range(width))))
            hi = builder.shuffle_vector(v, v, ir.Constant(idx, list(range(width, 2 * width))))
            v = builder.fadd(lo, hi)
        out.append(builder.extract_element(v, ir.Constant(ir.IntType(32), 0)))
    return out


@intrinsic
def _vsums(typingctx, fb, ft):
    """(sum x^2, sum y^2, sum (y-x)^2, sum x*y) over contiguous float64 ``fb``, ``ft``.

    The length must be a multiple of ``LANES`` (16; pad with zeros, which add nothing).
    Element ``i`` goes to lane ``i % 16``; each lane adds in index order; the lanes are
    then folded in halves (lane j += lane j + 8, then + 4, + 2, + 1). The order is fixed
    in the IR, with no fast-math flag, so the bits are the same on every CPU; written as
    LLVM vectors because numba's loop vectorizer refuses a float reduction without
    ``reassoc`` and its SLP vectorizer is off (the scalar four-lane loop ran 4.5x slower).
    """
    ok = all(isinstance(a, types.Array) and a.dtype == types.float64 and a.ndim == 1
             and a.layout == "C" for a in (fb, ft))
    if ok:
        return types.UniTuple(types.float64, 4)(fb, ft), _vec_sums_codegen


def _load_decoded(builder, ptr, at, ty):
    """Eight elements of a contiguous array at vector index ``at``, as ``<8 x double>``.

    float64 arrays load as they are; uint16 is bf16 (shifted into the high half of a
    float32), uint32 is float32; the caller checks the dtype codes. Any other width
    (never passed) converts as unsigned integers so that every specialization compiles.
    """
    f64x8 = ir.VectorType(ir.DoubleType(), 8)
    width = ty.dtype.bitwidth
    if isinstance(ty.dtype, types.Float):
        vt = ir.VectorType(ir.DoubleType() if width == 64 else ir.FloatType(), 8)
    else:
        vt = ir.VectorType(ir.IntType(width), 8)
    v = builder.load(builder.gep(builder.bitcast(ptr, vt.as_pointer()), [at]), align=width // 8)
    if isinstance(ty.dtype, types.Float):
        return v if width == 64 else builder.fpext(v, f64x8)
    i32x8 = ir.VectorType(ir.IntType(32), 8)
    if width == 16:
        v = builder.shl(builder.zext(v, i32x8), ir.Constant(i32x8, [16] * 8))
        return builder.fpext(builder.bitcast(v, ir.VectorType(ir.FloatType(), 8)), f64x8)
    if width == 32:
        return builder.fpext(builder.bitcast(v, ir.VectorType(ir.FloatType(), 8)), f64x8)
    return builder.uitofp(v, f64x8)


def _fused_codegen(context, builder, sig, args):
    """IR of ``_fused``: the sums as in ``_vsums`` plus the integer fields, one pass."""
    (bty, tty) = sig.args[:2]
    arrs = [context.make_array(ty)(context, builder, a) for ty, a in zip((bty, tty), args[:2])]
    dk, ck = args[2], args[3]
    f64x8 = ir.VectorType(ir.DoubleType(), 8)
    i64x8 = ir.VectorType(ir.IntType(64), 8)
    zero_f = ir.Constant(f64x8, None)
    zero_i = ir.Constant(i64x8, None)
    accs = [cgutils.alloca_once_value(builder, zero_f) for _ in range(8)]
    mx, ne, bey, flip = (cgutils.alloca_once_value(builder, zero_i) for _ in range(4))
    absm = ir.Constant(i64x8, [0x7FFFFFFFFFFFFFFF] * 8)
    expm = ir.Constant(i64x8, [0x7FF0000000000000] * 8)
    dkv = builder.insert_element(zero_i, dk, ir.Constant(ir.IntType(32), 0))
    dkv = builder.shuffle_vector(dkv, dkv, ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))
    ckv = builder.insert_element(zero_i, ck, ir.Constant(ir.IntType(32), 0))
    ckv = builder.shuffle_vector(ckv, ckv, ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))
    nitems = arrs[0].nitems
    groups = builder.sdiv(nitems, ir.Constant(nitems.type, LANES))

    def count(acc, flag):
        builder.store(builder.add(builder.load(acc), builder.zext(flag, i64x8)), acc)

    with cgutils.for_range(builder, groups) as loop:
        first = builder.mul(loop.index, ir.Constant(loop.index.type, 2))
        for half in range(2):
            at = builder.add(first, ir.Constant(first.type, half))
            x = _load_decoded(builder, arrs[0].data, at, bty)
            y = _load_decoded(builder, arrs[1].data, at, tty)
            d = builder.fsub(y, x)
            terms = (builder.fmul(x, x), builder.fmul(y, y), builder.fmul(d, d), builder.fmul(x, y))
            for k, term in enumerate(terms):
                acc = accs[2 * k + half]
                builder.store(builder.fadd(builder.load(acc), term), acc)
            ad = builder.and_(builder.bitcast(d, i64x8), absm)
            m = builder.load(mx)
            builder.store(builder.select(builder.icmp_signed(">", ad, m), ad, m), mx)
            # the bound at the lesser magnitude of the two (abs bits order like the magnitudes)
            ax = builder.and_(builder.bitcast(x, i64x8), absm)
            ay = builder.and_(builder.bitcast(y, i64x8), absm)
            lesser = builder.select(builder.icmp_signed("<", ay, ax), ay, ax)
            e = builder.sub(builder.and_(lesser, expm), dkv)
            bound = builder.select(builder.icmp_signed(">", e, ckv), e, ckv)
            count(bey, builder.icmp_signed(">", ad, bound))
            count(ne, builder.fcmp_unordered("!=", x, y))
            neg_x, pos_x = builder.fcmp_ordered("<", x, zero_f), builder.fcmp_ordered(">", x, zero_f)
            neg_y, pos_y = builder.fcmp_ordered("<", y, zero_f), builder.fcmp_ordered(">", y, zero_f)
            count(flip, builder.or_(builder.and_(neg_x, pos_y), builder.and_(pos_x, neg_y)))
    out = _fold_sums(builder, accs)
    lanes = [ir.Constant(ir.IntType(32), j) for j in range(8)]
    m = builder.load(mx)
    best = builder.extract_element(m, lanes[0])
    for j in lanes[1:]:
        other = builder.extract_element(m, j)
        best = builder.select(builder.icmp_signed(">", other, best), other, best)
    out.append(best)
    for acc in (ne, bey, flip):
        v = builder.load(acc)
        total = builder.extract_element(v, lanes[0])
        for j in lanes[1:]:
            total = builder.add(total, builder.extract_element(v, j))
        out.append(total)
    return context.make_tuple(builder, sig.return_type, out)


@intrinsic
def _fused(typingctx, b, t, dk, ck):
    """Every field of a finite sub-block in one pass: (b2, t2, d2, dot, max bits, n_ne, n_beyond, flips).

    ``b``, ``t``: contiguous float64 scratch, or raw bf16 (uint16) / float32 (uint32) bits
    decoded in the registers; the length a multiple of ``LANES``. The sums follow ``_vsums``'
    order exactly, so raw and scratch inputs give the same bits. ``n_ne`` counts values
    that differ (``x != y``); the bound is ``max(min(abs bits(x), abs bits(y)) & EXP - dk, ck)``, valid when it is
    a normal float64. Meaningful only when the sums come out finite (no NaN or Inf).
    """
    if all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in (b, t)):
        ret = types.Tuple((types.float64,) * 4 + (types.int64,) * 4)
        return ret(b, t, types.int64, types.int64), _fused_codegen
