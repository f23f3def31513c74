"""``adamkit bench`` (adamkit.app.bench): candidates compute Adam, and a tiny run reports sanely.

Lives beside the kernel tests because the benchmark is the kernels' yardstick; it never times
anything big (a few steps of the 64-128-10 MLP layout).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest

from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import adam_step, init_state
from adamkit.kernels.stored import adam_update_stored_, param_format
from adamkit.testing import rel_diff

pytest.importorskip("numba", reason="the benchmark's floor and kernel need numba")
pytest.importorskip("torch", reason="the benchmark's baselines are torch.optim")

from adamkit.app import bench

MATH_CANDIDATES = [
    "adamkit.kernels",
    "adamkit.numpy",
    "adamkit.torch",
    "kernel-via-torch",
    "torch.single",
    "torch.foreach",
    "torch.fused",
    "numpy.textbook",
    "numpy.inplace",
]


@pytest.mark.parametrize("name", MATH_CANDIDATES)
def test_each_candidate_runs_the_same_adam_step(name):
    """A benchmark that times a wrong step is worthless: 3 float64 steps against the reference."""
    problem = bench.Problem([(5, 3), (7,), ()], np.dtype(np.float64))
    start = [p.copy() for p in problem.params]
    step = bench.CANDIDATES[name].setup(problem)
    for _ in range(3):
        step()
    hp = AdamHyperParams(lr=bench.LR, beta1=bench.BETA1, beta2=bench.BETA2, eps=bench.EPS)
    for p0, g, p in zip(start, problem.grads, problem.params, strict=True):
        state = init_state(p0)
        for _ in range(3):
            p0, state = adam_step(p0, g, state, hp)
        assert rel_diff(p, p0) <= 1e-9, name


@pytest.mark.parametrize("name", ["adamkit.torch+bwd", "torch.fused+bwd", "torch.default+bwd"])
def test_after_backward_candidates_run_the_same_step_on_their_own_params(name):
    """Their gradients come from the untimed backward (``prepare``), equal to the layout's."""
    problem = bench.Problem([(5, 3), (7,), ()], np.dtype(np.float64))
    start = [p.copy() for p in problem.params]
    step = bench.CANDIDATES[name].setup(problem)
    assert callable(step.prepare)
    for _ in range(3):
        step.prepare()
        step()
    hp = AdamHyperParams(lr=bench.LR, beta1=bench.BETA1, beta2=bench.BETA2, eps=bench.EPS)
    for p0, p in zip(start, problem.params, strict=True):
        assert np.array_equal(p, p0)  # the layout's own parameters are not touched
    params = step.params
    for p0, g, p in zip(start, problem.grads, params, strict=True):
        state = init_state(p0)
        for _ in range(3):
            p0, state = adam_step(p0, g, state, hp)
        assert rel_diff(p.detach().numpy(), p0) <= 1e-9, name


def test_tiny_run_prints_a_table_and_writes_consistent_json(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.configure_parser(parser)
    out = tmp_path / "bench.json"
    names = ["floor", "adamkit.kernels", "torch.fused", "numpy.textbook", "optax", "fwd+bwd"]
    args = parser.parse_args(
        [
            *("--layouts", "digits", "--candidates", ",".join(names)),
            *("--repeats", "3", "--warmup", "1", "--json", str(out)),
        ]
    )
    assert bench.run(args) == 0
    table = capsys.readouterr().out
    assert "digits" in table and "torch.fused" in table
    report = json.loads(out.read_text())
    rows = {r["candidate"]: r for r in report["results"]}
    ran = set(rows) | set(report["skipped"])
    assert ran == set(names)
    assert rows["torch.fused"]["vs_torch_fused"] == pytest.approx(1.0)
    assert rows["floor"]["pct_of_floor"] == pytest.approx(100.0)
    for r in rows.values():
        assert r["n_params"] == 64 * 128 + 128 + 128 * 10 + 10
        assert len(r["times_ms"]) == 3
        assert r["median_ms"] == pytest.approx(float(np.median(r["times_ms"])))
        expected = rows["torch.fused"]["median_ms"] / r["median_ms"]
        assert r["vs_torch_fused"] == pytest.approx(expected)


def test_unknown_layout_or_candidate_is_a_usage_error(capsys):
    parser = argparse.ArgumentParser()
    bench.configure_parser(parser)
    for argv in (["--layouts", "1M,huge"], ["--candidates", "adam9000"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert "choose from" in capsys.readouterr().err


# -- state-format candidates --------------------------------------------------------------------

# A quantized matrix (5120 elements: codes) and a bias (7: float32 under int8, rule 1-2 of
# kernels.stored): the bytes of state per parameter each candidate must report, exactly from the
# storage (torch's candidates add their two 0-d float32 step tensors).
_SHAPES = [(64, 80), (7,)]
_INT8_BYTES = (5120 * 2 * (1 + 4 / 256) + 7 * 2 * 4) / 5127  # block-wise: 256 per scale
_STATE_CANDIDATES = {
    "adamkit.kernels[bf16]": (4.0, 0),
    "adamkit.kernels[int8]": (_INT8_BYTES, 0),
    "adamkit.numpy[bf16]": (4.0, None),
    "adamkit.numpy[int8]": (_INT8_BYTES, None),
    "adamkit.torch[bf16]": (4.0, 8),
    "adamkit.torch[int8]": (_INT8_BYTES, 8),
    "adamkit.torch[int8]+guard": (_INT8_BYTES, None),
    "adamkit.torch[bf16]+bwd": (4.0, None),
    "adamkit.torch[int8]+bwd": (_INT8_BYTES, None),
}


@pytest.mark.parametrize("name", _STATE_CANDIDATES)
def test_state_format_candidates_run_adam_and_report_their_state_bytes(name):
    """Each candidate runs the step of its format: after 3 steps every parameter has moved as the
    plain path of the same format moves it (load, reference step, store) within 1% (relative
    difference of the change: bf16 stochastic rounding draws other bits than the plain path, and
    a code may flip at a tie); the state bytes reported come from the storage."""
    state = name.split("[")[1].split("]")[0]
    problem = bench.Problem(_SHAPES, np.dtype(np.float32))
    start = [p.copy() for p in problem.params]
    step = bench.CANDIDATES[name].setup(problem)
    own = getattr(step, "params", None)  # the "+bwd" candidates' parameters of their own
    for _ in range(3):
        if own is not None:
            step.prepare()
        step()
    finals = problem.params if own is None else [t.detach().numpy() for t in own]
    hp = AdamHyperParams(lr=bench.LR, beta1=bench.BETA1, beta2=bench.BETA2, eps=bench.EPS)
    for p0, g, p in zip(start, problem.grads, finals, strict=True):
        fmt = param_format(state, p0.shape)
        ref = p0.copy()
        m, v = fmt.zeros(p0.shape, role="exp_avg"), fmt.zeros(p0.shape, role="exp_avg_sq")
        draw = np.random.default_rng(0)
        for t in range(1, 4):
            adam_update_stored_(fmt, [ref], [g], [m], [v], [None], [t], hp, rng=draw)
        assert rel_diff(p - p0, ref - p0) <= 0.01, name
    per_param, extra = _STATE_CANDIDATES[name]
    nbytes = bench._state_nbytes(step)
    if extra is None:  # the total is the front end's own count; only its order is checked
        assert nbytes is None or per_param * 5127 - 1e-6 <= nbytes <= per_param * 5127 + 4096
    else:
        assert nbytes == pytest.approx(per_param * 5127 + extra)


def test_torch_optim_candidates_report_fp32_state_bytes():
    problem = bench.Problem(_SHAPES, np.dtype(np.float32))
    step = bench.CANDIDATES["torch.fused"].setup(problem)
    step()
    assert bench._state_nbytes(step) == 8 * 5127 + 2 * 4  # exp_avg, exp_avg_sq, 0-d steps


@pytest.mark.parametrize(
    ("name", "module"), [("bnb.Adam8bit", "bitsandbytes"), ("torchao.AdamW8bit", "torchao")]
)
def test_third_party_8bit_candidates_are_skipped_with_a_reason_when_missing(
    name, module, monkeypatch
):
    monkeypatch.setitem(sys.modules, module, None)  # import fails: not installed
    problem = bench.Problem(_SHAPES, np.dtype(np.float32))
    with pytest.raises(bench.Skip, match=f"{module} is not installed"):
        bench.CANDIDATES[name].setup(problem)


def test_the_table_shows_state_bytes_per_parameter():
    rows = bench._summaries(
        [
            bench.Timing("x", "torch.fused", 100, 1, [1e-3, 2e-3], 800),
            bench.Timing("x", "floor", 100, 1, [1e-3], None),
        ]
    )
    assert rows[0]["state_bytes_per_param"] == 8.0 and rows[1]["state_bytes_per_param"] is None
    table = bench._table(rows)
    assert "B/param" in table.splitlines()[0] and "8.00" in table.splitlines()[2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "--repeats and --warmup must be at least 1"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
    ],
)
def test_bad_counts_exit_2_with_their_message(argv, message, capsys):
    from adamkit.app.cli import main

    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err
