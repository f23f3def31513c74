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
    result = bs.guard_overhead(
        n_matrices=2, width=30, rounds=3, warmup=1, train_rounds=2, train_sizes=(8, 16, 4)
    )
    assert result["params"] == 2 * 30 * 30 + 2 * 30
    assert set(result["median_ms"]) == {
        "adamkit (no guard)",
        "adamkit (default guard)",
        "adamkit (guard all)",
        "torch.optim.Adam",
        "torch.optim.Adam fused",
    }
    assert result["overhead_pct"]["adamkit (no guard)"] == 0.0
    assert result["train_params"] == 8 * 16 + 16 + 16 * 4 + 4
    assert set(result["train_median_ms"]) == {
        "adamkit (no guard)",
        "adamkit (default guard)",
        "adamkit (default guard, check in step)",
    }
    assert set(result["after_backward_step_ms"]) == set(result["after_backward_backward_ms"])
    assert "adamkit (default guard, check in step)" in result["after_backward_step_ms"]
    assert result["after_backward_overhead_pct"]["adamkit (no guard)"] == 0.0


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
    # "all" judges it against the first loss, rolls back and cuts the lr (x0.25) until it holds.
    data = _data(n_train=256, n_test=128)
    kwargs = {"model": "mlp", "dtype": "fp32", "lr": 1.0, "seed": 0, "batch_size": 16}
    plain = bs.train_run(data, optimizer="torch-adam", **kwargs)
    guarded = bs.train_run(data, optimizer="adamkit-all", **kwargs)
    assert guarded.guard["n_rollbacks"] >= 2
    assert guarded.acc > 0.95 > 0.9 > plain.acc


def test_summary_reports_the_seed_spread_and_paired_differences_at_the_reference_lr():
    # Seeds 0, 1, 2 at lr 1e-3: torch 0.70, 0.72, 0.74 (sd 0.02 -> 2 points), guard 0.71, 0.71,
    # 0.71 (sd 0); per seed guard - torch = +1, -1, -3 points, mean -1.
    results = []
    for seed, (t, g) in enumerate([(0.70, 0.71), (0.72, 0.71), (0.74, 0.71)]):
        for lr in (1e-3, 1e-2):
            results.append(_result("cnn bf16 torch-adam", lr, t, seed))
            results.append(_result("cnn bf16 adamkit-all", lr, g, seed))
    pair = bs.summarize_sweep(results, reference_lr=1e-3)["pairs"]["cnn bf16"]
    assert pair["acc_diff_points"] == pytest.approx(-1.0)
    assert pair["acc_diff_points_per_seed"] == pytest.approx([1.0, -1.0, -3.0])
    assert pair["acc_seed_sd_points"]["baseline"] == pytest.approx(2.0)
    assert pair["acc_seed_sd_points"]["guarded"] == pytest.approx(0.0, abs=1e-12)
    assert pair["targets"]["acc_not_below_by_0.2_points"] is False


def _baseline_file(tmp_path, runs, **settings):
    import json
    from dataclasses import asdict

    stored = {"epochs": 2, "batch_size": 256, "cnn_train_images": 10_000, **settings}
    path = tmp_path / "old.json"
    document = {"settings": stored, "sweep": {"runs": [asdict(r) for r in runs]}}
    path.write_text(json.dumps(document))
    return path


def test_baseline_runs_are_read_back_in_grid_order_and_checked(tmp_path):
    grid = dict(models=("mlp",), dtypes=("fp32",), lrs=(1e-3, 1e-2), seeds=(0, 1))
    same = dict(epochs=2, batch_size=256, cnn_train=10_000)
    runs = [
        _result("mlp fp32 torch-adam", lr, 0.5 + seed / 10 + lr, seed)
        for lr in (1e-2, 1e-3, 0.1)
        for seed in (1, 0)
    ]
    runs.append(_result("mlp fp32 adamkit-all", 1e-3, 0.99, 0))  # another optimizer: ignored
    path = _baseline_file(tmp_path, runs)
    got = bs.load_baseline_runs(path, **grid, **same)
    assert [(r.lr, r.seed) for r in got] == [(1e-3, 0), (1e-3, 1), (1e-2, 0), (1e-2, 1)]
    assert all(r.optimizer == "torch-adam" for r in got)
    assert got[3].acc == pytest.approx(0.5 + 0.1 + 1e-2)
    with pytest.raises(ValueError, match="epochs is 2, this run uses 3"):
        bs.load_baseline_runs(path, **grid, **{**same, "epochs": 3})
    with pytest.raises(ValueError, match=r"lacks 2 torch-adam run\(s\)"):
        bs.load_baseline_runs(path, **{**grid, "seeds": (0, 1, 2)}, **same)


def test_merge_documents_joins_split_sweeps_and_rejects_duplicates():
    from dataclasses import asdict

    mlp = [_result("mlp fp32 torch-adam", 1e-3, 0.8), _result("mlp fp32 adamkit-all", 1e-3, 0.9)]
    cnn = [_result("cnn fp32 torch-adam", 1e-3, 0.7), _result("cnn fp32 adamkit-all", 1e-3, 0.6)]
    docs = [
        {"command": "a", "sweep": {"runs": [asdict(r) for r in mlp]}},
        {"command": "b", "sweep": {"runs": [asdict(r) for r in cnn]}},
        {"command": "c", "faults": {"summary": {"fp32": {}}, "runs": []}},
    ]
    merged = bs.merge_documents(docs)
    pairs = merged["sweep"]["summary"]["pairs"]
    assert pairs["mlp fp32"]["acc_diff_points"] == pytest.approx(10.0)
    assert pairs["cnn fp32"]["acc_diff_points"] == pytest.approx(-10.0)
    assert merged["faults"] == docs[2]["faults"]
    assert [d["command"] for d in merged["merged_from"]] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="more than one document"):
        bs.merge_documents(docs[:1] + docs[:1])
    with pytest.raises(ValueError, match="2 documents have a fault injection"):
        bs.merge_documents(docs[2:] + docs[2:])


def test_baseline_faults_are_restricted_to_the_asked_optimizers(tmp_path):
    import json

    entry = {"clean_acc": 0.8, "faulted_acc": 0.7, "diff_points": -10.0, "faulted_nan": 0}
    runs = [
        {"optimizer": o, "dtype": d}
        for o in ("torch-adam", "adamkit-all")
        for d in ("fp32", "bf16")
    ]
    document = {
        "settings": {"seeds": [0, 1]},
        "faults": {
            "summary": {"fp32": {"torch-adam": entry, "adamkit-all": entry}},
            "runs": runs,
        },
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(document))
    got = bs.load_baseline_faults(path, dtypes=("fp32",), seeds=(0, 1), optimizers=("torch-adam",))
    assert got["summary"] == {"fp32": {"torch-adam": entry}}
    assert got["runs"] == [{"optimizer": "torch-adam", "dtype": "fp32"}]
    with pytest.raises(ValueError, match="lacks fault runs"):
        bs.load_baseline_faults(path, dtypes=("bf16",), seeds=(0, 1))
    with pytest.raises(ValueError, match="other seeds"):
        bs.load_baseline_faults(path, dtypes=("fp32",), seeds=(0, 1, 2))


@pytest.mark.parametrize(
    "option", ["--seeds", "--epochs", "--batch-size", "--cnn-train", "--threads"]
)
def test_counts_below_one_are_refused_with_a_message(option, capsys):
    from adamkit.app.cli import main

    assert main(["bench", "stability", option, "0"]) == 2
    assert f"{option} must be >= 1, got 0" in capsys.readouterr().err


def test_interleaved_times_rotates_the_order_and_skips_the_warmup():
    from adamkit.app.bench_common import interleaved_times

    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved_times(steps, rounds=3, warmup=1)
    # Round i starts at name i mod 3; the warm-up round (a, b, c) is run but not timed.
    assert calls == list("abcbcacababc")
    assert {n: len(t) for n, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0.0 for ts in times.values() for t in ts)
