"""The stored-format address-table kernels against the per-parameter fused kernels.

``numba_formats.adam_update_stored_table_`` runs the per-parameter kernels' span functions on raw
addresses, chunk by chunk, so every result (parameters, bf16 bits, 8-bit codes and scales) must be
bit-identical to ``numba_formats.adam_update_stored_`` on the same arrays (which is itself tested
against the plain load/step/store path in test_kernels_formats.py), whatever the sizes (empty,
tiny, a partial last block, above the parallel threshold), dtypes, hyper-parameters and mix of
step counts; bf16 stochastic rounding with the keys drawn as the per-parameter call draws them,
which leaves the generator in the same state.  The torch front end (``adamkit.torch.Adam`` with
``state=...``) is compared with its per-parameter path, forced by a module flag.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from adamkit.core.config import AdamHyperParams
from adamkit.formats import get_format

pytest.importorskip("numba", reason="the table kernels need numba (adamkit[fast])")

from adamkit.kernels import numba_formats as nf
from adamkit.kernels.numba_cpu import PARALLEL_MIN_SIZE

# Empty, tiny, under and across one block of 32/64/256, a partial last block, and one tensor
# above the parallel threshold (the table of these runs in parallel; SMALL serially).
SIZES = [0, 1, 31, 33, 64, 257, 4113, PARALLEL_MIN_SIZE + 1000 + 19]
SMALL = [1, 31, 300, 4096]
FORMATS = ["bf16", "bf16-nearest", "int8-companded", "int8-companded-64", "int8", "fp32"]
HPS = [
    AdamHyperParams(lr=1e-2),
    AdamHyperParams(lr=1e-2, amsgrad=True, maximize=True, weight_decay=0.1),
    AdamHyperParams(lr=1e-2, beta1=0.3, weight_decay=0.1, decoupled_weight_decay=True),
]


def _format(name):
    if name == "bf16-nearest":
        return dataclasses.replace(get_format("bf16"), rounding="nearest")
    fmt = get_format(name)
    # 8-bit codes for tiny tensors too (the format stores them densely otherwise): the table
    # kernel must handle any size.
    return dataclasses.replace(fmt, min_size=0) if hasattr(fmt, "min_size") else fmt


def _rows(fmt, sizes, dtype, amsgrad, rng):
    rows = []
    for n in sizes:
        p = rng.standard_normal(n).astype(dtype)
        stored = []
        for role in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[: 3 if amsgrad else 2]:
            st = fmt.zeros((n,), role=role)
            x = 0.1 * rng.standard_normal(n) if role == "exp_avg" else 0.01 * rng.random(n)
            fmt.store(st, x.astype(np.float32), rng=rng)
            stored.append(st)
        if not amsgrad:
            stored.append(None)
        rows.append([p, *stored])
    return rows


def _copy(rows):
    return [
        [r[0].copy()]
        + [
            None
            if st is None
            else dataclasses.replace(st, arrays={k: a.copy() for k, a in st.arrays.items()})
            for st in r[1:]
        ]
        for r in rows
    ]


def _table(fmt, rows, amsgrad):
    quantized = fmt.name not in ("bf16", "fp32")
    out = []
    for p, g, m, v, w in rows:
        w = w if amsgrad else v
        cells = [p.ctypes.data, g.ctypes.data]
        for st in (m, v, w):
            if quantized:
                cells += [st.arrays["codes"].ctypes.data, st.arrays["scales"].ctypes.data]
            else:
                key = "bits" if fmt.name == "bf16" else "values"
                cells += [st.arrays[key].ctypes.data, 0]
        out.append(cells)
    return np.array(out, dtype=np.int64).reshape(len(rows), nf.TABLE_COLUMNS)


def _keys(rng, n, amsgrad):
    # As the per-parameter call: one word per row (two with AMSGrad), in row order, in one draw.
    if amsgrad:
        return rng.bit_generator.random_raw(2 * n).reshape(n, 2)
    raw = rng.bit_generator.random_raw(n)
    return np.stack([raw, raw], axis=1)


def _same(a_rows, b_rows):
    for i, (a, b) in enumerate(zip(a_rows, b_rows, strict=True)):
        assert a[0].tobytes() == b[0].tobytes(), f"row {i}: parameter"
        for sa, sb in zip(a[1:], b[1:], strict=True):
            if sa is None:
                continue
            for key, arr in sa.arrays.items():
                assert arr.tobytes() == sb.arrays[key].tobytes(), f"row {i}: {sa.role} {key}"


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hp", HPS, ids=["plain", "ams-max-l2", "adamw-b1"])
@pytest.mark.parametrize("sizes", [SIZES, SMALL], ids=["parallel", "serial"])
def test_table_equals_per_parameter_kernel(name, dtype, hp, sizes):
    rng = np.random.default_rng([4, len(sizes), FORMATS.index(name)])
    fmt = _format(name)
    amsgrad = hp.amsgrad
    base = _rows(fmt, sizes, dtype, amsgrad, rng)
    per, tab = _copy(base), _copy(base)
    gen_per = np.random.default_rng(11)
    gen_tab = np.random.default_rng(11)
    steps = np.array([1 + (i % 3) for i in range(len(sizes))], dtype=np.int64)
    for _ in range(3):
        grads = [rng.standard_normal(n).astype(dtype) for n in sizes]
        rows_per = [[r[0], g, *r[1:]] for r, g in zip(per, grads, strict=True)]
        nf.adam_update_stored_(
            fmt, *[list(c) for c in zip(*rows_per, strict=True)], steps.tolist(), hp, rng=gen_per
        )
        rows_tab = [[r[0], g, *r[1:]] for r, g in zip(tab, grads, strict=True)]
        keys = _keys(gen_tab, len(sizes), amsgrad) if fmt.needs_rng else None
        sizes_arr = np.array(sizes, dtype=np.int64)
        bad = nf.adam_update_stored_table_(
            fmt, _table(fmt, rows_tab, amsgrad), sizes_arr, steps, np.dtype(dtype), hp, keys
        )
        assert not bad.any()
        steps = steps + 1
    _same(per, tab)
    assert gen_per.bit_generator.state == gen_tab.bit_generator.state


def test_non_finite_blocks_are_counted_per_row():
    fmt = _format("int8-companded-64")
    rng = np.random.default_rng(3)
    hp = AdamHyperParams()
    sizes = [200, 4096]
    rows = _rows(fmt, sizes, np.float32, False, rng)
    grads = [np.ones(n, dtype=np.float32) for n in sizes]
    grads[1][70] = 3e38  # g^2 overflows float32: its block's v is inf
    before = _copy(rows)
    table = _table(fmt, [[r[0], g, *r[1:]] for r, g in zip(rows, grads, strict=True)], False)
    bad = nf.adam_update_stored_table_(
        fmt, table, np.array(sizes), np.array([1, 1]), np.dtype(np.float32), hp
    )
    assert bad.tolist() == [0, 1]
    # the bad block (elements 64..127) is unchanged, its neighbours are updated
    assert rows[1][0][64:128].tobytes() == before[1][0][64:128].tobytes()
    assert rows[1][0][:64].tobytes() != before[1][0][:64].tobytes()


def test_table_layout():
    assert nf.table_layout(get_format("bf16")) == ("bf16", 1)
    assert nf.table_layout(get_format("int8-companded-64")) == ("int8-companded-64", 64)
    assert nf.table_layout(get_format("fp32")) == ("dense", 1)
    assert nf.table_layout(get_format("native")) is None
    stochastic = dataclasses.replace(get_format("int8"), rounding="stochastic")
    assert nf.table_layout(stochastic) is None


# -- the torch front end: tables against the per-parameter path ---------------------------------

TORCH_CASES = [
    ("bf16", {}),
    ("bf16", {"amsgrad": True, "maximize": True, "weight_decay": 0.1}),
    ("int8-companded", {"amsgrad": True}),
    ("int8-companded-64", {"weight_decay": 0.1, "betas": (0.3, 0.99)}),
    ("int8", {"maximize": True}),
]


def _torch_run(torch, optim, name, options, tables, with_bf16):
    import adamkit.torch.optim as module

    gen = torch.Generator().manual_seed(5)
    # tiny (dense under the 8-bit formats), a partial last block, above the parallel threshold;
    # float32 and float64; 1-d tensors (fp32 state under the 8-bit formats)
    shapes = [(3, 5), (70, 61), (300, 130), (40,), (33, 129)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    params.append(torch.randn(65, 70, generator=gen, dtype=torch.float64))
    if with_bf16:
        params.append(torch.randn(16, 8, generator=gen).to(torch.bfloat16))
    params = [torch.nn.Parameter(p) for p in params]
    opt = optim.Adam(params, lr=1e-2, state=name, **options)
    opt._format_rng = np.random.default_rng(9)
    saved = module._STORED_TABLES
    module._STORED_TABLES = tables
    try:
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            grads = [p.grad.clone() for p in params]
            opt.step()
            for p, g in zip(params, grads, strict=True):
                assert torch.equal(p.grad, g)  # the caller's gradients are only read
    finally:
        module._STORED_TABLES = saved
    return params, opt


@pytest.mark.parametrize(("name", "options"), TORCH_CASES)
@pytest.mark.parametrize("with_bf16", [False, True], ids=["f32-f64", "with-bf16-param"])
def test_torch_front_end_tables_equal_per_parameter_path(name, options, with_bf16):
    torch = pytest.importorskip("torch")
    from adamkit import torch as optim

    p_tab, o_tab = _torch_run(torch, optim, name, options, True, with_bf16)
    p_per, o_per = _torch_run(torch, optim, name, options, False, with_bf16)

    def bits(t):
        return t.detach().reshape(-1).view(torch.uint8)

    for a, b in zip(p_tab, p_per, strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(bits(a), bits(b))
        sa, sb = o_tab.state[a], o_per.state[b]
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == sb[key].dtype, key
                assert torch.equal(bits(value), bits(sb[key])), key
            else:
                assert value == sb[key], key
        assert float(sa["step"]) == 3.0
    assert o_tab._format_rng.bit_generator.state == o_per._format_rng.bit_generator.state


@pytest.mark.parametrize("name", ["bf16", "int8-companded-64"])
def test_torch_front_end_uses_the_tables(monkeypatch, name):
    torch = pytest.importorskip("torch")
    from adamkit import torch as optim
    from adamkit.torch import _addresses

    calls = []
    real = _addresses.update_stored_tables_

    def spy(fmt, rows, *args, **kwargs):
        calls.append((fmt.name, len(rows)))
        return real(fmt, rows, *args, **kwargs)

    monkeypatch.setattr("adamkit.torch.optim.update_stored_tables_", spy)
    params = [torch.nn.Parameter(torch.randn(n, 80)) for n in (60, 70, 500)]
    # small and 1-d tensors: float32 moments under the 8-bit formats, a table of the fp32 layout
    params += [torch.nn.Parameter(torch.randn(10, 5)), torch.nn.Parameter(torch.randn(7))]
    opt = optim.Adam(params, state=name)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    expected = [(name, 5)] if name == "bf16" else [(name, 3), ("fp32", 1), ("fp32", 1)]
    assert sorted(calls) == sorted(expected)
