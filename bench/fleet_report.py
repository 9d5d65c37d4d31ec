"""The tables ``nox -s fleet`` prints (Markdown, so docs/cost.md can quote them): no I/O."""

from __future__ import annotations

from typing import Any

import fleet_model as model

PENDING = "pending h2probe"  # what the fleet column says while kap lacks --readiness-interval

ROWS = (
    ("probe /readyz", model.PROBE),
    ("PING frames (not requests)", model.PING),
    ("LIST from cache", model.LIST_CACHE),
    ("LIST consistent", model.LIST_CONSISTENT),
    ("WATCH start", model.WATCH),
    ("requests in all", "requests"),
)


def cell(setting: dict[str, Any], fmt: str, get: Any) -> str:
    if setting.get("status") != "ran":
        return str(setting.get("status"))
    return format(get(setting), fmt)


def table(result: dict[str, Any]) -> str:
    """Markdown tables docs/cost.md quotes."""
    settings = result["settings"]
    names = list(settings)
    head = "| | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
    out = [f"Per node, requests/s (mean over {result['kaps']} kaps, {result['seconds']:g} s):\n"]
    out.append(head)
    for label, key in ROWS:
        cells = [cell(settings[n], ".4f", lambda s, k=key: s["per_node"]["mean"][k]) for n in names]
        out.append(f"| {label} | " + " | ".join(cells) + " |\n")
    cells = [cell(settings[n], ".4f", lambda s: s["per_node"]["max"]["requests"]) for n in names]
    out.append("| requests, busiest node | " + " | ".join(cells) + " |\n")
    out.append(f"\nProjected to {model.NODES:,} nodes x {model.APISERVERS} apiservers:\n\n")
    out.append(head)
    projections = [
        ("requests/s per apiserver", lambda s: s["projection"]["per_apiserver"]["requests"]),
        ("PINGs/s per apiserver", lambda s: s["projection"]["per_apiserver"][model.PING]),
        ("WATCH starts/s (cluster)", lambda s: s["projection"]["watch_starts_per_s"]),
        ("etcd reads/s (cluster)", lambda s: s["projection"]["etcd_reads_per_s"]),
    ]
    for label, get in projections:
        out.append(
            f"| {label} | " + " | ".join(cell(settings[n], ",.1f", get) for n in names) + " |\n"
        )
    out.append(
        "\nHerd after one apiserver restart (seconds after it stopped, "
        f"{result['herd_seconds']:g} s window):\n\n"
    )
    out.append(head)
    for label, key in (
        ("kaps that re-listed or re-watched", "count"),
        ("min", "min"),
        ("median", "median"),
        ("p90", "p90"),
        ("max", "max"),
        ("spread (max - min)", "spread"),
    ):
        fmt = "d" if key == "count" else ".2f"
        cells = [
            cell(
                settings[n],
                "",
                lambda s, k=key, f=fmt: "-" if s["herd"][k] is None else format(s["herd"][k], f),
            )
            for n in names
        ]
        out.append(f"| {label} | " + " | ".join(cells) + " |\n")
    herd_requests = [
        ("re-lists from cache", model.LIST_CACHE),
        ("re-lists consistent", model.LIST_CONSISTENT),
        ("re-watches", model.WATCH),
    ]
    for label, key in herd_requests:
        cells = [cell(settings[n], "d", lambda s, k=key: s["herd"]["requests"][k]) for n in names]
        out.append(f"| {label} | " + " | ".join(cells) + " |\n")
    out.append("\nBudgets (steady state, mean per node):\n\n")
    for n in names:
        s = settings[n]
        if s.get("status") != "ran":
            out.append(f"- {n}: {s.get('status')}\n")
            continue
        b = s["budget"]
        verdict = "holds" if b["holds"] else "FAILS: " + "; ".join(b["problems"])
        out.append(f"- {n}: at most {b['limit']} requests/s per node: {verdict}\n")
    return "".join(out)
