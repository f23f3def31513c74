"""Run ``adamkit bench accuracy`` (issue 7: fp32 vs bf16 vs int8 optimizer state) without the CLI.

``python benchmarks/state_accuracy.py --out benchmarks/results/<date>``; ``--quick``: a smoke run.

All options are those of :func:`adamkit.app.bench_accuracy.configure_parser` (``--help``); the
module docstring there says what is measured, on which data, and the pass/fail criteria.
"""

from __future__ import annotations

import argparse

from adamkit.app import bench_accuracy


def main() -> int:
    parser = argparse.ArgumentParser(prog="state_accuracy.py")
    bench_accuracy.configure_parser(parser)
    return bench_accuracy.run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
