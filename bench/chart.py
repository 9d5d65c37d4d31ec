"""The bench's picture: one small bar chart per figure, none / kap / haproxy side by side.

``bench/run.py`` calls :func:`draw` after writing its JSON and saves the PNG
next to it; ``python bench/chart.py results.json`` draws it again from a saved
run. Each bar is the median of the rounds and its whisker the spread (lowest
to highest round), so a reader sees both the comparison and how much the
rounds agreed before reading the table.

The data shaping (:func:`panels`) needs no plotting library and is what
tests/test_bench_chart.py checks; only :func:`draw` imports matplotlib (the
``bench`` extra, which ``nox -s bench`` installs). ``--check`` renders a
chart from a small made-up result into a temporary file and checks it is a
PNG: the bench session runs it first, so a broken plotting install shows
before minutes of benchmarking.

Usage: python bench/chart.py RESULTS.json [--out PNG] | --check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs

# Proxies in the order (and colours) the bars are drawn.
PROXIES = ("none", "kap", "haproxy")
COLOURS = {"none": "#9e9e9e", "kap": "#1f77b4", "haproxy": "#ff7f0e"}

# (title, test, key, scale): figures with one value per round.
ROUND_FIGURES: tuple[tuple[str, str, str, float], ...] = (
    ("bulk up, Gbit/s", "bulk", "up_gbps", 1),
    ("bulk up, proxy CPU s/GB", "bulk", "up_cpu_s_per_gb", 1),
    ("requests/s (50 conns), thousands", "rps", "rps", 1e-3),
    ("CPU per request, us", "rps", "cpu_us_per_req", 1),
    ("new connections/s", "churn", "conn_per_s", 1),
    ("CPU per connection, us", "churn", "cpu_us_per_conn", 1),
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@attrs.frozen
class Bar:
    proxy: str
    median: float
    low: float
    high: float


@attrs.frozen
class Panel:
    title: str
    bars: tuple[Bar, ...]


def _bar(proxy: str, values: list[float]) -> Bar | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return Bar(proxy, statistics.median(values), min(values), max(values))


def panels(results: dict[str, Any]) -> list[Panel]:
    """The chart's data: per figure, a bar per proxy that has values, in PROXIES order.

    Figures with no value for any proxy are left out. Added latency is the
    proxy's round trip minus no proxy's in the same round (as in the table);
    start-up has one value per start; memory one value per run.
    """
    rounds = results.get("rounds", {})
    out: list[Panel] = []

    def add(title: str, per_proxy: dict[str, list[float]]) -> None:
        bars = [_bar(p, per_proxy[p]) for p in PROXIES if p in per_proxy]
        kept = tuple(b for b in bars if b is not None)
        if kept:
            out.append(Panel(title, kept))

    for title, test, key, scale in ROUND_FIGURES:
        by = rounds.get(test, {})
        add(title, {p: [r[key] * scale for r in by[p] if r.get(key) is not None] for p in by})
    lat = rounds.get("lat", {})
    if "none" in lat:
        base = lat["none"]
        added = {
            p: [a["p50_us"] - b["p50_us"] for a, b in zip(lat[p], base, strict=False)]
            for p in lat
            if p != "none"
        }
        add("added latency p50, quiet conn, us", added)
    mem = results.get("mem", {})
    add("user-space bytes per idle conn", {p: [m["bytes_per_conn"]] for p, m in mem.items()})
    starts = results.get("start_s", {})
    add("start to serving, ms", {p: [s * 1e3 for s in v] for p, v in starts.items()})
    return out


def draw(results: dict[str, Any], path: Path) -> Path:
    """Render :func:`panels` of ``results`` into a PNG at ``path``."""
    # Imported here: the bench extra only; panels() works without it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = panels(results)
    if not shown:
        raise ValueError("nothing to draw: no figures in these results")
    cols = 3
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, shown, strict=False):
        names = [b.proxy for b in panel.bars]
        medians = [b.median for b in panel.bars]
        spread = [
            [b.median - b.low for b in panel.bars],
            [b.high - b.median for b in panel.bars],
        ]
        ax.bar(
            names,
            medians,
            yerr=spread,
            capsize=4,
            color=[COLOURS.get(n, "#555555") for n in names],
        )
        ax.set_title(panel.title, fontsize=10)
        ax.tick_params(labelsize=9)
        for i, bar in enumerate(panel.bars):
            label = f"{bar.median:,.0f}" if bar.median >= 100 else f"{bar.median:.3g}"
            ax.annotate(
                label,
                (i, bar.high),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.margins(y=0.15)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.suptitle("kap / haproxy / no proxy: median of the rounds, whiskers lowest-highest")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sample_results() -> dict[str, Any]:
    """A small made-up result in bench/run.py's shape (for --check and the tests)."""
    return {
        "rounds": {
            "bulk": {
                "none": [{"up_gbps": 30.0}, {"up_gbps": 31.0}],
                "kap": [
                    {"up_gbps": 13.0, "up_cpu_s_per_gb": 0.30},
                    {"up_gbps": 14.0, "up_cpu_s_per_gb": 0.32},
                ],
                "haproxy": [
                    {"up_gbps": 7.0, "up_cpu_s_per_gb": 1.0},
                    {"up_gbps": 6.8, "up_cpu_s_per_gb": 1.1},
                ],
            },
            "lat": {
                "none": [{"p50_us": 45.0}, {"p50_us": 47.0}],
                "kap": [{"p50_us": 146.0}, {"p50_us": 150.0}],
                "haproxy": [{"p50_us": 73.0}, {"p50_us": 77.0}],
            },
        },
        "mem": {"kap": {"bytes_per_conn": 4089.0}, "haproxy": {"bytes_per_conn": 3382.0}},
        "start_s": {"kap": [0.42, 0.45], "haproxy": [0.05, 0.06]},
    }


def check() -> None:
    """Render :func:`sample_results` and check the file is a PNG (see the docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = draw(sample_results(), Path(tmp) / "chart.png")
        head = path.read_bytes()[:8]
    if head != PNG_SIGNATURE:
        sys.exit(f"chart check: {path.name} is not a PNG")
    print("chart check: ok")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", type=Path, help="a JSON file written by bench/run.py")
    ap.add_argument("--out", type=Path, help="default: the JSON's path with .png")
    ap.add_argument("--check", action="store_true", help="render a made-up result, check the PNG")
    args = ap.parse_args()
    if args.check:
        check()
        return
    if args.results is None:
        ap.error("give a results JSON, or --check")
    try:
        results = json.loads(args.results.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"chart: cannot read {args.results}: {e}")
    print(draw(results, args.out or args.results.with_suffix(".png")))


if __name__ == "__main__":
    main()
