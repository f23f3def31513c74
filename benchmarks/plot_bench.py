"""Plot a JSON file written by ``adamkit bench --json``.

``python benchmarks/plot_bench.py IN.json OUT.png``

One panel per layout, one bar per candidate: throughput as a percentage of the streaming floor
(the memory-bandwidth limit), with torch.optim.Adam(fused=True) marked.  Needs matplotlib.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(argv[0], encoding="utf-8") as fh:
        report = json.load(fh)
    layouts: dict[str, list[dict]] = {}
    for row in report["results"]:
        layouts.setdefault(row["layout"], []).append(row)
    fig, axes = plt.subplots(1, len(layouts), figsize=(4 * len(layouts), 4), squeeze=False)
    for ax, (layout, rows) in zip(axes[0], layouts.items(), strict=True):
        names = [r["candidate"] for r in rows]
        values = [r["pct_of_floor"] or 0.0 for r in rows]
        colors = ["tab:orange" if n == "torch.fused" else "tab:blue" for n in names]
        ax.barh(names, values, color=colors)
        ax.axvline(100.0, color="black", linewidth=0.8)
        ax.set_title(f"{layout} ({rows[0]['n_params'] / 1e6:.2g}M params)")
        ax.set_xlabel("% of streaming floor (higher is faster)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(argv[1], dpi=120)
    print(f"wrote {argv[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
