"""``adamkit bench memory``: one fresh process per state format, bytes per parameter.

Expected values come from the formats' documented layouts, not from the code under test: fp32
state is two float32 moments (8 bytes per parameter); int8 is two 1-byte codes plus one float32
scale per block of 256 (2 + 8/256), with float32 moments for tensors below 4096 elements.
"""

from __future__ import annotations

import json

import pytest

from adamkit.app import bench_memory, cli

pytest.importorskip("torch")


def test_state_bytes_follow_the_formats_layouts():
    torch_row = bench_memory.measure("torch", layout="1M", steps=1)
    int8_row = bench_memory.measure("int8", layout="1M", steps=1)
    assert torch_row["state_bytes_per_param"] == pytest.approx(8.0, abs=1e-3)
    # 1M: matrices quantized, the small vectors (< 4096 elements) in float32.
    assert 2.0 + 8 / 256 <= int8_row["state_bytes_per_param"] < 2.2
    # The process grew by about the state (untouched zero pages may not count) plus fixed costs
    # of a few MiB (thread stacks, small buffers): not by a multiple of the parameters.
    for row in (torch_row, int8_row):
        grown = row["rss_bytes_per_param"] * row["params"]
        assert 0 <= grown < 2 * row["state_bytes_per_param"] * row["params"] + 16 * 2**20


def test_cli_prints_a_row_per_state_and_writes_json(tmp_path, capsys):
    out = tmp_path / "memory.json"
    argv = ["bench", "memory", "--layout", "1M", "--states", "bf16", "--steps", "1"]
    status = cli.main([*argv, "--json", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "bf16" in printed and str(out) in printed
    document = json.loads(out.read_text())
    assert [row["state"] for row in document["runs"]] == ["bf16"]
    assert document["runs"][0]["state_bytes_per_param"] == pytest.approx(4.0, abs=1e-3)


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(ValueError, match="Invalid state"):
        bench_memory.measure("int4")
    assert cli.main(["bench", "memory", "--states", "int4"]) == 2
    assert cli.main(["bench", "memory", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_a_failed_run_is_one_message_not_a_traceback(monkeypatch, capsys):
    def failing(state, layout, steps):
        raise RuntimeError(f"memory run for state={state!r} failed:\nMemoryError")

    monkeypatch.setattr(bench_memory, "measure", failing)
    assert cli.main(["bench", "memory", "--states", "int8"]) == 2
    err = capsys.readouterr().err
    assert "memory run for state='int8' failed" in err and "Traceback" not in err
