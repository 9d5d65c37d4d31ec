"""bench/chart.py's data shaping: what each bar of the bench's chart shows.

The rendering itself needs matplotlib, which only the bench installs
(``nox -s bench`` runs ``bench/chart.py --check`` before benchmarking); these
tests check what goes into the bars, with no plotting library.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

CHART = Path(__file__).resolve().parent.parent / "bench" / "chart.py"


@pytest.fixture(scope="module")
def chart() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_chart", CHART)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # attrs resolves the module's annotations through it
    spec.loader.exec_module(module)
    return module


def by_title(chart: ModuleType, results: dict[str, Any]) -> dict[str, Any]:
    return {p.title: p for p in chart.panels(results)}


def test_each_bar_is_the_median_of_the_rounds_with_their_spread(chart: ModuleType) -> None:
    shown = by_title(chart, chart.sample_results())
    bulk = shown["bulk up, Gbit/s"]
    assert [b.proxy for b in bulk.bars] == ["none", "kap", "haproxy"]
    kap = bulk.bars[1]
    assert (kap.median, kap.low, kap.high) == (13.5, 13.0, 14.0)


def test_a_proxy_without_a_figure_has_no_bar(chart: ModuleType) -> None:
    # No proxy has no CPU of its own: the CPU panel shows kap and haproxy only.
    cpu = by_title(chart, chart.sample_results())["bulk up, proxy CPU s/GB"]
    assert [b.proxy for b in cpu.bars] == ["kap", "haproxy"]


def test_added_latency_is_per_round_against_no_proxy(chart: ModuleType) -> None:
    lat = by_title(chart, chart.sample_results())["added latency p50, quiet conn, us"]
    # Rounds: kap 146-45 = 101 and 150-47 = 103; haproxy 28 and 30.
    assert [(b.proxy, b.median, b.low, b.high) for b in lat.bars] == [
        ("kap", 102.0, 101.0, 103.0),
        ("haproxy", 29.0, 28.0, 30.0),
    ]


def test_start_up_and_memory_come_in_their_units(chart: ModuleType) -> None:
    shown = by_title(chart, chart.sample_results())
    start = shown["start to serving, ms"].bars
    assert start[0].proxy == "kap"
    assert start[0].median == pytest.approx(435.0)
    assert shown["user-space bytes per idle conn"].bars[0].median == 4089.0


def test_figures_missing_from_a_partial_run_are_left_out(chart: ModuleType) -> None:
    results = {"rounds": {"rps": {"kap": [{"rps": 37400.0, "cpu_us_per_req": None}]}}}
    assert [p.title for p in chart.panels(results)] == ["requests/s (50 conns), thousands"]
    assert chart.panels({}) == []
