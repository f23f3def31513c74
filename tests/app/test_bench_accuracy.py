"""Tests of ``adamkit bench accuracy``: the verdicts on constructed runs, and a smoke run of the
CLI on tiny synthetic data written here (the real run is a benchmark, not a test)."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg

from adamkit.app import bench_accuracy as ba


def _record(model, variant, seed, metric):
    return ba.RunRecord(
        model=model,
        variant=variant,
        seed=seed,
        metric=metric,
        final_loss=metric if model == "gpt" else 0.3,
        final_acc=None if model == "gpt" else metric,
        steps=10,
        seconds=1.0,
        params=100,
        tensors=2,
        int8_params=0,
        int8_tensors=0,
        state_nbytes=800,
        train_loss=[2.0, 1.5, 1.0],
        eval_steps=[3],
        eval_loss=[1.0],
    )


def _runs(model, variant, metrics):
    return [_record(model, variant, seed, m) for seed, m in enumerate(metrics)]


def test_summary_verdicts_against_the_fp32_reference():
    runs = [
        *_runs("mlp", "fp32", (0.880, 0.882, 0.884)),  # mean 88.2 %
        *_runs("mlp", "int8", (0.879, 0.880, 0.881)),  # 88.0: -0.2 points, inside 0.3
        *_runs("mlp", "bf16", (0.876, 0.878, 0.877)),  # 87.7: -0.5 points, worse
        *_runs("mlp", "bf16p-stoch", (0.886, 0.886, 0.886)),  # 88.6: +0.4 points, better
        *_runs("cnn", "int8", (0.80, 0.81, 0.82)),  # no fp32 run of the cnn: no verdict
        *_runs("gpt", "fp32", (2.00, 2.02, 1.98)),  # mean 2.0
        *_runs("gpt", "int8", (2.01, 2.03, 1.99)),  # +0.5 %
        *_runs("gpt", "bf16p-nearest", (2.05, 2.05, 2.05)),  # +2.5 %, worse
        *_runs("gpt", "bf16", (1.97, 1.97, 1.97)),  # -1.5 %, better
        *_runs("gpt", "bf16p-stoch", (2.0, float("nan"), 2.0)),  # a NaN run
    ]
    summary = ba.summarize(runs, acc_tolerance=0.3, loss_tolerance=1.0)
    rows = summary["rows"]
    verdicts = {key: row["verdict"] for key, row in rows.items()}
    assert verdicts == {
        "mlp fp32": "ref",
        "mlp int8": "pass",
        "mlp bf16": "FAIL",
        "mlp bf16p-stoch": "outside, better",
        "cnn int8": None,
        "gpt fp32": "ref",
        "gpt int8": "pass",
        "gpt bf16p-nearest": "FAIL",
        "gpt bf16": "outside, better",
        "gpt bf16p-stoch": "FAIL",
    }
    mlp = rows["mlp int8"]
    assert mlp["mean"] == pytest.approx(88.0, abs=1e-9)
    assert mlp["sd"] == pytest.approx(0.1, abs=1e-9)
    assert (mlp["min"], mlp["max"]) == pytest.approx((87.9, 88.1))
    assert mlp["diff"] == pytest.approx(-0.2, abs=1e-9) and mlp["diff_unit"] == "points"
    # Paired per seed: -0.1, -0.2, -0.3.
    assert mlp["paired"]["mean"] == pytest.approx(-0.2, abs=1e-9)
    assert mlp["paired"]["sd"] == pytest.approx(0.1, abs=1e-9)
    gpt = rows["gpt int8"]
    assert gpt["diff"] == pytest.approx(0.5, abs=1e-9) and gpt["diff_unit"] == "percent"
    assert gpt["paired"]["mean"] == pytest.approx(
        statistics.fmean(
            (100 * (2.01 / 2.00 - 1), 100 * (2.03 / 2.02 - 1), 100 * (1.99 / 1.98 - 1))
        )
    )
    assert rows["gpt bf16p-nearest"]["diff"] == pytest.approx(2.5, abs=1e-9)
    assert math.isnan(rows["gpt bf16p-stoch"]["mean"])
    assert rows["cnn int8"]["diff"] is None and rows["mlp fp32"]["diff"] is None
    # A tighter tolerance turns the int8 passes into failures.
    tight = ba.summarize(runs, acc_tolerance=0.1, loss_tolerance=0.25)["rows"]
    assert tight["mlp int8"]["verdict"] == "FAIL" and tight["gpt int8"]["verdict"] == "FAIL"
    lines = ba.format_table(summary)
    assert len(lines) == 1 + len(rows)
    assert any("mlp" in line and "int8" in line and "-0.20 pt" in line for line in lines)
    assert any("gpt" in line and "+2.50 %" in line and "FAIL" in line for line in lines)


def _write_fashion(path, rng):
    # Learnable 8x8 images: class k lights row k % 8 (and column 0 for k >= 8).
    def split(n):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 8, 8))
        x[np.arange(n), y % 8] += 180
        x[np.arange(n), :, 0] += 15 * (y >= 8)[:, None]
        return x.astype(np.uint8), y.astype(np.int64)

    x_train, y_train = split(128)
    x_test, y_test = split(64)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


@pytest.fixture
def small_inputs(tmp_path):
    rng = np.random.default_rng(20261125)
    fashion = tmp_path / "fashion-mnist.npz"
    _write_fashion(fashion, rng)
    text = tmp_path / "text"
    text.mkdir()
    words = ["def", "return", "self", "(x)", "\n", "    ", "import", "for", "in", ":"]
    (text / "a.py").write_text(" ".join(rng.choice(words, 400)))
    (text / "b.py").write_text(" ".join(rng.choice(words, 300)))
    threads = torch.get_num_threads()
    yield fashion, text
    torch.set_num_threads(threads)  # the benchmark sets one thread for itself


def test_cli_writes_json_png_and_counts_int8_parameters(small_inputs, run_cli):
    fashion, text = small_inputs
    code, out, err = run_cli(
        *("bench", "accuracy", "--data-dir", fashion, "--text-root", text),
        *("--text-files", "a.py,b.py", "--seeds", "1", "--epochs", "1", "--batch-size", "32"),
        *("--gpt-steps", "3", "--gpt-context", "8", "--gpt-batch", "4", "--gpt-d-model", "32"),
        *("--gpt-heads", "2", "--gpt-layers", "1", "--gpt-eval-every", "2"),
        *("--gpt-eval-windows", "4", "--out", "res", "--tag", "t"),
    )
    assert code == 0, err
    document = json.loads((small_inputs[0].parent / "res" / "state-accuracy-t.json").read_text())
    runs = {(r["model"], r["variant"]): r for r in document["runs"]}
    # bf16p-* run only on the default --param-models (mlp, gpt).
    assert sorted(runs) == sorted(
        [("mlp", v) for v in ba.DEFAULT_VARIANTS]
        + [("cnn", v) for v in ("fp32", "bf16", "int8")]
        + [("gpt", v) for v in ba.DEFAULT_VARIANTS]
    )
    for (model, _), r in runs.items():
        assert len(r["train_loss"]) == r["steps"] == (4 if model != "gpt" else 3)
        assert len(r["eval_loss"]) == len(r["eval_steps"]) >= 1
    # The int8 rule: >= 4096 elements, >= 2-D, name without embed/norm.  MLP: the 64x128 layer
    # only; GPT with d_model 32: fc (128x32), out (32x128) and head (256x32), not qkv (96x32)
    # nor tok_embed (256x32, an embedding).
    assert runs[("mlp", "int8")]["int8_params"] == 64 * 128
    assert runs[("gpt", "int8")]["int8_params"] == 128 * 32 + 32 * 128 + 256 * 32
    assert runs[("gpt", "int8")]["int8_tensors"] == 3
    assert all(r["int8_params"] == 0 for (_, v), r in runs.items() if v != "int8")
    assert runs[("mlp", "int8")]["state_nbytes"] < runs[("mlp", "fp32")]["state_nbytes"]
    assert document["data"]["text"]["files"] == {
        "a.py": len((text / "a.py").read_bytes()),
        "b.py": len((text / "b.py").read_bytes()),
    }
    assert set(document["summary"]["rows"]) == {f"{m} {v}" for m, v in runs}
    assert document["summary"]["rows"]["mlp fp32"]["verdict"] == "ref"
    image = mpimg.imread(small_inputs[0].parent / "res" / "state-accuracy-t.png")
    assert image.shape[0] > 100 and image.shape[1] > 300
    assert "gpt   int8" in out and "results in" in out


def test_cli_rejects_bad_settings_and_missing_text(small_inputs, run_cli):
    _, text = small_inputs
    code, _, err = run_cli("bench", "accuracy", "--models", "gpt", "--gpt-steps", "0")
    assert code == 2 and "--gpt-steps must be >= 1, got 0" in err
    code, _, err = run_cli(
        *("bench", "accuracy", "--models", "gpt", "--text-root", text, "--text-files", "nope.py")
    )
    assert code == 2 and "nope.py" in err
    code, _, err = run_cli("bench", "accuracy", "--variants", "int4")
    assert code == 2 and "int4" in err
    code, out, _ = run_cli("bench", "--help")
    assert code == 0 and "adamkit bench accuracy --help" in " ".join(out.split())
