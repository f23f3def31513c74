"""The bandwidth-floor kernel moves the step's bytes: it must read and write what the step does."""

from __future__ import annotations

import numpy as np
import pytest

from adamkit.testing import seeded_rng

pytest.importorskip("numba", reason="the streaming floor is a numba kernel (adamkit[fast])")

from adamkit.kernels.numba_cpu import PARALLEL_MIN_SIZE
from adamkit.kernels.streaming import stream_update_


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
def test_adds_the_gradient_to_param_and_both_moments(dtype):
    rng = seeded_rng("stream", dtype.__name__)
    shapes = [(), (0,), (7,), (3, 5), (PARALLEL_MIN_SIZE + 1,)]
    arrays = [[np.asarray(rng.standard_normal(s), dtype=dtype) for _ in range(4)] for s in shapes]
    before = [[a.copy() for a in row] for row in arrays]
    stream_update_(*([row[i] for row in arrays] for i in range(4)))
    for (p, g, m, v), (p0, g0, m0, v0) in zip(arrays, before, strict=True):
        assert g.tobytes() == g0.tobytes()
        np.testing.assert_array_equal(p, p0 + g0)
        np.testing.assert_array_equal(m, m0 + g0)
        np.testing.assert_array_equal(v, v0 + g0)


def test_rejects_non_contiguous_arrays_before_writing():
    rng = seeded_rng("stream-reject")
    good = [rng.standard_normal(4).astype(np.float32) for _ in range(4)]
    bad = [rng.standard_normal(8).astype(np.float32)[::2] for _ in range(4)]
    saved = [a.copy() for a in good]
    with pytest.raises(TypeError, match="parameter 1"):
        stream_update_(*([good[i], bad[i]] for i in range(4)))
    for a, b in zip(good, saved, strict=True):
        np.testing.assert_array_equal(a, b)
