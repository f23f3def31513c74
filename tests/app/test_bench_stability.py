"""Smoke tests of ``adamkit bench stability`` on tiny synthetic data (the real run: a benchmark)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from matplotlib import image as mpimg

from adamkit.app import bench_stability as bs


def _data(n_train=96, n_test=48, seed=0):
    """Learnable 8x8 images: class k lights row k % 8 (plus noise)."""
    gen = torch.Generator().manual_seed(seed)

    def split(n):
        y = torch.randint(0, 10, (n,), generator=gen)
        x = 0.3 * torch.rand(n, 8, 8, generator=gen)
        x[torch.arange(n), y % 8] += 0.7
        x[torch.arange(n), :, y // 8] += 0.5 * (y >= 8).float()[:, None]
        return x, y

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    return bs.SweepData(x_train, y_train, x_test, y_test, "synthetic")


def _result(setting, lr, acc, seed=0, *, loss=0.5, initial=2.3, nan=False):
    model, dtype, optimizer = setting.split()
    return bs.RunResult(
        model, dtype, optimizer, lr, seed, initial, loss, acc, nan, nan or loss > initial, 0.1, 10
    )


def test_summary_bands_counts_and_reference_accuracy():
    lrs = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    torch_accs = (0.50, 0.80, 0.84, 0.30, 0.10)  # band: 1e-3..1e-2 (0.798 <= acc)
    guard_accs = (0.50, 0.81, 0.85, 0.83, 0.81)  # band: 1e-3..1 (threshold 0.8075)
    results = []
    for seed in (0, 1):
        for lr, a, b in zip(lrs, torch_accs, guard_accs, strict=True):
            results.append(
                _result(
                    "mlp fp32 torch-adam",
                    lr,
                    a,
                    seed,
                    nan=lr == 1.0 and seed == 0,
                    loss=3.0 if lr == 0.1 else 0.5,
                )
            )
            results.append(_result("mlp fp32 adamkit-all", lr, b, seed))
    summary = bs.summarize_sweep(results, band=0.95, reference_lr=1e-3)
    torch_s = summary["settings"]["mlp fp32 torch-adam"]
    guard_s = summary["settings"]["mlp fp32 adamkit-all"]
    assert torch_s["mean_acc"] == pytest.approx(torch_accs)
    assert (torch_s["band"]["lo"], torch_s["band"]["hi"]) == (1e-3, 1e-2)
    assert torch_s["band"]["width"] == pytest.approx(10.0)
    assert (guard_s["band"]["lo"], guard_s["band"]["hi"]) == (1e-3, 1.0)
    assert torch_s["nan"] == 1 and torch_s["diverged"] == 3  # NaN at lr 1, loss 3 > 2.3 at 0.1
    assert torch_s["diverged_per_lr"] == [0, 0, 0, 2, 1] and torch_s["nan_per_lr"][-1] == 1
    pair = summary["pairs"]["mlp fp32"]
    assert pair["band_widening"] == pytest.approx(100.0)
    assert pair["acc_diff_points"] == pytest.approx(1.0)
    assert pair["targets"] == {
        "no_nan": True,
        "acc_not_below_by_0.2_points": True,
        "band_10x_wider": True,
    }
    assert summary["targets"] == {
        "guard_nan_runs_zero": True,
        "guard_diverged_strictly_fewer": True,
    }
    assert summary["totals"] == {
        "torch-adam": {"nan": 1, "diverged": 3},
        "adamkit-all": {"nan": 0, "diverged": 0},
    }


def test_band_is_contiguous_around_the_best():
    # A usable lr beyond an unusable one is not part of the band.
    results = [
        _result("cnn bf16 torch-adam", lr, acc)
        for lr, acc in ((1e-3, 0.9), (1e-2, 0.5), (1e-1, 0.89))
    ]
    band = bs.summarize_sweep(results)["settings"]["cnn bf16 torch-adam"]["band"]
    assert (band["lo"], band["hi"], band["best_lr"]) == (1e-3, 1e-3, 1e-3)


def test_faulty_model_injects_only_in_training_steps():
    torch.manual_seed(0)
    inner = bs.build_model("mlp", (8, 8))
    model = bs.FaultyModel(inner, loud_steps={0}, shuffle_steps={1}, nan_steps={2})
    x = torch.rand(6, 8, 8)
    model.eval()
    assert torch.equal(model(x), inner(x)) and model.calls == 0
    model.train()
    assert torch.allclose(model(x), inner(x * 1000.0))
    shuffled = model(x)
    assert not torch.equal(shuffled, inner(x))
    assert torch.equal(shuffled.sort(dim=0).values, inner(x).sort(dim=0).values)
    out = model(x)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isnan(p.grad).any() for p in inner.parameters())
    assert model.injected == 3 and model.calls == 3


# The CNN's first runs are slow (kernel set-up for each new shape), so it runs in one dtype here.
@pytest.mark.parametrize(("model", "dtype"), [("mlp", "fp32"), ("mlp", "bf16"), ("cnn", "bf16")])
def test_train_run_and_injected_nan(model, dtype):
    data = _data()
    clean = bs.train_run(
        data, model=model, dtype=dtype, optimizer="adamkit-all", lr=3e-3, seed=0, batch_size=16
    )
    assert clean.steps == 12 and not clean.nan and clean.guard["n_steps"] == 12
    assert math.isfinite(clean.initial_loss) and 0.0 <= clean.acc <= 1.0
    faults = {"nan_steps": (3,), "inf_steps": (5,)}
    lost = bs.train_run(
        data,
        model=model,
        dtype=dtype,
        optimizer="torch-adam",
        lr=3e-3,
        seed=0,
        batch_size=16,
        faults=faults,
    )
    assert lost.nan and lost.diverged and lost.guard == {} and lost.faults == "inf_steps,nan_steps"
    kept = bs.train_run(
        data,
        model=model,
        dtype=dtype,
        optimizer="adamkit-default",
        lr=3e-3,
        seed=0,
        batch_size=16,
        faults=faults,
    )
    assert not kept.nan and kept.guard["n_skipped_nonfinite"] == 2 and kept.guard["n_applied"] == 10


def test_sweep_plot_and_faults_on_tiny_data(tmp_path):
    data = _data()
    lines = []
    results = bs.lr_sweep(
        {"mlp": data},
        lrs=(1e-3, 1.0),
        seeds=(0,),
        dtypes=("fp32",),
        batch_size=32,
        epochs=1,
        progress=lines.append,
    )
    assert len(results) == 4 and len(lines) == 4 and "mlp fp32 torch-adam" in lines[0]
    summary = bs.summarize_sweep(results)
    bs.plot_sweep(summary, tmp_path / "sweep.png")
    assert mpimg.imread(tmp_path / "sweep.png").ndim == 3
    report = bs.fault_injection(
        data,
        dtypes=("fp32",),
        faults={"nan_steps": (1,), "loud_steps": (2,)},
        epochs=1,
        batch_size=32,
        optimizers=("torch-adam", "adamkit-all"),
    )
    assert report["summary"]["fp32"]["torch-adam"]["faulted_nan"] == 1
    assert report["summary"]["fp32"]["adamkit-all"]["faulted_nan"] == 0
    assert len(report["runs"]) == 4


def test_overhead_reports_every_candidate():
    result = bs.guard_overhead(n_matrices=2, width=30, rounds=3, warmup=1)
    assert result["params"] == 2 * 30 * 30 + 2 * 30
    assert set(result["median_ms"]) == {
        "adamkit (no guard)",
        "adamkit (default guard)",
        "adamkit (guard all)",
        "torch.optim.Adam",
    }
    assert result["overhead_pct"]["adamkit (no guard)"] == 0.0


def test_cli_options_and_missing_data(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bs.configure_parser(parser)
    args = parser.parse_args(
        [
            "--quick",
            "--parts",
            "sweep",
            "--lrs",
            "0.1,0.001",
            "--data-dir",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert args.lrs == (0.001, 0.1) and args.parts == ("sweep",)
    assert bs.run(args) == 2
    assert "--data-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--models", "resnet"])


def test_guard_all_rolls_back_a_too_high_lr():
    # lr 1: Adam's first update (lr * sign(g) on every weight) blows the loss up at step 2;
    # "all" judges it against the first loss, rolls back and halves the lr until it holds.
    data = _data(n_train=256, n_test=128)
    kwargs = {"model": "mlp", "dtype": "fp32", "lr": 1.0, "seed": 0, "batch_size": 16}
    plain = bs.train_run(data, optimizer="torch-adam", **kwargs)
    guarded = bs.train_run(data, optimizer="adamkit-all", **kwargs)
    assert guarded.guard["n_rollbacks"] >= 2
    assert guarded.acc > 0.95 > 0.9 > plain.acc
