"""``quant_floor.ScaleCheck``: the largest plain magnitude of each group of a quantized side's scales, by runs of
one group (``_group_runs``, ``np.maximum.reduceat``) where a layout's groups run along a row in order, against the
element-wise ``np.maximum.at`` reference on random and adversarial rows (NaN, zeros, runs that cut blocks and rows),
fed in runs of any length; and fed from the floor test's own windows (``_stream_co``), the count of a pass of its own.
"""

from __future__ import annotations

import numpy as np
import pytest

from weightdiff.measure.quant_floor import _group_ids, _group_runs


def _reference(layout, sshape, R, C, x):
    ids_of = _group_ids(layout, sshape, R, C)
    A = np.zeros(int(np.prod(sshape)), np.float64)
    rs, cs = np.arange(R, dtype=np.int64)[:, None], np.arange(C, dtype=np.int64)[None, :]
    with np.errstate(invalid="ignore"):
        np.maximum.at(A, np.broadcast_to(ids_of(rs, cs), x.shape).reshape(-1), x.reshape(-1))
    return A


def _by_runs(layout, sshape, R, C, x, cuts):
    runs = _group_runs(layout, sshape, R, C)
    assert runs is not None
    A = np.zeros(int(np.prod(sshape)), np.float64)
    for a, b in zip(cuts, cuts[1:]):
        ids, vals = runs(a, x[a:b])
        assert len(np.unique(ids)) == len(ids)            # each group once per run
        A[ids] = np.maximum(A[ids], vals)
    return A


LAYOUTS = [
    # (layout, scales' shape, R, C)
    (("cols", np.arange(40) // 8, None), (13, 5), 13, 40),                       # GPTQ, groups of 8
    (("cols", np.repeat([0, 0, 1, 3, 3, 3, 4], [3, 2, 5, 1, 9, 4, 6]), None), (9, 5), 9, 30),   # uneven, a gap
    (("block", 4, 8), (4, 5), 13, 37),                                           # FP8 blocks, both cut
    (("block", 1, 37), (13, 1), 13, 37),                                         # a scale per row (int8 channel)
    (("block", 13, 37), (1, 1), 13, 37),                                         # one scale
    (("block", 1, 8), (13, 5), 13, 40),                                          # AWQ groups
    (("block", 32, 1, 64), (4, 24), 128, 24),                                    # MXFP4 experts: 2 of 64 rows
    (("block", 4, 8, 6), (4, 5), 12, 40),                                        # experts whose rows cut blocks
    (("flat", 64), (9,), 13, 40),                                                # bnb 4-bit, rows cut blocks
    (("flat", 40), (13,), 13, 40),
    (("flat", 7), (75,), 13, 40),
]


@pytest.mark.parametrize("case", range(len(LAYOUTS)))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_maxima_by_runs_are_the_element_wise_ones(case, seed):
    layout, sshape, R, C = LAYOUTS[case]
    rng = np.random.default_rng(seed)
    x = np.abs(rng.standard_normal((R, C)))
    if seed == 1:                        # adversarial: zeros, NaN, infinities, ties
        x[rng.random((R, C)) < 0.3] = 0.0
        x[rng.integers(R), rng.integers(C)] = np.nan
        x[rng.integers(R), rng.integers(C)] = np.inf
        x[:, ::3] = 1.5
    if seed == 2:
        x[:] = 0.0
        x[rng.integers(R), :] = np.nan
    ref = _reference(layout, sshape, R, C, x)
    for cuts in ([0, R], list(range(R + 1)), sorted({0, R, *rng.integers(1, R, 3).tolist()})):
        got = _by_runs(layout, sshape, R, C, x, cuts)
        np.testing.assert_array_equal(got, ref)           # NaN where NaN, the same bits elsewhere


def test_layouts_whose_groups_go_back_take_the_element_wise_path():
    assert _group_runs(("cols", np.array([0, 1, 0, 1]), None), (3, 2), 3, 4) is None       # act-order
    assert _group_runs(("flat", 4, True), (3,), 3, 4) is None                              # transposed flat order
    assert _group_runs(("block", 4, 8), (9, 9), 13, 37) is None                            # scales that do not fit


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_extremes_of_rounded_weights_are_the_rounded_extremes(dtype, seed):
    """``_FirstGroups.count`` rounds each group's two extremes, not its every weight (rounding to nearest is
    monotone): the same values, ties to even, signed zeros, infinities, float16's overflow and NaN included."""
    from weightdiff.kernels.quant import round_to

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((64, 96)) * 10.0 ** rng.integers(-6, 6, (64, 96))).astype(np.float32)
    if seed == 1:
        ties = np.float32(1.0) + np.float32(2.0 ** -8) * rng.integers(0, 4, (64, 96)).astype(np.float32)
        x[:, ::2] = ties[:, ::2] * np.sign(x[:, ::2])     # bf16 halfway points, both signs
        x[::5, 3] = -0.0
        x[::7, 4] = 0.0
        x[1, :8] = np.inf
        x[2, 8:16] = -np.inf
        x[3, 16] = np.nan
        x[4, 24:32] = 70000.0                             # past float16's largest finite value
        x[5, 32:40] = -65520.0                            # rounds to float16's -inf
    starts = np.array([0, 5, 32, 33, 64, 90])
    for red in (np.minimum, np.maximum):
        a = round_to(red.reduceat(x, starts, axis=1).T, dtype)
        b = red.reduceat(round_to(x, dtype), starts, axis=1).T
        np.testing.assert_array_equal(a, b)               # (NaN where NaN; +0 and -0 compare equal)


@pytest.mark.parametrize("sym,dtype", [(False, "BF16"), (True, "F16"), (False, "F32")])
def test_every_group_in_place_counts_as_the_groups_gathered(sym, dtype):
    """``_FirstGroups`` over every group of one size with no activation order (compressed-tensors) takes each
    group's extremes from a [rows, groups, size] view; the counts are those of the gathered columns' reductions
    (``reduceat``, the path of other orders), fed in windows that cut rows, with NaN, infinities and signed zeros
    among the weights and about half of the stored parameters those a quantizer gives."""
    from types import SimpleNamespace

    from weightdiff.measure.quant_floor import _ct_params, _FirstGroups

    rng = np.random.default_rng(3)
    m, n, size = 24, 96, 16
    x = (rng.standard_normal((m, n)) * 0.02).astype(np.float32)
    x[1, :3], x[2, 20], x[3, 40:42], x[4, 50] = np.nan, np.inf, [-0.0, 0.0], -np.inf
    x[5, 64:80] = 0.0                                                    # a group of zeros
    g = np.arange(n) // size
    xr = x.reshape(m, -1, size)
    with np.errstate(invalid="ignore"):
        s, z = _ct_params(np.nanmin(xr, axis=2), np.nanmax(xr, axis=2), 15, sym, dtype)
    keep = rng.random(s.shape) < 0.5
    s = np.where(keep, s, s * np.float32(1.5)).T                          # [groups, rows]
    z = np.where(keep, z, z + 3).T
    src = SimpleNamespace(all_groups=True, bits=4, sym=sym, sdtype=dtype)
    counts = []
    for in_place in (True, False):
        fg = _FirstGroups(src, SimpleNamespace(), "w", "F32", m, n, s, z, np.arange(n // size), g)
        assert bool(fg.size) is True
        if not in_place:
            fg.size = 0
        flat = x.reshape(-1)
        for a, b in ((0, 50), (50, 51), (51, 700), (700, flat.size)):
            with np.errstate(invalid="ignore"):
                fg.window(flat[a:b])
        counts.append({r: c.copy() for r, c in fg.counts.items()})
        assert fg.result() is not None
    for r in counts[0]:
        np.testing.assert_array_equal(counts[0][r], counts[1][r])
    assert 0 < sum(c.sum() for c in counts[0].values()) < 3 * m * (n // size)
    fg = _FirstGroups(src, SimpleNamespace(), "w", "F32", m, n, s, z, np.arange(n // size), g[rng.permutation(n)])
    assert fg.size == 0                                                   # columns out of place: gathered
    # zero points held in 32 bits where they fit (a NaN group's is int64's least: then 64)
    assert fg.zeros.dtype == (np.int32 if -2 ** 31 <= z.min() and z.max() < 2 ** 31 else np.int64)
    z = np.where(z < -2 ** 31, 0, z)
    assert _FirstGroups(src, SimpleNamespace(), "w", "F32", m, n, s, z, np.arange(n // size), g).zeros.dtype == np.int32
    z[0, 0] = 2 ** 40
    assert _FirstGroups(src, SimpleNamespace(), "w", "F32", m, n, s, z, np.arange(n // size), g).zeros.dtype == np.int64
