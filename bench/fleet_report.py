"""The tables ``nox -s fleet`` prints (Markdown, so docs/cost.md can quote them): no I/O."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import fleet_model as model

Getter = Callable[[dict[str, Any]], Any]

PER_NODE: Sequence[tuple[str, Getter]] = (
    ("probe /readyz", lambda s: s["per_node"]["mean"][model.PROBE]),
    ("PING frames (not requests)", lambda s: s["per_node"]["mean"][model.PING]),
    ("LIST from cache", lambda s: s["per_node"]["mean"][model.LIST_CACHE]),
    ("LIST consistent", lambda s: s["per_node"]["mean"][model.LIST_CONSISTENT]),
    ("WATCH start", lambda s: s["per_node"]["mean"][model.WATCH]),
    ("requests in all", lambda s: s["per_node"]["mean"]["requests"]),
    ("requests, busiest node", lambda s: s["per_node"]["max"]["requests"]),
)
PROJECTED: Sequence[tuple[str, Getter]] = (
    ("requests/s per apiserver", lambda p: p["per_apiserver"]["requests"]),
    ("PINGs/s per apiserver", lambda p: p["per_apiserver"][model.PING]),
    ("WATCH starts/s (cluster)", lambda p: p["watch_starts_per_s"]),
    ("etcd reads/s (cluster)", lambda p: p["etcd_reads_per_s"]),
)
HERD: Sequence[tuple[str, Getter]] = (
    ("kaps that re-listed or re-watched", lambda h: h["count"]),
    ("min", lambda h: h["min"]),
    ("median", lambda h: h["median"]),
    ("p90", lambda h: h["p90"]),
    ("max", lambda h: h["max"]),
    ("spread (max - min)", lambda h: h["spread"]),
    ("re-lists from cache", lambda h: h["requests"][model.LIST_CACHE]),
    ("re-lists consistent", lambda h: h["requests"][model.LIST_CONSISTENT]),
    ("re-watches", lambda h: h["requests"][model.WATCH]),
)


def _number(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else format(value, fmt)


def _table(columns: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]) -> str:
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines) + "\n"


def table(result: dict[str, Any]) -> str:
    """Per node, projected, herd, budgets: what docs/cost.md quotes."""
    settings = result["settings"]
    names = list(settings)
    runs = [settings[n] for n in names]
    per_node = [(label, [_number(get(s), ".4f") for s in runs]) for label, get in PER_NODE]
    projections = [result["original_model"], *(s["projection"] for s in runs)]
    projected = [
        (label, [_number(get(p), ",.1f") for p in projections]) for label, get in PROJECTED
    ]
    herd = [(label, [_number(get(s["herd"]), ".2f") for s in runs]) for label, get in HERD]
    budgets = []
    for name, s in zip(names, runs, strict=True):
        b = s["budget"]
        verdict = "holds" if b["holds"] else "FAILS: " + "; ".join(b["problems"])
        budgets.append(f"- {name}: at most {b['limit']} requests/s per node: {verdict}\n")
    return "".join(
        [
            f"Per node, requests/s (mean over {result['kaps']} kaps, {result['seconds']:g} s):\n\n",
            _table(names, per_node),
            f"\nProjected to {model.NODES:,} nodes x {model.APISERVERS} apiservers"
            " (kap before: the original design, modelled):\n\n",
            _table(["kap before", *names], projected),
            "\nHerd after one apiserver restart (seconds after it stopped, "
            f"{result['herd_seconds']:g} s window):\n\n",
            _table(names, herd),
            "\nBudgets (steady state, mean per node):\n\n",
            *budgets,
        ]
    )
