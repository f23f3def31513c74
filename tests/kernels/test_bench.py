"""``adamkit bench`` (adamkit.app.bench): candidates compute Adam, and a tiny run reports sanely.

Lives beside the kernel tests because the benchmark is the kernels' yardstick; it never times
anything big (a few steps of the 64-128-10 MLP layout).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from adamkit.core.config import AdamHyperParams
from adamkit.core.reference import adam_step, init_state
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
