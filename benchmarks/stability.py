"""Run ``adamkit bench stability`` without the CLI.

``python benchmarks/stability.py --quick --out bench-results``

All options are those of :func:`adamkit.app.bench_stability.configure_parser` (``--help``); the
module docstring there says what is measured and how.
"""

from __future__ import annotations

import argparse

from adamkit.app import bench_stability


def main() -> int:
    parser = argparse.ArgumentParser(prog="stability.py")
    bench_stability.configure_parser(parser)
    return bench_stability.run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
