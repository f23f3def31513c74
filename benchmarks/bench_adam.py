"""Run ``adamkit bench`` without the CLI.

``python benchmarks/bench_adam.py --quick --json out.json``

All options are those of ``adamkit bench --help`` (see :mod:`adamkit.app.bench`).
"""

from __future__ import annotations

import argparse

from adamkit.app import bench


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench_adam.py")
    bench.configure_parser(parser)
    return bench.run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
